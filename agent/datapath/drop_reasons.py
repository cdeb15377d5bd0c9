"""Why the datapath drops a packet: the Python mirror of bpf/lib/drop_reasons.h.

A unit test parses the C header and fails when this table and the header
disagree, so the two can only change together.
"""

from __future__ import annotations

import enum


class DropReason(enum.IntEnum):
    SPOOFED_SOURCE = 0
    NO_LISTENER = 1
    ASSIGN_FAILED = 2
    MALFORMED = 3
    FRAGMENT = 4
    EXTHDR_LIMIT = 5
    NO_SOCKET = 6
    NO_CONFIG = 7
    REDIRECT_FAILED = 8
    VLAN_TAGGED = 9
    UNKNOWN_L3 = 10
    ENCAPSULATED = 11

    @property
    def label(self) -> str:
        """The metric label value, e.g. ``no_listener``."""
        return self.name.lower()


DROP_REASON_MAX = 12
DESCRIPTIONS: dict[DropReason, str] = {
    DropReason.SPOOFED_SOURCE: "pod sent TCP from an address that is not its own",
    DropReason.NO_LISTENER: "tunnel listener missing: fail closed",
    DropReason.ASSIGN_FAILED: "bpf_sk_assign refused the socket",
    DropReason.MALFORMED: "truncated or invalid IP/TCP header",
    DropReason.FRAGMENT: "fragmented TCP: ports unknown, cannot be captured safely",
    DropReason.EXTHDR_LIMIT: "more IPv6 extension headers than the datapath walks",
    DropReason.NO_SOCKET: "non-SYN reached the tunnel device with no socket",
    DropReason.NO_CONFIG: "datapath config missing: agent not ready",
    DropReason.REDIRECT_FAILED: "could not redirect to the tunnel device",
    DropReason.VLAN_TAGGED: "802.1Q/802.1ad tag (priority tags too): pods send untagged frames",
    DropReason.UNKNOWN_L3: "not IPv4, IPv6 or ARP: not on the allow list",
    DropReason.ENCAPSULATED:
        "IP-in-IP, GRE, VXLAN, Geneve...: would be decapsulated around capture",
}
