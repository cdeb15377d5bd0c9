"""Which service a DNS name means, from a client pod's point of view (pure).

A port of ztunnel's name handling (istio/ztunnel src/dns/server.rs ::
``Store::get_aliases``, ``to_kube_fqdns``, ``find_server``, ``get_wildcards``;
src/dns/name_util.rs :: ``has_domain``, ``trim_domain``). Names are tuples of
lower-case labels without the root label.

For a client in namespace ``ns`` and cluster domain ``cluster.local``, a query is
tried as (each deduplicated, in order):

1. the name itself;
2. the Kubernetes FQDNs it could be short for: ``a`` -> ``a.ns.svc.cluster.local``;
   ``a.b`` -> ``a.b.svc.cluster.local`` and ``a.b.ns.svc.cluster.local``;
   ``a.b.svc`` -> ``a.b.svc.cluster.local`` (and ``a.b.svc.svc.cluster.local``);
   ``a.b.c`` -> ``a.b.c.svc.cluster.local``; ``a.b.c.svc`` -> ``...cluster.local``;
3. the name with one of the pod's search domains stripped (``ns.svc.cluster.local``,
   ``svc.cluster.local``, ``cluster.local``: ztunnel's per-pod default), and the FQDNs
   that stripped name could be short for. A match here is answered with a CNAME from
   the asked name to the stripped one (unless it matched a wildcard).

Each candidate is looked up as is and then as wildcards of decreasing specificity
(``*.ns1.svc.cluster.local``, ``*.svc.cluster.local``, ...). A service without VIPs
only matches if it is a Kubernetes (headless) service under ``.svc.<domain>``; a
service the client's namespace may not see never matches; among services sharing a
hostname the client's namespace wins, then a canonical one, then the preferred
namespace, then the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.model.types import Model, Service, best_service_match

Labels = tuple[str, ...]


def labels_of(text: str) -> Labels:
    """``"A.b.c."`` -> ``("a", "b", "c")``."""
    return tuple(label.lower() for label in text.strip(".").split(".") if label)


def text_of(labels: Labels) -> str:
    return ".".join(labels)


def has_domain(name: Labels, domain: Labels) -> bool:
    """name_util.rs :: has_domain: strictly longer and ending with the domain."""
    if "*" in domain[:1] or len(name) <= len(domain):
        return False
    return name[len(name) - len(domain):] == domain


def trim_domain(name: Labels, domain: Labels) -> Labels | None:
    return name[:len(name) - len(domain)] if has_domain(name, domain) else None


@dataclass(frozen=True)
class NameConfig:
    domain: Labels = ("cluster", "local")
    preferred_namespace: str | None = None

    @property
    def svc_domain(self) -> Labels:
        return ("svc", *self.domain)

    def search_domains(self, namespace: str) -> tuple[Labels, ...]:
        """ztunnel SystemForwarder::search_domains in shared (node proxy) mode."""
        return ((namespace, *self.svc_domain), self.svc_domain, self.domain)


def to_kube_fqdns(name: Labels, namespaced_domain: Labels, config: NameConfig) -> list[Labels]:
    out: list[Labels] = []
    n = len(name)
    if n == 1:
        out.append(name + namespaced_domain)
    elif n == 2:
        out.append(name + config.svc_domain)
        out.append(name + namespaced_domain)
    elif n == 3:
        if has_domain(name, ("svc",)):
            out.append(name + config.domain)
        out.append(name + config.svc_domain)
    elif n == 4 and has_domain(name, ("svc",)):
        out.append(name + config.domain)
    return out


@dataclass(frozen=True)
class Alias:
    name: Labels
    # Set when the alias came from stripping a search domain off the asked name.
    stripped: Labels | None = None


def aliases(name: Labels, client_namespace: str, config: NameConfig) -> list[Alias]:
    out: list[Alias] = []
    seen: set[Labels] = set()

    def add(alias: Alias) -> None:
        if alias.name not in seen:
            seen.add(alias.name)
            out.append(alias)

    add(Alias(name))
    namespaced = (client_namespace, *config.svc_domain)
    for fqdn in to_kube_fqdns(name, namespaced, config):
        add(Alias(fqdn))
    for search in config.search_domains(client_namespace):
        stripped = trim_domain(name, search)
        if stripped is None:
            continue
        add(Alias(stripped, stripped))
        for fqdn in to_kube_fqdns(stripped, namespaced, config):
            add(Alias(fqdn, stripped))
    return out


def wildcards(name: Labels) -> list[Labels]:
    """server.rs :: get_wildcards: the name, then ``*.`` + each proper suffix of 2+ labels
    down to one label (``a.b.c`` -> ``a.b.c``, ``*.b.c``, ``*.c``)."""
    out = [name]
    rest = name
    while len(rest) > 1:
        out.append(("*", *rest[1:]))
        rest = rest[1:]
    return out


@dataclass(frozen=True)
class ServiceMatch:
    service: Service
    # The hostname (or wildcard) that matched.
    matched: Labels
    alias: Alias

    @property
    def wildcard(self) -> bool:
        return self.matched[:1] == ("*",)


def find_service(model: Model, name: Labels, client_namespace: str,
                 config: NameConfig) -> ServiceMatch | None:
    """server.rs :: Store::find_server, for services (not headless pod names)."""
    svc_suffix = "." + text_of(config.svc_domain)
    for alias in aliases(name, client_namespace, config):
        for candidate in wildcards(alias.name):
            services = [s for s in model.services_by_hostname(text_of(candidate))
                        if (s.vips or s.hostname.lower().endswith(svc_suffix))
                        and s.visible_to(client_namespace)]
            best = best_service_match(services, client_namespace, config.preferred_namespace)
            if best is not None:
                return ServiceMatch(best, candidate, alias)
    return None
