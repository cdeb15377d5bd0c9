"""The DNS proxy's decisions, sans-IO: bytes in, an answer or "forward this" out.

Behaviour follows ztunnel's DNS proxy (istio/ztunnel src/dns/server.rs ::
``Store::lookup`` / ``Resolver for Store``, src/dns/handler.rs ::
``Handler::handle_request``, ``send_lookup``, ``send_lookup_error``,
``response_edns``):

- a query whose client (by source address) is not a known workload: SERVFAIL;
- opcode other than QUERY: NOTIMP;
- record types other than A/AAAA, classes other than IN, and names that are not a
  service this client can see: **forwarded** to the upstream resolver, whose answer
  (NXDOMAIN included) is relayed. The proxy itself never says NXDOMAIN;
- a service name (see :mod:`agent.dns.names`): an authoritative answer with the VIPs on
  the client's network of the asked family (a headless service: its endpoints'
  addresses), TTL 30 s, in random order; CNAME first when a search domain was
  stripped. A service known but without records of that family (or of a family the
  service does not have, or AAAA with IPv6 off): NOERROR with no answers (NODATA);
- EDNS is echoed (payload at least 512); a UDP reply larger than the client's limit
  (512, or its EDNS payload, at most 4096) is truncated with TC set, so the client
  retries over TCP.

Stricter than ztunnel, on purpose: a message that is itself a response (QR set) or
shorter than a DNS header is dropped without a reply (answering responses is how
two resolvers loop); a query over :data:`MAX_QUERY_SIZE` bytes, or one with a
question count other than 1, gets FORMERR; a forwarded reply is relayed as the
upstream sent it (ztunnel re-synthesises it from a hickory lookup).
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.dns.names import NameConfig, ServiceMatch, find_service, labels_of, text_of
from agent.model.types import IPAddress, IpFamily, Model, Workload

TTL_SECONDS = 30  # server.rs :: DEFAULT_TTL_SECONDS
UDP_MIN_PAYLOAD = 512
UDP_MAX_PAYLOAD = 4096
TCP_MAX_MESSAGE = 65535
OUR_EDNS_PAYLOAD = 1232
MAX_QUERY_SIZE = 4096
HEADER_SIZE = 12


class Transport(Enum):
    UDP = "udp"
    TCP = "tcp"


class Verdict(Enum):
    ANSWER = "answer"    # send `response`
    FORWARD = "forward"  # send `query` upstream, then forwarded_reply()/forward_failed()
    DROP = "drop"        # send nothing


class QueryOutcome(Enum):
    """Why a query ended the way it did (for counters and the DNS access log)."""

    SERVED = "served"                  # we answered with records
    NODATA = "nodata"                  # a service name, no records of that type
    FORWARDED = "forwarded"            # relayed from the upstream
    FORWARD_FAILED = "forward_failed"  # upstream timed out / refused / bad reply: SERVFAIL
    UNKNOWN_CLIENT = "unknown_client"  # SERVFAIL
    FORMERR = "formerr"                # malformed, oversized, or not one question
    NOTIMP = "notimp"                  # opcode other than QUERY
    OVERLOADED = "overloaded"          # too many queries in flight: SERVFAIL
    FAILED = "failed"                  # a query we could parse but not handle: SERVFAIL
    DROPPED = "dropped"                # not a query at all: no reply


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    outcome: QueryOutcome
    response: bytes = b""
    query: dns.message.Message | None = None
    # The client's id and reply size limit, to finish a forwarded query.
    client_id: int = 0
    max_size: int = UDP_MIN_PAYLOAD
    qname: str = ""
    qtype: str = ""
    answers: int = 0


@dataclass(frozen=True)
class DnsSettings:
    names: NameConfig = field(default_factory=NameConfig)
    ipv6_enabled: bool = True


def _reply_limit(query: dns.message.Message | None, transport: Transport) -> int:
    if transport is Transport.TCP:
        return TCP_MAX_MESSAGE
    if query is None or query.edns < 0:
        return UDP_MIN_PAYLOAD
    return max(UDP_MIN_PAYLOAD, min(query.payload, UDP_MAX_PAYLOAD))


def _header_error(wire: bytes, rcode: dns.rcode.Rcode, outcome: QueryOutcome) -> Decision:
    """An error reply built from the raw header alone (the rest could not be parsed)."""
    qid, flags = struct.unpack("!HH", wire[:4])
    reply = dns.message.Message(id=qid)
    reply.flags = dns.flags.QR | (flags & dns.flags.RD) | dns.flags.RA
    reply.set_opcode(dns.opcode.from_flags(flags))
    reply.set_rcode(rcode)
    return Decision(Verdict.ANSWER, outcome, reply.to_wire(), client_id=qid)


def _render(message: dns.message.Message, limit: int) -> bytes:
    """Wire form within ``limit`` bytes; truncated (TC set) if it does not fit."""
    return message.to_wire(max_size=limit, prefer_truncation=True)


def _error_reply(query: dns.message.Message, rcode: dns.rcode.Rcode, limit: int) -> bytes:
    reply = dns.message.make_response(query, recursion_available=True,
                                      our_payload=OUR_EDNS_PAYLOAD)
    reply.set_rcode(rcode)
    return _render(reply, limit)


def _is_record_type(address: IPAddress, rdtype: dns.rdatatype.RdataType) -> bool:
    return (address.version == 4) == (rdtype == dns.rdatatype.A)


def _addresses(model: Model, client: Workload, match: ServiceMatch,
               rdtype: dns.rdatatype.RdataType, settings: DnsSettings) -> list[IPAddress]:
    """server.rs :: get_addresses."""
    service = match.service
    if not service.vips:  # headless: each endpoint's first address of the family
        out = []
        for ep in model.endpoints(service):
            wl = model.workload_by_uid(ep.workload_uid)
            if wl is None:
                continue
            for ip in wl.workload_ips:
                if _is_record_type(ip, rdtype):
                    out.append(ip)
                    break
        return out
    return [vip.address for vip in service.vips
            if _is_record_type(vip.address, rdtype) and vip.network == client.network]


def _family_allowed(match: ServiceMatch, rdtype: dns.rdatatype.RdataType,
                    settings: DnsSettings) -> bool:
    """server.rs :: service_family_allowed."""
    if rdtype == dns.rdatatype.AAAA and not settings.ipv6_enabled:
        return False
    families = match.service.ip_families
    if families is IpFamily.IPV4 and rdtype == dns.rdatatype.AAAA:
        return False
    return not (families is IpFamily.IPV6 and rdtype == dns.rdatatype.A)


def _to_name(labels: tuple[str, ...]) -> dns.name.Name:
    return dns.name.from_text(text_of(labels) + ".") if labels else dns.name.root


def decide(wire: bytes, transport: Transport, client_address: IPAddress | str,
           client_for: Callable[[IPAddress], Workload | None], model: Model,
           settings: DnsSettings, rng: random.Random) -> Decision:
    """One query from ``client_address`` -> what to do. Pure except for ``rng``.

    Never raises for any ``wire``: what cannot be handled is dropped or answered with
    an error code.
    """
    try:
        return _decide(wire, transport, client_address, client_for, model, settings, rng)
    except Exception:
        if len(wire) < HEADER_SIZE:
            return Decision(Verdict.DROP, QueryOutcome.DROPPED)
        return _header_error(wire, dns.rcode.SERVFAIL, QueryOutcome.FAILED)


def _decide(wire: bytes, transport: Transport, client_address: IPAddress | str,
            client_for: Callable[[IPAddress], Workload | None], model: Model,
            settings: DnsSettings, rng: random.Random) -> Decision:
    if len(wire) < HEADER_SIZE:
        return Decision(Verdict.DROP, QueryOutcome.DROPPED)
    flags = struct.unpack("!H", wire[2:4])[0]
    if flags & dns.flags.QR:
        return Decision(Verdict.DROP, QueryOutcome.DROPPED)
    if len(wire) > MAX_QUERY_SIZE:
        return _header_error(wire, dns.rcode.FORMERR, QueryOutcome.FORMERR)
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return _header_error(wire, dns.rcode.NOTIMP, QueryOutcome.NOTIMP)
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        return _header_error(wire, dns.rcode.FORMERR, QueryOutcome.FORMERR)
    limit = _reply_limit(query, transport)
    if len(query.question) != 1:
        return Decision(Verdict.ANSWER, QueryOutcome.FORMERR,
                        _error_reply(query, dns.rcode.FORMERR, limit), client_id=query.id)
    question = query.question[0]
    qname, rdtype = question.name, question.rdtype
    forward = Decision(Verdict.FORWARD, QueryOutcome.FORWARDED, query=query,
                       client_id=query.id, max_size=limit, qname=qname.to_text(),
                       qtype=dns.rdatatype.to_text(rdtype))

    def answer(outcome: QueryOutcome, response: bytes, answers: int = 0) -> Decision:
        return replace(forward, verdict=Verdict.ANSWER, outcome=outcome, response=response,
                       answers=answers)

    client = client_for(ipaddress.ip_address(client_address))
    if client is None:
        return answer(QueryOutcome.UNKNOWN_CLIENT, _error_reply(query, dns.rcode.SERVFAIL, limit))
    if (question.rdclass != dns.rdataclass.IN
            or rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA)):
        return forward
    try:
        labels = labels_of(qname.to_text())
    except Exception:
        return forward
    match = find_service(model, labels, client.namespace, settings.names)
    if match is None:
        return forward
    reply = dns.message.make_response(query, recursion_available=True,
                                      our_payload=OUR_EDNS_PAYLOAD)
    reply.flags |= dns.flags.AA
    if not _family_allowed(match, rdtype, settings):
        return answer(QueryOutcome.NODATA, _render(reply, limit))
    addresses = _addresses(model, client, match, rdtype, settings)
    if not addresses:
        return answer(QueryOutcome.NODATA, _render(reply, limit))
    rng.shuffle(addresses)
    owner = qname
    if match.alias.stripped is not None and not match.wildcard:
        owner = _to_name(match.alias.stripped)
        cname = dns.rrset.from_text(qname, TTL_SECONDS, dns.rdataclass.IN,
                                    dns.rdatatype.CNAME, owner.to_text())
        reply.answer.append(cname)
    records = dns.rrset.from_text_list(owner, TTL_SECONDS, dns.rdataclass.IN, rdtype,
                                       [str(a) for a in addresses])
    reply.answer.append(records)
    return answer(QueryOutcome.SERVED, _render(reply, limit), len(addresses))


def forwarded_reply(decision: Decision, reply: dns.message.Message) -> bytes:
    """The upstream's reply as the client gets it: its id, within its size limit."""
    reply.id = decision.client_id
    try:
        return _render(reply, decision.max_size)
    except Exception:
        return forward_failed(decision)


def forward_failed(decision: Decision) -> bytes:
    """SERVFAIL for a forwarded query whose upstream failed (or that we shed)."""
    assert decision.query is not None
    reply = dns.message.make_response(decision.query, recursion_available=True,
                                      our_payload=OUR_EDNS_PAYLOAD)
    reply.id = decision.client_id
    reply.set_rcode(dns.rcode.SERVFAIL)
    return _render(reply, decision.max_size)
