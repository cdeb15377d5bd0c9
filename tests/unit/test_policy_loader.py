"""Policy loading: each document judged on its own, fail-closed stand-ins, the watcher."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.policy import (
    ConnectionRequest,
    DocumentOutcome,
    DocumentResult,
    LoadReport,
    PolicyAction,
    PolicySet,
    PolicyWatcher,
    WorkloadRef,
    load_policy_dir,
    load_policy_report,
)
from agent.policy.commands import policy as policy_command

ALLOW_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep
  namespace: foo
spec:
  selector:
    matchLabels: {app: httpbin}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/foo/sa/sleep"]
    to:
    - operation:
        ports: ["8080"]
"""

DENY_TWO_DOCS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plaintext, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"]}}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: foo
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["10.9.0.0/16", "10.8.0.1"]}}]
---
"""

HTTPBIN = WorkloadRef("httpbin", "foo", {"app": "httpbin"})


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def judged(directory: Path, file: str = "deny.yaml") -> tuple[LoadReport, list[DocumentResult]]:
    report = load_policy_report(directory)
    return report, [r for r in report.documents if r.file == file]


def only_failure(directory: Path) -> DocumentResult:
    """The single fail-closed document of ``directory`` (every other one accepted)."""
    report = load_policy_report(directory)
    failed = report.failed_closed
    assert len(failed) == 1, report.documents
    assert all(r.outcome is not DocumentOutcome.IGNORED for r in report.documents)
    return failed[0]


def test_loads_multi_document_files(tmp_path: Path) -> None:
    write(tmp_path, "allow.yaml", ALLOW_SLEEP)
    write(tmp_path, "deny.yml", DENY_TWO_DOCS)
    write(tmp_path, "README.md", "not a policy")
    policies = load_policy_dir(tmp_path)
    assert [p.key for p in policies.policies] == [
        "istio-system/deny-plaintext", "foo/allow-sleep", "foo/deny-legacy"]
    legacy = next(p for p in policies.policies if p.name == "deny-legacy")
    assert legacy.dry_run and legacy.origin == "deny.yml document 2"
    decision = policies.evaluate(ConnectionRequest(
        "10.0.0.5", "spiffe://cluster.local/ns/foo/sa/sleep", "10.1.0.7", 8080, HTTPBIN))
    assert decision.allowed and decision.policy == "foo/allow-sleep"


def test_empty_directory_is_an_empty_set(tmp_path: Path) -> None:
    assert load_policy_dir(tmp_path) == PolicySet.empty()


# Document 2 enforced (not dry-run) with a bad CIDR.
BAD_CIDR_DOC2 = DENY_TWO_DOCS.replace('"10.8.0.1"', '"10.0.0.300/8"').replace(
    '  annotations: {istio.io/dry-run: "true"}\n', "")
SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/bar/sa/client"
DB = WorkloadRef("db", "foo", {"app": "db"})
BAR = WorkloadRef("web", "bar", {"app": "web"})


def allowed(policies: PolicySet, identity: str | None = SLEEP,
            workload: WorkloadRef = HTTPBIN, port: int = 8080) -> bool:
    return policies.evaluate(ConnectionRequest(
        "10.0.0.5", identity, "10.1.0.7", port, workload)).allowed


# Documents Istio's validation webhook rejects (ValidateAuthorizationPolicy,
# checkDryRunAnnotation) or that cannot be read: each fails closed on its own.
# Also exported as fixtures for the native evaluator (tests/unit/policy_fixtures.py).
BAD_DOCUMENTS = [
    (BAD_CIDR_DOC2, "deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]: "
                    "'10.0.0.300/8' is not a CIDR"),
    (ALLOW_SLEEP.replace('ports: ["8080"]', 'ports: ["80800"]'),
     "deny.yaml: document 1: spec.rules[0].to[0].operation.ports[0]: '80800' is not a port"),
    (ALLOW_SLEEP.replace('ports: ["8080"]', 'ports: ["http"]'),
     "spec.rules[0].to[0].operation.ports[0]: 'http' is not a port"),
    (ALLOW_SLEEP.replace("principals:", "principalz:"),
     "deny.yaml: document 1: spec.rules[0].from[0].source.principalz: unknown field"),
    (ALLOW_SLEEP.replace("  rules:", "  action: allow\n  rules:"),
     "spec.action: 'allow' is not an action: use ALLOW or DENY"),
    (ALLOW_SLEEP.replace("  rules:", "  provider: {name: ext}\n  rules:"),
     "spec.provider: must only be set with action CUSTOM"),
    (ALLOW_SLEEP.replace('principals: ["cluster.local/ns/foo/sa/sleep"]',
                         "principals: cluster.local/ns/foo/sa/sleep"),
     "spec.rules[0].from[0].source.principals: must be a list, got a string"),
    (ALLOW_SLEEP.replace("cluster.local/ns/foo/sa/sleep", "cluster.local/*/sa/sleep"),
     "principals[0]: 'cluster.local/*/sa/sleep': '*' is only allowed once, at the start"),
    (ALLOW_SLEEP.replace("  namespace: foo\n", ""),
     "deny.yaml: document 1: metadata.namespace: is required"),
    (ALLOW_SLEEP.replace("kind: AuthorizationPolicy", "kind: PeerAuthentication"),
     "deny.yaml: document 1: kind: 'PeerAuthentication' is not supported"),
    (ALLOW_SLEEP.replace("security.istio.io/v1", "security.istio.io/v2"),
     "apiVersion: 'security.istio.io/v2' is not supported"),
    (ALLOW_SLEEP.replace("matchLabels: {app: httpbin}", "matchExpressions: []"),
     "spec.selector.matchExpressions: unknown field"),
    (ALLOW_SLEEP.replace("    - source:\n        principals: [\"cluster.local/ns/foo/sa/sleep\"]",
                         "    - source: {}"),
     "spec.rules[0].from[0].source: must not be empty"),
    (ALLOW_SLEEP.replace("principals:", "principals: []\n        notPrincipals:"
                         ).replace('notPrincipals: ["cluster.local/ns/foo/sa/sleep"]',
                                   "notPrincipals: []"),
     "spec.rules[0].from[0].source: must not be empty"),
    (ALLOW_SLEEP + "  - when: [{key: destination.ip}]\n",
     "spec.rules[1].when[0]: values or notValues must be set for key 'destination.ip'"),
    (ALLOW_SLEEP + "  - when: [{key: destination.ipz, values: [x]}]\n",
     "spec.rules[1].when[0].key: unknown condition key 'destination.ipz'"),
    (ALLOW_SLEEP + "  - when: [{key: destination.namespace, values: [x]}]\n",
     "'destination.namespace' is replaced by metadata.namespace"),
    (ALLOW_SLEEP + "  - when: [{key: 'request.headers[]', values: [x]}]\n",
     "bad key 'request.headers[]': should have the form a[b]"),
    (ALLOW_SLEEP + "  - when: [{key: destination.port, values: ['65536']}]\n",
     "spec.rules[1].when[0].values[0]: '65536' is not a port"),
    (ALLOW_SLEEP + "  - from: [{source: {serviceAccounts: [a/b/c]}}]\n",
     "spec.rules[1].from[0].source.serviceAccounts[0]: 'a/b/c' is not a service account"),
    (ALLOW_SLEEP + "  - from: [{source: {serviceAccounts: [x], principals: ['*']}}]\n",
     "spec.rules[1].from[0].source: serviceAccounts/notServiceAccounts cannot be combined"),
    (ALLOW_SLEEP + "  - from: [{source: {serviceAccounts: [x], namespaces: [foo]}}]\n",
     "spec.rules[1].from[0].source: serviceAccounts/notServiceAccounts cannot be combined"),
    (ALLOW_SLEEP + "  - from: [{source: {trustDomains: [a/b]}}]\n",
     "trustDomains[0]: 'a/b': a trust domain has no '/'"),
    (ALLOW_SLEEP.replace("  name: allow-sleep\n",
                         "  name: allow-sleep\n  annotations: {istio.io/dry-run: yes}\n"),
     "metadata.annotations[istio.io/dry-run]: must be a string, got a boolean"),
    (ALLOW_SLEEP.replace("  name: allow-sleep\n",
                         "  name: allow-sleep\n  annotations: {istio.io/dry-run: 'yes'}\n"),
     "metadata.annotations[istio.io/dry-run]: 'yes' is not a boolean (Go strconv.ParseBool"),
    (ALLOW_SLEEP.replace("  name: allow-sleep\n",
                         "  name: allow-sleep\n  annotations: {istio.io/dry-run: ''}\n"),
     "metadata.annotations[istio.io/dry-run]: '' is not a boolean"),
    (ALLOW_SLEEP.replace("kind: AuthorizationPolicy", "kind: AuthorizationPolicy\nkind: x"),
     "deny.yaml: document 1: line 3, column 1: invalid YAML: found duplicate key 'kind'"),
    ("apiVersion: [unclosed\n", "deny.yaml: document 1: line 2, column 1: invalid YAML"),
    ("- just\n- a list\n", "deny.yaml: document 1: must be a mapping, got a list"),
]


@pytest.mark.parametrize(("text", "message"), BAD_DOCUMENTS)
def test_bad_document_fails_closed_with_exact_location(tmp_path: Path, text: str,
                                                        message: str) -> None:
    write(tmp_path, "allow-good.yaml", ALLOW_SLEEP.replace("allow-sleep", "good"))
    write(tmp_path, "deny.yaml", text)
    failure = only_failure(tmp_path)
    assert failure.file == "deny.yaml" and message in str(failure), str(failure)
    report = load_policy_report(tmp_path)
    good = [r for r in report.documents if r.file == "allow-good.yaml"]
    assert [r.outcome for r in good] == [DocumentOutcome.ACCEPTED]  # judged on its own
    assert failure.policy is not None and failure.policy.stands_in_for
    assert failure.policy in report.policies.policies
    assert report.error is not None and message in str(report.error)
    # Never wider than the document: nothing from the bad file's scope gets more access.
    assert not allowed(report.policies, OTHER)


def test_exact_message_format(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    assert str(only_failure(tmp_path).issues[0]) == (
        "deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]: "
        "'10.0.0.300/8' is not a CIDR")


def test_other_documents_of_the_same_file_stay_in_force(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    report, results = judged(tmp_path)
    assert [r.outcome for r in results] == [DocumentOutcome.ACCEPTED,
                                            DocumentOutcome.FAIL_CLOSED]
    # Document 1 (mesh-wide DENY of plaintext) is enforced as written...
    assert not allowed(report.policies, None, BAR)
    # ...document 2 (a DENY in foo) is a DENY-all for namespace foo.
    stand_in = results[1].policy
    assert stand_in is not None and stand_in.action is PolicyAction.DENY
    assert stand_in.key == "foo/meshagent-fail-closed[deny.yaml#2]"
    assert not allowed(report.policies, SLEEP, HTTPBIN) and not allowed(report.policies,
                                                                          SLEEP, DB)
    assert allowed(report.policies, SLEEP, BAR)
    assert "every connection to workloads in namespace foo is denied" in results[1].effect


def test_yaml_syntax_error_loses_only_its_document(tmp_path: Path) -> None:
    broken = "apiVersion: security.istio.io/v1\nkind: [oops\n"
    write(tmp_path, "mixed.yaml", ALLOW_SLEEP + "---\n" + broken + "---\n"
          + ALLOW_SLEEP.replace("allow-sleep", "second"))
    report, results = judged(tmp_path, "mixed.yaml")
    assert [(r.document, r.outcome) for r in results] == [
        (1, DocumentOutcome.ACCEPTED), (2, DocumentOutcome.FAIL_CLOSED),
        (3, DocumentOutcome.ACCEPTED)]
    assert "line 19, column 1: invalid YAML" in str(results[1].issues[0])
    # Its scope is unknown: the stand-in denies mesh-wide.
    assert results[1].policy is not None
    assert results[1].policy.namespace == "istio-system"
    assert not allowed(report.policies, SLEEP, BAR)


def test_unreadable_file_denies_mesh_wide(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"\xff\xfe not utf-8")
    write(tmp_path, "allow.yaml", ALLOW_SLEEP)
    report = load_policy_report(tmp_path)
    (failure,) = report.failed_closed
    assert failure.document is None and "cannot read" in str(failure)
    assert not allowed(report.policies, SLEEP, BAR)


def test_unlistable_directory_denies_mesh_wide(tmp_path: Path) -> None:
    not_a_dir = write(tmp_path, "file.yaml", ALLOW_SLEEP)
    report = load_policy_report(not_a_dir)
    assert report.failed_closed and not allowed(report.policies, SLEEP, BAR)
    assert "cannot list the policy directory" in str(report.error)


def test_missing_directory_means_no_policies(tmp_path: Path) -> None:
    report = load_policy_report(tmp_path / "nope")
    assert report.directory_missing and report.policies == PolicySet.empty()
    assert report.error is None


def test_stand_in_scope_is_the_valid_selector(tmp_path: Path) -> None:
    # A DENY for app=httpbin with a bad CIDR: only httpbin is cut off.
    write(tmp_path, "deny.yaml", """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: d, namespace: foo}
        spec:
          action: DENY
          selector: {matchLabels: {app: httpbin}}
          rules: [{from: [{source: {ipBlocks: [nope]}}]}]
        """)
    policies = load_policy_dir(tmp_path)
    assert not allowed(policies, SLEEP, HTTPBIN)
    assert allowed(policies, SLEEP, DB)


def test_stand_in_with_a_bad_selector_covers_the_namespace(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: d, namespace: foo}
        spec:
          action: DENY
          selector: {matchLabels: {app: [not, a, string]}}
          rules: [{}]
        """)
    policies = load_policy_dir(tmp_path)
    assert not allowed(policies, SLEEP, HTTPBIN) and not allowed(policies, SLEEP, DB)
    assert allowed(policies, SLEEP, BAR)


def test_invalid_allow_becomes_allow_nothing_for_its_scope(tmp_path: Path) -> None:
    # Another ALLOW still admits what it allows; nothing else reaches httpbin.
    write(tmp_path, "allow.yaml", ALLOW_SLEEP)
    write(tmp_path, "bad.yaml", ALLOW_SLEEP.replace("allow-sleep", "bad").replace(
        "cluster.local/ns/foo/sa/sleep", "cluster.local/ns/bar/sa/client").replace(
        '"8080"', '"x"'))
    report = load_policy_report(tmp_path)
    (failure,) = report.failed_closed
    assert failure.policy is not None and failure.policy.action is PolicyAction.ALLOW
    assert failure.policy.rules == ()
    assert "allow-nothing ALLOW for workloads in namespace foo labelled app=httpbin" in (
        failure.effect)
    assert allowed(report.policies, SLEEP, HTTPBIN)
    assert not allowed(report.policies, OTHER, HTTPBIN)  # what the bad one meant: denied
    assert allowed(report.policies, OTHER, DB)


def test_invalid_dry_run_policy_is_ignored(tmp_path: Path) -> None:
    # A dry-run policy never changes a decision, so dropping an invalid one widens nothing.
    write(tmp_path, "deny.yaml", DENY_TWO_DOCS.replace('"10.8.0.1"', '"bad"'))
    _, results = judged(tmp_path)
    assert results[1].outcome is DocumentOutcome.IGNORED and results[1].policy is None
    assert "'bad' is not a CIDR" in str(results[1])


def test_duplicate_policies_all_fail_closed(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", ALLOW_SLEEP)
    write(tmp_path, "b.yaml", ALLOW_SLEEP.replace("cluster.local/ns/foo/sa/sleep",
                                                  "cluster.local/ns/bar/sa/client"))
    report = load_policy_report(tmp_path)
    assert [r.outcome for r in report.documents] == [DocumentOutcome.FAIL_CLOSED] * 2
    assert "b.yaml: document 1: metadata.name: duplicate policy foo/allow-sleep " \
           "(also defined in a.yaml document 1)" in str(report.error)
    assert not allowed(report.policies, SLEEP) and not allowed(report.policies, OTHER)


@pytest.mark.parametrize(("text", "field"), [
    (ALLOW_SLEEP.replace("  rules:", "  action: AUDIT\n  rules:"), "spec.action"),
    (ALLOW_SLEEP.replace("  rules:", "  action: CUSTOM\n  provider: {name: ext}\n  rules:"),
     "spec.action"),
    # CUSTOM is ignored whatever else it says (convertAuthorizationPolicy checks the
    # action before looking at the rules).
    (ALLOW_SLEEP.replace("  rules:", "  action: CUSTOM\n  rules:").replace('"8080"', '"x"'),
     "spec.action"),
    (ALLOW_SLEEP.replace("  selector:\n    matchLabels: {app: httpbin}\n",
                         "  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, "
                         "name: gw}\n"), "spec.targetRef"),
    (ALLOW_SLEEP.replace("  selector:\n    matchLabels: {app: httpbin}\n",
                         "  targetRefs: [{kind: Service, group: '', name: httpbin}]\n"),
     "spec.targetRefs"),
    ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
     "metadata: {name: d, namespace: foo}\nspec: {action: DENY}\n", "spec.rules"),
])
def test_documents_istiod_does_not_send_to_ztunnel_are_ignored(tmp_path: Path, text: str,
                                                               field: str) -> None:
    write(tmp_path, "deny.yaml", text)
    report, (result,) = judged(tmp_path)
    assert result.outcome is DocumentOutcome.IGNORED and result.policy is None
    assert result.issues[0].path == field
    assert len(report.policies) == 0 and allowed(report.policies, OTHER)


def test_http_attributes_are_accepted_with_warnings(tmp_path: Path) -> None:
    write(tmp_path, "l7.yaml", ALLOW_SLEEP.replace('ports: ["8080"]',
                                                   'ports: ["8080"]\n        methods: ["GET"]'))
    report, (result,) = judged(tmp_path, "l7.yaml")
    assert result.outcome is DocumentOutcome.ACCEPTED_WITH_WARNINGS
    assert result.policy is not None
    assert result.policy.rules[0].unsupported_fields == ("to.operation.methods",)
    assert "in an ALLOW policy the rule is omitted" in str(result)
    assert not allowed(report.policies)  # the only rule never matches


def test_spiffe_principal_is_accepted_and_never_matches(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", ALLOW_SLEEP.replace("cluster.local/ns/foo/sa/sleep",
                                                  "spiffe://cluster.local/ns/foo/sa/sleep"))
    report, (result,) = judged(tmp_path, "p.yaml")
    assert result.outcome is DocumentOutcome.ACCEPTED_WITH_WARNINGS
    assert "principals[0]: 'spiffe://cluster.local/ns/foo/sa/sleep' can never match" in str(
        result)
    assert not allowed(report.policies, SLEEP)


def test_kubectl_metadata_is_tolerated(tmp_path: Path) -> None:
    write(tmp_path, "k.yaml", ALLOW_SLEEP.replace(
        "  namespace: foo\n", "  namespace: foo\n  uid: x\n  finalizers: []\n"
        "  ownerReferences: []\n  annotations: {kubectl.kubernetes.io/last-applied: '{}', "
        "istio.io/dry-run: 'False'}\n"))
    _, (result,) = judged(tmp_path, "k.yaml")
    assert result.outcome is DocumentOutcome.ACCEPTED and not result.policy.dry_run


def bump(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_watcher_denies_until_first_read_then_judges_each_change(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path)
    assert not watcher.loaded_once and watcher.report is None
    assert not allowed(watcher.current, SLEEP, BAR)  # not read yet: fail closed
    first = watcher.poll()
    assert first == PolicySet.empty() and watcher.last_error is None
    assert watcher.poll() is None  # unchanged

    policy_file = tmp_path / "allow.yaml"
    bump(policy_file, ALLOW_SLEEP)
    loaded = watcher.poll()
    assert loaded is not None and [p.key for p in loaded.policies] == ["foo/allow-sleep"]
    assert watcher.current is loaded

    bump(tmp_path / "deny.yaml", BAD_CIDR_DOC2)
    with_bad = watcher.poll()
    assert with_bad is not None and watcher.current is with_bad
    assert watcher.last_error is not None
    assert "deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]" in str(
        watcher.last_error)
    assert watcher.report is not None and watcher.report.counts() == {
        DocumentOutcome.ACCEPTED: 2, DocumentOutcome.ACCEPTED_WITH_WARNINGS: 0,
        DocumentOutcome.IGNORED: 0, DocumentOutcome.FAIL_CLOSED: 1}
    assert not allowed(with_bad, SLEEP, HTTPBIN)  # the bad DENY's scope (foo) denies
    assert allowed(with_bad, OTHER, BAR)
    assert watcher.poll() is None  # same files: not re-read

    bump(tmp_path / "deny.yaml", DENY_TWO_DOCS)
    fixed = watcher.poll()
    assert fixed is not None and len(fixed) == 3 and watcher.last_error is None

    policy_file.unlink()
    after_delete = watcher.poll()
    assert after_delete is not None and len(after_delete) == 2


def test_watcher_on_missing_directory_has_no_policies(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path / "absent")
    assert watcher.poll() == PolicySet.empty()
    assert watcher.last_error is None and watcher.loaded_once
    assert watcher.report is not None and watcher.report.directory_missing
    write(tmp_path, "absent", "now a file, not a directory")
    failed = watcher.poll()
    assert failed is not None and not allowed(failed, SLEEP, BAR)


def test_metrics_count_outcomes(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from agent.policy.metrics import PolicyDocumentsCollector

    watcher = PolicyWatcher(tmp_path)
    registry = CollectorRegistry()
    registry.register(PolicyDocumentsCollector(watcher))
    assert registry.get_sample_value("meshagent_policy_fail_closed") == 1  # not read yet
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    watcher.poll()
    assert registry.get_sample_value("meshagent_policy_documents",
                                     {"outcome": "fail_closed"}) == 1
    assert registry.get_sample_value("meshagent_policy_documents",
                                     {"outcome": "accepted"}) == 1
    assert registry.get_sample_value("meshagent_policy_fail_closed") == 1


def test_check_command(tmp_path: Path) -> None:
    write(tmp_path, "allow.yaml", ALLOW_SLEEP)
    runner = CliRunner()
    base = ["check", "--policy-dir", str(tmp_path), "--to-workload", "foo/httpbin",
            "--label", "app=httpbin"]
    ok = runner.invoke(policy_command, [*base, "--from", "spiffe://cluster.local/ns/foo/sa/sleep",
                                        "--from", "10.0.0.5", "--to", "10.1.0.7:8080"])
    assert ok.exit_code == 0, ok.output
    assert "decision: ALLOW (allowed by ALLOW policy foo/allow-sleep rule 0)" in ok.output
    denied = runner.invoke(policy_command, [*base, "--from", "10.0.0.5", "--to", "10.1.0.7:8080"])
    assert denied.exit_code == 1
    assert "principals: plaintext (no identity) not in [cluster.local/ns/foo/sa/sleep]" in (
        denied.output)
    as_json = runner.invoke(policy_command, [*base, "--from", "10.0.0.5", "--to",
                                             "[::1]:8080", "--json"])
    assert as_json.exit_code == 1 and '"allowed": false' in as_json.output


def test_check_command_decides_with_the_stand_ins(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    result = CliRunner().invoke(policy_command, [
        "check", "--policy-dir", str(tmp_path), "--from", SLEEP, "--to", "10.1.0.7:80",
        "--to-workload", "foo/httpbin"])
    assert result.exit_code == 1, result.output
    assert "'10.0.0.300/8' is not a CIDR" in result.output  # listed (stderr)
    assert "fail-closed stand-in for: deny.yaml: document 2" in result.output
    assert "DENY  foo/meshagent-fail-closed[deny.yaml#2]: MATCHED rule 0" in result.output
    assert "decision: DENY (denied: fail closed (deny.yaml: document 2" in result.output


def test_validate_command_lists_every_document(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", DENY_TWO_DOCS)
    result = CliRunner().invoke(policy_command, ["validate", "--policy-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "deny.yaml document 2: accepted: DENY foo/deny-legacy (dry-run)" in result.output
    assert "2 documents: 2 accepted, 0 accepted_with_warnings, 0 ignored, 0 fail_closed" in (
        result.output)
    write(tmp_path, "audit.yaml", ALLOW_SLEEP.replace("  rules:", "  action: AUDIT\n  rules:"))
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    bad = CliRunner().invoke(policy_command, ["validate", "--policy-dir", str(tmp_path)])
    assert bad.exit_code == 2, bad.output
    assert "audit.yaml document 1 (foo/allow-sleep): ignored" in bad.output
    assert "deny.yaml document 2 (foo/deny-legacy): fail_closed: every connection" in (
        bad.output)


def test_tunnel_denies_until_its_first_policy_read(tmp_path: Path) -> None:
    """The call site (agent/tunnel/gate.py): before the gate's first reload, an inbound
    connection is denied; after it, the directory's set decides."""
    from agent.policy import ConnectionRequest, WorkloadRef
    from agent.tunnel.gate import PolicyGate
    from agent.tunnel.tracker import ConnectionTracker

    gate = PolicyGate(tmp_path / "absent", "istio-system", ConnectionTracker())
    pod = WorkloadRef(name="httpbin", namespace="foo", labels={"app": "httpbin"})

    def decide() -> bool:
        request = ConnectionRequest(src_ip="10.0.0.5", src_identity=SLEEP, dst_ip="10.1.0.7",
                                    dst_port=8080, dst_workload=pod)
        return gate.evaluate(request).allowed

    assert not decide()
    gate.reload()  # missing directory: no policies
    assert decide()
    (tmp_path / "absent").mkdir()
    write(tmp_path / "absent", "deny.yaml", BAD_CIDR_DOC2)
    gate.reload()
    assert not decide()  # document 2 fails closed for namespace foo
    assert "deny.yaml: document 2" in str(gate.last_error or "")


def test_alias_bomb_fails_closed_without_expanding(tmp_path: Path) -> None:
    # Nine levels of nine aliases: 9**9 strings if anything walked or printed the tree.
    levels = ['x0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    labels = "\n".join(f"    {line}" for line in levels)
    write(tmp_path, "bomb.yaml", "apiVersion: security.istio.io/v1\n"
          "kind: AuthorizationPolicy\nmetadata:\n  name: bomb\n  namespace: foo\n"
          f"  labels:\n{labels}\n"
          "spec: {rules: [{to: [{operation: {ports: [*l8]}}]}]}\n")
    failure = only_failure(tmp_path)
    assert "ports[0]: a list is not a port" in str(failure)


@pytest.mark.parametrize("text", [
    "a: 1\n---\nb: 2\n", "---\na: 1\n---\n", "# c\n---\na: 1\n", "--- {a: 1}\n--- {b: 2}\n",
    "a: 1\n...\n---\nb: 2\n", "%YAML 1.1\n---\na: 1\n", "a: |\n  x\n  ---\n  y\n",
    "a: 1\n---\n---\nb: 1\n", "# only\n", "", "a: 1\n---\n# trailing comment\n",
])
def test_document_split_agrees_with_pyyaml_on_valid_streams(text: str) -> None:
    import yaml

    from agent.policy.loader import _split_documents, _StrictLoader

    split = [doc for _, part in _split_documents(text)
             for doc in yaml.load_all(part, Loader=_StrictLoader)]
    assert split == list(yaml.safe_load_all(text))


def test_kubectl_list_items_are_judged_one_by_one(tmp_path: Path) -> None:
    import yaml

    good = yaml.safe_load(ALLOW_SLEEP)
    bad = yaml.safe_load(ALLOW_SLEEP.replace("allow-sleep", "bad").replace('"8080"', '"x"'))
    audit = yaml.safe_load(ALLOW_SLEEP.replace("allow-sleep", "audit").replace(
        "  rules:", "  action: AUDIT\n  rules:"))
    write(tmp_path, "dump.yaml", yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
         "items": [good, bad, audit]}))
    report, results = judged(tmp_path, "dump.yaml")
    assert [(r.document, r.item, r.outcome) for r in results] == [
        (1, 0, DocumentOutcome.ACCEPTED), (1, 1, DocumentOutcome.FAIL_CLOSED),
        (1, 2, DocumentOutcome.IGNORED)]
    assert str(results[1].issues[0]) == (
        "dump.yaml: document 1: items[1].spec.rules[0].to[0].operation.ports[0]: "
        "'x' is not a port (an integer 0..65535)")
    assert results[1].where == "dump.yaml document 1 items[1]"
    assert results[1].policy is not None
    assert results[1].policy.key == "foo/meshagent-fail-closed[dump.yaml#1.items[1]]"
    assert allowed(report.policies, SLEEP) and not allowed(report.policies, OTHER)


def test_a_malformed_list_fails_closed(tmp_path: Path) -> None:
    write(tmp_path, "dump.yaml", "apiVersion: v1\nkind: List\nitems: {not: a list}\n")
    failure = only_failure(tmp_path)
    assert "items: unknown field" in str(failure) and failure.policy is not None
    assert failure.policy.namespace == "istio-system"  # mesh-wide


def test_dry_run_annotation_on_another_kind_still_fails_closed(tmp_path: Path) -> None:
    write(tmp_path, "pa.yaml", DENY_TWO_DOCS.split("---\n")[1].replace(
        "kind: AuthorizationPolicy", "kind: PeerAuthentication"))
    assert "kind: 'PeerAuthentication' is not supported" in str(only_failure(tmp_path))
