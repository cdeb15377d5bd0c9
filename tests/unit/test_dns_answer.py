"""The DNS proxy's sans-IO decisions, case by case as ztunnel's tests, and fuzzed."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dns.answer import (
    MAX_QUERY_SIZE,
    DnsSettings,
    QueryOutcome,
    Transport,
    Verdict,
    decide,
    forward_failed,
    forwarded_reply,
)
from agent.dns.names import NameConfig, aliases, labels_of, to_kube_fqdns, wildcards
from agent.model.loader import load_model_file
from agent.model.types import Model, NetworkAddress, Workload

MODEL = load_model_file(Path(__file__).parent / "data" / "model" / "dns.yaml")
SETTINGS = DnsSettings()


def client_for(model: Model):
    def lookup(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Workload | None:
        return model.workload_by_address(NetworkAddress("", ip))
    return lookup


def ask(name: str, rdtype: str = "A", client: str = "127.0.0.1",
        transport: Transport = Transport.UDP, model: Model = MODEL,
        settings_: DnsSettings = SETTINGS, **kw: object):
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    decision = decide(query.to_wire(), transport, client, client_for(model), model, settings_,
                      random.Random(3))
    response = dns.message.from_wire(decision.response) if decision.response else None
    return decision, response, query


def records(response: dns.message.Message) -> list[tuple[str, str, str]]:
    out = []
    for rrset in response.answer:
        for rdata in rrset:
            out.append((rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype),
                        rdata.to_text()))
    return sorted(out)


@pytest.mark.parametrize(("host", "expected"), [
    ("productpage.ns1.svc.cluster.local.", [("productpage.ns1.svc.cluster.local.", "A",
                                             "9.9.9.9")]),
    ("productpage.ns1.", [("productpage.ns1.", "A", "9.9.9.9")]),
    ("productpage.", [("productpage.", "A", "9.9.9.9")]),
    ("PRODUCTPAGE.Ns1.svc.cluster.local.", [("PRODUCTPAGE.Ns1.svc.cluster.local.", "A",
                                             "9.9.9.9")]),
    ("productpage.ns1.ns1.svc.cluster.local.", [
        ("productpage.ns1.", "A", "9.9.9.9"),
        ("productpage.ns1.ns1.svc.cluster.local.", "CNAME", "productpage.ns1.")]),
    ("www.google.com", [("www.google.com.", "A", "1.1.1.1")]),
    ("www.google.com.ns1.svc.cluster.local.", [
        ("www.google.com.", "A", "1.1.1.1"),
        ("www.google.com.ns1.svc.cluster.local.", "CNAME", "www.google.com.")]),
    ("example.ns2.", [("example.ns2.", "A", "10.10.10.10")]),
    ("example.ns2.svc.", [("example.ns2.svc.", "A", "10.10.10.10")]),
    ("example.ns2.svc.cluster.local.", [("example.ns2.svc.cluster.local.", "A",
                                         "10.10.10.10")]),
    ("nslocalsame.ns1.svc.cluster.local.", [("nslocalsame.ns1.svc.cluster.local.", "A",
                                             "10.10.10.241")]),
    ("dual.localhost.", [("dual.localhost.", "A", "2.2.2.2")]),
    ("foo.wildcard.", [("foo.wildcard.", "A", "10.10.10.11")]),
    ("a.b.wildcard.", [("a.b.wildcard.", "A", "11.11.11.11")]),
    # A wildcard matched after stripping a search domain: no CNAME (ztunnel).
    ("foo.wildcard.ns1.svc.cluster.local.", [("foo.wildcard.ns1.svc.cluster.local.", "A",
                                              "10.10.10.11")]),
    ("both-networks.ns1.svc.cluster.local.", [("both-networks.ns1.svc.cluster.local.", "A",
                                               "21.21.21.21")]),
    ("headless.ns1.svc.cluster.local.", [("headless.ns1.svc.cluster.local.", "A",
                                          "30.30.30.30"),
                                         ("headless.ns1.svc.cluster.local.", "A",
                                          "31.31.31.31")]),
])
def test_service_names_are_answered(host: str, expected: list[tuple[str, str, str]]) -> None:
    decision, response, query = ask(host)
    assert decision.verdict is Verdict.ANSWER and decision.outcome is QueryOutcome.SERVED
    assert response is not None and response.id == query.id
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA and response.flags & dns.flags.RA
    assert records(response) == sorted(expected)
    assert all(rrset.ttl == 30 for rrset in response.answer)


@pytest.mark.parametrize(("host", "rdtype", "expected"), [
    ("dual.localhost.", "AAAA", [("dual.localhost.", "AAAA", "2001:db8::ff00:42:8329")]),
    ("headless.ns1.svc.cluster.local.", "AAAA", [
        ("headless.ns1.svc.cluster.local.", "AAAA", "2001:db8::30"),
        ("headless.ns1.svc.cluster.local.", "AAAA", "2001:db8::31")]),
])
def test_aaaa(host: str, rdtype: str, expected: list[tuple[str, str, str]]) -> None:
    _, response, _ = ask(host, rdtype)
    assert records(response) == expected


@pytest.mark.parametrize(("host", "rdtype"), [
    ("ipv6.localhost.", "A"),
    ("ipv4.localhost.", "AAAA"),
    ("productpage.ns1.ns1.svc.cluster.local.", "AAAA"),
    ("v4only.ns1.svc.cluster.local.", "AAAA"),  # ipFamilies: IPv4
    ("nw2-only.ns1.svc.cluster.local.", "A"),   # no VIP on the client's network
])
def test_known_names_without_records_are_nodata_not_nxdomain(host: str, rdtype: str) -> None:
    decision, response, _ = ask(host, rdtype)
    assert decision.outcome is QueryOutcome.NODATA
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []
    assert response.flags & dns.flags.AA


def test_ipv6_disabled_gives_nodata_for_aaaa() -> None:
    decision, response, _ = ask("dual.localhost.", "AAAA",
                                settings_=DnsSettings(ipv6_enabled=False))
    assert decision.outcome is QueryOutcome.NODATA and response.answer == []


@pytest.mark.parametrize(("host", "rdtype"), [
    ("www.bing.com.", "A"),                      # not a service
    ("productpage.ns1.", "NS"),                  # not A/AAAA
    ("productpage.ns1.svc.cluster.local.", "TXT"),
    ("nslocal.ns2.svc.cluster.local.", "A"),     # namespace-scoped, other namespace
    ("example.", "A"),                           # short name of another namespace's service
    ("headless.example.com.", "A"),              # no VIPs, not a Kubernetes service
    ("headless.pod0.ns1.svc.cluster.local.", "A"),  # pod names are not served (ztunnel todo)
    ("svc.cluster.local.", "A"),
    (".", "A"),
])
def test_everything_else_is_forwarded(host: str, rdtype: str) -> None:
    decision, response, query = ask(host, rdtype)
    assert decision.verdict is Verdict.FORWARD and response is None
    assert decision.query is not None and decision.query.question == query.question
    assert decision.client_id == query.id


def test_short_names_follow_the_clients_namespace() -> None:
    _, response, _ = ask("example.", client="127.0.0.2")  # a client in ns2
    assert records(response) == [("example.", "A", "10.10.10.10")]
    assert ask("productpage.", client="127.0.0.2")[0].verdict is Verdict.FORWARD


def test_unknown_client_gets_servfail() -> None:
    decision, response, _ = ask("productpage.ns1.", client="192.0.2.1")
    assert decision.outcome is QueryOutcome.UNKNOWN_CLIENT
    assert response.rcode() == dns.rcode.SERVFAIL


def test_not_a_query_opcode_and_bad_shapes() -> None:
    query = dns.message.make_query("productpage.ns1.", "A")
    query.set_opcode(dns.opcode.UPDATE)
    decision = decide(query.to_wire(), Transport.UDP, "127.0.0.1", client_for(MODEL), MODEL,
                      SETTINGS, random.Random())
    assert decision.outcome is QueryOutcome.NOTIMP
    assert dns.message.from_wire(decision.response).rcode() == dns.rcode.NOTIMP
    response = dns.message.make_response(dns.message.make_query("a.", "A"))
    decision = decide(response.to_wire(), Transport.UDP, "127.0.0.1", client_for(MODEL), MODEL,
                      SETTINGS, random.Random())
    assert decision.verdict is Verdict.DROP
    two = dns.message.make_query("a.", "A")
    two.question.append(dns.message.make_query("b.", "A").question[0])
    decision = decide(two.to_wire(), Transport.UDP, "127.0.0.1", client_for(MODEL), MODEL,
                      SETTINGS, random.Random())
    assert dns.message.from_wire(decision.response).rcode() == dns.rcode.FORMERR
    for garbage in (b"", b"\x00" * 11):
        assert decide(garbage, Transport.UDP, "127.0.0.1", client_for(MODEL), MODEL, SETTINGS,
                      random.Random()).verdict is Verdict.DROP
    truncated = dns.message.make_query("productpage.ns1.", "A").to_wire()[:20]
    decision = decide(truncated, Transport.UDP, "127.0.0.1", client_for(MODEL), MODEL,
                      SETTINGS, random.Random())
    assert decision.outcome is QueryOutcome.FORMERR
    reply = dns.message.from_wire(decision.response)
    assert reply.id == int.from_bytes(truncated[:2], "big")
    big = dns.message.make_query("a.", "A").to_wire() + b"\x00" * MAX_QUERY_SIZE
    assert decide(big, Transport.TCP, "127.0.0.1", client_for(MODEL), MODEL, SETTINGS,
                  random.Random()).outcome is QueryOutcome.FORMERR


def many_endpoints_model(n: int) -> Model:
    text = (Path(__file__).parent / "data" / "model" / "dns.yaml").read_text()
    extra = "".join(
        f"- uid: c1//v1/Pod/ns1/big-{i}\n  name: big-{i}\n  namespace: ns1\n"
        f"  workloadIps: [\"40.0.{i // 200}.{i % 200 + 1}\"]\n"
        f"  services: {{\"ns1/big.ns1.svc.cluster.local\": {{80: 80}}}}\n" for i in range(n))
    text = text.replace("services:\n- {name: productpage",
                        extra + "services:\n- {name: big, namespace: ns1, hostname: "
                        "big.ns1.svc.cluster.local, vips: [], ports: {80: 80}}\n"
                        "- {name: productpage", 1)
    from agent.model.loader import load_model_text
    return load_model_text(text)


def test_large_answers_are_truncated_over_udp_and_whole_over_tcp() -> None:
    model = many_endpoints_model(100)
    _, udp, _ = ask("big.ns1.svc.cluster.local.", model=model)
    assert udp.flags & dns.flags.TC
    decision, _, _ = ask("big.ns1.svc.cluster.local.", model=model)
    assert len(decision.response) <= 512
    decision, edns, _ = ask("big.ns1.svc.cluster.local.", model=model, use_edns=0, payload=1232)
    assert len(decision.response) <= 1232 and edns.edns == 0 and edns.payload >= 512
    _, tcp, _ = ask("big.ns1.svc.cluster.local.", model=model, transport=Transport.TCP)
    assert not tcp.flags & dns.flags.TC and len(records(tcp)) == 100


def test_forwarded_reply_gets_the_client_id_and_size_limit() -> None:
    decision, _, query = ask("www.bing.com.")
    upstream = dns.message.make_response(decision.query)
    upstream.id = 4242
    for i in range(100):
        upstream.answer.append(dns.rrset.from_text("www.bing.com.", 60, "IN", "A",
                                                   f"192.0.2.{i + 1}"))
    wire = forwarded_reply(decision, upstream)
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id and len(wire) <= 512 and reply.flags & dns.flags.TC
    failed = dns.message.from_wire(forward_failed(decision))
    assert failed.id == query.id and failed.rcode() == dns.rcode.SERVFAIL


def test_name_helpers_as_ztunnel() -> None:
    cfg = NameConfig()
    assert to_kube_fqdns(("name",), ("ns1", "svc", "cluster", "local"), cfg) == [
        ("name", "ns1", "svc", "cluster", "local")]
    assert to_kube_fqdns(("name", "ns2"), ("ns1", "svc", "cluster", "local"), cfg) == [
        ("name", "ns2", "svc", "cluster", "local"),
        ("name", "ns2", "ns1", "svc", "cluster", "local")]
    assert wildcards(labels_of("svc1.ns1.svc.cluster.local")) == [
        labels_of(n) for n in ("svc1.ns1.svc.cluster.local", "*.ns1.svc.cluster.local",
                               "*.svc.cluster.local", "*.cluster.local", "*.local")]
    names = [a.name for a in aliases(labels_of("name.ns1.svc.cluster.local"), "ns1", cfg)]
    assert names[0] == labels_of("name.ns1.svc.cluster.local")
    assert labels_of("name.ns1") in names  # stripped "svc.cluster.local"


# -- fuzzing ------------------------------------------------------------------

CLIENTS = st.sampled_from(["127.0.0.1", "127.0.0.2", "192.0.2.1", "::1"])
TRANSPORTS = st.sampled_from(list(Transport))


def check(decision, wire: bytes, transport: Transport) -> None:
    if decision.verdict is Verdict.ANSWER:
        reply = dns.message.from_wire(decision.response)
        assert reply.id == int.from_bytes(wire[:2], "big")
        assert reply.flags & dns.flags.QR
        if transport is Transport.UDP:
            assert len(decision.response) <= 4096
    elif decision.verdict is Verdict.FORWARD:
        assert decision.query is not None and len(decision.query.question) == 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700), TRANSPORTS, CLIENTS)
def test_fuzz_arbitrary_bytes(wire: bytes, transport: Transport, client: str) -> None:
    decision = decide(wire, transport, client, client_for(MODEL), MODEL, SETTINGS,
                      random.Random(0))
    check(decision, wire, transport)


LABELS = st.sampled_from(["productpage", "ns1", "ns2", "svc", "cluster", "local", "example",
                          "headless", "wildcard", "b", "*", "www", "google", "com", "x" * 63,
                          "big", "DUAL", "localhost", "-", "a\\.b", "\\000"])
RDTYPES = st.sampled_from(["A", "AAAA", "CNAME", "TXT", "ANY", "NS", "PTR", "SRV", "TYPE999"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LABELS, max_size=8), RDTYPES, st.booleans(), st.integers(0, 65535),
       st.integers(0, 0xFFFF), TRANSPORTS, CLIENTS, st.sampled_from(["IN", "CH", "ANY"]))
def test_fuzz_structured_queries(labels: list[str], rdtype: str, edns: bool, payload: int,
                                 flags: int, transport: Transport, client: str,
                                 rdclass: str) -> None:
    name = ".".join(labels) + "." if labels else "."
    try:
        query = dns.message.make_query(name, rdtype, rdclass, use_edns=0 if edns else False,
                                       payload=payload)
    except Exception:
        return  # a name dnspython itself will not build
    query.flags = flags & ~dns.flags.QR & 0xFFFF
    wire = query.to_wire()
    decision = decide(wire, transport, client, client_for(MODEL), MODEL, SETTINGS,
                      random.Random(0))
    check(decision, wire, transport)
    if transport is Transport.UDP and decision.verdict is Verdict.ANSWER:
        limit = max(512, min(payload, 4096)) if edns else 512
        assert len(decision.response) <= limit


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["productpage.ns1.", "headless.ns1.svc.cluster.local.", "www.bing.com."]),
       st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, 80), TRANSPORTS)
def test_fuzz_mutated_queries(name: str, flips: list[tuple[int, int]], cut: int,
                              transport: Transport) -> None:
    wire = bytearray(dns.message.make_query(name, "A", use_edns=0).to_wire())
    for pos, value in flips:
        if pos < len(wire):
            wire[pos] = value
    data = bytes(wire[:len(wire) - cut] if cut < len(wire) else wire)
    decision = decide(data, transport, "127.0.0.1", client_for(MODEL), MODEL, SETTINGS,
                      random.Random(0))
    check(decision, data, transport)
