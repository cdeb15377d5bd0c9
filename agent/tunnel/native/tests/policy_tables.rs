//! The Python policy tables, run against the native evaluator (`src/policy.rs`).
//!
//! `tests/data/policy_tables.jsonl` (every case of the Python policy test tables and the
//! adversarial cases of `tests/unit/policy_fixtures.py`) and
//! `tests/data/policy_random.jsonl` (seeded random policy sets) are generated from the
//! Python tables and engine; `tests/unit/test_policy_fixtures.py` keeps them exact. Each
//! case holds the compiled rule set, connections, and the Python engine's decision for
//! each: the native decision must be the same, field for field (allowed, deciding
//! policy, action, rule, reason, dry-run matches, dry-run verdict), and the revocation
//! helper must pick exactly the denied connections.

use std::path::PathBuf;

use meshagent_datapath::policy::{revoked, Connection, RuleSet};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("data").join(name)
}

/// Run every case of a fixture file; returns (cases, decisions) checked.
fn run(name: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(data(name)).unwrap_or_else(|e| panic!("{name}: {e} (regenerate: .venv/bin/python tests/unit/policy_fixtures.py --write)"));
    let (mut cases, mut decisions) = (0, 0);
    for (line_no, line) in text.lines().enumerate() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}:{}: {e}", line_no + 1));
        let label = format!("{name}:{} {}", line_no + 1, case["name"]);
        let rules = RuleSet::from_json(&case["compiled"].to_string()).unwrap_or_else(|e| panic!("{label}: {e}"));
        let connections: Vec<Connection> = case["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| Connection::from_json(c).unwrap_or_else(|e| panic!("{label}: {e}")))
            .collect();
        let expected = case["decisions"].as_array().unwrap();
        assert_eq!(connections.len(), expected.len(), "{label}");
        for (index, (conn, want)) in connections.iter().zip(expected).enumerate() {
            let got = rules.evaluate(conn).to_json();
            assert_eq!(&got, want, "{label} connection {index}: {conn:?}");
            decisions += 1;
        }
        // Revocation: exactly the connections now denied, in order, with their decision.
        let gone: Vec<(usize, serde_json::Value)> = revoked(&rules, connections.iter().enumerate()).into_iter().map(|(i, d)| (i, d.to_json())).collect();
        let want: Vec<(usize, serde_json::Value)> = expected.iter().enumerate().filter(|(_, d)| d["allowed"] == false).map(|(i, d)| (i, d.clone())).collect();
        assert_eq!(gone, want, "{label}: revoked");
        cases += 1;
    }
    (cases, decisions)
}

#[test]
fn python_policy_tables() {
    let (cases, decisions) = run("policy_tables.jsonl");
    // The tables only grow; a truncated or empty file must not pass.
    assert!(cases >= 200 && decisions >= 250, "only {cases} cases / {decisions} decisions");
}

#[test]
fn random_policy_sets_decide_as_the_python_engine() {
    let (cases, decisions) = run("policy_random.jsonl");
    assert!(cases >= 40 && decisions >= 320, "only {cases} cases / {decisions} decisions");
}
