"""Gateway API HTTPRoute routing for a waypoint (pure).

An HTTPRoute attaches to a Service with ``parentRefs: [{kind: Service, group: "",
name}]`` (GAMMA). Its rules are expanded to one route per match and ordered as Istio
does (istio/istio ``pilot/pkg/config/kube/gateway/conversion.go``: routes by creation
time, then namespace, then name (``sortRoutesByCreationTime``); within them,
``sortHTTPRoutes``: path Exact > PathPrefix > RegularExpression (``getURIRank``), longer
path first (``getURILength``), a method match first, more header matches first, more
query matches first; a stable sort keeps rule order otherwise).

Matching (Gateway API ``HTTPRouteMatch``): ``PathPrefix`` matches whole path elements
(``/foo`` matches ``/foo`` and ``/foo/bar``, not ``/foobar``; a trailing ``/`` in the
value is ignored); ``Exact`` the whole path; ``RegularExpression`` the whole path (RE2
there, Python ``re.fullmatch`` here); headers are case-insensitive names with Exact
(case-sensitive values) or RegularExpression; query parameters likewise by exact name;
method exactly. A rule without matches is ``PathPrefix /``. No route matches: 404.

Per rule: weighted ``backendRefs`` (weight default 1; all 0 -> 500 as the spec says),
``RequestHeaderModifier`` (set, add, remove), ``timeouts.request`` /
``timeouts.backendRequest`` (Go durations), ``retry`` (Gateway API ``HTTPRouteRetry``:
attempts, codes, backoff). Without a ``retry`` Istio's default applies
(``pilot/pkg/networking/core/route/retry/retry.go`` :: ``DefaultPolicy``: 2 retries,
retryOn ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``
with retriable status 503, retry on another host (``RetryPreviousHosts``)).

Fault injection has no Gateway API field; a rule may carry Istio's VirtualService
``fault`` (``delay: {percentage: {value}, fixedDelay}``, ``abort: {percentage: {value},
httpStatus}``) under the key ``fault`` - a meshagent extension, named as such.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled",
                    "retriable-status-codes")
DEFAULT_RETRIABLE_CODES = (503,)
API_VERSIONS = frozenset({"gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"})
# Envoy's default route timeout is 15 s; Istio sets 0 (none) on its routes unless the
# route names one. We keep a bound anyway: never an unbounded wait.
DEFAULT_REQUEST_TIMEOUT = 0.0


class PathKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"

    @property
    def rank(self) -> int:
        return {PathKind.EXACT: 3, PathKind.PREFIX: 2, PathKind.REGEX: 1}[self]


class RouteInvalid(ValueError):
    """An HTTPRoute the Gateway API validation would reject (message names the field)."""


class RouteOutcome(enum.Enum):
    ROUTED = "routed"
    NO_ROUTE = "no_route"           # 404 NR
    ABORTED = "aborted"             # fault injection abort (FI)
    NO_BACKEND = "no_backend"       # every weight 0 (500)


@dataclass(frozen=True)
class ValueMatch:
    name: str
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(actual) is not None
        return actual == self.value


@dataclass(frozen=True)
class Match:
    path_kind: PathKind = PathKind.PREFIX
    path: str = "/"
    path_regex: re.Pattern[str] | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches_path(self, path: str) -> bool:
        path = path.split("?", 1)[0]
        if self.path_kind is PathKind.EXACT:
            return path == self.path
        if self.path_kind is PathKind.REGEX:
            assert self.path_regex is not None
            return self.path_regex.fullmatch(path) is not None
        prefix = self.path.rstrip("/")
        if not prefix:
            return path.startswith("/")
        return path == prefix or path.startswith(prefix + "/")

    def matches(self, request: RouteRequest) -> bool:
        if not self.matches_path(request.path):
            return False
        if self.method is not None and request.method != self.method:
            return False
        for h in self.headers:
            if not h.matches(request.header(h.name)):
                return False
        params = request.query_params()
        return all(q.matches(params.get(q.name)) for q in self.query)

    def sort_key(self) -> tuple[int, int, int, int, int]:
        """Descending precedence (negated for an ascending sort), conversion.go."""
        length = len(self.path_regex.pattern) if self.path_regex is not None else len(self.path)
        return (-self.path_kind.rank, -length, 0 if self.method else 1,
                -len(self.headers), -len(self.query))


@dataclass(frozen=True)
class BackendRef:
    name: str
    namespace: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Gateway API semantics: set overwrites, add appends, remove drops (by name,
        case-insensitively)."""
        drop = {n.lower() for n in self.remove} | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        out += [(n.lower(), v) for n, v in self.set]
        out += [(n.lower(), v) for n, v in self.add]
        return out


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_RETRY_ATTEMPTS          # retries after the first try
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON
    codes: tuple[int, ...] = DEFAULT_RETRIABLE_CODES
    backoff: float = 0.025                          # Envoy's base interval, 25 ms

    def retriable_status(self, status: int) -> bool:
        return "retriable-status-codes" in self.retry_on and status in self.codes

    def retriable_connect_failure(self) -> bool:
        return "connect-failure" in self.retry_on

    def retriable_reset(self) -> bool:
        return bool({"refused-stream", "reset", "cancelled"} & set(self.retry_on))


@dataclass(frozen=True)
class Fault:
    delay_percent: float = 0.0
    delay_seconds: float = 0.0
    abort_percent: float = 0.0
    abort_status: int = 0


@dataclass(frozen=True)
class RouteRule:
    route: str                                # namespace/name
    index: int
    match: Match
    backends: tuple[BackendRef, ...]
    modifier: HeaderModifier = field(default_factory=HeaderModifier)
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    backend_timeout: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fault: Fault | None = None

    @property
    def name(self) -> str:
        return f"{self.route}.{self.index}"


@dataclass(frozen=True)
class RouteRequest:
    method: str
    path: str
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return ",".join(values) if values else None

    def query_params(self) -> dict[str, str]:
        """First value per exact (case-sensitive) name, as Gateway API asks."""
        _, _, query = self.path.partition("?")
        out: dict[str, str] = {}
        for pair in query.split("&"):
            if not pair:
                continue
            name, _, value = pair.partition("=")
            out.setdefault(name, value)
        return out


@dataclass(frozen=True)
class RouteDecision:
    outcome: RouteOutcome
    rule: RouteRule | None = None
    backend: BackendRef | None = None
    delay: float = 0.0
    abort_status: int = 0


@dataclass(frozen=True)
class ServiceRef:
    namespace: str
    name: str
    port: int | None = None


@dataclass(frozen=True)
class HttpRoute:
    namespace: str
    name: str
    creation: str                     # RFC 3339 timestamp as written, "" if none
    parents: tuple[ServiceRef, ...]
    rules: tuple[RouteRule, ...]


def parse_duration(text: Any, where: str) -> float:
    """A Gateway API Duration (``1h2m3s4ms``: h, m, s, ms) in seconds."""
    if not isinstance(text, str) or not re.fullmatch(r"(\d+(h|m|s|ms))+", text):
        raise RouteInvalid(f"{where}: {text!r} is not a duration such as 10s or 250ms")
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|h|m|s)", text))


def _regex(text: Any, where: str) -> re.Pattern[str]:
    if not isinstance(text, str):
        raise RouteInvalid(f"{where}: must be a string")
    try:
        return re.compile(text)
    except re.error as exc:
        raise RouteInvalid(f"{where}: bad regular expression: {exc}") from None


def _value_matches(raw: Any, where: str, lower_names: bool) -> tuple[ValueMatch, ...]:
    if not isinstance(raw, list):
        raise RouteInvalid(f"{where}: must be a list")
    out = []
    for i, h in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(h, dict) or not isinstance(h.get("name"), str) \
                or not isinstance(h.get("value"), str):
            raise RouteInvalid(f"{w}: needs name and value")
        kind = h.get("type", "Exact")
        name = h["name"].lower() if lower_names else h["name"]
        if kind == "Exact":
            out.append(ValueMatch(name, h["value"]))
        elif kind == "RegularExpression":
            out.append(ValueMatch(name, h["value"], _regex(h["value"], f"{w}.value")))
        else:
            raise RouteInvalid(f"{w}.type: {kind!r} is not Exact or RegularExpression")
    return tuple(out)


def _parse_match(raw: Any, where: str) -> Match:
    if not isinstance(raw, dict):
        raise RouteInvalid(f"{where}: must be a mapping")
    unknown = set(raw) - {"path", "headers", "queryParams", "method"}
    if unknown:
        raise RouteInvalid(f"{where}.{sorted(unknown)[0]}: unknown field")
    path = raw.get("path") or {"type": "PathPrefix", "value": "/"}
    try:
        kind = PathKind(path.get("type", "PathPrefix"))
    except (ValueError, AttributeError):
        raise RouteInvalid(f"{where}.path.type: must be Exact, PathPrefix or "
                           "RegularExpression") from None
    value = path.get("value", "/")
    if not isinstance(value, str) or (kind is not PathKind.REGEX and not value.startswith("/")):
        raise RouteInvalid(f"{where}.path.value: must start with '/'")
    method = raw.get("method")
    if method is not None and method not in ("GET", "HEAD", "POST", "PUT", "DELETE",
                                             "CONNECT", "OPTIONS", "TRACE", "PATCH"):
        raise RouteInvalid(f"{where}.method: {method!r} is not an HTTP method")
    return Match(kind, value, _regex(value, f"{where}.path.value") if kind is PathKind.REGEX
                 else None,
                 _value_matches(raw.get("headers", []), f"{where}.headers", True),
                 _value_matches(raw.get("queryParams", []), f"{where}.queryParams", False),
                 method)


def _parse_modifier(raw: Any, where: str) -> HeaderModifier:
    if not isinstance(raw, dict):
        raise RouteInvalid(f"{where}: must be a mapping")

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        items = raw.get(key, [])
        if not isinstance(items, list) or not all(
                isinstance(i, dict) and isinstance(i.get("name"), str)
                and isinstance(i.get("value"), str) for i in items):
            raise RouteInvalid(f"{where}.{key}: must be a list of {{name, value}}")
        return tuple((i["name"], i["value"]) for i in items)

    remove = raw.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(r, str) for r in remove):
        raise RouteInvalid(f"{where}.remove: must be a list of names")
    return HeaderModifier(pairs("set"), pairs("add"), tuple(remove))


def _percent(raw: Any, where: str) -> float:
    value = (raw or {}).get("value", 100.0) if isinstance(raw, dict | type(None)) else None
    if not isinstance(value, int | float) or not 0 <= value <= 100:
        raise RouteInvalid(f"{where}: percentage.value must be 0..100")
    return float(value)


def _parse_fault(raw: Any, where: str) -> Fault:
    if not isinstance(raw, dict) or not set(raw) <= {"delay", "abort"}:
        raise RouteInvalid(f"{where}: fault takes delay and abort")
    fault = Fault()
    if "delay" in raw:
        d = raw["delay"]
        fault = Fault(_percent(d.get("percentage"), f"{where}.delay.percentage"),
                      parse_duration(d.get("fixedDelay"), f"{where}.delay.fixedDelay"))
    if "abort" in raw:
        a = raw["abort"]
        status = a.get("httpStatus")
        if not isinstance(status, int) or not 200 <= status <= 599:
            raise RouteInvalid(f"{where}.abort.httpStatus: must be an HTTP status")
        fault = Fault(fault.delay_percent, fault.delay_seconds,
                      _percent(a.get("percentage"), f"{where}.abort.percentage"), status)
    return fault


def _parse_retry(raw: Any, where: str) -> RetryPolicy:
    """Gateway API HTTPRouteRetry (attempts: total retries; codes; backoff)."""
    if not isinstance(raw, dict) or not set(raw) <= {"attempts", "codes", "backoff"}:
        raise RouteInvalid(f"{where}: retry takes attempts, codes, backoff")
    attempts = raw.get("attempts", DEFAULT_RETRY_ATTEMPTS)
    if not isinstance(attempts, int) or attempts < 0:
        raise RouteInvalid(f"{where}.attempts: must be >= 0")
    codes = raw.get("codes", list(DEFAULT_RETRIABLE_CODES))
    if not isinstance(codes, list) or not all(isinstance(c, int) and 400 <= c <= 599
                                              for c in codes):
        raise RouteInvalid(f"{where}.codes: must be 4xx/5xx statuses")
    backoff = parse_duration(raw["backoff"], f"{where}.backoff") if "backoff" in raw else 0.025
    return RetryPolicy(attempts, DEFAULT_RETRY_ON, tuple(codes), backoff)


def parse_http_route(doc: Any) -> HttpRoute:
    """One HTTPRoute document -> :class:`HttpRoute`; :class:`RouteInvalid` names the field."""
    try:
        return _parse_http_route(doc)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        if isinstance(exc, RouteInvalid):
            raise
        # A value of a shape no check foresaw (a list where a string belongs...).
        raise RouteInvalid(f"a field has the wrong type ({type(exc).__name__}: {exc})") \
            from None


def _parse_http_route(doc: Any) -> HttpRoute:
    if not isinstance(doc, dict) or not isinstance(doc.get("apiVersion"), str) \
            or doc["apiVersion"] not in API_VERSIONS or doc.get("kind") != "HTTPRoute":
        raise RouteInvalid("apiVersion/kind: expected gateway.networking.k8s.io/v1 HTTPRoute")
    meta = doc.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not isinstance(namespace, str) or not name or not namespace:
        raise RouteInvalid("metadata: name and namespace are required")
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise RouteInvalid("spec: must be a mapping")
    unknown = set(spec) - {"parentRefs", "rules", "hostnames"}
    if unknown:
        raise RouteInvalid(f"spec.{sorted(unknown)[0]}: unknown field")
    parents = []
    for i, ref in enumerate(spec.get("parentRefs") or []):
        w = f"spec.parentRefs[{i}]"
        if not isinstance(ref, dict) or not isinstance(ref.get("name"), str):
            raise RouteInvalid(f"{w}: needs a name")
        if ref.get("kind") != "Service" or ref.get("group", "") not in ("", "core"):
            raise RouteInvalid(f"{w}: a waypoint route attaches to a Service (kind: Service, "
                               "group: \"\")")
        port = ref.get("port")
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise RouteInvalid(f"{w}.port: must be a port number")
        parents.append(ServiceRef(ref.get("namespace", namespace), ref["name"], port))
    if not parents:
        raise RouteInvalid("spec.parentRefs: at least one Service")
    rules: list[RouteRule] = []
    raw_rules = spec.get("rules") or [{}]
    if not isinstance(raw_rules, list):
        raise RouteInvalid("spec.rules: must be a list")
    key = f"{namespace}/{name}"
    for i, raw in enumerate(raw_rules):
        w = f"spec.rules[{i}]"
        if not isinstance(raw, dict):
            raise RouteInvalid(f"{w}: must be a mapping")
        unknown = set(raw) - {"matches", "backendRefs", "filters", "timeouts", "retry",
                              "fault", "name"}
        if unknown:
            raise RouteInvalid(f"{w}.{sorted(unknown)[0]}: unknown field")
        backends = []
        for j, b in enumerate(raw.get("backendRefs") or []):
            bw = f"{w}.backendRefs[{j}]"
            if not isinstance(b, dict) or not isinstance(b.get("name"), str) \
                    or not isinstance(b.get("port"), int):
                raise RouteInvalid(f"{bw}: needs name and port")
            if b.get("kind", "Service") != "Service" or b.get("group", "") not in ("", "core"):
                raise RouteInvalid(f"{bw}: only Service backends are supported")
            weight = b.get("weight", 1)
            if not isinstance(weight, int) or not 0 <= weight <= 1_000_000:
                raise RouteInvalid(f"{bw}.weight: must be 0..1000000")
            backends.append(BackendRef(b["name"], b.get("namespace", namespace), b["port"],
                                       weight))
        modifier = HeaderModifier()
        for j, f in enumerate(raw.get("filters") or []):
            fw = f"{w}.filters[{j}]"
            if not isinstance(f, dict) or f.get("type") != "RequestHeaderModifier":
                raise RouteInvalid(f"{fw}.type: only RequestHeaderModifier is supported")
            modifier = _parse_modifier(f.get("requestHeaderModifier"),
                                       f"{fw}.requestHeaderModifier")
        timeouts = raw.get("timeouts") or {}
        if not isinstance(timeouts, dict) or not set(timeouts) <= {"request", "backendRequest"}:
            raise RouteInvalid(f"{w}.timeouts: takes request and backendRequest")
        request_timeout = (parse_duration(timeouts["request"], f"{w}.timeouts.request")
                           if "request" in timeouts else DEFAULT_REQUEST_TIMEOUT)
        backend_timeout = (parse_duration(timeouts["backendRequest"],
                                          f"{w}.timeouts.backendRequest")
                           if "backendRequest" in timeouts else 0.0)
        retry = _parse_retry(raw["retry"], f"{w}.retry") if "retry" in raw else RetryPolicy()
        fault = _parse_fault(raw["fault"], f"{w}.fault") if "fault" in raw else None
        matches = raw.get("matches") or [{}]
        if not isinstance(matches, list):
            raise RouteInvalid(f"{w}.matches: must be a list")
        for j, m in enumerate(matches):
            rules.append(RouteRule(key, i, _parse_match(m, f"{w}.matches[{j}]"),
                                   tuple(backends), modifier, request_timeout,
                                   backend_timeout, retry, fault))
    creation = meta.get("creationTimestamp", "")
    return HttpRoute(namespace, name, str(creation), tuple(parents), tuple(rules))


class RouteTable:
    """The routes of one Service port, in precedence order."""

    def __init__(self, routes: Iterable[HttpRoute], service: ServiceRef) -> None:
        attached = [r for r in routes
                    if any(p.namespace == service.namespace and p.name == service.name
                           and (p.port is None or p.port == service.port) for p in r.parents)]
        attached.sort(key=lambda r: (r.creation, r.namespace, r.name))
        ordered = [rule for r in attached for rule in r.rules]
        # Stable: equal keys keep creation/name/rule order (sort.SliceStable).
        self.rules: list[RouteRule] = sorted(ordered, key=lambda rule: rule.match.sort_key())
        self.service = service

    def __bool__(self) -> bool:
        return bool(self.rules)

    def route(self, request: RouteRequest, rng: random.Random) -> RouteDecision:
        """Pick the rule and backend for a request; apply fault injection draws."""
        for rule in self.rules:
            if not rule.match.matches(request):
                continue
            delay = 0.0
            if rule.fault is not None:
                if rule.fault.delay_percent and rng.random() * 100 < rule.fault.delay_percent:
                    delay = rule.fault.delay_seconds
                if rule.fault.abort_percent and rng.random() * 100 < rule.fault.abort_percent:
                    return RouteDecision(RouteOutcome.ABORTED, rule, delay=delay,
                                         abort_status=rule.fault.abort_status)
            backend = pick_backend(rule.backends, rng, self.service)
            if backend is None:
                return RouteDecision(RouteOutcome.NO_BACKEND, rule, delay=delay)
            return RouteDecision(RouteOutcome.ROUTED, rule, backend, delay)
        return RouteDecision(RouteOutcome.NO_ROUTE)


def pick_backend(backends: Sequence[BackendRef], rng: random.Random,
                 default: ServiceRef) -> BackendRef | None:
    """Weighted choice; a rule without backendRefs goes to the parent Service itself
    (GAMMA: the route's parent is the default backend)."""
    if not backends:
        return BackendRef(default.name, default.namespace, default.port or 0)
    total = sum(b.weight for b in backends)
    if total == 0:
        return None
    return rng.choices(list(backends), weights=[b.weight for b in backends], k=1)[0]


def load_routes(docs: Iterable[Any]) -> tuple[list[HttpRoute], list[str]]:
    """Parse every HTTPRoute; one bad route is reported (and serves nothing: its
    requests get 404, never another route's backends) without affecting the others."""
    routes: list[HttpRoute] = []
    problems: list[str] = []
    for i, d in enumerate(docs):
        try:
            routes.append(parse_http_route(d))
        except RouteInvalid as exc:
            problems.append(f"routes[{i}]: {exc}")
    return routes, problems
