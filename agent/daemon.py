"""``meshagent run``: the node agent daemon.

Start-up, in order: load persisted state; set up node plumbing; compile the
BPF programs once; subscribe to the node's address changes (rtnetlink), then
write the datapath settings, node addresses and exclusions into the maps;
re-enroll the pods from state whose netns and veth still exist (filters are
replaced atomically, so traffic never runs without one) and forget the rest;
then serve the API on a root-only UNIX socket and keep the node-address map
in step with the node (:mod:`agent.netns.addrwatch`). With ``[k8s] enabled``,
also watch the API server (:mod:`agent.k8s.nodeagent`): this node's pods are
enrolled and unenrolled by Istio's labels through the same ``pod_add``/``pod_del``
transaction as API requests, and the cluster model is written for the tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from agent import __version__
from agent.config import Config
from agent.contracts import ContractError
from agent.contracts import api as schema
from agent.contracts.api import ErrorCode, Response
from agent.contracts.files import TUNNEL_STATUS_FILE, TunnelStatus
from agent.datapath import attach
from agent.datapath.maps import POD_F_BRIDGED, DatapathMaps, DatapathSettings
from agent.datapath.programs import (
    TUNNEL_DEV_INGRESS,
    Programs,
    check_bpffs,
    compile_programs,
    remove_stale_pins,
)
from agent.enrollment import Enroller, EnrollmentError, captures_dns, pod_flags
from agent.netns.addrwatch import AddressChanges, AddressWatch
from agent.netns.node import TunnelDevice, setup_node, verify_node
from agent.netns.veth import PodNetworkError, find_host_veth, node_addresses
from agent.registry import Registry, RegistryError
from agent.state import AgentState, load_state, save_state
from agent.telemetry.metrics import AgentMetrics, MetricsServer, serve_metrics

if TYPE_CHECKING:
    from agent.k8s.nodeagent import KubernetesNode

log = structlog.get_logger("agent.daemon")
MAX_REQUEST_BYTES = 64 * 1024
# A removed address is applied by re-reading them all; a burst of removals
# (pods deleted together) is coalesced into one re-read this long after the first.
ADDRESS_RESYNC_DELAY_S = 0.1


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.state = AgentState()
        self.programs: Programs | None = None
        self.maps: DatapathMaps | None = None
        self.enroller: Enroller | None = None
        self.tunnel_device: TunnelDevice | None = None
        self.address_watch: AddressWatch | None = None
        self._resync_pending = False
        self.started_at = time.time()
        # Every kernel operation runs on this one thread: pyroute2's sync API
        # and bcc tables must not run inside the asyncio loop, and serialising
        # them makes each enrollment a transaction with nothing interleaved.
        self.kernel = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self.metrics_registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.metrics_registry, self._datapath_counters)
        self.metrics_server: MetricsServer | None = None
        self.kubernetes: KubernetesNode | None = None

    def _datapath_counters(self) -> dict[str, dict[str, Any]]:
        """Per-pod datapath counters for the metrics scrape (runs on the HTTP thread)."""
        if self.maps is None:
            return {}
        counters = self.maps.counters()
        return {pod.key: counters[pod.host_ifindex].as_dict()
                for pod in list(self.state.registry) if pod.host_ifindex in counters}

    def persist(self) -> None:
        save_state(self.cfg.agent.state_dir, self.state, self.cfg.tunnel.trust_domain)

    def start(self) -> None:
        """Bring the node to the desired state (see the module docstring)."""
        check_bpffs()  # before any change: under `ip netns exec` there is no bpffs
        state_dir_existed = Path(self.cfg.agent.state_dir).exists()
        self.state = load_state(self.cfg.agent.state_dir)
        if not state_dir_existed:
            self.state.node.created_state_dir = True  # uninstall may remove it
        self.tunnel_device = setup_node(self.cfg, self.state.node)
        self.persist()
        self.programs = compile_programs(pin_dir=self.cfg.agent.bpf_pin_dir)
        self.maps = DatapathMaps(self.programs)
        t, d = self.cfg.tunnel, self.cfg.datapath
        self.maps.set_settings(DatapathSettings(
            capture_mark=d.capture_mark, capture_mask=d.capture_mask,
            tunnel_mark=t.socket_mark, tunnel_ifindex=self.tunnel_device.ifindex,
            tunnel_mac=self.tunnel_device.mac, outbound_port=t.outbound_port,
            inbound_port=t.inbound_port, hbone_port=t.hbone_port,
            redirect_mark=d.redirect_mark,
            # Set whenever the tunnel has a DNS proxy: a pod may opt in on a node
            # that does not capture by default (only MA_POD_F_DNS pods are captured).
            dns_port=t.dns_port))
        # Subscribe before the first read: a change in between is not lost.
        self.address_watch = AddressWatch()
        self.maps.set_node_addresses(node_addresses())
        self.maps.set_exclusions(d.excluded_ports, d.excluded_cidrs)
        self.maps.set_encapsulation_ports(d.encapsulation_udp_ports)
        self._attach_tunnel_device()
        saved = list(self.state.registry)
        self.state.registry = Registry()
        self.enroller = Enroller(self.cfg, self.programs, self.maps, self.state.registry,
                                 self.persist)
        self._restore(saved)
        pruned = self.maps.prune({p.host_ifindex: p.addresses for p in self.state.registry})
        stale = remove_stale_pins(self.cfg.agent.bpf_pin_dir)
        if pruned or stale:
            log.info("reconciled datapath", pods_pruned=pruned, stale_pins_removed=len(stale))
        self.persist()
        log.info("agent ready", version=__version__, pods=len(self.state.registry),
                 tunnel_device=self.cfg.agent.tunnel_device, socket=self.cfg.agent.socket)

    def _attach_tunnel_device(self) -> None:
        """clsact + tunnel_dev_ingress on our own device (replaced atomically on restart)."""
        assert self.programs is not None and self.tunnel_device is not None
        from pyroute2 import IPRoute

        idx = self.tunnel_device.ifindex
        spec = attach.FilterSpec(attach.INGRESS, TUNNEL_DEV_INGRESS,
                                 self.programs.fds[TUNNEL_DEV_INGRESS])
        with IPRoute() as ipr:
            attach.ensure_clsact(ipr, idx)
            attach.attach(ipr, idx, spec, self.cfg.agent.tc_priority, self.cfg.agent.tc_handle)

    def _restore(self, saved: list[Any]) -> None:
        assert self.enroller is not None and self.maps is not None

        for pod in saved:
            try:
                veth = find_host_veth(pod.netns, pod.ifname, self.enroller.rtnl)
            except PodNetworkError as exc:
                log.info("forgetting pod whose network is gone", pod=pod.key, reason=str(exc))
                continue
            if veth.ifindex != pod.host_ifindex:
                log.info("pod veth changed while agent was down", pod=pod.key)
            try:
                ipr = self.enroller.ipr
                created = attach.ensure_clsact(ipr, veth.ifindex, self.enroller.rtnl)
                pod = type(pod).from_json({
                    **pod.to_json(), "host_ifindex": veth.ifindex,
                    "host_ifname": veth.ifname, "addresses": list(veth.pod_addresses),
                    "created_clsact": pod.created_clsact or created})
                self.maps.add_pod(pod.host_ifindex, pod.addresses, pod_flags(
                    veth, captures_dns(self.cfg.datapath.dns_capture, pod.dns_capture)))
                self.enroller.attach_filters(ipr, pod.host_ifindex)
                self.state.registry.add(pod)
            except (attach.AttachError, RegistryError, OSError) as exc:
                log.error("could not restore pod; it is no longer enrolled", pod=pod.key,
                          error=str(exc))
                continue
            log.info("pod restored", pod=pod.key, ifindex=pod.host_ifindex)

    # --- node addresses -------------------------------------------------------

    def _on_address_events(self) -> None:
        """Reader callback (event loop): queue the map update on the kernel thread."""
        assert self.address_watch is not None
        try:
            changes = self.address_watch.read()
        except OSError as exc:
            log.error("reading address events failed; re-reading the addresses", error=str(exc))
            changes = AddressChanges(resync=True)
        if not changes:
            return
        loop = asyncio.get_running_loop()
        if changes.added:
            loop.run_in_executor(self.kernel, self._add_node_addresses, sorted(changes.added))
        if changes.links:
            loop.run_in_executor(self.kernel, self._follow_masters, dict(changes.links))
        if changes.resync and not self._resync_pending:
            self._resync_pending = True
            loop.call_later(ADDRESS_RESYNC_DELAY_S, lambda: loop.run_in_executor(
                self.kernel, self._resync_node_addresses))

    def _add_node_addresses(self, addresses: list[str]) -> None:
        assert self.maps is not None
        added = self.maps.add_node_addresses(addresses)
        if added:
            log.info("node addresses added to the datapath", addresses=added)

    def _follow_masters(self, links: dict[int, int | None]) -> None:
        """An enrolled pod's host veth joined or left a bridge: re-flag it, so its
        captured packets take the path that works there (MA_POD_F_BRIDGED)."""
        assert self.maps is not None
        for ifindex, master in links.items():
            flags = self.maps.pod_flags(ifindex)
            if flags is None:
                continue
            wanted = (flags | POD_F_BRIDGED) if master else (flags & ~POD_F_BRIDGED)
            if wanted != flags and self.maps.set_pod_flags(ifindex, wanted):
                log.info("pod veth master changed", ifindex=ifindex, master=master,
                         bridged=bool(master))

    def _resync_node_addresses(self) -> None:
        """Side effects: one address dump; rewrites the node-address map to match."""
        assert self.maps is not None
        self._resync_pending = False
        try:
            self.maps.set_node_addresses(node_addresses())
        except Exception as exc:  # the map keeps its old content; next event retries
            log.error("re-reading node addresses failed", error=str(exc))

    # --- API -----------------------------------------------------------------

    def handle(self, raw: Any) -> dict[str, Any]:
        """Execute one request on the kernel thread; never raises."""
        started = time.monotonic()
        is_add = isinstance(raw, dict) and raw.get("op") == "pod_add"
        try:
            req = schema.parse_request(raw)
            result = self._dispatch(req)
        except (schema.RequestError, PodNetworkError, RegistryError, EnrollmentError) as exc:
            if is_add:
                self.metrics.enrollment_failed(_ERROR_REASONS.get(type(exc), "other"))
            return Response.failure(_error_code(exc), str(exc)).to_json()
        except Exception as exc:
            log.exception("request failed", request=raw)
            if is_add:
                self.metrics.enrollment_failed("internal")
            return Response.failure(ErrorCode.INTERNAL, f"internal error: {exc}").to_json()
        if is_add:
            self.metrics.observe_enrollment(time.monotonic() - started)
        self.metrics.set_enrolled_pods(len(self.state.registry))
        return Response.success(result).to_json()

    def _dispatch(self, req: schema.Request) -> Any:
        assert self.enroller is not None and self.maps is not None
        if isinstance(req, schema.PodAdd):
            return self.enroller.add(req).to_json()
        if isinstance(req, schema.PodDel):
            pod = self.enroller.find(req)
            if pod is None:
                raise RegistryError("no such enrolled pod; 'meshagent pod list' shows them",
                                    ErrorCode.NOT_ENROLLED)
            self.enroller.remove(pod)
            return pod.to_json()
        if isinstance(req, schema.PodList):
            return self._pods_with_counters()
        return self.status()

    def _pods_with_counters(self, shadowing: bool = False) -> list[dict[str, Any]]:
        """The enrolled pods with their counters; with ``shadowing``, also the
        foreign tc filters that run before ours on each veth (two netlink dumps
        per pod)."""
        assert self.maps is not None and self.enroller is not None
        counters = self.maps.counters()
        out = []
        prio, handle = self.cfg.agent.tc_priority, self.cfg.agent.tc_handle
        for pod in self.state.registry:
            data = pod.to_json()
            c = counters.get(pod.host_ifindex)
            data["counters"] = c.as_dict() if c else None
            if shadowing:
                try:
                    data["shadowed_by"] = attach.shadowing_filters(
                        self.enroller.rtnl, pod.host_ifindex, prio, handle)
                except OSError as exc:
                    data["shadowed_by"] = [{"error": str(exc)}]
            out.append(data)
        return out

    def status(self) -> dict[str, Any]:
        kubernetes = None
        if self.kubernetes is not None:
            from agent.k8s.reconcile import Enrolled

            kubernetes = self.kubernetes.status(
                {p.key: Enrolled(p.key, p.uid) for p in self.state.registry})
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "pods": self._pods_with_counters(shadowing=True),
            "node": verify_node(self.cfg),
            "tunnel_ports": {"outbound": self.cfg.tunnel.outbound_port,
                             "inbound": self.cfg.tunnel.inbound_port,
                             "hbone": self.cfg.tunnel.hbone_port},
            "listeners": _listening_ports(),
            "tc_priority": self.cfg.agent.tc_priority,
            **_tunnel_status(Path(self.cfg.agent.state_dir) / TUNNEL_STATUS_FILE),
            "kubernetes": kubernetes,
        }

    async def _client(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        response: dict[str, Any]
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != 0:
                response = Response.failure(ErrorCode.PERMISSION_DENIED,
                                            "the agent API is root-only").to_json()
            else:
                line = await asyncio.wait_for(reader.readline(), timeout=10)
                if len(line) > MAX_REQUEST_BYTES:
                    response = Response.failure(ErrorCode.REQUEST_TOO_LARGE,
                                                "request too large").to_json()
                else:
                    try:
                        raw = json.loads(line)
                    except ValueError as exc:
                        response = Response.failure(ErrorCode.BAD_REQUEST,
                                                    f"request is not JSON: {exc}").to_json()
                    else:
                        if isinstance(raw, dict) and raw.get("op") == "pod_verdict":
                            response = await self._pod_verdict(raw)
                        else:
                            loop = asyncio.get_running_loop()
                            response = await loop.run_in_executor(self.kernel, self.handle, raw)
            writer.write(json.dumps(response).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError) as exc:
            log.info("api client dropped", error=str(exc))
        finally:
            writer.close()

    async def _pod_verdict(self, raw: Any) -> dict[str, Any]:
        """``pod_verdict``: answered on the event loop from the watch's cache (no
        kernel work, so it never waits behind enrollments); never raises."""
        from agent.k8s.nodeagent import KubernetesUnavailable

        try:
            req = schema.parse_request(raw)
            assert isinstance(req, schema.PodVerdict)
            if self.kubernetes is None:
                return Response.failure(ErrorCode.NOT_KUBERNETES, "this agent does not watch "
                                        "Kubernetes: set [k8s] enabled = true, or configure "
                                        "meshagent-cni without \"kubernetes\": true").to_json()
            answer = await self.kubernetes.pod_verdict(req.namespace, req.name)
        except schema.RequestError as exc:
            return Response.failure(exc.code, str(exc)).to_json()
        except KubernetesUnavailable as exc:
            return Response.failure(exc.code, str(exc)).to_json()
        except Exception as exc:
            log.exception("pod_verdict failed", request=raw)
            return Response.failure(ErrorCode.INTERNAL, f"internal error: {exc}").to_json()
        return Response.success(answer.to_json()).to_json()

    async def serve(self) -> None:
        if self.cfg.agent.metrics_port:
            self.metrics_server = serve_metrics(self.metrics_registry, "0.0.0.0",
                                                self.cfg.agent.metrics_port)
        self.metrics.set_enrolled_pods(len(self.state.registry))
        path = Path(self.cfg.agent.socket)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, path=str(path),
                                                     limit=MAX_REQUEST_BYTES + 1)
        finally:
            os.umask(old_umask)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if self.address_watch is not None:
            loop.add_reader(self.address_watch.fileno(), self._on_address_events)
            # Whatever changed since start() read the addresses is queued on the socket.
            self._on_address_events()
        if self.kubernetes is not None:
            self.kubernetes.start()
        async with server:
            await stop.wait()
        if self.kubernetes is not None:
            await self.kubernetes.stop()
        if self.address_watch is not None:
            loop.remove_reader(self.address_watch.fileno())
            self.address_watch.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if self.metrics_server is not None:
            self.metrics_server.close()
        # Filters stay attached and keep steering traffic to the tunnel while
        # the agent is away; the next start reconciles them.
        log.info("agent stopped; datapath left in place")


_ERROR_REASONS: dict[type, str] = {
    schema.RequestError: "bad_request", PodNetworkError: "pod_network",
    RegistryError: "conflict", EnrollmentError: "kernel",
}


def _error_code(exc: Exception) -> ErrorCode:
    """The API error code of a refused request (see agent.contracts.api.ErrorCode)."""
    code = getattr(exc, "code", None)
    if isinstance(code, ErrorCode):
        return code
    return _ERROR_CODES.get(type(exc), ErrorCode.INTERNAL)


_ERROR_CODES: dict[type, ErrorCode] = {PodNetworkError: ErrorCode.POD_NETWORK,
                                       EnrollmentError: ErrorCode.KERNEL}


def _tunnel_status(path: Path) -> dict[str, Any]:
    """The ``tunnel`` part of the status (None while the tunnel has written
    none) and ``tunnel_error``: why the file could not be used, if it could not."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {"tunnel": None, "tunnel_error": None}
    except (OSError, ValueError) as exc:
        return {"tunnel": None, "tunnel_error": f"{path}: unreadable ({exc})"}
    try:
        return {"tunnel": TunnelStatus.from_json(raw, str(path)).to_json(), "tunnel_error": None}
    except ContractError as exc:
        return {"tunnel": None, "tunnel_error": str(exc)}


def _listening_ports() -> list[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def run(cfg: Config) -> None:
    agent = Agent(cfg)
    if cfg.k8s.enabled:  # before any change: credentials that cannot be loaded stop us here
        from agent.k8s.nodeagent import KubernetesNode

        agent.kubernetes = KubernetesNode(agent)
    agent.kernel.submit(agent.start).result()
    asyncio.run(agent.serve())
