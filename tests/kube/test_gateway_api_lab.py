"""The Gateway API (gateway.networking.k8s.io/v1) against the lab API server: the real
kubectl applies and gets Gateways, GatewayClasses and HTTPRoutes (bad ones refused,
naming the field); the controller's model carries the waypoint bindings
``assign_waypoints`` computes over the API's objects, a namespace's
``istio.io/use-waypoint`` label binds and unbinds; a server without the Gateway API
CRDs (404) gets a model without waypoint bindings, never none at all."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kube_helpers import namespace, pod, until
from kubernetes import config

from agent.k8s.controller import NodeController
from agent.k8s.convert import Converted
from agent.k8s.reconcile import Enrolled
from agent.k8s.watch import ClusterWatch, Kind, targets
from agent.model.types import GatewayAddress, NamespacedHostname

GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: apps
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
"""
GATEWAY_CLASS = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: istio-waypoint}
spec: {controllerName: istio.io/mesh-controller}
"""
ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: apps}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"""
WEB = {"apiVersion": "v1", "kind": "Service",
       "metadata": {"name": "web", "namespace": "apps"},
       "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80,
                                                      "targetPort": 8080}]}}
WAYPOINT = GatewayAddress(NamespacedHostname("apps", "waypoint.apps.svc.cluster.local"),
                          15008)


def test_kubectl_applies_and_gets_gateway_api_objects(kubelab, kubectl):
    kubelab.apply(namespace("apps"))
    for doc in (GATEWAY_CLASS, GATEWAY, ROUTE):
        assert "created" in kubectl("apply", "-f", "-", stdin=doc).stdout
    got = json.loads(kubectl("get", "gateway", "-n", "apps", "waypoint", "-o", "json").stdout)
    assert got["spec"]["listeners"][0]["port"] == 15008
    assert got["metadata"]["labels"] == {"istio.io/waypoint-for": "service"}
    assert "istio-waypoint" in kubectl("get", "gatewayclasses").stdout
    assert "web" in kubectl("get", "httproutes.gateway.networking.k8s.io", "-n", "apps").stdout
    changed = GATEWAY.replace("waypoint-for: service", "waypoint-for: all")
    assert "configured" in kubectl("apply", "-f", "-", stdin=changed).stdout
    kubectl("label", "gateway", "-n", "apps", "waypoint", "team=b")
    got = json.loads(kubectl("get", "gtw", "-n", "apps", "waypoint", "-o", "json").stdout)
    assert got["metadata"]["labels"] == {"istio.io/waypoint-for": "all", "team": "b"}
    assert "deleted" in kubectl("delete", "httproute", "-n", "apps", "web").stdout


def test_bad_gateway_is_refused_naming_the_field(kubelab, kubectl):
    kubelab.apply(namespace("apps"))
    no_port = GATEWAY.replace("port: 15008, ", "")
    out = kubectl("apply", "-f", "-", stdin=no_port, check=False)
    assert out.returncode != 0 and "spec.listeners[0].port" in out.stderr
    bad_from = GATEWAY.replace("protocol: HBONE}", "protocol: HBONE, allowedRoutes: "
                               "{namespaces: {from: Everyone}}}")
    out = kubectl("apply", "-f", "-", stdin=bad_from, check=False)
    assert out.returncode != 0 and "allowedRoutes.namespaces.from" in out.stderr
    assert kubectl("get", "gateways", "-A", "-o", "name").stdout.split() == []


class NoBackend:
    async def enrolled(self) -> dict[str, Enrolled]:
        return {}

    async def enroll(self, p: Any) -> None:
        raise AssertionError("nothing is enrolled here")

    async def unenroll(self, key: str) -> None:
        raise AssertionError("nothing is enrolled here")


def _run(kubeconfig: Any, scenario: Any) -> None:
    async def main() -> None:
        api = config.new_client_from_config(str(kubeconfig))
        models: list[Converted] = []
        controller = NodeController("n1", NoBackend(), None,
                                    on_model=lambda m, _p: models.append(m))
        watch = ClusterWatch(api, targets("n1"), watch_timeout=5)
        watch.start(asyncio.get_running_loop())
        stop = asyncio.Event()
        task = asyncio.create_task(controller.run(watch, full_every=60, model_every=0.1,
                                                  stop=stop))
        try:
            await scenario(controller, models)
        finally:
            stop.set()
            await task
            await asyncio.to_thread(watch.stop)
            api.close()
    asyncio.run(main())


def _service_waypoint(models: list[Converted]) -> GatewayAddress | None:
    svc = next(s for s in models[-1].model.services if s.name == "web")
    return svc.waypoint


def test_model_carries_the_waypoint_bindings_from_the_api(kubelab, kubeconfig, kubectl):
    kubelab.apply(namespace("apps"))
    kubelab.apply(WEB)
    kubelab.apply(pod("web-1", namespace="apps", ip="10.1.0.5"))

    async def scenario(controller: NodeController, models: list[Converted]) -> None:
        await until(lambda: bool(models), "a model")
        assert _service_waypoint(models) is None
        await asyncio.to_thread(kubectl, "label", "namespace", "apps",
                                "istio.io/use-waypoint=waypoint")
        # named but not there yet: bound to it anyway, so the tunnel fails closed
        await until(lambda: _service_waypoint(models) == WAYPOINT, "bound (missing)")
        await asyncio.to_thread(kubectl, "apply", "-f", "-", stdin=GATEWAY)
        await until(lambda: Kind.GATEWAYS in controller.cache.synced
                    and controller.cache.raw[Kind.GATEWAYS], "the Gateway seen")
        # a service-only waypoint: the Service is bound, the pod inherits nothing
        await until(lambda: _service_waypoint(models) == WAYPOINT and next(
            w for w in models[-1].model.workloads if w.name == "web-1").waypoint is None,
            "bound to the Gateway")
        await asyncio.to_thread(kubectl, "label", "pod", "-n", "apps", "web-1",
                                "istio.io/use-waypoint=waypoint")
        await until(lambda: next(w for w in models[-1].model.workloads
                                 if w.name == "web-1").waypoint is None, "pod refused")
        await asyncio.to_thread(kubectl, "label", "namespace", "apps", "istio.io/use-waypoint-")
        await until(lambda: _service_waypoint(models) is None, "unbound")

    _run(kubeconfig, scenario)


def test_no_gateway_api_crds_model_without_waypoints(kubelab, kubeconfig):
    kubelab.faults.missing_groups.add("gateway.networking.k8s.io")
    kubelab.apply(namespace("apps", {"istio.io/use-waypoint": "waypoint"}))
    kubelab.apply(WEB)

    async def scenario(controller: NodeController, models: list[Converted]) -> None:
        await until(lambda: bool(models), "a model although the Gateway API is missing")
        assert _service_waypoint(models) is None
        failure = controller.cache.failures[Kind.GATEWAYS]
        assert failure.code == 404 and "install the Gateway API CRDs" in failure.problem
        assert Kind.SERVICES in controller.cache.synced

    _run(kubeconfig, scenario)
