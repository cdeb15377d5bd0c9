"""``meshagent-cni``: the chained CNI plugin that enrolls pods with the agent.

A container runtime executes it after the interface plugin (ptp, bridge, ...)
with the CNI environment and the network configuration (including
``prevResult``) on stdin:

* ADD - if the pod's Kubernetes namespace is enrolled (with ``"kubernetes": true``:
  if the agent's ``pod_verdict`` says so by Istio's labels, from its watch or one
  fetch of the pod, as istio cni/pkg/plugin/plugin.go asks the API server in
  CmdAdd), ask the agent over its API socket to enroll the pod (``pod_add``)
  before the pod's first packet; print prevResult unchanged. If
  the agent is unreachable: fail closed with code 11 (the runtime retries), or
  with ``fail_open`` pass the pod through unenrolled and log it.
* DEL - idempotent: if the agent lists the pod as enrolled, remove it
  (``pod_del``); succeed silently for unknown pods, a missing netns, or an
  agent that is down (its start-up forgets pods whose netns is gone).
* CHECK - fail unless a pod that should be enrolled is enrolled.
* VERSION - print the supported spec versions.

stdout carries only the protocol; log lines (JSON) go to ``log_file``
(default ``/var/log/meshagent-cni.log``), or to stderr if it cannot be opened.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.api import client
from agent.cni import spec
from agent.cni.spec import CniError
from agent.contracts.api import ErrorCode

AgentCall = Callable[[str, dict[str, Any], float], Any]
MAX_STDIN_BYTES = 4 * 1024 * 1024


@dataclass
class Outcome:
    """What the executable prints on stdout and exits with, plus its log lines."""

    stdout: str = ""
    exit_code: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    log_file: str = spec.DEFAULT_LOG_FILE


class _Run:
    """One invocation: collects log records so they are written once at the end."""

    def __init__(self, env: Mapping[str, str], outcome: Outcome) -> None:
        self.outcome = outcome
        self.context = {k: env.get(k, "") for k in ("CNI_COMMAND", "CNI_CONTAINERID",
                                                     "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS")}

    def log(self, level: str, event: str, **fields: Any) -> None:
        self.outcome.log.append({"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "level": level, "event": event, "pid": os.getpid(),
                                 **self.context, **fields})


def same_netns(a: str, b: str) -> bool:
    """Whether two netns paths name the same namespace (same inode) or the same path."""
    if os.path.normpath(a) == os.path.normpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _netns_exists(path: str) -> bool:
    try:
        return os.path.exists(path)
    except ValueError:
        return False


def _unavailable(exc: Exception, socket_path: str) -> CniError:
    return CniError(spec.ERR_TRY_AGAIN_LATER, "meshagent agent is unavailable",
                    f"{exc}. Start the agent on this node (systemctl start meshagent) and the "
                    f"runtime will retry; or set \"fail_open\": true in the \"meshagent\" "
                    f"section to let pods start unenrolled (socket {socket_path})")


def _add(env: spec.CniEnv, conf: spec.NetConf, call: AgentCall, run: _Run) -> str:
    """ADD. Side effects: at most pod_add (+ pod_list, pod_del of a stale entry) calls."""
    result = spec.add_result(conf)
    plugin = conf.plugin
    sock, timeout = plugin.agent_socket, plugin.timeout_seconds
    request = None if plugin.kubernetes else spec.pod_add_request(env, plugin)
    if request is None and not plugin.kubernetes:
        run.log("info", "pod passed through: namespace not enrolled",
                enrolled_namespaces=list(plugin.enrolled_namespaces))
        return spec.dumps(result)
    try:
        if request is None:
            request = _kubernetes_request(env, call, sock, timeout, run)
            if request is None:
                return spec.dumps(result)
        key = f"{request['namespace']}/{request['name']}"
        try:
            pod = call(sock, request, timeout)
        except client.AgentError as exc:
            if exc.code is not ErrorCode.ALREADY_ENROLLED:
                raise
            pods = call(sock, {"op": "pod_list"}, timeout)
            existing = spec.find_enrolled(pods, request["namespace"], request["name"])
            existing_netns = existing.netns if existing else ""
            if existing and same_netns(existing_netns, env.netns):
                run.log("info", "pod already enrolled (repeated ADD)", pod=key)
                return spec.dumps(result)
            if existing and not _netns_exists(existing_netns):
                # A previous sandbox of this pod whose DEL never reached the agent.
                run.log("warning", "removing stale enrollment of a previous sandbox", pod=key,
                        stale_netns=existing_netns)
                call(sock, spec.pod_del_request(request["namespace"], request["name"]), timeout)
                pod = call(sock, request, timeout)
            else:
                raise
    except client.AgentUnavailable as exc:
        if plugin.fail_open:
            run.log("warning", "agent unavailable: pod passed through UNENROLLED (fail_open)",
                    pod=_key(env), error=str(exc))
            return spec.dumps(result)
        raise _unavailable(exc, sock) from exc
    except client.AgentError as exc:
        if exc.code is ErrorCode.KUBERNETES_UNAVAILABLE:
            if plugin.fail_open:
                run.log("warning", "API server unavailable: pod passed through UNENROLLED "
                        "(fail_open)", pod=_key(env), error=str(exc))
                return spec.dumps(result)
            raise CniError(spec.ERR_TRY_AGAIN_LATER, "the agent cannot judge the pod now",
                           f"{exc}. The runtime retries") from exc
        raise CniError(spec.ERR_AGENT_REFUSED,
                       f"meshagent agent refused to enroll pod {_key(env)}",
                       f"{exc}. Check 'meshagent pod list' and the agent's log on this node"
                       ) from exc
    run.log("info", "pod enrolled", pod=key, service_account=request["service_account"],
            host_ifname=pod.get("host_ifname") if isinstance(pod, dict) else None,
            addresses=pod.get("addresses") if isinstance(pod, dict) else None)
    return spec.dumps(result)


def _key(env: spec.CniEnv) -> str:
    identity = env.pod_identity()
    return "/".join(identity) if identity else "?"


def _kubernetes_request(env: spec.CniEnv, call: AgentCall, sock: str, timeout: float,
                        run: _Run) -> dict[str, Any] | None:
    """Ask the agent whether Istio's rules enroll the pod; its ``pod_add`` if they do.
    Side effects: one pod_verdict call."""
    identity = env.pod_identity()
    if identity is None:
        raise CniError(spec.ERR_INVALID_ENV, "CNI_ARGS lacks K8S_POD_NAMESPACE/K8S_POD_NAME",
                       "the runtime must pass the Kubernetes pod's identity")
    namespace, name = identity
    verdict = call(sock, spec.pod_verdict_request(namespace, name), timeout)
    if not isinstance(verdict, dict) or not isinstance(verdict.get("enroll"), bool):
        raise CniError(spec.ERR_AGENT_REFUSED, "meshagent agent sent an invalid pod_verdict",
                       "the agent and meshagent-cni must be the same release")
    if not verdict["enroll"]:
        run.log("info", "pod passed through: Istio's rules do not enroll it",
                pod=f"{namespace}/{name}", verdict=verdict.get("verdict"))
        return None
    return spec.kubernetes_pod_add_request(env, verdict)


def _del(env: spec.CniEnv, conf: spec.NetConf, call: AgentCall, run: _Run) -> str:
    """DEL. Side effects: pod_list, then pod_del if this sandbox's pod is enrolled."""
    identity = env.pod_identity()
    if identity is None:
        run.log("info", "DEL without a Kubernetes pod in CNI_ARGS: nothing to unenroll")
        return ""
    namespace, name = identity
    key = f"{namespace}/{name}"
    sock, timeout = conf.plugin.agent_socket, conf.plugin.timeout_seconds
    try:
        pods = call(sock, {"op": "pod_list"}, timeout)
        enrolled = spec.find_enrolled(pods, namespace, name)
        if enrolled is None:
            run.log("info", "pod not enrolled: nothing to remove", pod=key)
            return ""
        enrolled_netns = enrolled.netns
        if (env.netns and enrolled_netns and not same_netns(enrolled_netns, env.netns)
                and _netns_exists(enrolled_netns)):
            run.log("info", "enrolled pod belongs to another (newer) sandbox: kept", pod=key,
                    enrolled_netns=enrolled_netns)
            return ""
        call(sock, spec.pod_del_request(namespace, name), timeout)
    except client.AgentUnavailable as exc:
        # Failing would block pod deletion while the agent is down; the agent
        # forgets pods whose netns is gone when it starts, so nothing leaks.
        run.log("warning", "agent unavailable on DEL: nothing removed (the agent forgets "
                "pods whose netns is gone when it starts)", pod=key, error=str(exc))
        return ""
    except client.AgentError as exc:
        if exc.code is ErrorCode.NOT_ENROLLED:
            run.log("info", "pod was already removed", pod=key)
            return ""
        raise CniError(spec.ERR_AGENT_REFUSED, f"meshagent agent failed to remove pod {key}",
                       f"{exc}. The runtime retries DEL; check the agent's log") from exc
    run.log("info", "pod unenrolled", pod=key)
    return ""


def _check(env: spec.CniEnv, conf: spec.NetConf, call: AgentCall, run: _Run) -> str:
    """CHECK. Side effects: one pod_list call when the pod should be enrolled."""
    spec.check_command_version(conf, "CHECK")
    spec.require_prev_result(conf, "CHECK")
    identity = env.pod_identity()
    assert identity is not None  # parse_env guarantees it for CHECK
    namespace, name = identity
    key = f"{namespace}/{name}"
    sock = conf.plugin.agent_socket
    if conf.plugin.kubernetes:
        try:
            if _kubernetes_request(env, call, sock, conf.plugin.timeout_seconds, run) is None:
                return ""
        except (client.AgentUnavailable, client.AgentError) as exc:
            if conf.plugin.fail_open:
                run.log("warning", "agent cannot judge the pod on CHECK: passed (fail_open)",
                        pod=key, error=str(exc))
                return ""
            raise CniError(spec.ERR_TRY_AGAIN_LATER, "meshagent agent cannot judge the pod",
                           f"{exc}; check the agent's log") from exc
    elif not conf.plugin.enrolls(namespace):
        return ""
    try:
        pods = call(sock, {"op": "pod_list"}, conf.plugin.timeout_seconds)
    except client.AgentUnavailable as exc:
        if conf.plugin.fail_open:
            run.log("warning", "agent unavailable on CHECK: passed (fail_open)", pod=key)
            return ""
        raise _unavailable(exc, sock) from exc
    except client.AgentError as exc:
        raise CniError(spec.ERR_AGENT_REFUSED, "meshagent agent refused pod_list",
                       f"{exc}; check the agent's log") from exc
    enrolled = spec.find_enrolled(pods, namespace, name)
    if enrolled is None:
        raise CniError(spec.ERR_NOT_ENROLLED, f"pod {key} is not enrolled in the mesh",
                       f"namespace {namespace} is enrolled, but the agent does not list the "
                       "pod: delete the pod so the runtime re-creates it, or enroll it with "
                       f"'meshagent pod add --netns {env.netns}'")
    if not same_netns(enrolled.netns, env.netns):
        raise CniError(spec.ERR_NOT_ENROLLED, f"pod {key} is enrolled with another netns",
                       f"the agent has {enrolled.netns}, the runtime says {env.netns}: "
                       "delete the pod so the runtime re-creates it")
    return ""


def execute(env: Mapping[str, str], stdin: bytes, call: AgentCall = client.call) -> Outcome:
    """Run one CNI command; never raises.

    Side effects: only through ``call`` (agent API requests); the caller
    prints ``stdout``, writes the log records and exits with ``exit_code``.
    """
    outcome = Outcome()
    run = _Run(env, outcome)
    version = spec.peek_version(stdin)
    try:
        cni_env = spec.parse_env(env)
        if cni_env.command == "VERSION":
            outcome.stdout = spec.dumps(spec.version_result())
            return outcome
        conf = spec.parse_config(stdin)
        version = conf.cni_version
        outcome.log_file = conf.plugin.log_file
        handler = {"ADD": _add, "DEL": _del, "CHECK": _check}[cni_env.command]
        outcome.stdout = handler(cni_env, conf, call, run)
    except CniError as exc:
        run.log("error", "command failed", code=exc.code, msg=exc.msg, details=exc.details)
        outcome.stdout = spec.dumps(exc.to_json(version))
        outcome.exit_code = 1
    except Exception as exc:  # a bug: still answer in protocol
        run.log("error", "internal error", error=repr(exc))
        err = CniError(spec.ERR_INTERNAL, "meshagent-cni internal error",
                       f"{exc!r}; please report it with the plugin log")
        outcome.stdout = spec.dumps(err.to_json(version))
        outcome.exit_code = 1
    return outcome


def write_log(outcome: Outcome) -> None:
    """Append the records as JSON lines to the log file; stderr if that fails."""
    if not outcome.log:
        return
    text = "".join(json.dumps(r, default=str) + "\n" for r in outcome.log)
    if outcome.log_file:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(outcome.log_file) or "/", exist_ok=True)
            fd = os.open(outcome.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
            return
    sys.stderr.write(text)


def main() -> None:
    """The ``meshagent-cni`` executable.

    Side effects: reads stdin (at most 4 MiB), talks to the agent socket,
    appends to the log file, prints the CNI result or error on stdout and
    exits 0 on success, 1 on error.
    """
    stdin = sys.stdin.buffer.read(MAX_STDIN_BYTES + 1)
    if len(stdin) > MAX_STDIN_BYTES:
        stdin = b"<too large>"  # fails to decode: code 6
    outcome = execute(os.environ, stdin)
    sys.stdout.write(outcome.stdout)
    sys.stdout.flush()
    write_log(outcome)
    sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
