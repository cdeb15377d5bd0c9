"""Policy loading: multi-document files, strict all-or-nothing validation, the watcher."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.policy import (
    ConnectionRequest,
    PolicyLoadError,
    PolicySet,
    PolicyWatcher,
    WorkloadRef,
    load_policy_dir,
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


def only_issue(directory: Path) -> str:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(directory)
    assert len(caught.value.issues) == 1, caught.value.issues
    return str(caught.value)


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


BAD_CIDR_DOC2 = DENY_TWO_DOCS.replace('"10.8.0.1"', '"10.0.0.300/8"')


@pytest.mark.parametrize(("text", "message"), [
    (BAD_CIDR_DOC2, "deny.yaml: document 2: spec.rules[0].from[0].source.ipBlocks[1]: "
                    "'10.0.0.300/8' is not a CIDR"),
    (ALLOW_SLEEP.replace('ports: ["8080"]', 'ports: ["80800"]'),
     "deny.yaml: document 1: spec.rules[0].to[0].operation.ports[0]: '80800' is not a port"),
    (ALLOW_SLEEP.replace('ports: ["8080"]', 'ports: ["http"]'),
     "spec.rules[0].to[0].operation.ports[0]: 'http' is not a port"),
    (ALLOW_SLEEP.replace("principals:", "principalz:"),
     "deny.yaml: document 1: spec.rules[0].from[0].source.principalz: unknown field"),
    (ALLOW_SLEEP.replace("  rules:", "  action: AUDIT\n  rules:"),
     "deny.yaml: document 1: spec.action: 'AUDIT' is not a supported action"),
    (ALLOW_SLEEP.replace("  rules:", "  action: allow\n  rules:"),
     "spec.action: 'allow' is not a supported action: use ALLOW or DENY"),
    (ALLOW_SLEEP.replace('principals: ["cluster.local/ns/foo/sa/sleep"]',
                         "principals: cluster.local/ns/foo/sa/sleep"),
     "spec.rules[0].from[0].source.principals: must be a list, got a string"),
    (ALLOW_SLEEP.replace("cluster.local/ns/foo/sa/sleep", "spiffe://cluster.local/ns/foo/sa/x"),
     "principals[0]: 'spiffe://cluster.local/ns/foo/sa/x': write principals without"),
    (ALLOW_SLEEP.replace("cluster.local/ns/foo/sa/sleep", "cluster.local/*/sa/sleep"),
     "principals[0]: 'cluster.local/*/sa/sleep': '*' is only allowed once, at the start"),
    (ALLOW_SLEEP.replace("  namespace: foo\n", ""),
     "deny.yaml: document 1: metadata.namespace: is required"),
    (ALLOW_SLEEP.replace("kind: AuthorizationPolicy", "kind: PeerAuthentication"),
     "deny.yaml: document 1: kind: 'PeerAuthentication' is not supported"),
    (ALLOW_SLEEP.replace("security.istio.io/v1", "security.istio.io/v2"),
     "apiVersion: 'security.istio.io/v2' is not supported"),
    (ALLOW_SLEEP.replace("  selector:", "  targetRef: {kind: Gateway, name: gw}\n  selector:"),
     "spec.targetRef: is not supported at L4"),
    (ALLOW_SLEEP.replace("matchLabels: {app: httpbin}", "matchExpressions: []"),
     "spec.selector.matchExpressions: unknown field"),
    (ALLOW_SLEEP.replace("    - source:\n        principals: [\"cluster.local/ns/foo/sa/sleep\"]",
                         "    - source: {}"),
     "spec.rules[0].from[0].source: must not be empty"),
    (ALLOW_SLEEP + "  - when: [{key: destination.ip}]\n",
     "spec.rules[1].when[0]: values or notValues must be set for key 'destination.ip'"),
    (ALLOW_SLEEP + "  - when: [{key: destination.ipz, values: [x]}]\n",
     "spec.rules[1].when[0].key: unknown condition key 'destination.ipz'"),
    (ALLOW_SLEEP + "  - when: [{key: destination.port, values: ['0']}]\n",
     "spec.rules[1].when[0].values[0]: '0' is not a port"),
    (ALLOW_SLEEP + "  - from: [{source: {serviceAccounts: [a/b/c]}}]\n",
     "spec.rules[1].from[0].source.serviceAccounts[0]: 'a/b/c' is not a service account"),
    (ALLOW_SLEEP + "  - from: [{source: {serviceAccounts: [x], principals: ['*']}}]\n",
     "spec.rules[1].from[0].source: serviceAccounts/notServiceAccounts cannot be combined"),
    (ALLOW_SLEEP.replace("  name: allow-sleep\n",
                         "  name: allow-sleep\n  annotations: {istio.io/dry-run: yes}\n"),
     "metadata.annotations[istio.io/dry-run]: must be a string, got a boolean"),
    ("apiVersion: [unclosed\n", "deny.yaml: line 2, column 1: invalid YAML"),
])
def test_bad_file_is_rejected_with_exact_location(tmp_path: Path, text: str,
                                                   message: str) -> None:
    write(tmp_path, "allow-good.yaml", ALLOW_SLEEP.replace("allow-sleep", "good"))
    write(tmp_path, "deny.yaml", text)
    assert message in only_issue(tmp_path)


def test_exact_message_format(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    assert only_issue(tmp_path) == ("deny.yaml: document 2: "
                                    "spec.rules[0].from[0].source.ipBlocks[1]: "
                                    "'10.0.0.300/8' is not a CIDR")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", ALLOW_SLEEP.replace('"8080"', '"0"'))
    write(tmp_path, "b.yaml", BAD_CIDR_DOC2)
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_dir(tmp_path)
    assert [(i.file, i.document) for i in caught.value.issues] == [("a.yaml", 1), ("b.yaml", 2)]


def test_duplicate_policies_are_rejected(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", ALLOW_SLEEP)
    write(tmp_path, "b.yaml", ALLOW_SLEEP)
    assert "b.yaml: document 1: metadata.name: duplicate policy foo/allow-sleep" in only_issue(
        tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    assert "is not a directory" in only_issue(tmp_path / "nope")


def test_l7_fields_are_accepted_and_recorded(tmp_path: Path) -> None:
    write(tmp_path, "l7.yaml", ALLOW_SLEEP.replace('ports: ["8080"]',
                                                   'ports: ["8080"]\n        methods: ["GET"]'))
    rule = load_policy_dir(tmp_path).policies[0].rules[0]
    assert rule.l7_fields == ("to.operation.methods",)


def bump(path: Path, text: str) -> None:
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_watcher_reloads_and_keeps_last_good_set(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path)
    first = watcher.poll()
    assert first == PolicySet.empty() and watcher.last_error is None
    assert watcher.poll() is None  # unchanged

    policy_file = tmp_path / "allow.yaml"
    bump(policy_file, ALLOW_SLEEP)
    loaded = watcher.poll()
    assert loaded is not None and [p.key for p in loaded.policies] == ["foo/allow-sleep"]
    assert watcher.current is loaded

    bump(policy_file, ALLOW_SLEEP.replace('"8080"', '"99999"'))
    assert watcher.poll() is None
    assert watcher.current is loaded  # last good set kept
    assert watcher.last_error is not None
    assert "allow.yaml: document 1: spec.rules[0].to[0].operation.ports[0]" in str(
        watcher.last_error)
    assert watcher.poll() is None  # same bad files: not re-read, error kept
    assert watcher.last_error is not None

    bump(tmp_path / "deny.yaml", DENY_TWO_DOCS)  # still invalid: allow.yaml is bad
    assert watcher.poll() is None and watcher.current is loaded

    bump(policy_file, ALLOW_SLEEP)
    fixed = watcher.poll()
    assert fixed is not None and len(fixed) == 3 and watcher.last_error is None

    policy_file.unlink()
    after_delete = watcher.poll()
    assert after_delete is not None and len(after_delete) == 2


def test_watcher_on_missing_directory_keeps_empty_set(tmp_path: Path) -> None:
    watcher = PolicyWatcher(tmp_path / "absent")
    assert watcher.poll() is None
    assert watcher.current == PolicySet.empty() and watcher.last_error is not None
    assert not watcher.loaded_once


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


def test_check_command_reports_invalid_policies(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", BAD_CIDR_DOC2)
    result = CliRunner().invoke(policy_command, [
        "check", "--policy-dir", str(tmp_path), "--from", "10.0.0.5", "--to", "10.1.0.7:80",
        "--to-workload", "foo/httpbin"])
    assert result.exit_code == 2
    assert "'10.0.0.300/8' is not a CIDR" in result.output


def test_validate_command(tmp_path: Path) -> None:
    write(tmp_path, "deny.yaml", DENY_TWO_DOCS)
    result = CliRunner().invoke(policy_command, ["validate", "--policy-dir", str(tmp_path)])
    assert result.exit_code == 0 and "2 policies valid" in result.output
    assert "foo/deny-legacy (dry-run)" in result.output
