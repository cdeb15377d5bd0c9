"""Kubernetes in the namespace lab (root): ``lab up --kube``, real kernel, real kubectl.

The lab API server (agent.kubelab) runs on node1 with the lab's nodes, namespaces and
pods; both agents watch it. Nothing is enrolled by the lab: Istio's labels, set with
kubectl, decide.

* ``kubectl label namespace default istio.io/dataplane-mode=ambient`` enrolls its
  pods in the kernel on both nodes (registry, our tc filter on the host veth, the
  ``ambient.istio.io/redirection`` annotation), and cross-node traffic goes over HBONE
  with each tunnel's model learned from the API server only (no peer files, no shared
  model file), including the Service ``web.team-b`` (VIP, v4 and v6) from its
  Service and EndpointSlices;
* a pod labelled ``istio.io/dataplane-mode=none`` is unenrolled (filter gone,
  annotation removed); removing the namespace label unenrolls the rest;
* ``ambient.istio.io/dns-capture``: "false" opts out, "true" in, anything else is
  ignored (the node default);
* the API server stopped: nothing in the datapath changes and traffic still flows;
  started again (objects restored, older watches 410), a label set then is acted on.

Behaviour only, never timings; every wait is bounded (10 s); the lab is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from labkit import (
    TC_HANDLE,
    TC_PREF,
    Lab,
    LabSpec,
    kube_lab_up,
    lab_up,
    program,
    run_in,
    running,
    until,
)

from agent.lab import kube
from agent.model.loader import load_model_text
from agent.model.types import InboundProtocol

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="k", mode="hbone")
ECHO_PORT = 18090
WAIT = 10.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with kube_lab_up(LAB, tmp_path_factory.mktemp("lab-k8s")) as lab:
        yield lab


def kubectl(lab: Lab, *args: str) -> str:
    out = subprocess.run(kube.kubectl_argv(lab.plan, *args), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
    return out.stdout


def enrolled(lab: Lab, node: str) -> dict[str, dict[str, Any]]:
    return {f"{p['namespace']}/{p['name']}": p for p in lab.api(node, {"op": "pod_list"})}


def our_filter(lab: Lab, pod: str) -> bool:
    p = lab.pod(pod)
    out = run_in(lab.ns(p.node), ["tc", "filter", "show", "dev", p.host_ifname, "ingress"])
    return TC_PREF in out.stdout and TC_HANDLE in out.stdout


def annotation(lab: Lab, namespace: str, pod: str) -> str | None:
    raw = kubectl(lab, "get", "pod", "-n", namespace, pod, "-o", "json")
    annotations: dict[str, str] = json.loads(raw)["metadata"].get("annotations") or {}
    return annotations.get("ambient.istio.io/redirection")


def wait_enrolled(lab: Lab, want: dict[str, set[str]]) -> None:
    """Each node's registry holds exactly ``want[node]`` (namespace/name)."""
    for node, keys in want.items():
        def exact(n: str = node, k: set[str] = keys) -> bool:
            return set(enrolled(lab, n)) == k
        until(f"{node} enrolls exactly {sorted(keys)}", exact, WAIT)


def log_events(lab: Lab, node: str) -> list[dict[str, Any]]:
    out = []
    for line in lab.tunnel_log(node).read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def echo(lab: Lab, src: str, dst_ip: str) -> dict[str, Any]:
    out = run_in(lab.ns(src), [*program("echo_client"), dst_ip, str(ECHO_PORT), "k8s"])
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def tunnel_entries(lab: Lab, node: str, dst: str) -> list[dict[str, Any]]:
    entries = []
    for line in lab.tunnel_log(node).read_text().splitlines():
        with_dst = f'"dst": "{dst}"'
        if with_dst in line:
            entries.append(json.loads(line))
    return entries


@pytest.fixture(scope="module")
def echo_server(lab: Lab) -> None:
    lab.background.start(lab.ns("n2-a"), "echo-n2-a",
                         [*program("peer_echo_server"), str(ECHO_PORT)], ready_line="ready")


def test_namespace_label_enrolls_pods_and_hbone_uses_the_api_model(
        lab: Lab, echo_server: None) -> None:
    wait_enrolled(lab, {"node1": set(), "node2": set()})  # nothing before the label
    kubectl(lab, "label", "namespace", "default", "istio.io/dataplane-mode=ambient")
    # n1-plain/n2-plain are in default too but carry istio.io/dataplane-mode=none
    wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": {"default/n2-a"}})
    assert our_filter(lab, "n1-a") and our_filter(lab, "n2-a")
    assert not our_filter(lab, "n1-b") and not our_filter(lab, "n1-plain")
    until("the redirection annotation is set",
          lambda: annotation(lab, "default", "n2-a") == "enabled" or None, WAIT)
    assert enrolled(lab, "node1")["default/n1-a"]["uid"]  # from the API

    # The tunnels know each other's pods only from the API server.
    raw = Path(f"/proc/{lab.tunnel_pid('node1')}/environ").read_bytes()
    env = dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)
    assert env["MESHAGENT_TUNNEL_PEER_WORKLOADS"] == ""
    assert env["MESHAGENT_TUNNEL_MODEL_FILE"] == str(lab.node_dir("node1") / "model.yaml")
    assert not (Path(lab.run_dir) / "model.yaml").exists()
    a2 = lab.pod("n2-a")
    model = lab.node_dir("node1") / "model.yaml"
    until("node1's model (from the API) has n2-a as HBONE",
          lambda: any(w.name == "n2-a" and w.node == "node2"
                      and w.protocol is InboundProtocol.HBONE
                      for w in load_model_text(model.read_text()).workloads) or None, WAIT)
    written = model.stat().st_mtime
    until("node1's tunnel loaded that model", lambda: any(
        e.get("event") == "model loaded" and e.get("path") == str(model)
        and datetime.fromisoformat(e["timestamp"]).timestamp() >= written - 0.001
        for e in log_events(lab, "node1")) or None, WAIT)
    result = echo(lab, "n1-a", a2.ipv4)
    assert result["echo_ok"] and result["peer"] == lab.pod("n1-a").ipv4, result
    dst = f"{a2.ipv4}:{ECHO_PORT}"
    until("node1's tunnel logged the connection",
          lambda: tunnel_entries(lab, "node1", dst) or None, WAIT)
    out = tunnel_entries(lab, "node1", dst)[-1]
    assert (out["direction"], out["path"], out["result"]) == ("outbound", "hbone", "ok"), out
    inb = tunnel_entries(lab, "node2", dst)[-1]
    assert (inb["direction"], inb["path"]) == ("inbound", "hbone"), inb

    # ... and every Service: web.team-b's VIP from the API's Service + EndpointSlices
    for pod in ("n1-b", "n2-b"):
        lab.background.start(lab.ns(pod), f"web-{pod}",
                             [*program("peer_echo_server"), str(kube.SERVICE_TARGET_PORT)],
                             ready_line="ready")
    for vip in (kube.SERVICE_VIPS[0], f"[{kube.SERVICE_VIPS[1]}]"):
        proc = run_in(lab.ns("n1-a"), [*program("echo_client"), vip.strip("[]"),
                                        str(kube.SERVICE_PORT), "svc"])
        result = json.loads(proc.stdout)
        assert result["echo_ok"], result
    until("node1's tunnel logged connections to the Service",
          lambda: [e for e in (json.loads(line) for line in
                               lab.tunnel_log("node1").read_text().splitlines()
                               if kube.SERVICE_HOSTNAME in line)
                   if e.get("service") == kube.SERVICE_HOSTNAME] or None, WAIT)

    status = lab.api("node1", {"op": "status"})["kubernetes"]
    assert status["synced"] and status["node"] == "node1"
    rows = {p["pod"]: p for p in status["pods"]}
    assert rows["default/n1-a"]["enrolled"] and not rows["default/n1-plain"]["enrolled"]


def test_pod_opt_out_and_namespace_unlabel_unenroll(lab: Lab) -> None:
    kubectl(lab, "label", "--overwrite", "namespace", "default",
            "istio.io/dataplane-mode=ambient")
    wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": {"default/n2-a"}})
    kubectl(lab, "label", "pod", "-n", "default", "n2-a", "istio.io/dataplane-mode=none")
    wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": set()})
    assert not our_filter(lab, "n2-a") and our_filter(lab, "n1-a")
    until("n2-a's redirection annotation is removed",
          lambda: annotation(lab, "default", "n2-a") is None or None, WAIT)
    kubectl(lab, "label", "pod", "-n", "default", "n2-a", "istio.io/dataplane-mode-")
    wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": {"default/n2-a"}})
    kubectl(lab, "label", "namespace", "default", "istio.io/dataplane-mode-")
    wait_enrolled(lab, {"node1": set(), "node2": set()})
    assert not our_filter(lab, "n1-a") and not our_filter(lab, "n2-a")


def test_dns_capture_annotation(lab: Lab) -> None:
    for pod, value in (("n1-b", "false"), ("n2-b", "true")):
        kubectl(lab, "annotate", "--overwrite", "pod", "-n", "team-b", pod,
                f"ambient.istio.io/dns-capture={value}")
    kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode=ambient")
    wait_enrolled(lab, {"node1": {"team-b/n1-b"}, "node2": {"team-b/n2-b"}})
    assert enrolled(lab, "node1")["team-b/n1-b"]["dns_capture"] is False
    assert enrolled(lab, "node2")["team-b/n2-b"]["dns_capture"] is True
    kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode-")
    wait_enrolled(lab, {"node1": set(), "node2": set()})
    kubectl(lab, "annotate", "--overwrite", "pod", "-n", "team-b", "n1-b",
            "ambient.istio.io/dns-capture=perhaps")  # not a boolean: ignored
    kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode=ambient")
    wait_enrolled(lab, {"node1": {"team-b/n1-b"}, "node2": {"team-b/n2-b"}})
    assert enrolled(lab, "node1")["team-b/n1-b"]["dns_capture"] is None
    kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode-")
    wait_enrolled(lab, {"node1": set(), "node2": set()})


def test_api_server_away_changes_nothing_and_is_caught_up_with(
        lab: Lab, echo_server: None) -> None:
    kubectl(lab, "label", "--overwrite", "namespace", "default",
            "istio.io/dataplane-mode=ambient")
    wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": {"default/n2-a"}})
    before = {n: enrolled(lab, n) for n in ("node1", "node2")}
    pid = lab.pid("node1", kube.PROCESS)
    os.kill(pid, signal.SIGTERM)
    until("the lab API server stopped and saved its objects",
          lambda: (not running(pid) and kube.state_path(lab.plan).exists()) or None, WAIT)
    until("node2's agent sees its watches fail",
          lambda: any(w["failure"] for w in
                      lab.api("node2", {"op": "status"})["kubernetes"]["watches"].values())
          or None, WAIT)
    for node, pods in before.items():
        now = enrolled(lab, node)
        assert {k: p["host_ifindex"] for k, p in now.items()} == \
            {k: p["host_ifindex"] for k, p in pods.items()}
    assert our_filter(lab, "n1-a") and our_filter(lab, "n2-a")
    result = echo(lab, "n1-a", lab.pod("n2-a").ipv4)
    assert result["echo_ok"], result

    kube.start_api_server(lab.plan)  # restores the saved objects
    kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode=ambient")
    wait_enrolled(lab, {"node1": {"default/n1-a", "team-b/n1-b"},
                        "node2": {"default/n2-a", "team-b/n2-b"}})
    assert enrolled(lab, "node1")["default/n1-a"]["host_ifindex"] == \
        before["node1"]["default/n1-a"]["host_ifindex"]
    for ns in ("default", "team-b"):
        kubectl(lab, "label", "namespace", ns, "istio.io/dataplane-mode-")
    wait_enrolled(lab, {"node1": set(), "node2": set()})


def test_cni_and_watch_agree_on_every_pod(tmp_path: Path) -> None:
    """``lab up --kube --pods cni`` with ``default`` labelled from the start: the CNI
    plugin asks the agent (pod_verdict) and enrolls n1-a/n2-a in ADD, before their first
    packet; the watch then only annotates; for every pod the registry and the watch's
    verdict agree. A pod the CNI passed through (team-b) is enrolled by the watch when
    its namespace is labelled (its netns found from its IP)."""
    env = {kube.KUBE_ENV: "1", kube.AMBIENT_ENV: "default"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with lab_up(LAB, tmp_path, "cni") as lab:
            for k in env:
                os.environ.pop(k)
            for node in ("node1", "node2"):
                log = Path(lab.run_dir) / node / "cni.log"
                lines = [json.loads(line) for line in
                         Path(cni_log(lab, node)).read_text().splitlines()]
                n = node[-1]
                assert any(e["event"] == "pod enrolled" and e.get("pod") == f"default/n{n}-a"
                           for e in lines), log
                assert any(e["event"].startswith("pod passed through: Istio")
                           and e.get("pod") == f"team-b/n{n}-b" for e in lines), log

            def agree() -> bool:
                for node in ("node1", "node2"):
                    status = lab.api(node, {"op": "status"})["kubernetes"]
                    registry = set(enrolled(lab, node))
                    for row in status["pods"]:
                        if (row["pod"] in registry) != row["enrolled"] or \
                                (row["verdict"] == "enroll") != row["enrolled"]:
                            return False
                return True
            until("the CNI's enrollments and the watch's verdicts agree", agree, WAIT)
            wait_enrolled(lab, {"node1": {"default/n1-a"}, "node2": {"default/n2-a"}})
            until("n1-a is annotated",
                  lambda: annotation(lab, "default", "n1-a") == "enabled" or None, WAIT)
            kubectl(lab, "label", "namespace", "team-b", "istio.io/dataplane-mode=ambient")
            wait_enrolled(lab, {"node1": {"default/n1-a", "team-b/n1-b"},
                                "node2": {"default/n2-a", "team-b/n2-b"}})
            until("the CNI's enrollments and the watch's verdicts agree", agree, WAIT)
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def cni_log(lab: Lab, node: str) -> str:
    from agent.lab.cnipods import plugin_log_path

    return plugin_log_path(lab.plan, node)
