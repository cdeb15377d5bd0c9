"""Agent and tunnel lifecycle against the real kernel (root, bcc, namespaces).

What a node operator does to a running mesh, and what must hold while it
happens:

1. ``kill -9`` of the agent under load: traffic through HBONE never notices,
   the restarted agent lists the pods again and enrolls new ones;
2. a pod deleted while the agent is down is forgotten on start (registry,
   state file, pinned maps);
3. connections older than an enrollment keep working; unenrolling a pod
   breaks its connections that went through the tunnel (characterised here:
   the pod's next segment goes straight to the peer pod, which never saw that
   4-tuple and answers with a RST);
4. with the tunnel down, enrolled pods fail closed (nothing leaves in clear)
   and recover once it is back; a stopping tunnel drains: a connection in
   flight through it finishes with every byte, and curls across a restart of
   either node's tunnel all succeed (new SYNs in the gap are dropped and
   retransmitted);
5. ``meshagent uninstall`` removes exactly what the agent created, and keeps
   a foreign tc filter (and the clsact qdisc it needs) working;
6. enroll / unenroll / re-enroll round trips, and start / stop / uninstall /
   start of the whole node.

Every test builds its own lab with a random prefix (``l`` + 4 hex digits) and
tears it down in ``finally``, checking that nothing of it is left. Every wait
is bounded; assertions are about behaviour, never about how long it took.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import labkit
import pytest
from labkit import (
    AGENT_ARGV,
    Capture,
    LabFactory,
    LabSpec,
    closed_records,
    links,
    our_filters,
    qdiscs,
    run_in,
    running,
    spawned,
    sysctl,
    tc_filters,
    wait_until,
)
from pyroute2 import netns as pyroute2_netns

from agent.api import client
from agent.datapath.maps import addr_key
from agent.datapath.programs import pin_path
from agent.lab import mesh, netlab
from agent.lab.topology import LabPlan, PodPlan, netns_path
from agent.netns import enter

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(300)]

LAB = LabSpec(letter="l", mode="hbone")  # each test builds its own (lab_factory)
HTTP_PORT = 8080
ECHO_PORT = 9000
IPERF_PORT = 5201
OUTBOUND_PORT = 15001  # tunnel.outbound_port default
ROUTE_TABLE = 15000  # datapath.route_table default
READY_TIMEOUT_S = 90.0  # agent start compiles the BPF programs; CI machines are slow


# -- processes and the agent API -------------------------------------------------------


def pid_of(plan: LabPlan, node: str, name: str) -> int:
    return int(Path(plan.node_run_dir(node), f"{name}.pid").read_text().strip())


def stop_process(plan: LabPlan, node: str, name: str, sig: int = signal.SIGTERM) -> None:
    """Signal ``name`` on ``node`` and wait (bounded) until it has exited."""
    pid = pid_of(plan, node, name)
    os.kill(pid, sig)
    wait_until(f"{name} on {node} (pid {pid}) to exit after signal {sig}",
               lambda: not running(pid), timeout=20)


def start_process(plan: LabPlan, node: str, name: str, mode: str = "hbone") -> None:
    """(Re)start the agent (``name="agent"``) or the tunnel on ``node`` like the lab does."""
    command = "run" if name == "agent" else "tunnel"
    netlab.start_node_process(plan, node, name, [*AGENT_ARGV, command],
                              mesh.node_env(plan, plan.node(node), mode))


def api(plan: LabPlan, node: str, request: dict[str, Any]) -> Any:
    return client.call(mesh.agent_socket(plan, node), request, timeout=30)


def agent_answers(plan: LabPlan, node: str) -> dict[str, Any] | None:
    try:
        return dict(api(plan, node, {"op": "status"}))
    except (client.AgentUnavailable, OSError):
        return None


def wait_agent(plan: LabPlan, node: str) -> dict[str, Any]:
    return wait_until(f"the agent on {node} to answer", lambda: agent_answers(plan, node),
                      timeout=READY_TIMEOUT_S, interval=0.1)


def wait_listener(plan: LabPlan, node: str) -> None:
    def listening() -> bool:
        status = agent_answers(plan, node)
        return status is not None and OUTBOUND_PORT in status["listeners"]

    wait_until(f"the tunnel on {node} to listen on {OUTBOUND_PORT}", listening,
               timeout=READY_TIMEOUT_S, interval=0.05)


def pod_add(plan: LabPlan, pod: PodPlan) -> dict[str, Any]:
    return dict(api(plan, pod.node, {"op": "pod_add", "netns": pod.netns, "name": pod.name,
                                     "namespace": pod.namespace,
                                     "service_account": pod.service_account}))


def pod_del(plan: LabPlan, pod: PodPlan) -> None:
    api(plan, pod.node, {"op": "pod_del", "name": pod.name, "namespace": pod.namespace})


def enrolled(plan: LabPlan, node: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in api(plan, node, {"op": "pod_list"})}


def counters(plan: LabPlan, pod: PodPlan) -> dict[str, Any]:
    return enrolled(plan, pod.node)[pod.name]["counters"] or {}


def state_file(plan: LabPlan, node: str) -> Path:
    return Path(plan.node_run_dir(node)) / "state" / "state.json"


def pin_dir(plan: LabPlan, node: str) -> Path:
    return Path(mesh.node_env(plan, plan.node(node), "hbone")["MESHAGENT_AGENT_BPF_PIN_DIR"])


def pinned_has(plan: LabPlan, node: str, map_name: str, key: bytes) -> bool:
    """Whether the agent's pinned map ``map_name`` has ``key`` (read straight from bpffs)."""
    from bcc.libbcc import lib

    path = pin_path(str(pin_dir(plan, node))) / map_name
    fd = lib.bpf_obj_get(str(path).encode())
    assert fd >= 0, f"cannot open pinned map {path}"
    try:
        k = ctypes.create_string_buffer(key, len(key))
        value = ctypes.create_string_buffer(256)
        return int(lib.bpf_lookup_elem(fd, k, value)) == 0
    finally:
        os.close(fd)


def ifindex_key(ifindex: int) -> bytes:
    return struct.pack("=I", ifindex)


# -- the tunnels' access logs ----------------------------------------------------------


def records(plan: LabPlan, node: str) -> list[dict[str, Any]]:
    """Every ``connection closed`` line of ``node``'s tunnel log."""
    return closed_records(plan, node)


def wait_record(plan: LabPlan, node: str, what: str,
                pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first record of ``node``'s whole tunnel log matching ``pred`` (polls, bounded)."""
    return labkit.wait_record(plan, node, 0, pred, what)


def from_addr(ip: str, port: int) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["direction"] == "outbound" and r["src"] == f"{ip}:{port}"


# -- servers and clients in pod namespaces (sockets opened via setns) ------------------


def pod_socket(pod: PodPlan) -> socket.socket:
    """A TCP socket that lives in ``pod``'s netns (it stays there after setns back)."""
    with enter.netns(netns_path(pod.netns)):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def connect(pod: PodPlan, ip: str, port: int, timeout: float = 5) -> socket.socket:
    sock = pod_socket(pod)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def http_get(pod: PodPlan, ip: str, port: int = HTTP_PORT, timeout: float = 5) -> tuple[str, int]:
    """GET / from ``pod``; returns (body, local port); raises unless the answer is 200."""
    with connect(pod, ip, port, timeout) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    reply = b"".join(chunks).decode(errors="replace")
    if not reply.startswith("HTTP/1.0 200"):
        raise OSError(f"unexpected HTTP reply {reply[:80]!r}")
    return reply.split("\r\n\r\n", 1)[-1], local_port


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"peer={self.client_address[0]}:{self.client_address[1]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@dataclass
class EchoServer:
    """Echoes every byte back; remembers the peer of every connection it accepted."""

    listener: socket.socket
    peers: list[tuple[str, int]] = field(default_factory=list)
    conns: list[socket.socket] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[:2])
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:  # close on EOF: the tunnel logs at full close
            while data := conn.recv(4096):
                conn.sendall(data)


class Servers:
    """In-process servers bound inside pod namespaces; ``close`` stops them all."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], None]] = []

    def http(self, pod: PodPlan, port: int = HTTP_PORT) -> None:
        with enter.netns(netns_path(pod.netns)):
            httpd = ThreadingHTTPServer(("0.0.0.0", port), _Handler)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

        def close() -> None:
            httpd.shutdown()
            httpd.server_close()

        self._closers.append(close)

    def echo(self, pod: PodPlan, port: int = ECHO_PORT) -> EchoServer:
        with enter.netns(netns_path(pod.netns)):
            listener = socket.create_server(("0.0.0.0", port))
        server = EchoServer(listener)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()

        def close() -> None:
            server.stop.set()
            thread.join(timeout=5)
            listener.close()
            for conn in server.conns:
                with contextlib.suppress(OSError):
                    conn.close()

        self._closers.append(close)
        return server

    def close(self) -> None:
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


def exchange(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    got = b""
    while len(got) < len(message):
        chunk = sock.recv(len(message) - len(got))
        if not chunk:
            raise ConnectionError(f"peer closed after {got!r}")
        got += chunk
    assert got == message, f"echo mismatch: sent {message!r}, got {got!r}"


def make_pod(plan: LabPlan, name: str, letter: str, host: int) -> PodPlan:
    """A new pod on node1 wired exactly like the lab wires its pods (netns
    ``<prefix>-<name>``, so ``lab down`` removes it)."""
    node = plan.node("node1")
    pod = PodPlan(name=name, node=node.name, netns=f"{plan.prefix}-{name}",
                  ipv4=f"10.244.1.{host}", ipv6=f"fd00:10:244:1::{host}",
                  host_ifname=f"{plan.prefix}n1{letter}", gateway_ipv4="10.244.1.1",
                  gateway_ipv6="fd00:10:244:1::1", namespace="default",
                  service_account=f"sa-{letter}", enroll=True)
    pyroute2_netns.create(pod.netns)
    netlab._build_pod(node, pod, netlab._Steps(lambda _: None))  # the lab's own recipe
    return pod


# -- 1. kill -9 of the agent -------------------------------------------------------------


def test_agent_kill9_under_load_then_restart_restores_and_enrolls(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, b = plan.pod("n1-a"), plan.pod("n2-a")
        servers.http(b)
        http_get(a, b.ipv4)  # the path works before anything happens
        before = counters(plan, a)["captured_out_packets"]

        results: list[str | None] = []  # None = ok, else the error
        restarted_at = -1  # len(results) when the restarted agent answered
        stop = threading.Event()

        def request_loop() -> None:
            while not stop.is_set():
                try:
                    http_get(a, b.ipv4)
                    results.append(None)
                except Exception as exc:
                    results.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.03)

        with spawned(b.netns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)]):
            wait_until("iperf3 server to listen", lambda: f":{IPERF_PORT} " in run_in(
                b.netns, ["ss", "-ltn"]).stdout)
            loop = threading.Thread(target=request_loop, daemon=True)
            loop.start()
            try:
                with spawned(a.netns, ["iperf3", "-c", b.ipv4, "-p", str(IPERF_PORT),
                                          "-t", "6", "-J"]) as iperf:
                    wait_until("iperf3 control and data connections", lambda: run_in(
                        a.netns, ["ss", "-Htn", "state", "established",
                                  "dst", f"{b.ipv4}:{IPERF_PORT}"]).stdout.count("\n") >= 2)
                    wait_until("10 requests", lambda: len(results) >= 10)

                    stop_process(plan, "node1", "agent", signal.SIGKILL)
                    assert agent_answers(plan, "node1") is None
                    start_process(plan, "node1", "agent")
                    wait_agent(plan, "node1")
                    restarted_at = len(results)

                    out, err = iperf.communicate(timeout=60)
                    wait_until("100 requests, 20 of them after the restart",
                               lambda: len(results) >= max(100, restarted_at + 20), timeout=60)
            finally:
                stop.set()
                loop.join(timeout=15)

        failed = [r for r in results if r is not None]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
        assert iperf.returncode == 0, f"iperf3 failed: {err}{out[-2000:]}"
        report = json.loads(out)
        assert "error" not in report, report["error"]
        assert report["end"]["sum_received"]["bytes"] > 0

        pods = enrolled(plan, "node1")
        assert set(pods) == {"n1-a", "n1-b"}, pods
        # pinned maps survived the crash: the counters kept counting from where they were
        assert pods["n1-a"]["counters"]["captured_out_packets"] > before

        # a brand-new pod, enrolled by the restarted agent, is captured into HBONE
        new = make_pod(plan, "n1-z", "z", 60)
        assert pod_add(plan, new)["host_ifname"] == new.host_ifname
        _, port = http_get(new, b.ipv4)
        rec = wait_record(plan, "node1", "the new pod's connection", from_addr(new.ipv4, port))
        assert rec["path"] == "hbone" and rec["result"] == "ok", rec
        assert rec["src_identity"].endswith("/ns/default/sa/sa-z"), rec


# -- 2. reconcile ------------------------------------------------------------------------


def test_pod_deleted_while_agent_down_is_forgotten(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, gone, peer = plan.pod("n1-a"), plan.pod("n1-b"), plan.pod("n2-a")
        servers.http(peer)
        pods = enrolled(plan, "node1")
        gone_ifindex, a_ifindex = pods["n1-b"]["host_ifindex"], pods["n1-a"]["host_ifindex"]
        assert pinned_has(plan, "node1", "ma_pods", ifindex_key(gone_ifindex))

        stop_process(plan, "node1", "agent", signal.SIGTERM)
        pyroute2_netns.remove(gone.netns)  # its veth goes with it
        start_process(plan, "node1", "agent")
        wait_agent(plan, "node1")

        assert set(enrolled(plan, "node1")) == {"n1-a"}
        saved = json.loads(state_file(plan, "node1").read_text())
        assert [p["name"] for p in saved["pods"]] == ["n1-a"], saved["pods"]
        # the pinned maps were pruned of it, and still hold the pod that remains
        assert not pinned_has(plan, "node1", "ma_pods", ifindex_key(gone_ifindex))
        assert not pinned_has(plan, "node1", "ma_pod_addrs", addr_key(gone.ipv4))
        assert pinned_has(plan, "node1", "ma_pods", ifindex_key(a_ifindex))
        assert pinned_has(plan, "node1", "ma_pod_addrs", addr_key(a.ipv4))

        _, port = http_get(a, peer.ipv4)
        rec = wait_record(plan, "node1", "n1-a's request", from_addr(a.ipv4, port))
        assert rec["path"] == "hbone" and rec["result"] == "ok", rec


# -- 3. enrollment and unenrollment of a pod with open connections -------------------------


def test_connection_older_than_enrollment_survives_and_new_ones_are_captured(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, plain = plan.pod("n1-a"), plan.pod("n2-plain")
        echo = servers.echo(plain)
        pod_del(plan, a)

        sent: list[int] = []
        errors: list[str] = []
        stop = threading.Event()
        old = connect(a, plain.ipv4, ECHO_PORT)
        old_port = old.getsockname()[1]

        def talk() -> None:  # one message every ~100 ms until told to stop
            i = 0
            while not stop.is_set():
                try:
                    exchange(old, f"msg-{i:05d}".encode())
                    sent.append(i)
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                i += 1
                time.sleep(0.1)

        talker = threading.Thread(target=talk, daemon=True)
        talker.start()
        try:
            wait_until("5 exchanges before enrollment", lambda: len(sent) >= 5 or errors)
            pod_add(plan, a)
            enrolled_at = len(sent)
            wait_until("10 exchanges after enrollment",
                       lambda: len(sent) >= enrolled_at + 10 or errors, timeout=20)
        finally:
            stop.set()
            talker.join(timeout=10)
            old.close()
        assert not errors, f"the old connection broke after {len(sent)} exchanges: {errors}"
        assert len(sent) >= enrolled_at + 10

        with connect(a, plain.ipv4, ECHO_PORT) as new:
            new_port = new.getsockname()[1]
            exchange(new, b"captured?")
        rec = wait_record(plan, "node1", "the new connection", from_addr(a.ipv4, new_port))
        assert rec["path"] == "passthrough" and rec["result"] == "ok", rec
        # the old connection never went through the tunnel (it closed before the
        # new one was even opened, so its record would be there by now)
        assert not [r for r in records(plan, "node1") if r["src"] == f"{a.ipv4}:{old_port}"]
        assert (a.ipv4, old_port) in echo.peers  # it talked to the server directly


def test_unenrollment_resets_connections_made_through_the_tunnel(
        servers: Servers, lab_factory: LabFactory) -> None:
    """Documented behaviour: after ``pod del`` the pod's segments of a tunneled
    connection bypass the tunnel and reach the peer pod directly; the peer only
    knows the tunnel's leg (another source port), so it answers with a RST and
    the application sees ECONNRESET (not a hang)."""
    with lab_factory() as lab:
        plan = lab.plan
        a, b = plan.pod("n1-a"), plan.pod("n2-a")
        echo = servers.echo(b)
        # The tunnel dials the peer from the client's IP with an ephemeral port;
        # should that port equal the client's, the peer *would* know the 4-tuple
        # (with other sequence numbers). Make sure we test the usual case.
        for _ in range(5):
            sock = connect(a, b.ipv4, ECHO_PORT)
            client_port = sock.getsockname()[1]
            exchange(sock, b"through-the-tunnel")
            wait_until("the server to accept", lambda: echo.peers)
            server_seen_port = echo.peers[-1][1]
            if server_seen_port != client_port:
                break
            sock.close()
        else:
            pytest.fail("the tunnel's leg kept reusing the client's source port")
        try:
            assert server_seen_port != client_port
            capture = Capture(plan.node("node1").netns, f"tcp and port {ECHO_PORT}")
            try:
                pod_del(plan, a)
                sock.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    for _ in range(3):  # the first send may be buffered before the RST lands
                        exchange(sock, b"after-unenroll")
                capture.wait_line("the peer pod's RST", rf"IP {re.escape(b.ipv4)}\.{ECHO_PORT} > "
                                  rf"{re.escape(a.ipv4)}\.{client_port}: Flags \[R")
            finally:
                lines = capture.stop()
        finally:
            sock.close()
        # the pod's own segment went out on the underlay in clear, straight to the peer
        assert any(re.search(rf"IP {re.escape(a.ipv4)}\.{client_port} > "
                             rf"{re.escape(b.ipv4)}\.{ECHO_PORT}:", ln) for ln in lines), lines


# -- 4. tunnel restart -------------------------------------------------------------------


def curl(pod: PodPlan, ip: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return run_in(pod.netns, ["curl", "-sS", "-o", "/dev/null", "-m", str(timeout),
                              "-w", "%{http_code}", f"http://{ip}:{HTTP_PORT}/"],
                  timeout=timeout + 10)


def test_tunnel_down_fails_closed_and_recovers(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, plain, b = plan.pod("n1-a"), plan.pod("n1-plain"), plan.pod("n2-a")
        servers.http(b)
        assert curl(a, b.ipv4, 5).stdout == "200"
        stop_process(plan, "node1", "tunnel", signal.SIGTERM)
        drops_before = counters(plan, a).get("drops", {}).get("no_listener", 0)

        capture = Capture(plan.node("node1").netns, f"tcp and dst port {HTTP_PORT}")
        try:
            down = curl(a, b.ipv4, 2)
            # control: a pod that is not enrolled still talks in clear, and the
            # capture sees it (after n1-a's attempts, so those were processed too)
            assert curl(plain, b.ipv4, 5).stdout == "200"
            capture.wait_line("n1-plain's connection",
                              rf"IP {re.escape(plain.ipv4)}\.\d+ > {re.escape(b.ipv4)}\.")
        finally:
            lines = capture.stop()
        assert down.returncode != 0, f"curl succeeded with the tunnel down: {down}"
        leaked = [ln for ln in lines if re.search(rf"IP {re.escape(a.ipv4)}\.\d+ > ", ln)]
        assert not leaked, f"n1-a's TCP left the node in clear: {leaked}"
        assert counters(plan, a)["drops"].get("no_listener", 0) > drops_before

        start_process(plan, "node1", "tunnel")
        wait_listener(plan, "node1")
        def served() -> subprocess.CompletedProcess[str] | None:
            r = curl(a, b.ipv4, 2)
            return r if r.stdout == "200" else None

        ok = wait_until("a curl to succeed after the tunnel restart", served,
                        timeout=5, interval=0.05)
        assert ok.returncode == 0


def listening_on_outbound(plan: LabPlan, node: str) -> bool:
    status = agent_answers(plan, node)
    return status is not None and OUTBOUND_PORT in status["listeners"]


def test_a_connection_in_flight_survives_a_tunnel_restart(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, b = plan.pod("n1-a"), plan.pod("n2-a")
        servers.echo(b)
        with connect(a, b.ipv4, ECHO_PORT, timeout=30) as sock:
            exchange(sock, b"before the stop")
            pid = pid_of(plan, "node1", "tunnel")
            os.kill(pid, signal.SIGTERM)
            # the stopping tunnel closes its listeners first (a new one may bind)...
            wait_until("node1's tunnel to close its listeners",
                       lambda: not listening_on_outbound(plan, "node1"), timeout=20)
            assert running(pid)
            # ...and carries the connection it has to its end, every byte
            payload = secrets.token_bytes(256 * 1024)
            exchange(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b"", "the echo server's FIN, through the draining tunnel"
        wait_until(f"the tunnel (pid {pid}) to exit once drained", lambda: not running(pid),
                   timeout=20)
        start_process(plan, "node1", "tunnel")
        wait_listener(plan, "node1")
        with connect(a, b.ipv4, ECHO_PORT, timeout=30) as sock:
            exchange(sock, b"after the restart")


def test_curls_across_tunnel_restarts_all_succeed(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        plan = lab.plan
        a, b = plan.pod("n1-a"), plan.pod("n2-a")
        servers.http(b)
        results: list[subprocess.CompletedProcess[str]] = []
        stop = threading.Event()

        def load() -> None:
            for _ in range(2000):  # bounded; normally ended by ``stop``
                if stop.is_set():
                    return
                # a timeout well past the SYN retransmissions a restart costs
                results.append(run_in(a.netns, [
                    "curl", "-sS", "-o", "/dev/null", "-m", "60", "--connect-timeout", "45",
                    "-w", "%{http_code}", f"http://{b.ipv4}:{HTTP_PORT}/"], timeout=70))

        def ten_more(what: str) -> None:
            target = len(results) + 10
            wait_until(f"10 requests {what}", lambda: len(results) >= target, timeout=120)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            for node in ("node1", "node2"):  # the client's tunnel, then the server's
                ten_more(f"before restarting {node}'s tunnel")
                stop_process(plan, node, "tunnel", signal.SIGTERM)
                start_process(plan, node, "tunnel")
                wait_listener(plan, node)
                ten_more(f"after restarting {node}'s tunnel")
        finally:
            stop.set()
            loader.join(timeout=80)
        failed = [(r.returncode, r.stdout, r.stderr.strip()) for r in results
                  if r.returncode != 0 or r.stdout != "200"]
        assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"


# -- 5. uninstall next to a foreign tc filter ----------------------------------------------

FOREIGN_PROG = r"""
BPF_ARRAY(foreign_seen, u64, 1);
int foreign_count(struct __sk_buff *skb)
{
	int zero = 0;
	u64 *n = foreign_seen.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return -1; /* TC_ACT_UNSPEC: no verdict, the next filter decides */
}
"""


@contextlib.contextmanager
def foreign_filter(plan: LabPlan, pod: PodPlan) -> Iterator[Callable[[], int]]:
    """A filter that is not ours on the pod's host veth ingress (prio 10, handle 1,
    on a clsact qdisc it creates itself); yields a reader of its packet count."""
    from bcc import BPF
    from bcc.libbcc import lib

    ns = plan.node(pod.node).netns
    bpf = BPF(text=FOREIGN_PROG.encode())
    try:
        fn = bpf.load_func(b"foreign_count", BPF.SCHED_CLS)
        pin = Path("/sys/fs/bpf") / f"{plan.prefix}-foreign-{secrets.token_hex(4)}"
        assert lib.bpf_obj_pin(fn.fd, str(pin).encode()) == 0, "pinning the foreign program"
        try:
            for argv in (["qdisc", "add", "dev", pod.host_ifname, "clsact"],
                         ["filter", "add", "dev", pod.host_ifname, "ingress", "prio", "10",
                          "handle", "0x1", "bpf", "object-pinned", str(pin), "direct-action"]):
                # nsenter, not `tc -n`: that remounts /sys and would hide the pin
                subprocess.run(netlab.nsenter_argv(ns, ["tc", *argv]), check=True, timeout=10,
                               capture_output=True)
        finally:
            pin.unlink()  # the filter holds the program now
        table = bpf[b"foreign_seen"]
        yield lambda: int(table[table.Key(0)].value)
    finally:
        bpf.cleanup()



def foreign_lines(ns: str, dev: str) -> list[str]:
    return [ln for ln in tc_filters(ns, dev, "ingress") if "pref 10 " in ln and "handle 0x1 " in ln]


def start_plain_node(plan: LabPlan) -> None:
    """Agent and tunnel (plain mode) on node1 only; node2 has none."""
    Path(plan.run_dir, "config.toml").write_text("# lifecycle test: defaults + env\n")
    start_process(plan, "node1", "agent", "plain")
    wait_agent(plan, "node1")  # first: the agent records that it made the state dir
    start_process(plan, "node1", "tunnel", "plain")
    wait_listener(plan, "node1")


def uninstall(plan: LabPlan) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **mesh.node_env(plan, plan.node("node1"), "plain")}
    return subprocess.run(netlab.nsenter_argv(plan.node("node1").netns,
                                              [*AGENT_ARGV, "uninstall"]),
                          capture_output=True, text=True, timeout=60, env=env, check=False)


def assert_nothing_of_ours(plan: LabPlan) -> None:
    ns = plan.node("node1").netns
    for dev in links(ns):
        for direction in ("ingress", "egress"):
            assert not our_filters(ns, dev, direction), (dev, direction,
                                                         tc_filters(ns, dev, direction))
    assert "meshtun0" not in links(ns) and "meshtun1" not in links(ns)
    for family in ("-4", "-6"):
        rules = subprocess.run(["ip", family, "-n", ns, "rule"], capture_output=True, text=True,
                               timeout=10, check=True).stdout
        assert f"lookup {ROUTE_TABLE}" not in rules, rules
        routes = subprocess.run(["ip", family, "-n", ns, "route", "show", "table",
                                 str(ROUTE_TABLE)], capture_output=True, text=True, timeout=10,
                                check=False).stdout
        assert not routes.strip(), routes
    assert not pin_dir(plan, "node1").exists()
    assert not state_file(plan, "node1").exists()


def test_uninstall_removes_ours_and_keeps_a_foreign_filter(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory(mode=None) as lab:
        plan = lab.plan
        a, plain = plan.pod("n1-a"), plan.pod("n2-plain")
        ns = plan.node("node1").netns
        servers.http(plain)
        early_demux = sysctl(ns, "net/ipv4/tcp_early_demux")
        with foreign_filter(plan, a) as foreign_count:
            http_get(a, plain.ipv4)
            assert foreign_count() > 0, "the foreign filter does not count"

            start_plain_node(plan)
            assert not pod_add(plan, a)["created_clsact"]
            assert len(our_filters(ns, a.host_ifname, "ingress")) == 1
            assert len(our_filters(ns, a.host_ifname, "egress")) == 1
            # status names the foreign filter that runs before ours (prio 10 < 58)
            status = client.call(mesh.agent_socket(plan, "node1"), {"op": "status"}, timeout=10)
            (pod,) = status["pods"]
            assert pod["shadowed_by"] == [{"direction": "ingress", "prio": 10, "handle": 1,
                                           "kind": "bpf", "name": pod["shadowed_by"][0]["name"],
                                           "direct_action": True}]
            seen = foreign_count()
            _, port = http_get(a, plain.ipv4)
            rec = wait_record(plan, "node1", "n1-a's request", from_addr(a.ipv4, port))
            assert rec["path"] == "plain" and rec["result"] == "ok", rec  # plain-mode tunnel
            assert foreign_count() > seen, "the foreign filter stopped seeing packets"
            assert len(foreign_lines(ns, a.host_ifname)) == 1

            refused = uninstall(plan)
            assert refused.returncode != 0
            assert "the agent is running" in refused.stderr, refused.stderr
            assert pin_dir(plan, "node1").exists() and state_file(plan, "node1").exists()

            stop_process(plan, "node1", "agent", signal.SIGTERM)
            done = uninstall(plan)
            assert done.returncode == 0, done.stderr
            assert_nothing_of_ours(plan)
            assert sysctl(ns, "net/ipv4/tcp_early_demux") == early_demux
            assert "clsact" in qdiscs(ns, a.host_ifname)  # not ours: the foreign filter needs it
            assert len(foreign_lines(ns, a.host_ifname)) == 1

            # direct again: with the tunnel gone too, any capture left would fail closed
            stop_process(plan, "node1", "tunnel", signal.SIGTERM)
            seen = foreign_count()
            body, port = http_get(a, plain.ipv4)
            assert body.strip() == f"peer={a.ipv4}:{port}"
            assert foreign_count() > seen


# -- 6. round trips ----------------------------------------------------------------------


def test_enroll_unenroll_round_trips_and_node_reinstall(
        servers: Servers, lab_factory: LabFactory) -> None:
    with lab_factory(mode=None) as lab:
        plan = lab.plan
        a, plain = plan.pod("n1-a"), plan.pod("n2-plain")
        ns = plan.node("node1").netns
        servers.http(plain)
        start_plain_node(plan)

        def filters_each_way() -> tuple[int, int]:
            return (len(our_filters(ns, a.host_ifname, "ingress")),
                    len(our_filters(ns, a.host_ifname, "egress")))

        def in_maps(ifindex: int) -> tuple[bool, bool]:
            return (pinned_has(plan, "node1", "ma_pods", ifindex_key(ifindex)),
                    pinned_has(plan, "node1", "ma_pod_addrs", addr_key(a.ipv4)))

        def captured() -> None:
            _, port = http_get(a, plain.ipv4)
            wait_record(plan, "node1", "a captured request", from_addr(a.ipv4, port))

        pod = pod_add(plan, a)
        ifindex = pod["host_ifindex"]
        assert pod["created_clsact"]
        assert filters_each_way() == (1, 1)
        assert in_maps(ifindex) == (True, True)
        captured()
        assert counters(plan, a)["captured_out_packets"] > 0

        pod_del(plan, a)
        assert filters_each_way() == (0, 0)
        assert "clsact" not in qdiscs(ns, a.host_ifname)  # we created it, so it went
        assert in_maps(ifindex) == (False, False)
        assert "n1-a" not in enrolled(plan, "node1")

        pod_add(plan, a)
        with pytest.raises(client.AgentError, match="already enrolled"):
            pod_add(plan, a)
        assert filters_each_way() == (1, 1)
        assert len(enrolled(plan, "node1")) == 1
        pod_del(plan, a)
        assert filters_each_way() == (0, 0)
        pod_add(plan, a)
        assert filters_each_way() == (1, 1)
        assert counters(plan, a) == {}  # the old counters went with the old enrollment
        captured()

        # the node: stop, uninstall, start again -> plumbing recreated, pods enrollable
        stop_process(plan, "node1", "tunnel", signal.SIGTERM)
        stop_process(plan, "node1", "agent", signal.SIGTERM)
        state_dir = state_file(plan, "node1").parent
        assert (state_dir / "tunnel-status.json").exists()
        done = uninstall(plan)
        assert done.returncode == 0, done.stderr
        assert_nothing_of_ours(plan)
        # tunnel-status.json too, and the state dir, which the agent made (it started
        # first in start_plain_node) and which is now empty
        assert not state_dir.exists(), done.stdout + done.stderr
        assert "clsact" not in qdiscs(ns, a.host_ifname)
        start_process(plan, "node1", "agent", "plain")
        status = wait_agent(plan, "node1")
        start_process(plan, "node1", "tunnel", "plain")
        wait_listener(plan, "node1")
        assert all(status["node"].values()), status["node"]
        assert status["pods"] == []
        pod_add(plan, a)
        assert filters_each_way() == (1, 1)
        captured()


# -- 7. the agent under `ip netns exec` ------------------------------------------------


def test_agent_under_ip_netns_exec_explains_the_missing_bpffs_and_changes_nothing(
        lab_factory: LabFactory) -> None:
    """`ip netns exec` remounts /sys for the netns, which hides /sys/fs/bpf: the
    agent must say so and what to do, before it changes anything on the node."""
    with lab_factory(mode=None) as lab:
        plan = lab.plan
        node = plan.node("node1")
        Path(plan.run_dir, "config.toml").write_text("# ip netns exec test\n")
        env = {**os.environ, **mesh.node_env(plan, node, "plain")}
        out = subprocess.run(["ip", "netns", "exec", node.netns, *AGENT_ARGV, "run"],
                             capture_output=True, text=True, timeout=60, env=env, check=False)
        assert out.returncode != 0
        assert "ip netns exec" in out.stderr and "nsenter --net=" in out.stderr, out.stderr
        assert "mount -t bpf" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
        assert "meshtun0" not in links(node.netns)
        assert not state_file(plan, "node1").parent.exists()
