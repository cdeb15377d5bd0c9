//! The native policy evaluator's own rules: strict reading of the compiled rule set
//! (unknown version or field = error, never ignored; nothing empty), CIDR matching, the
//! identity the rules see, and the revocation helper. The decisions themselves are the
//! Python tables' (`tests/policy_tables.rs`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use meshagent_datapath::policy::{revoked, Basis, Cidr, Connection, Identity, RuleSet, FORMAT, VERSION};
use meshagent_datapath::spiffe::parse_spiffe_id;
use serde_json::{json, Value};

/// A valid set: one ALLOW in `foo` for principals `cluster.local/ns/foo/*` on 8080.
fn valid() -> Value {
    json!({
        "format": FORMAT,
        "version": VERSION,
        "policies": [{
            "key": "foo/allow", "namespace": "foo", "mesh_wide": false, "selector": null,
            "action": "ALLOW", "dry_run": false, "fail_closed": null,
            "rules": [{"clauses": [
                [{"principals": [{"kind": "prefix", "value": "cluster.local/ns/foo/"}]}],
                [{"destination_ports": [8080]}]
            ]}]
        }]
    })
}

fn read(value: &Value) -> Result<RuleSet, String> {
    RuleSet::from_json(&value.to_string()).map_err(|e| e.to_string())
}

fn rejected(value: Value, expect: &str) {
    let error = read(&value).expect_err(&format!("accepted {value}"));
    assert!(error.contains(expect), "{error:?} does not say {expect:?}");
    assert!(error.contains("agent.policy.compile"), "{error:?} does not say what to do");
}

fn edit(f: impl FnOnce(&mut Value)) -> Value {
    let mut value = valid();
    f(&mut value);
    value
}

fn conn(identity: Option<&str>, src: &str, port: u16) -> Connection {
    Connection {
        src_ip: Some(src.parse().unwrap()),
        src_identity: identity.map(|uri| Identity::from(&parse_spiffe_id(uri).unwrap())),
        dst_ip: "10.1.0.7".parse().unwrap(),
        dst_port: port,
        dst_namespace: "foo".into(),
        dst_labels: BTreeMap::from([("app".to_string(), "httpbin".to_string())]),
    }
}

const SLEEP: &str = "spiffe://cluster.local/ns/foo/sa/sleep";

#[test]
fn a_valid_set_reads_and_decides() {
    let rules = read(&valid()).unwrap();
    assert!(rules.evaluate(&conn(Some(SLEEP), "10.0.0.5", 8080)).allowed);
    let denied = rules.evaluate(&conn(Some(SLEEP), "10.0.0.5", 9090));
    assert!(!denied.allowed);
    assert_eq!(denied.basis, Basis::NoAllowMatched(vec![Arc::from("foo/allow")]));
    assert_eq!(denied.reason(), "denied: 1 ALLOW policy(ies) apply (foo/allow) and none matched");
    assert!(!rules.evaluate(&conn(None, "10.0.0.5", 8080)).allowed, "plaintext has no principal");
}

#[test]
fn unknown_or_missing_format_and_version_are_errors() {
    rejected(edit(|v| v["version"] = json!(2)), "version 2 is not supported (this datapath reads version 1)");
    rejected(edit(|v| v["version"] = json!("1")), "version \"1\" is not supported");
    rejected(edit(|v| drop(v.as_object_mut().unwrap().remove("version"))), "version missing");
    rejected(edit(|v| v["format"] = json!("istio.authorization")), "format Some(\"istio.authorization\")");
    rejected(json!([]), "must be a JSON object");
    rejected(Value::Null, "must be a JSON object");
    assert!(RuleSet::from_json("{").unwrap_err().to_string().contains("not JSON"));
}

#[test]
fn unknown_fields_are_errors_at_every_level() {
    rejected(edit(|v| v["extra"] = json!(1)), "unknown field `extra`");
    rejected(edit(|v| v["policies"][0]["origin"] = json!("x.yaml")), "unknown field `origin`");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["request_principals"] = json!(["*"])), "unknown field `request_principals`");
    rejected(edit(|v| v["policies"][0]["rules"][0] = json!({"clauses": [], "when": []})), "");
    rejected(edit(|v| v["policies"][0]["rules"][0] = json!({"clausez": []})), "unknown variant `clausez`");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["principals"][0]["kind"] = json!("regex")), "unknown variant `regex`");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["principals"][0] = json!({"kind": "exact", "value": "a", "ignore_case": true})), "\"ignore_case\", expected \"kind\" or \"value\"");
    rejected(edit(|v| v["policies"][0]["action"] = json!("AUDIT")), "unknown variant `AUDIT`");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][1][0]["destination_ports"] = json!([65536])), "");
    rejected(
        edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0] = json!({"service_accounts": [{"namespace": "foo", "service_account": "a", "trust_domain": "x"}]})),
        "unknown field `trust_domain`",
    );
}

#[test]
fn missing_fields_are_errors_not_defaults() {
    for field in ["key", "namespace", "mesh_wide", "selector", "action", "dry_run", "fail_closed", "rules"] {
        rejected(edit(|v| drop(v["policies"][0].as_object_mut().unwrap().remove(field))), &format!("missing field `{field}`"));
    }
    rejected(edit(|v| drop(v.as_object_mut().unwrap().remove("policies"))), "missing field `policies`");
}

#[test]
fn nothing_empty_is_accepted() {
    // What ztunnel would skip (an empty match) or read as "no constraint" (an empty
    // clause) would be a producer bug here: an error, never a wider rule.
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0] = json!([])), "clauses[0] is empty");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0] = json!([{}])), "empty match");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0] = json!({"principals": []})), "\"principals\" is an empty list");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["principals"][0]["value"] = json!("")), "empty string match");
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0] = json!({"service_accounts": [{"namespace": "", "service_account": "a"}]})), "empty part");
    rejected(edit(|v| v["policies"][0]["fail_closed"] = json!("")), "empty reason");
    rejected(edit(|v| v["policies"][0]["key"] = json!("foo/")), "is not <namespace>/<name>");
    rejected(edit(|v| v["policies"][0]["key"] = json!("bar/allow")), "is not <namespace>/<name>");
}

#[test]
fn presence_takes_no_value() {
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["principals"][0] = json!({"kind": "presence", "value": "x"})), "");
    let ok = edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0]["principals"][0] = json!({"kind": "presence"}));
    assert!(read(&ok).unwrap().evaluate(&conn(Some(SLEEP), "10.0.0.5", 8080)).allowed);
}

#[test]
fn inconsistent_sets_are_errors() {
    rejected(edit(|v| { let p = v["policies"][0].clone(); v["policies"].as_array_mut().unwrap().push(p); }), "duplicate policy foo/allow");
    let two_roots = edit(|v| {
        v["policies"][0]["mesh_wide"] = json!(true);
        let mut other = v["policies"][0].clone();
        other["key"] = json!("bar/allow");
        other["namespace"] = json!("bar");
        v["policies"].as_array_mut().unwrap().push(other);
    });
    rejected(two_roots, "mesh-wide policies in two namespaces");
    let mixed = edit(|v| {
        let mut other = v["policies"][0].clone();
        other["key"] = json!("foo/mesh");
        other["mesh_wide"] = json!(true);
        v["policies"].as_array_mut().unwrap().push(other);
    });
    rejected(mixed, "has mesh-wide and namespace-scoped policies");
}

#[test]
fn cidrs_are_read_in_canonical_form_only() {
    for good in ["10.0.0.0/8", "10.0.0.5/32", "0.0.0.0/0", "2001:db8::/32", "::/0", "2001:db8::5/128", "::ffff:a00:0/104"] {
        assert!(Cidr::parse(good).is_ok(), "{good}");
    }
    for bad in ["10.0.0.1/8", "10.0.0.0/33", "::/129", "10.0.0.0", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/+8", "10.0.0.0/008", "10.0.0.300/8", "2001:db8::1/32", "fe80::1%eth0/64", "", "/8", "x/8"] {
        assert!(Cidr::parse(bad).is_err(), "{bad:?} accepted");
    }
    rejected(edit(|v| v["policies"][0]["rules"][0]["clauses"][0][0] = json!({"source_ips": ["10.0.0.1/8"]})), "not a CIDR in canonical form");
}

#[test]
fn cidr_matching_v4_v6_and_mapped() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let net = |s: &str| Cidr::parse(s).unwrap();
    assert!(net("10.0.0.0/8").contains(ip("10.255.0.1")));
    assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
    assert!(net("10.0.0.4/30").contains(ip("10.0.0.7")) && !net("10.0.0.4/30").contains(ip("10.0.0.8")));
    assert!(net("0.0.0.0/0").contains(ip("255.255.255.255")));
    assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")), "families never cross");
    assert!(net("::/0").contains(ip("2001:db8::1")) && !net("::/0").contains(ip("10.0.0.1")));
    assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")) && !net("2001:db8::/32").contains(ip("2001:db9::")));
    assert!(net("2001:db8::5/128").contains(ip("2001:db8::5")) && !net("2001:db8::5/128").contains(ip("2001:db8::4")));
    // An IPv4-mapped address is compared as IPv4 (agent/addr.py parse_ip does the same).
    assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
    assert!(!net("::ffff:a00:0/104").contains(ip("::ffff:10.1.2.3")));
}

#[test]
fn the_identity_the_rules_see() {
    let id = Identity::from(&parse_spiffe_id("spiffe://td.example/ns/foo/sa/sleep").unwrap());
    assert_eq!((id.principal.as_str(), id.namespace.as_str(), id.service_account.as_str()), ("td.example/ns/foo/sa/sleep", "foo", "sleep"));
}

#[test]
fn revocation_returns_exactly_the_connections_now_denied() {
    let live = [("a", conn(Some(SLEEP), "10.0.0.5", 8080)), ("b", conn(Some("spiffe://cluster.local/ns/bar/sa/x"), "10.0.0.6", 8080)), ("c", conn(None, "10.0.0.7", 8080))];
    let before = RuleSet::empty();
    assert!(revoked(&before, live.iter().map(|(k, c)| (*k, c))).is_empty(), "no policies: nothing revoked");
    let after = read(&valid()).unwrap();
    let gone = revoked(&after, live.iter().map(|(k, c)| (*k, c)));
    let keys: Vec<&str> = gone.iter().map(|(k, _)| *k).collect();
    assert_eq!(keys, ["b", "c"]);
    assert!(gone.iter().all(|(_, d)| !d.allowed && d.policy.is_none()));
    // A dry-run DENY-all revokes nothing; the same enforced revokes everything.
    let deny_all = |dry_run: bool| {
        read(&json!({"format": FORMAT, "version": VERSION, "policies": [{
            "key": "istio-system/deny", "namespace": "istio-system", "mesh_wide": true, "selector": null,
            "action": "DENY", "dry_run": dry_run, "fail_closed": null, "rules": [{"clauses": []}]}]}))
        .unwrap()
    };
    assert!(revoked(&deny_all(true), live.iter().map(|(k, c)| (*k, c))).is_empty());
    let all = revoked(&deny_all(false), live.iter().map(|(k, c)| (*k, c)));
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].1.reason(), "denied by DENY policy istio-system/deny rule 0");
}

#[test]
fn a_rule_set_is_shared_across_workers() {
    fn shareable<T: Send + Sync>() {}
    shareable::<RuleSet>();
    let rules = Arc::new(read(&valid()).unwrap());
    let worker = {
        let rules = rules.clone();
        std::thread::spawn(move || rules.evaluate(&conn(Some(SLEEP), "10.0.0.5", 8080)).allowed)
    };
    assert!(worker.join().unwrap());
}
