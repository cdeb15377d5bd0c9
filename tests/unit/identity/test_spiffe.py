"""SPIFFE ID parsing and formatting (spiffe/spiffe standards/SPIFFE-ID.md 2.1-2.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.spiffe import (
    MAX_URI_BYTES,
    SpiffeId,
    SpiffeUri,
    parse_spiffe_id,
    parse_spiffe_uri,
    trust_domain_uri,
)

WEB = SpiffeId("cluster.local", "default", "web")


def test_spiffe_id_round_trip() -> None:
    uri = "spiffe://cluster.local/ns/default/sa/web"
    parsed = parse_spiffe_id(uri)
    assert parsed == WEB
    assert str(parsed) == uri
    assert parsed.principal == "cluster.local/ns/default/sa/web"


@pytest.mark.parametrize("uri", [
    "",
    "http://cluster.local/ns/default/sa/web",
    "SPIFFE://cluster.local/ns/default/sa/web",
    "spiffe://cluster.local/ns/default",
    "spiffe://cluster.local/ns/default/sa/",
    "spiffe://cluster.local/ns//sa/web",
    "spiffe://cluster.local/namespace/default/sa/web",
    "spiffe://cluster.local/ns/default/sa/web/extra",
    "spiffe://Cluster.Local/ns/default/sa/web",
    "spiffe://cluster.local/ns/default/sa/web?x=1",
    "spiffe://cluster.local/ns/default/sa/web#frag",
    "spiffe://cluster.local/ns/../sa/web",
    "spiffe://cluster.local/ns/./sa/web",
    "spiffe:///ns/default/sa/web",
    "spiffe://cluster.local:8443/ns/default/sa/web",
    "spiffe://user@cluster.local/ns/default/sa/web",
    "spiffe://cluster.local/ns/d%41fault/sa/web",
    "spiffe://cluster.local/ns/de fault/sa/web",
    "spiffe://clüster.local/ns/default/sa/web",
])
def test_parse_spiffe_id_rejects_malformed(uri: str) -> None:
    with pytest.raises(ValueError, match="SPIFFE"):
        parse_spiffe_id(uri)


def test_general_spiffe_ids_are_valid_but_name_no_workload() -> None:
    opaque = parse_spiffe_uri("spiffe://example.org/payments/Web-FE_1")
    assert opaque == SpiffeUri("example.org", ("payments", "Web-FE_1"))
    assert opaque.workload() is None
    assert opaque.principal == "example.org/payments/Web-FE_1"
    domain = parse_spiffe_uri("spiffe://example.org")
    assert domain.path == () and str(domain) == trust_domain_uri("example.org")
    with pytest.raises(ValueError, match="SPIFFE"):
        parse_spiffe_id("spiffe://example.org")
    with pytest.raises(ValueError):
        parse_spiffe_uri("spiffe://example.org/")  # trailing slash


def test_length_limits() -> None:
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId("a" * 256, "ns", "sa")
    SpiffeId("a" * 255, "ns", "sa")
    long_path = "spiffe://td/" + "/".join(["x" * 100] * 21)
    assert len(long_path) > MAX_URI_BYTES
    with pytest.raises(ValueError, match="2048"):
        parse_spiffe_uri(long_path)


def test_constructor_validates_parts() -> None:
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId("Evil.Example", "default", "web")
    with pytest.raises(ValueError, match="namespace"):
        SpiffeId("cluster.local", "a/b", "web")
    with pytest.raises(ValueError, match="service account"):
        SpiffeId("cluster.local", "default", "..")


_segment = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=20).filter(
    lambda s: s not in (".", ".."))


@given(td=st.text(alphabet="abc019.-_", min_size=1, max_size=30), ns=_segment, sa=_segment)
def test_format_then_parse_is_identity(td: str, ns: str, sa: str) -> None:
    spiffe_id = SpiffeId(td, ns, sa)
    assert parse_spiffe_id(str(spiffe_id)) == spiffe_id
    assert parse_spiffe_uri(str(spiffe_id)).workload() == spiffe_id
