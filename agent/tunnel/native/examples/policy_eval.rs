//! The native policy evaluator over JSON lines, for the differential test
//! `tests/unit/test_policy_fixtures.py::test_fresh_random_sets_decide_the_same_natively`:
//! each stdin line `{"compiled": <rule set>, "connections": [<connection>, ...]}` (the
//! fixture case form of `tests/unit/policy_fixtures.py`) gives one stdout line
//! `{"decisions": [...]}` (as `Decision.to_dict()` in Python) or `{"error": "..."}`.
//! Built by `cargo test` (as every example), not part of the datapath.

use std::io::{BufRead, Write};

use meshagent_datapath::policy::{Connection, PolicyError, RuleSet};
use serde_json::{json, Value};

fn decide(line: &str) -> Result<Value, PolicyError> {
    let case: Value = serde_json::from_str(line).map_err(|e| PolicyError(format!("not JSON: {e}")))?;
    let rules = RuleSet::from_json(&case["compiled"].to_string())?;
    let connections = case["connections"].as_array().ok_or_else(|| PolicyError("no connections list".into()))?;
    let mut decisions = Vec::with_capacity(connections.len());
    for c in connections {
        decisions.push(rules.evaluate(&Connection::from_json(c)?).to_json());
    }
    Ok(json!({ "decisions": decisions }))
}

fn main() {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin is not UTF-8 text");
        let answer = decide(&line).unwrap_or_else(|e| json!({ "error": e.to_string() }));
        writeln!(out, "{answer}").expect("stdout closed");
    }
}
