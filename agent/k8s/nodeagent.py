"""The daemon's Kubernetes side: watches, enrollment through the daemon, the model.

:class:`KubernetesNode` is what ``meshagent run`` starts when ``[k8s] enabled``:

- an API client from ``k8s.kubeconfig`` (or in-cluster credentials);
- a :class:`~agent.k8s.watch.ClusterWatch` (this node's pods, namespaces and, with
  ``k8s.model``, the whole cluster's pods, Services, EndpointSlices and
  AuthorizationPolicies), consumed by a :class:`~agent.k8s.controller.NodeController`;
- :class:`DaemonBackend`: the controller's enroll/unenroll go through the daemon's
  own ``pod_add``/``pod_del`` requests on its kernel thread (the all-or-nothing
  transaction of :mod:`agent.enrollment`), after finding the pod's netns from its IP
  (:mod:`agent.k8s.podnetns`);
- :class:`~agent.k8s.controller.ApiAnnotator`: ``ambient.istio.io/redirection``;
- :meth:`KubernetesNode.write_model`: the cluster model as ztunnel local-config (its
  JSON spelling)
  to ``tunnel.model_file`` and the AuthorizationPolicies to
  ``<tunnel.policy_dir>/kubernetes-api.yaml``, each replaced atomically, which the
  tunnel already watches;
- :meth:`KubernetesNode.pod_verdict`: the CNI plugin's question "enroll this new
  pod?" answered from the cache, or by fetching the pod once (istio
  cni/pkg/plugin/plugin.go asks the API server for the pod in CmdAdd).

An unreachable API server only produces watch failures: the cache, the registry and
so the datapath stay as last seen, and the files are rewritten only from a complete
list of every kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from kubernetes import client
from kubernetes import config as kube_config

from agent.contracts.api import ErrorCode
from agent.k8s.controller import ApiAnnotator, NodeController, node_facts
from agent.k8s.convert import Converted, policy_document
from agent.k8s.objects import Namespace, ObjectProblem, Pod, read_namespace, read_pod
from agent.k8s.podnetns import PodNetnsLocator
from agent.k8s.reconcile import Enrolled, plan
from agent.k8s.rules import dns_capture_choice, verdict
from agent.k8s.watch import ClusterWatch, Kind, targets
from agent.model.loader import model_to_json_yaml
from agent.model.types import Model
from agent.policy.engine import PolicySet

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("meshagent.k8s")

POLICY_FILE = "kubernetes-api.yaml"
REQUEST_TIMEOUT = (5, 10)


class EnrollFailed(RuntimeError):
    """The daemon refused an enrollment the watch asked for (rolled back)."""


class KubernetesConfigError(RuntimeError):
    """The API server's address or credentials cannot be loaded; says what to do."""


class KubernetesUnavailable(RuntimeError):
    """The API server could not answer; ``code`` is the agent API's error code."""

    code = ErrorCode.KUBERNETES_UNAVAILABLE


def node_name(configured: str, tunnel_node: str) -> str:
    """``k8s.node_name``, else $NODE_NAME (the DaemonSet's downward API), else
    ``tunnel.node_name``, else the host name."""
    return configured or os.environ.get("NODE_NAME", "") or tunnel_node or socket.gethostname()


def pod_add_request(pod: Pod, netns: str) -> dict[str, Any]:
    """The daemon's ``pod_add`` for an API pod (pure)."""
    request: dict[str, Any] = {
        "op": "pod_add", "netns": netns, "ifname": "eth0", "name": pod.meta.name,
        "namespace": pod.meta.namespace, "service_account": pod.service_account,
        "labels": dict(pod.meta.labels), "uid": pod.meta.uid}
    choice = dns_capture_choice(pod.meta.annotations)
    if choice is not None:
        request["dns_capture"] = choice
    return request


def write_text_atomic(path: Path, text: str) -> None:
    """Side effects: creates ``path``'s directory, writes a temporary file beside it
    (a name the tunnel's watchers skip) and renames it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class DaemonBackend:
    """Enroll and unenroll through the daemon's API handler on its kernel thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._locator: PodNetnsLocator | None = None

    async def _kernel(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.agent.kernel, fn, *args)

    async def enrolled(self) -> Mapping[str, Enrolled]:
        def read() -> dict[str, Enrolled]:
            return {p.key: Enrolled(p.key, p.uid) for p in self.agent.state.registry}
        result: dict[str, Enrolled] = await self._kernel(read)
        return result

    def _locator_on_kernel(self) -> PodNetnsLocator:
        if self._locator is None:
            assert self.agent.enroller is not None
            self._locator = PodNetnsLocator(self.agent.enroller.ipr, self.agent.enroller.rtnl)
        return self._locator

    def _enroll(self, pod: Pod) -> dict[str, Any]:
        """Kernel thread: find the netns, then the daemon's pod_add transaction."""
        netns = self._locator_on_kernel().find(pod.ips[0])
        return self.agent.handle(pod_add_request(pod, netns))

    async def enroll(self, pod: Pod) -> None:
        response: dict[str, Any] = await self._kernel(self._enroll, pod)
        if not response["ok"] and response.get("code") != ErrorCode.ALREADY_ENROLLED.value:
            raise EnrollFailed(response.get("error"))

    async def unenroll(self, key: str) -> None:
        namespace, _, name = key.partition("/")
        response: dict[str, Any] = await self._kernel(
            self.agent.handle, {"op": "pod_del", "namespace": namespace, "name": name})
        if not response["ok"] and response.get("code") != ErrorCode.NOT_ENROLLED.value:
            raise EnrollFailed(response.get("error"))

    def close(self) -> None:
        """Kernel thread only (or after it stopped)."""
        if self._locator is not None:
            self._locator.close()


@dataclass(frozen=True)
class PodVerdict:
    enroll: bool
    verdict: str
    service_account: str
    uid: str
    labels: Mapping[str, str]
    dns_capture: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"enroll": self.enroll, "verdict": self.verdict,
                "service_account": self.service_account, "uid": self.uid,
                "labels": dict(self.labels), "dns_capture": self.dns_capture}


def api_client(kubeconfig: str, pool: int) -> client.ApiClient:
    """Side effects: reads the kubeconfig (or the service account's token and CA).
    Raises :class:`KubernetesConfigError`."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            kube_config.load_kube_config(config_file=kubeconfig,
                                         client_configuration=configuration)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
    except (kube_config.ConfigException, OSError, ValueError) as e:
        where = f"k8s.kubeconfig={kubeconfig!r}" if kubeconfig else "in-cluster credentials"
        raise KubernetesConfigError(
            f"cannot use {where}: {e}. Point k8s.kubeconfig at a readable kubeconfig, run "
            "in a pod with a service account, or set k8s.enabled = false") from e
    configuration.connection_pool_maxsize = pool  # one streaming watch per target
    return client.ApiClient(configuration)


class KubernetesNode:
    def __init__(self, agent: Agent) -> None:
        cfg = agent.cfg
        self.agent = agent
        self.k8s = cfg.k8s
        self.node = node_name(cfg.k8s.node_name, cfg.tunnel.node_name)
        self.model_file = Path(cfg.tunnel.model_file) if cfg.tunnel.model_file else None
        self.policy_file = Path(cfg.tunnel.policy_dir) / POLICY_FILE
        self.targets = targets(self.node, model=cfg.k8s.model)
        self.api = api_client(cfg.k8s.kubeconfig, len(self.targets) + 4)
        self.core = client.CoreV1Api(self.api)
        self.watch = ClusterWatch(self.api, self.targets, resync_period=cfg.k8s.resync_seconds)
        self.backend = DaemonBackend(agent)
        self.controller = NodeController(
            self.node, self.backend, ApiAnnotator(self.api),
            exclude_namespaces=frozenset(cfg.k8s.exclude_namespaces),
            on_model=self.write_model if cfg.k8s.model else None)
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._written: dict[Path, str] = {}
        self._model_written: Model | None = None  # the model the model file holds
        self.models_written = 0

    def start(self) -> None:
        """Side effects: one thread per watch target, one asyncio task."""
        loop = asyncio.get_running_loop()
        self.watch.start(loop)
        self.task = loop.create_task(self.controller.run(
            self.watch, full_every=self.k8s.reconcile_seconds, stop=self.stop_event))
        log.info("watching the API server %s as node %s (%d watches)",
                 self.api.configuration.host, self.node, len(self.targets))

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await asyncio.to_thread(self.watch.stop)
        self.agent.kernel.submit(self.backend.close).result()
        self.api.close()

    # --- the tunnel's model ---------------------------------------------------------

    async def write_model(self, converted: Converted, _policies: PolicySet) -> None:
        """Side effects: rewrites ``tunnel.model_file`` and the policy file when their
        text changed (atomically; see :func:`write_text_atomic`). The model is written
        in local-config's JSON spelling (:func:`~agent.model.loader.model_to_json_yaml`:
        at 10,000 pods a fraction of the time block YAML takes to write and to read),
        and not rendered again while it equals the one last written."""
        policies = [policy_document(o) for _k, o in
                    sorted(self.controller.cache.raw[Kind.AUTHORIZATION_POLICIES].items())]
        model = converted.model

        def render_and_write() -> None:
            files = {self.policy_file: "# AuthorizationPolicies from the API server "
                     "(written by meshagent)\n" + yaml.safe_dump_all(policies, sort_keys=False)}
            if self.model_file is not None and model != self._model_written:
                files[self.model_file] = model_to_json_yaml(model)
            for path, text in files.items():
                if self._written.get(path) != text:
                    write_text_atomic(path, text)
                    self._written[path] = text
            if self.model_file is not None:
                self._model_written = model
        await asyncio.to_thread(render_and_write)
        self.models_written += 1

    # --- the CNI plugin's question --------------------------------------------------

    async def _fetch(self, fn: Any, *args: Any) -> Any:
        def call() -> Any:
            try:
                return self.api.sanitize_for_serialization(
                    fn(*args, _request_timeout=REQUEST_TIMEOUT))
            except client.exceptions.ApiException as e:
                raise KubernetesUnavailable(
                    f"the API server answered {e.status} {e.reason}: check the agent's RBAC "
                    "(get on pods and namespaces) and that the pod exists") from e
            except Exception as e:
                raise KubernetesUnavailable(
                    f"the API server is unreachable ({e}); the runtime retries the pod") from e
        return await asyncio.to_thread(call)

    async def pod_verdict(self, namespace: str, name: str) -> PodVerdict:
        """Whether this node should enroll ``namespace/name`` now (the rules of
        :func:`agent.k8s.rules.verdict`). A pod or namespace the watch has not seen
        yet is fetched once. Raises :class:`KubernetesUnavailable`."""
        cache = self.controller.cache
        key = f"{namespace}/{name}"
        pod: Pod | ObjectProblem | None = cache.node_pods.get(key)
        if pod is None:
            pod = read_pod(await self._fetch(self.core.read_namespaced_pod, name, namespace))
        ns: Namespace | ObjectProblem | None = cache.namespaces.get(namespace)
        if ns is None:
            ns = read_namespace(await self._fetch(self.core.read_namespace, namespace))
        for problem in (pod, ns):
            if isinstance(problem, ObjectProblem):
                raise KubernetesUnavailable(f"cannot read {problem}")
        assert isinstance(pod, Pod) and isinstance(ns, Namespace)
        v = verdict(pod.facts(), ns.labels, frozenset(self.k8s.exclude_namespaces))
        return PodVerdict(v.enroll, v.value, pod.service_account, pod.meta.uid,
                          dict(pod.meta.labels), dns_capture_choice(pod.meta.annotations))

    # --- status -----------------------------------------------------------------------

    def status(self, enrolled: Mapping[str, Enrolled]) -> dict[str, Any]:
        """The ``kubernetes`` block of ``meshagent status`` (any thread: reads copies)."""
        cache = self.controller.cache
        pods, namespaces = dict(cache.node_pods), dict(cache.namespaces)
        synced = cache.is_synced(Kind.NODE_PODS, Kind.NAMESPACES)
        p = plan(pods, namespaces, enrolled, self.node, synced,
                 frozenset(self.k8s.exclude_namespaces))
        last = self.controller.last
        return {
            "server": self.api.configuration.host, "node": self.node, "synced": synced,
            "watches": node_facts(cache),
            "pods": [{"pod": key, "verdict": p.verdicts[key].value if key in p.verdicts
                      else None, "enrolled": key in enrolled, "ips": list(pod.ips)}
                     for key, pod in sorted(pods.items())],
            "pending": {"enroll": [a.pod.key for a in p.enroll],
                        "unenroll": [a.key for a in p.unenroll]},
            "last_failures": list(last.failures) if last else [],
            "models_written": self.models_written,
            "problems": list(cache.problems)[-10:],
        }
