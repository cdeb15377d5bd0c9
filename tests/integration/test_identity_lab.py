"""Identity between two real tunnels (root, netns lab): Istio plug-in CA material,
certificate chains on the wire, and the trust domain check on :15008.

The module's lab signs with plug-in CA material generated like Istio's
``samples/certs`` (``tests/istio_like_certs.py``, same layout: root, intermediate,
chain; RSA, an intermediate without a subject key identifier, no SPIFFE URI SAN);
another lab signs with EC material made
with openssl the way istio ``tools/certs/common.mk`` makes it, one level deeper
(root -> intermediate -> sub-intermediate). Peers trust only ``root-cert.pem``, so
every handshake that works shows the chain was sent.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from istio_like_certs import istio_samples_dir
from labkit import (
    Lab,
    LabFactory,
    LabSpec,
    log_events,
    mark,
    program,
    run_in,
    until,
    wait_entry,
)
from labkit import addr as _fmt

from agent.identity.ca import MeshCA, WorkloadCert, load_ca
from agent.identity.spiffe import SpiffeId

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(240)]

SAMPLES = istio_samples_dir()  # generated like istio samples/certs (tests/istio_like_certs.py)
LAB = LabSpec(letter="i", ca_from=str(SAMPLES))
TRUST_DOMAIN = "cluster.local"
ECHO_PORT = 7070
HBONE_PORT = 15008
SA_A = SpiffeId(TRUST_DOMAIN, "default", "sa-a")


def _start_echo(lab: Lab) -> None:
    lab.background.start(lab.ns("n2-a"), "echo-n2-a",
                         [*program("peer_echo_server"), str(ECHO_PORT)], ready_line="ready")


def _echo_over_hbone(lab: Lab) -> dict[str, Any]:
    """n1-a -> n2-a through both tunnels; the inbound record, once the mesh carries it."""
    a1, a2 = lab.pod("n1-a"), lab.pod("n2-a")

    def attempt() -> dict[str, Any] | None:
        since = mark(lab)
        out = run_in(lab.ns("n1-a"), [*program("echo_client"), str(a2.ipv4), str(ECHO_PORT),
                                      "ping"])
        result = json.loads(out.stdout)
        if result["error"] is not None or not result["echo_ok"]:
            return None
        record = wait_entry(lab, "node2", since, "inbound echo", direction="inbound",
                            dst=_fmt(str(a2.ipv4), ECHO_PORT))
        # before both tunnels know the pods, a connection may pass in plaintext
        return record if record["path"] == "hbone" and \
            record["src_identity"] == SA_A.uri and str(a1.ipv4) in record["src"] else None

    return until("an echo n1-a -> n2-a over HBONE", attempt)


def _files(tmp_path: Path, name: str, cert_pem: bytes, key_pem: bytes) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    crt, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    crt.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    key.chmod(0o600)
    return {"cert": str(crt), "key": str(key)}


def _h2_connect(lab: Lab, files: dict[str, str], trust: Path) -> dict[str, Any]:
    """One CONNECT from node1's netns to n2-a's :15008, trusting only ``trust``."""
    a2 = lab.pod("n2-a")
    cfg = {**files, "trust": str(trust), "host": str(a2.ipv4), "port": HBONE_PORT,
           "authority": _fmt(str(a2.ipv4), ECHO_PORT), "send": "hello"}
    out = run_in(lab.ns("node1"), [*program("h2_connect_client"), json.dumps(cfg)])
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture(scope="module")
def lab(mesh_lab: Lab) -> Lab:
    _start_echo(mesh_lab)
    return mesh_lab


def test_tunnels_signing_with_istio_sample_ca_carry_traffic(lab: Lab, tmp_path: Path) -> None:
    record = _echo_over_hbone(lab)
    assert record["result"] == "ok", record
    # node2's tunnel presents leaf + the plug-in intermediate: a client trusting only
    # the sample root-cert.pem verifies it; it accepts our client leaf + chain.
    ca = load_ca(Path(lab.run_dir) / "ca", TRUST_DOMAIN)
    issued = ca.issue(SA_A)
    ok = _h2_connect(lab, _files(tmp_path, "chain", issued.full_chain_pem, issued.key_pem),
                     SAMPLES / "root-cert.pem")
    assert ok["handshake"] and ok["status"] == 200 and ok["error"] is None, ok
    assert ok["data"].endswith("\nhello"), ok
    # the same leaf without its chain cannot be verified by the tunnel
    since = mark(lab)
    bare = _h2_connect(lab, _files(tmp_path, "bare", issued.cert_pem, issued.key_pem),
                       SAMPLES / "root-cert.pem")
    assert bare["status"] is None and bare["data"] == "", bare
    failed = until("node2 logs the failed handshake", lambda: [
        e for e in log_events(lab, "node2", since["node2"])
        if e.get("event") == "HBONE TLS handshake failed"])
    assert "certificate" in failed[0]["reason"].lower(), failed


def _leaf_of_domain(ca: MeshCA, uri: str) -> tuple[bytes, bytes]:
    """A leaf for ``uri`` signed by the lab's CA (which issue() refuses for other domains)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + ca.chain_pem, key_pem


def test_other_trust_domain_signed_by_the_mesh_ca_is_refused(lab: Lab, tmp_path: Path) -> None:
    """Issue 11 item 2: such a certificate was accepted and logged under its identity."""
    evil_uri = "spiffe://evil.example/ns/default/sa/sa-a"
    cert_pem, key_pem = _leaf_of_domain(load_ca(Path(lab.run_dir) / "ca", TRUST_DOMAIN),
                                        evil_uri)
    since = mark(lab)
    refused = _h2_connect(lab, _files(tmp_path, "evil", cert_pem, key_pem),
                          SAMPLES / "root-cert.pem")
    assert refused["handshake"], refused  # the chain is good ...
    assert refused["status"] is None and refused["data"] == "", refused  # ... the domain not
    logged = until("node2 logs the refused identity", lambda: [
        e for e in log_events(lab, "node2", since["node2"])
        if e.get("event") == "hbone connection refused"])
    assert "outside trust domain 'cluster.local'" in logged[0]["error"], logged
    assert not [e for e in log_events(lab, "node2", since["node2"])
                if e.get("src_identity") == evil_uri]
    _echo_over_hbone(lab)  # and the listener keeps serving the mesh


# -- EC material made with openssl as istio tools/certs does, two intermediates -----------

_ROOT_EXT = """[ req ]
prompt = no
distinguished_name = dn
x509_extensions = ext
[ dn ]
O = Istio
CN = Root CA
[ ext ]
subjectKeyIdentifier = hash
basicConstraints = critical, CA:true
keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign
"""

_CA_EXT = """[ ext ]
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
basicConstraints = critical, CA:true, pathlen:{pathlen}
keyUsage = critical, digitalSignature, nonRepudiation, keyEncipherment, keyCertSign
subjectAltName = DNS:istiod.istio-system.svc
"""


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


def _openssl_cacerts(directory: Path) -> Path:
    """root-cert.pem, ca-cert.pem, ca-key.pem, cert-chain.pem (sub, intermediate, root)."""
    directory.mkdir(parents=True)
    (directory / "root.conf").write_text(_ROOT_EXT)
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "root-key.pem",
             cwd=directory)
    _openssl("req", "-new", "-x509", "-sha256", "-days", "30", "-key", "root-key.pem",
             "-config", "root.conf", "-out", "root-cert.pem", cwd=directory)
    issuer = ("root-cert.pem", "root-key.pem")
    for name, pathlen in (("intermediate", 1), ("ca", 0)):
        (directory / f"{name}.conf").write_text(_CA_EXT.format(pathlen=pathlen))
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                 f"{name}-key.pem", cwd=directory)
        _openssl("req", "-new", "-sha256", "-key", f"{name}-key.pem", "-subj",
                 f"/O=Istio/CN={name} CA/L=cluster1", "-out", f"{name}.csr", cwd=directory)
        _openssl("x509", "-req", "-sha256", "-days", "30", "-in", f"{name}.csr", "-CA",
                 issuer[0], "-CAkey", issuer[1], "-CAcreateserial", "-extfile",
                 f"{name}.conf", "-extensions", "ext", "-out", f"{name}-cert.pem",
                 cwd=directory)
        issuer = (f"{name}-cert.pem", f"{name}-key.pem")
    (directory / "cert-chain.pem").write_bytes(b"".join(
        (directory / f).read_bytes() for f in ("ca-cert.pem", "intermediate-cert.pem",
                                               "root-cert.pem")))
    return directory


def test_tunnels_signing_with_ec_material_two_intermediates(lab_factory: LabFactory,
                                                            tmp_path: Path) -> None:
    cacerts = _openssl_cacerts(tmp_path / "cacerts")
    with lab_factory(ca_from=str(cacerts)) as ec_lab:
        _start_echo(ec_lab)
        assert _echo_over_hbone(ec_lab)["result"] == "ok"
        issued: WorkloadCert = load_ca(Path(ec_lab.run_dir) / "ca", TRUST_DOMAIN).issue(SA_A)
        assert len(x509.load_pem_x509_certificates(issued.full_chain_pem)) == 3
        ok = _h2_connect(ec_lab, _files(tmp_path, "ec", issued.full_chain_pem,
                                        issued.key_pem), cacerts / "root-cert.pem")
        assert ok["handshake"] and ok["status"] == 200, ok
