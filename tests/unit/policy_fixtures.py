"""The Python policy tables as data, so the native evaluator runs the same spec.

Generates two files under ``agent/tunnel/native/tests/data/``:

* ``policy_tables.jsonl``: every case of the policy test tables
  (``test_policy_semantics.CASES``, ``test_policy_engine.CASES``,
  ``test_policy_loader.BAD_DOCUMENTS``) and the adversarial cases below
  (``NATIVE_CASES``: IPv6 and IPv4-mapped CIDRs, malformed CIDRs, unsupported and
  HTTP-only fields under ALLOW and DENY, dry-run, empty rules, unknown source IP,
  non-Istio SPIFFE IDs, a custom root namespace). Each case: the documents (or policy
  files), the rule set ``agent.policy.compile`` makes of what the loader judged, the
  connections, and the Python engine's decision for each, which the generator checks
  against the table's expected verdict.
* ``policy_random.jsonl``: seeded random policy sets and connections (one set per
  line), decided by the Python engine: the differential property that both engines
  give the same answer on inputs nobody wrote by hand.

``tests/unit/test_policy_fixtures.py`` asserts the committed files are exactly what
this generates (they cannot drift from the tables) and re-runs them through the Python
loader and engine; ``agent/tunnel/native/tests/policy_tables.rs`` runs them against
``src/policy.rs``. Regenerate after changing a table or the engine::

    .venv/bin/python tests/unit/policy_fixtures.py --write
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.policy import (
    ConnectionRequest,
    PolicySet,
    WorkloadRef,
    judge_document,
    load_policy_report,
)
from agent.policy.compile import compile_policy_set

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "agent" / "tunnel" / "native" / "tests" / "data"
TABLES = DATA / "policy_tables.jsonl"
RANDOM = DATA / "policy_random.jsonl"
ROOT = "istio-system"
RANDOM_SEED = 14
RANDOM_SETS = 40
RANDOM_CONNECTIONS = 8

Json = dict[str, Any]


# ------------------------------------------------------------------ evaluation

def load_documents(documents: Sequence[Json], root: str) -> PolicySet:
    """What the loader makes of ``documents`` (as one file ``table.yaml``)."""
    results = [judge_document(document, "table.yaml", index, root)
               for index, document in enumerate(documents, start=1)]
    return PolicySet([r.policy for r in results if r.policy is not None], root)


def load_files(files: dict[str, str], root: str) -> PolicySet:
    """What the loader makes of a policy directory holding ``files``.

    Side effects: writes the files into a temporary directory, removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="meshagent-policy-fixture-") as directory:
        for name, text in files.items():
            (Path(directory) / name).write_text(text, encoding="utf-8")
        return load_policy_report(directory, root).policies


def case_policies(case: Json) -> PolicySet:
    if "files" in case:
        return load_files(case["files"], case["root_namespace"])
    return load_documents(case["documents"], case["root_namespace"])


def connection_json(request: ConnectionRequest, src_ip: str | None = None) -> Json:
    """A connection as both engines read it; ``src_ip`` keeps a raw (e.g. IPv4-mapped)
    source address the request normalised."""
    identity = request.identity
    return {
        "src_ip": src_ip if src_ip is not None else (
            None if request.src_ip is None else str(request.src_ip)),
        "src_identity": None if identity is None else {
            "uri": identity.uri, "principal": identity.principal,
            "namespace": identity.namespace, "service_account": identity.service_account},
        "dst_ip": str(request.dst_ip),
        "dst_port": request.dst_port,
        "dst_workload": {"name": request.dst_workload.name,
                         "namespace": request.dst_workload.namespace,
                         "labels": dict(sorted(request.dst_workload.labels.items()))},
    }


def connection_request(connection: Json) -> ConnectionRequest:
    identity = connection["src_identity"]
    workload = connection["dst_workload"]
    return ConnectionRequest(connection["src_ip"], None if identity is None else identity["uri"],
                             connection["dst_ip"], connection["dst_port"],
                             WorkloadRef(workload["name"], workload["namespace"],
                                         workload["labels"]))


def decide(policies: PolicySet, connections: Sequence[Json]) -> list[Json]:
    return [policies.evaluate(connection_request(c)).to_dict() for c in connections]


def make_case(name: str, source: str, *, connections: Sequence[Json],
              expected: Sequence[bool] | None, documents: Sequence[Json] | None = None,
              files: dict[str, str] | None = None, root: str = ROOT,
              dry_run_matches: Sequence[str] | None = None) -> Json:
    """One fixture case; ``expected`` (the table's verdicts) must agree with the engine."""
    case: Json = {"name": name, "source": source, "root_namespace": root}
    if files is not None:
        case["files"] = files
    else:
        case["documents"] = list(documents or [])
    policies = case_policies(case)
    case["compiled"] = compile_policy_set(policies)
    case["connections"] = list(connections)
    case["decisions"] = decide(policies, connections)
    if expected is not None:
        got = [d["allowed"] for d in case["decisions"]]
        if got != list(expected):
            raise AssertionError(f"{source} {name!r}: the engine decides {got}, the table "
                                 f"says {list(expected)}")
    if dry_run_matches is not None:
        got_matches = sorted(m["policy"] for m in case["decisions"][0]["dry_run_matches"])
        if got_matches != sorted(dry_run_matches):
            raise AssertionError(f"{name!r}: dry-run matches {got_matches}")
    return case


# ------------------------------------------------------------------ the tables

def semantics_cases() -> list[Json]:
    import test_policy_semantics as semantics

    return [make_case(c.name, f"test_policy_semantics.py::CASES ({c.cite})",
                      documents=c.documents, connections=[connection_json(c.request)],
                      expected=[c.allowed], root=semantics.ROOT,
                      dry_run_matches=c.dry_run_matches)
            for c in semantics.CASES]


def engine_cases() -> list[Json]:
    import test_policy_engine as engine

    return [make_case(name, "test_policy_engine.py::CASES", documents=documents,
                      connections=[connection_json(request)], expected=[allowed])
            for name, documents, request, allowed in engine.CASES]


def loader_cases() -> list[Json]:
    import test_policy_loader as loader

    good = loader.ALLOW_SLEEP.replace("allow-sleep", "good")
    connections = [connection_json(ConnectionRequest("10.0.0.5", identity, "10.1.0.7", 8080,
                                                     workload))
                   for identity, workload in ((loader.OTHER, loader.HTTPBIN),
                                              (loader.SLEEP, loader.HTTPBIN),
                                              (None, loader.BAR))]
    cases = []
    for index, (text, message) in enumerate(loader.BAD_DOCUMENTS):
        # The table asserts OTHER -> httpbin is denied; the rest is the engine's answer.
        cases.append(make_case(f"bad document {index}: {message}",
                               "test_policy_loader.py::BAD_DOCUMENTS",
                               files={"allow-good.yaml": good, "deny.yaml": text},
                               connections=connections, expected=None))
        if cases[-1]["decisions"][0]["allowed"]:
            raise AssertionError(f"{message!r}: OTHER -> httpbin must be denied")
    return cases


def _doc(name: str, namespace: str = "foo", **fields: Any) -> Json:
    """A document as ``test_policy_semantics.doc`` writes them, named first."""
    from test_policy_semantics import doc

    return doc(name=name, namespace=namespace, **fields)


def _from(**source: Any) -> list[Json]:
    return [{"from": [{"source": source}]}]


HTTPBIN = WorkloadRef("httpbin", "foo", {"app": "httpbin"})
SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"


def _conn(src_ip: str | None = "10.0.0.5", identity: str | None = SLEEP,
          dst_ip: str = "10.1.0.7", port: int = 8080,
          workload: WorkloadRef = HTTPBIN) -> Json:
    return connection_json(ConnectionRequest(src_ip, identity, dst_ip, port, workload),
                           src_ip=src_ip)


# (name, documents, [(connection, expected allowed)]): cases the native engine must get
# right that the other tables do not spell out; each expectation written by hand.
NATIVE_CASES: list[tuple[str, list[Json], list[tuple[Json, bool]]]] = [
    ("IPv6 ipBlocks", [_doc("v6", rules=_from(ipBlocks=["2001:db8::/32"]))],
     [(_conn("2001:db8::5"), True), (_conn("2001:db9::1"), False),
      (_conn("10.0.0.5"), False)]),
    ("IPv6 ipBlocks with host bits set (istiod: netip.ParsePrefix)",
     [_doc("v6", rules=_from(ipBlocks=["2001:db8::1/32"]))], [(_conn("2001:db8:0:1::9"), True)]),
    ("IPv6 /128 bare address and ::/0",
     [_doc("one", rules=_from(ipBlocks=["2001:db8::7"])),
      _doc("all", action="DENY", rules=_from(ipBlocks=["::/0"], notIpBlocks=["2001:db8::7"]))],
     [(_conn("2001:db8::7"), True), (_conn("2001:db8::8"), False), (_conn("10.0.0.5"), False)]),
    ("IPv4-mapped source compared as IPv4",
     [_doc("v4", rules=_from(ipBlocks=["10.0.0.0/8"]))],
     [(_conn("::ffff:10.0.0.5"), True), (_conn("::ffff:11.0.0.5"), False)]),
    ("an IPv4-mapped IPv6 CIDR never matches an IPv4 source (as ztunnel's IpNet::contains)",
     [_doc("mapped", rules=_from(ipBlocks=["::ffff:10.0.0.0/104"]))],
     [(_conn("10.0.0.5"), False), (_conn("::ffff:10.0.0.5"), False)]),
    ("0.0.0.0/0 and notIpBlocks in one source",
     [_doc("v4", rules=_from(ipBlocks=["0.0.0.0/0"], notIpBlocks=["10.0.0.4/30"]))],
     [(_conn("10.0.0.5"), False), (_conn("10.0.0.9"), True), (_conn("2001:db8::1"), False)]),
    ("destination.ip IPv6 and notValues",
     [_doc("dst", rules=[{"when": [{"key": "destination.ip", "values": ["fd00::/8"],
                                    "notValues": ["fd00::1"]}]}])],
     [(_conn(dst_ip="fd00::2"), True), (_conn(dst_ip="fd00::1"), False),
      (_conn(dst_ip="10.1.0.7"), False)]),
    ("unknown source IP: ipBlocks never match, notIpBlocks never exclude",
     [_doc("a", rules=_from(ipBlocks=["0.0.0.0/0"])),
      _doc("b", rules=_from(notIpBlocks=["0.0.0.0/0"]), selector={"app": "db"})],
     [(_conn(None), False),
      (_conn(None, workload=WorkloadRef("db", "foo", {"app": "db"})), True)]),
    ("malformed CIDR in a DENY fails closed for its namespace",
     [_doc("bad", action="DENY", rules=_from(ipBlocks=["10.0.0.0/33"])),
      _doc("allow-all", rules=[{}])],
     [(_conn(), False), (_conn(workload=WorkloadRef("web", "bar", {})), True)]),
    ("malformed IPv6 CIDR in an ALLOW is allow-nothing",
     [_doc("bad", rules=_from(ipBlocks=["2001:db8::/129"]))], [(_conn("2001:db8::1"), False)]),
    ("CIDR that is not one ('10.0.0.0/-1', '1.2.3', '')",
     [_doc("a", action="DENY", rules=_from(ipBlocks=["10.0.0.0/-1"]), selector={"app": "a"}),
      _doc("b", action="DENY", rules=_from(notIpBlocks=["1.2.3"]), selector={"app": "b"}),
      _doc("c", action="DENY", rules=[{"when": [{"key": "source.ip", "values": [""]}]}],
           selector={"app": "c"})],
     [(_conn(workload=WorkloadRef(n, "foo", {"app": n})), False) for n in "abc"]
     + [(_conn(), True)]),
    ("unknown field in a DENY: deny-all for its selector",
     [_doc("bad", action="DENY", selector={"app": "httpbin"}, rules=[{"fromm": []}])],
     [(_conn(), False), (_conn(workload=WorkloadRef("db", "foo", {"app": "db"})), True)]),
    ("HTTP-only hosts/notPaths/remoteIpBlocks in ALLOW rules never match",
     [_doc("http", rules=[{"to": [{"operation": {"hosts": ["a"], "ports": ["8080"]}}]},
                          {"to": [{"operation": {"notPaths": ["/x"]}}]},
                          *_from(remoteIpBlocks=["10.0.0.0/8"], ipBlocks=["10.0.0.0/8"])])],
     [(_conn(), False)]),
    ("HTTP-only fields in DENY: dropped next to L4, entry skipped alone",
     [_doc("deny", action="DENY",
           rules=[{"to": [{"operation": {"methods": ["GET"]}},
                          {"operation": {"notMethods": ["GET"], "ports": ["9090"]}}],
                   "from": [{"source": {"notRequestPrincipals": ["*"]}},
                            {"source": {"remoteIpBlocks": ["1.1.1.1"],
                                        "namespaces": ["foo"]}}]}])],
     [(_conn(port=9090), False), (_conn(port=8080), True),
      (_conn(port=9090, identity="spiffe://cluster.local/ns/bar/sa/x"), True)]),
    ("DENY with an HTTP when and an L4 when never matches",
     [_doc("deny", action="DENY", rules=[{"when": [
         {"key": "destination.port", "values": ["8080"]},
         {"key": "request.headers[x]", "values": ["y"]}]}])], [(_conn(), True)]),
    ("ALLOW with trustDomains never matches (meshagent deviation, never wider)",
     [_doc("td", rules=_from(trustDomains=["cluster.local"]))], [(_conn(), False)]),
    ("dry-run DENY matches, enforced ALLOW decides",
     [_doc("audit", action="DENY", rules=[{}], dry_run="t"),
      _doc("allow", rules=_from(namespaces=["foo"]))],
     [(_conn(), True), (_conn(identity=None), False)]),
    ("dry-run ALLOW that would deny",
     [_doc("dry", rules=_from(namespaces=["bar"]), dry_run="1")], [(_conn(), True)]),
    ("empty rules: allow-nothing, deny-all, spec {}",
     [_doc("nothing", rules=[], selector={"app": "a"}),
      _doc("deny-all", action="DENY", rules=[{}], selector={"app": "b"}),
      _doc("empty-spec", selector={"app": "c"})],
     [(_conn(workload=WorkloadRef(n, "foo", {"app": n})), False) for n in "abc"]
     + [(_conn(), True)]),
    ("empty selector selects every workload of the namespace",
     [_doc("all", rules=[], selector={})],
     [(_conn(), False), (_conn(workload=WorkloadRef("web", "bar", {})), True)]),
    ("a SPIFFE ID outside Istio's shape: principal only, no namespace or account",
     [_doc("sa", rules=_from(serviceAccounts=["foo/sleep"]), selector={"app": "a"}),
      _doc("ns", rules=_from(notNamespaces=["foo"]), selector={"app": "b"}),
      _doc("p", rules=_from(principals=["cluster.local/workload/*"]), selector={"app": "c"})],
     [(_conn(identity="spiffe://cluster.local/workload/x",
             workload=WorkloadRef(n, "foo", {"app": n})), want)
      for n, want in (("a", False), ("b", True), ("c", True))]),
    ("port 0 never matches; notPorts; when destination.port notValues",
     [_doc("zero", rules=[{"to": [{"operation": {"ports": ["0"]}}]},
                          {"to": [{"operation": {"notPorts": ["8080", "9090"]}}],
                           "when": [{"key": "destination.port", "notValues": ["443"]}]}])],
     [(_conn(port=8080), False), (_conn(port=80), True), (_conn(port=443), False)]),
    ("when source.namespace presence and source.principal suffix",
     [_doc("w", rules=[{"when": [{"key": "source.namespace", "values": ["*"]},
                                 {"key": "source.principal", "values": ["*/sa/sleep"]}]}])],
     [(_conn(), True), (_conn(identity=None), False),
      (_conn(identity="spiffe://cluster.local/ns/foo/sa/other"), False)]),
    ("policy order names the deciding policy: root first, then by name",
     [_doc("b-allow", rules=[{}]), _doc("a-allow", rules=_from(namespaces=["foo"])),
      _doc("mesh-allow", namespace=ROOT, rules=_from(notNamespaces=["bar"]))],
     [(_conn(), True), (_conn(identity=None), True),
      (_conn(identity="spiffe://cluster.local/ns/bar/sa/x"), True)]),
]


def native_cases() -> list[Json]:
    cases = [make_case(name, "policy_fixtures.py::NATIVE_CASES", documents=documents,
                       connections=[c for c, _ in checks], expected=[w for _, w in checks])
             for name, documents, checks in NATIVE_CASES]
    # test_policy_engine.py::test_custom_root_namespace_applies_mesh_wide
    cases.append(make_case("custom root namespace", "policy_fixtures.py::NATIVE_CASES",
                           documents=[_doc("p", "mesh-root", spec={})],
                           connections=[_conn()], expected=[False], root="mesh-root"))
    return cases


def tables() -> list[Json]:
    """Every table case, each tagged with its ``suite``."""
    return [{"suite": suite, **case}
            for suite, cases in (("semantics", semantics_cases()), ("engine", engine_cases()),
                                 ("loader", loader_cases()), ("native", native_cases()))
            for case in cases]


# ------------------------------------------------------------------ random sets

_NAMESPACES = ["foo", "foo", "foo", "bar", ROOT, ROOT]  # weighted to the workloads'
_PATTERNS = ["cluster.local/ns/foo/sa/sleep", "cluster.local/ns/bar/*", "*/sa/client", "*",
             "spiffe://cluster.local/ns/foo/sa/sleep", "td/ns/foo/sa/sleep"]
_NS_PATTERNS = ["foo", "bar", "b*", "*o", "*"]
_CIDRS = ["10.0.0.0/24", "10.0.0.5", "10.0.1.0/24", "10.0.0.0/8", "0.0.0.0/0",
          "2001:db8::/32", "2001:db8::5/128", "::/0", "::ffff:10.0.0.0/104", "10.0.0.1/16"]
_BAD_CIDRS = ["10.0.0.300/8", "2001:db8::/200", "x"]
_PORTS = ["80", "443", "8080", "9090", "0"]
_L4_WHEN = {"source.ip": _CIDRS, "destination.ip": _CIDRS, "destination.port": _PORTS,
            "source.principal": _PATTERNS, "source.namespace": _NS_PATTERNS}
_L7_WHEN = ["request.headers[x]", "source.serviceAccount", "remote.ip"]


def _some(rng: random.Random, pool: Sequence[str], most: int = 2) -> list[str]:
    return rng.sample(list(pool), rng.randint(1, min(most, len(pool))))


def _random_source(rng: random.Random) -> Json:
    source: Json = {}
    while not source:
        if rng.random() < 0.3:
            source["principals"] = _some(rng, _PATTERNS)
        if rng.random() < 0.2:
            source["notPrincipals"] = _some(rng, _PATTERNS)
        if rng.random() < 0.3:
            source["namespaces"] = _some(rng, _NS_PATTERNS)
        if rng.random() < 0.2:
            source["notNamespaces"] = _some(rng, _NS_PATTERNS)
        if rng.random() < 0.3:
            source["ipBlocks"] = _some(rng, _CIDRS)
        if rng.random() < 0.2:
            source["notIpBlocks"] = _some(rng, _CIDRS)
        if not (source.keys() & {"principals", "notPrincipals", "namespaces",
                                 "notNamespaces"}) and rng.random() < 0.15:
            source["serviceAccounts"] = rng.sample(["foo/sleep", "sleep", "bar/client"], 1)
        if rng.random() < 0.1:
            source["requestPrincipals"] = ["*"]
        if rng.random() < 0.05:
            source["trustDomains"] = ["cluster.local"]
    return source


def _random_operation(rng: random.Random) -> Json:
    operation: Json = {}
    while not operation:
        if rng.random() < 0.5:
            operation["ports"] = _some(rng, _PORTS)
        if rng.random() < 0.3:
            operation["notPorts"] = _some(rng, _PORTS, 1)
        if rng.random() < 0.15:
            operation["methods"] = ["GET"]
    return operation


def _random_rule(rng: random.Random) -> Json:
    rule: Json = {}
    if rng.random() < 0.6:
        rule["from"] = [{"source": _random_source(rng)} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:
        rule["to"] = [{"operation": _random_operation(rng)} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        conditions = []
        for _ in range(rng.randint(1, 2)):
            if rng.random() < 0.15:
                conditions.append({"key": rng.choice(_L7_WHEN), "values": ["x"]})
                continue
            key = rng.choice(sorted(_L4_WHEN))
            condition: Json = {"key": key}
            if rng.random() < 0.7:
                condition["values"] = _some(rng, _L4_WHEN[key])
            if rng.random() < 0.4 or "values" not in condition:
                condition["notValues"] = _some(rng, _L4_WHEN[key], 1)
            conditions.append(condition)
        rule["when"] = conditions
    return rule


def _random_document(rng: random.Random, index: int) -> Json:
    action = rng.choice(["ALLOW", "ALLOW", "DENY", "DENY", None, "AUDIT"])
    rules: Any = [_random_rule(rng) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.1:
        rules = ...
    document = _doc(f"p{index}", rng.choice(_NAMESPACES), action=action, rules=rules,
                    selector=rng.choice([None, None, {"app": "httpbin"}, {"app": "db"}, {}]),
                    dry_run=rng.choice([None, None, None, "true", "false"]))
    if rng.random() < 0.08:  # broken: fails closed (bad CIDR or unknown field)
        if rng.random() < 0.5:
            document["spec"]["rules"] = [{"from": [{"source": {
                "ipBlocks": [rng.choice(_BAD_CIDRS)]}}]}]
        else:
            document["spec"]["rulez"] = []
    return document


_IDENTITIES = [None, SLEEP, "spiffe://cluster.local/ns/bar/sa/client",
               "spiffe://td/ns/foo/sa/sleep", "spiffe://cluster.local/ns/istio-system/sa/gw",
               "spiffe://cluster.local/workload/x"]
_SOURCE_IPS = ["10.0.0.5", "10.0.1.9", "192.168.1.1", "2001:db8::5", "2001:db9::1",
               "::ffff:10.0.0.5", None]
_DEST_IPS = ["10.1.0.7", "10.0.0.1", "2001:db8::7", "fd00::1"]
_WORKLOADS = [HTTPBIN, HTTPBIN, WorkloadRef("db", "foo", {"app": "db"}),
              WorkloadRef("app", "bar", {"app": "httpbin"}), WorkloadRef("gw", ROOT, {})]


def random_sets(seed: int = RANDOM_SEED, count: int = RANDOM_SETS) -> list[Json]:
    """Seeded random policy sets with connections, decided by the Python engine."""
    rng = random.Random(seed)
    sets = []
    for number in range(count):
        documents = [_random_document(rng, i) for i in range(rng.randint(1, 4))]
        connections = [_conn(rng.choice(_SOURCE_IPS), rng.choice(_IDENTITIES),
                             rng.choice(_DEST_IPS), int(rng.choice(_PORTS[:4])),
                             rng.choice(_WORKLOADS))
                       for _ in range(RANDOM_CONNECTIONS)]
        case = make_case(f"random {seed}/{number}", "policy_fixtures.py::random_sets",
                         documents=documents, connections=connections, expected=None)
        sets.append(case)
    return sets


# ------------------------------------------------------------------ files

def json_lines(cases: Sequence[Json]) -> str:
    """One case per line, canonical (sorted keys, compact), so a diff names the case."""
    return "".join(json.dumps(case, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False) + "\n" for case in cases)


def tables_text() -> str:
    return json_lines(tables())


def random_text() -> str:
    return json_lines(random_sets())


def main(argv: Sequence[str] | None = None) -> int:
    """Write (``--write``) or check the fixture files. Side effects: writes TABLES and
    RANDOM with ``--write``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the fixture files")
    args = parser.parse_args(argv)
    stale = []
    for path, text in ((TABLES, tables_text()), (RANDOM, random_text())):
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        elif not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path))
    if stale:
        print("stale policy fixtures (run with --write): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
