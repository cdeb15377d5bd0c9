"""Which destinations use which waypoint, as istiod decides it (pure).

Follows istio/istio ``pilot/pkg/serviceregistry/ambient/waypoints.go``
(``pilot/pkg/serviceregistry/kube/controller/ambient`` in older trees):

- ``GetUseWaypoint``: ``istio.io/use-waypoint: <name>`` names a waypoint in the
  object's own namespace, or in ``istio.io/use-waypoint-namespace``; the value
  ``none`` opts the object out (a waypoint called "none" cannot be used).
- ``fetchWaypointForTarget``: the object's own label wins; ``none`` on the object
  stops there (no namespace fallback); else the namespace's label. A named waypoint
  that does not exist is "not ready" (:attr:`BindingOutcome.WAYPOINT_MISSING`: the node
  tunnel fails such traffic closed). The waypoint must allow attachment from the
  object's namespace (``AllowsAttachmentFromNamespace``: its listener's
  ``allowedRoutes.namespaces.from`` ``Same`` (default), ``All`` or ``Selector``; the HBONE
  listener on 15008 is the one read, ``makeAllowedRoutes``).
- ``gatewayToWaypointTransform``: ``istio.io/waypoint-for`` on the Gateway (else its
  GatewayClass, else ``service``) says what traffic it takes: ``service``,
  ``workload``, ``all`` or ``none``. ``fetchWaypointForService`` refuses a waypoint not
  for service traffic; ``fetchWaypointForWorkload`` one not for workload traffic (and
  silently so when the workload only inherited the namespace's label).
- ``fetchWaypointForService``: a waypoint's own Service never uses a waypoint
  (``gateway.istio.io/managed: istio.io-mesh-controller``), and a waypoint's own
  pod never inherits its namespace's (``fetchWaypointForInstance``). We extend that
  to *loops*: a waypoint pod labelled with ``istio.io/use-waypoint`` itself (directly
  or through a chain of waypoints) is refused with :attr:`BindingOutcome.LOOP`
  (Istio ignores the label).

Fail closed (our rule, not Istio's): a binding document we cannot read (a
:class:`Fault`: malformed or unsupported ``istio.io/use-waypoint``,
``istio.io/use-waypoint-namespace``, ``istio.io/waypoint-for``, ``allowedRoutes``, or a
document the feed rejects) makes every target it could bind
:attr:`BindingOutcome.UNRESOLVED`, never "not bound": a broken Service or Pod
document its object; a broken Namespace document the objects that would inherit from
it (and those whose waypoint admits namespaces by ``Selector``); a broken Gateway
(or its GatewayClass, when the Gateway has no ``waypoint-for`` of its own) every
object naming it; an unreadable file everything. A document without a name (or
namespace) covers every object of its kind (in its namespace).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.model.types import BindingDocument, UnresolvedBinding

USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR = "istio.io/waypoint-for"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_LABEL = "gateway.istio.io/managed"
MESH_CONTROLLER = "istio.io-mesh-controller"


class TrafficType(enum.Enum):
    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"


class FromNamespaces(enum.Enum):
    SAME = "Same"
    ALL = "All"
    SELECTOR = "Selector"


class TargetKind(enum.Enum):
    SERVICE = "service"
    WORKLOAD = "workload"


class BindingOutcome(enum.Enum):
    BOUND = "bound"
    NOT_BOUND = "not_bound"                # no label anywhere
    OPTED_OUT = "opted_out"                # use-waypoint: none
    WAYPOINT_MISSING = "waypoint_missing"  # ReportWaypointIsNotReady
    ATTACHMENT_DENIED = "attachment_denied"  # ReportWaypointAttachmentDenied
    UNSUPPORTED_TRAFFIC = "unsupported_traffic_type"  # ReportWaypointUnsupportedTrafficType
    LOOP = "loop"
    UNRESOLVED = "waypoint_unresolved"     # a document that could bind it is unreadable

    @property
    def fails_closed(self) -> bool:
        """Traffic the node tunnel must refuse (bound, but to nothing usable, or we
        cannot tell what it is bound to)."""
        return self in (BindingOutcome.WAYPOINT_MISSING, BindingOutcome.LOOP,
                        BindingOutcome.UNRESOLVED)


@dataclass(frozen=True)
class LabelSelector:
    """``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist)."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class Waypoint:
    """A waypoint Gateway: ``namespace/name``, what traffic it takes, who may attach."""

    namespace: str
    name: str
    traffic: TrafficType = TrafficType.SERVICE
    allowed_from: FromNamespaces = FromNamespaces.SAME
    selector: LabelSelector | None = None
    service_account: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def allows_attachment_from(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """waypoints.go ``AllowsAttachmentFromNamespace``."""
        if self.allowed_from is FromNamespaces.ALL:
            return True
        if self.allowed_from is FromNamespaces.SELECTOR:
            return self.selector is not None and self.selector.matches(labels)
        return self.namespace == namespace


@dataclass(frozen=True)
class Object:
    """A Namespace, Service or Pod: its namespace, name and labels."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    """A binding document that cannot be read and the objects it could bind:
    ``target`` documents named ``namespace``/``name`` (``""``: any). ``cause`` is the
    document and field at fault (for a Gateway whose GatewayClass is broken, the
    class); ``problem`` says what is wrong with it."""

    target: BindingDocument
    namespace: str
    name: str
    cause: UnresolvedBinding
    problem: str

    @classmethod
    def of(cls, cause: UnresolvedBinding, problem: str) -> Fault:
        return cls(cause.kind, cause.namespace, cause.name, cause, problem)

    def covers(self, kind: BindingDocument, namespace: str, name: str) -> bool:
        """Whether the document could be ``kind`` ``namespace/name`` (a Namespace's
        ``namespace`` is "")."""
        if self.target is BindingDocument.UNKNOWN:
            return True
        return (self.target is kind and (not self.namespace or self.namespace == namespace)
                and (not self.name or self.name == name))


@dataclass(frozen=True)
class Binding:
    outcome: BindingOutcome
    waypoint: Waypoint | None = None
    named: str | None = None  # namespace/name the labels asked for
    reason: str = ""
    fault: Fault | None = None  # why it is UNRESOLVED

    @property
    def bound(self) -> bool:
        return self.outcome is BindingOutcome.BOUND


def use_waypoint(labels: Mapping[str, str], default_namespace: str) -> tuple[str | None, bool]:
    """waypoints.go ``GetUseWaypoint``: (``namespace/name`` or None, is ``none``)."""
    value = labels.get(USE_WAYPOINT)
    if value is None:
        return None, False
    if value == "none":
        return None, True
    namespace = labels.get(USE_WAYPOINT_NAMESPACE, default_namespace)
    return f"{namespace}/{value}", False


def waypoint_traffic(gateway_labels: Mapping[str, str],
                     class_labels: Mapping[str, str] | None = None) -> TrafficType:
    """``gatewayToWaypointTransform``: the Gateway's label, else its class's, else service.
    An unknown value is ``none`` (takes nothing: never wider than written)."""
    raw = gateway_labels.get(WAYPOINT_FOR, (class_labels or {}).get(WAYPOINT_FOR, "service"))
    try:
        return TrafficType(raw)
    except ValueError:
        return TrafficType.NONE


class Bindings:
    """Resolve bindings over the known namespaces, waypoints and waypoint instances."""

    def __init__(self, namespaces: Sequence[Object], waypoints: Sequence[Waypoint],
                 faults: Sequence[Fault] = ()) -> None:
        self.namespaces = {n.name: n for n in namespaces}
        self.waypoints = {w.key: w for w in waypoints}
        self.faults = tuple(faults)

    def _unresolved(self, kind: BindingDocument, namespace: str, name: str,
                    named: str | None = None) -> Binding | None:
        """UNRESOLVED when a broken document could be ``kind namespace/name``."""
        for fault in self.faults:
            if fault.covers(kind, namespace, name):
                return Binding(BindingOutcome.UNRESOLVED, named=named, fault=fault,
                               reason=f"{fault.cause} cannot be read ({fault.problem})")
        return None

    def _namespace_unresolved(self, namespace: str) -> Binding | None:
        return self._unresolved(BindingDocument.NAMESPACE, "", namespace)

    def _waypoint_unresolved(self, named: str) -> Binding | None:
        namespace, _, name = named.partition("/")
        return self._unresolved(BindingDocument.GATEWAY, namespace, name, named)

    def _namespace_labels(self, namespace: str) -> Mapping[str, str]:
        ns = self.namespaces.get(namespace)
        return ns.labels if ns is not None else {}

    def _for_target(self, obj: Object) -> Binding:
        """``fetchWaypointForTarget``."""
        named, is_none = use_waypoint(obj.labels, obj.namespace)
        if is_none:
            return Binding(BindingOutcome.OPTED_OUT, reason=f"{USE_WAYPOINT}: none")
        if named is None:
            unknown = self._namespace_unresolved(obj.namespace)
            if unknown is not None:
                return unknown
            named, _ = use_waypoint(self._namespace_labels(obj.namespace), obj.namespace)
            if named is None:
                return Binding(BindingOutcome.NOT_BOUND)
        unknown = self._waypoint_unresolved(named)
        if unknown is not None:
            return unknown
        waypoint = self.waypoints.get(named)
        if waypoint is None:
            return Binding(BindingOutcome.WAYPOINT_MISSING, named=named,
                           reason=f"waypoint {named} does not exist (not ready)")
        if waypoint.allowed_from is FromNamespaces.SELECTOR:
            unknown = self._namespace_unresolved(obj.namespace)  # its labels are unknown
            if unknown is not None:
                return unknown
        if not waypoint.allows_attachment_from(obj.namespace,
                                               self._namespace_labels(obj.namespace)):
            return Binding(BindingOutcome.ATTACHMENT_DENIED, waypoint, named,
                           f"waypoint {named} does not allow routes from namespace "
                           f"{obj.namespace} ({waypoint.allowed_from.value})")
        return Binding(BindingOutcome.BOUND, waypoint, named)

    def _instance_of(self, obj: Object) -> Waypoint | None:
        """``fetchWaypointForInstance`` (pods) and the managed label (services)."""
        name = obj.labels.get(GATEWAY_NAME_LABEL)
        if name is None:
            return None
        return self.waypoints.get(f"{obj.namespace}/{name}")

    def for_service(self, service: Object) -> Binding:
        """``fetchWaypointForService`` (+ loop detection, + fail closed)."""
        unknown = self._unresolved(BindingDocument.SERVICE, service.namespace, service.name)
        if unknown is not None:
            return unknown
        if service.labels.get(MANAGED_LABEL) == MESH_CONTROLLER:
            return Binding(BindingOutcome.NOT_BOUND, reason="a waypoint's own service")
        binding = self._for_target(service)
        if not binding.bound:
            return binding
        assert binding.waypoint is not None
        if binding.waypoint.traffic not in (TrafficType.SERVICE, TrafficType.ALL):
            return Binding(BindingOutcome.UNSUPPORTED_TRAFFIC, binding.waypoint, binding.named,
                           f"waypoint {binding.named} is for {binding.waypoint.traffic.value} "
                           "traffic, not service")
        return self._check_loop(service, binding)

    def for_workload(self, pod: Object) -> Binding:
        """``fetchWaypointForWorkload`` (+ loop detection). A waypoint's own pod never
        inherits its namespace's waypoint (workloads.go: ``fetchWaypointForInstance``
        comes first and an instance gets no waypoint); one labelled itself is a loop.
        A pod of a Gateway we cannot read is unresolved (is it an instance or not?)."""
        unknown = self._unresolved(BindingDocument.POD, pod.namespace, pod.name)
        gateway_name = pod.labels.get(GATEWAY_NAME_LABEL)
        if unknown is None and gateway_name is not None:
            unknown = self._waypoint_unresolved(f"{pod.namespace}/{gateway_name}")
        if unknown is not None:
            return unknown
        if self._instance_of(pod) is not None and USE_WAYPOINT not in pod.labels:
            return Binding(BindingOutcome.NOT_BOUND, reason="a waypoint's own pod")
        binding = self._for_target(pod)
        if not binding.bound:
            return binding
        assert binding.waypoint is not None
        if binding.waypoint.traffic not in (TrafficType.WORKLOAD, TrafficType.ALL):
            if USE_WAYPOINT not in pod.labels:
                return Binding(BindingOutcome.NOT_BOUND, reason="inherited a service waypoint")
            return Binding(BindingOutcome.UNSUPPORTED_TRAFFIC, binding.waypoint, binding.named,
                           f"waypoint {binding.named} is for {binding.waypoint.traffic.value} "
                           "traffic, not workload")
        return self._check_loop(pod, binding)

    def _check_loop(self, obj: Object, binding: Binding) -> Binding:
        """A waypoint instance (pod labelled with its gateway name) bound to a waypoint,
        including itself, would send its own upstream traffic back into the mesh's L7
        path: refused. Follows the chain of waypoint pods to find longer loops."""
        own = self._instance_of(obj)
        if own is None:
            return binding
        seen = [own.key]
        current = binding.waypoint
        while current is not None:
            if current.key in seen:
                return Binding(BindingOutcome.LOOP, binding.waypoint, binding.named,
                               "waypoint binding loop: " + " -> ".join([*seen, current.key]))
            seen.append(current.key)
            # The next hop: the waypoint's own namespace label (how its pods would bind).
            unknown = self._namespace_unresolved(current.namespace)
            if unknown is not None:
                return unknown
            named, _ = use_waypoint(self._namespace_labels(current.namespace),
                                    current.namespace)
            unknown = self._waypoint_unresolved(named) if named else None
            if unknown is not None:
                return unknown
            current = self.waypoints.get(named) if named else None
        return Binding(BindingOutcome.LOOP, binding.waypoint, binding.named,
                       f"a waypoint instance ({own.key}) may not itself use a waypoint")
