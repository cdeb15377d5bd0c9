"""Attach and detach our tc filters with pyroute2, touching nothing of others'.

Every filter we install carries our own priority and handle (config
``agent.tc_priority`` / ``agent.tc_handle``) and a name starting with
``meshagent``; that triple is how we recognise ours. A clsact qdisc is created
only when the device has none, and we remember whether we created it so that
only a qdisc we made is ever deleted.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.netns.rtnl import RtnlSocket

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"
_TC_H_MIN_INGRESS = 0xFFF2
_TC_H_MIN_EGRESS = 0xFFF3
FILTER_NAME_PREFIX = "meshagent"


class AttachError(RuntimeError):
    """A tc operation failed; the message names the device and the next step."""


@dataclass(frozen=True)
class FilterSpec:
    direction: str  # INGRESS or EGRESS
    name: str       # program name recorded in the filter
    fd: int


def _parent_minor(direction: str) -> int:
    return _TC_H_MIN_INGRESS if direction == INGRESS else _TC_H_MIN_EGRESS


def qdisc_kinds(ipr: Any, ifindex: int) -> set[str]:
    return {q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=ifindex)}


def ensure_clsact(ipr: Any, ifindex: int, rtnl: RtnlSocket | None = None) -> bool:
    """Make sure the device has a clsact qdisc; return True if we created it.

    Side effects: may add a clsact qdisc to the device. ``rtnl`` makes the
    check for existing qdiscs cheap (enrollment's hot path).
    """
    if rtnl is not None:
        kind = rtnl.ingress_qdisc_kind(ifindex)
        kinds = {kind} if kind else set()
    else:
        kinds = qdisc_kinds(ipr, ifindex)
    if "clsact" in kinds:
        return False
    if "ingress" in kinds:
        raise AttachError(
            f"ifindex {ifindex} has an 'ingress' qdisc, which excludes clsact; "
            "its owner must switch to clsact before meshagent can attach")
    if rtnl is not None:
        try:
            return rtnl.add_clsact(ifindex)
        except OSError as exc:
            raise AttachError(f"adding clsact to ifindex {ifindex} failed: {exc}") from exc
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise AttachError(f"adding clsact to ifindex {ifindex} failed: {exc}") from exc
        return False
    return True


def remove_clsact(ipr: Any, ifindex: int) -> None:
    """Delete the clsact qdisc (only call for one we created and now own alone).

    Side effects: removes the qdisc and, with it, any filter still under it;
    callers check ``foreign_filters`` first.
    """
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise AttachError(f"removing clsact from ifindex {ifindex} failed: {exc}") from exc


def _filters(ipr: Any, ifindex: int, direction: str) -> list[Any]:
    try:
        return list(ipr.get_filters(index=ifindex, parent=direction))
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
            return []
        raise


def _filter_identity(msg: Any) -> tuple[int, int, str]:
    prio = (msg["info"] >> 16) & 0xFFFF
    options = msg.get_attr("TCA_OPTIONS")
    name = ""
    if options is not None:
        name = options.get_attr("TCA_BPF_NAME") or ""
    return prio, msg["handle"], name


def our_filters(ipr: Any, ifindex: int, direction: str, prio: int,
                handle: int) -> list[Any]:
    return [m for m in _filters(ipr, ifindex, direction)
            if _filter_identity(m)[:2] == (prio, handle)
            and m.get_attr("TCA_KIND") == "bpf"]


def foreign_filters(ipr: Any, ifindex: int, prio: int, handle: int) -> list[Any]:
    """Filters on the device that are not ours (a primary CNI's, an operator's)."""
    out = []
    for direction in (INGRESS, EGRESS):
        for m in _filters(ipr, ifindex, direction):
            if m["handle"] == 0 and m.get_attr("TCA_OPTIONS") is None:
                continue  # the per-priority chain header, not a filter
            if _filter_identity(m)[:2] != (prio, handle):
                out.append(m)
    return out


def shadowing_filters(rtnl: RtnlSocket, ifindex: int, prio: int,
                      handle: int) -> list[dict[str, Any]]:
    """Foreign filters that run BEFORE ours (a lower priority number) on either
    direction of a device: a final verdict there (e.g. a direct-action program
    returning TC_ACT_OK, an ``action ok``/``drop``) means ours never sees the
    packet, so that pod's traffic is not captured. Reads only."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, int, str | None]] = set()
    for direction in (INGRESS, EGRESS):
        parent = 0xFFFF0000 | _parent_minor(direction)
        for f in rtnl.filters(ifindex, parent):
            if (f.prio, f.handle) == (prio, handle) or f.prio >= prio:
                continue
            # One line per priority: u32 lists its hash table besides each filter.
            if (direction, f.prio, f.kind) in seen:
                continue
            seen.add((direction, f.prio, f.kind))
            out.append({"direction": "ingress" if direction == INGRESS else "egress",
                        "prio": f.prio, "handle": f.handle, "kind": f.kind, "name": f.name,
                        "direct_action": f.direct_action})
    return out


def attach(ipr: Any, ifindex: int, spec: FilterSpec, prio: int, handle: int,
           rtnl: RtnlSocket | None = None) -> None:
    """Install or atomically replace our filter on one direction of a device.

    Side effects: one tc ``replace`` of the bpf filter at (prio, handle); the
    kernel swaps the program in one step, so there is no window without one.
    ``rtnl`` sends it through the lean rtnetlink writer (enrollment's hot path).
    """
    name = f"{FILTER_NAME_PREFIX}-{spec.name}"[:64]
    if rtnl is not None:
        parent = 0xFFFF0000 | _parent_minor(spec.direction)
        try:
            rtnl.replace_bpf_filter(index=ifindex, parent=parent, prio=prio, handle=handle,
                                    fd=spec.fd, name=name)
        except OSError as exc:
            raise AttachError(
                f"attaching {spec.name} to ifindex {ifindex} ({spec.direction}) failed: {exc}"
            ) from exc
        return
    try:
        ipr.tc("replace-filter", "bpf", ifindex, handle, fd=spec.fd,
               name=name, parent=spec.direction,
               classid=1, direct_action=True, prio=prio)
    except NetlinkError as exc:
        raise AttachError(
            f"attaching {spec.name} to ifindex {ifindex} ({spec.direction}) failed: {exc}"
        ) from exc


def detach(ipr: Any, ifindex: int, direction: str, prio: int, handle: int) -> bool:
    """Remove our filter if present; return whether one was removed.

    Side effects: deletes exactly the filter at (prio, handle) in that direction.
    """
    if not our_filters(ipr, ifindex, direction, prio, handle):
        return False
    try:
        ipr.tc("del-filter", "bpf", ifindex, handle, parent=direction, prio=prio)
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise AttachError(f"detaching from ifindex {ifindex} failed: {exc}") from exc
    return True
