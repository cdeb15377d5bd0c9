//! Policy in the running datapath: the current compiled rule set (a versioned snapshot
//! sent by the driver), the decision per new inbound connection, and the tracked live
//! connections a new snapshot re-checks (revocation).
//!
//! Follows ztunnel: `src/state.rs` `assert_rbac` (one decision per new connection, before
//! the pod is dialed) and `src/proxy/connection_manager.rs` (tracked connections, closed
//! when a policy update denies them). Fail closed: until the first snapshot is applied
//! every connection is denied; a snapshot that cannot be read is refused and the previous
//! one stays (never "allow all").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;
use tokio::sync::Notify;

use crate::policy::{revoked, Connection, Decision, RuleSet};

/// One applied snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    pub rules: RuleSet,
}

/// A control message after the configuration (one JSON line each on stdin).
#[derive(Debug, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// The compiled rule set (`agent.policy.compile`), replacing the current one.
    /// `version` must grow with every snapshot.
    Policy { version: u64, rules: serde_json::Value },
    /// A new certificate and key (PEM files) for a local identity (a SPIFFE URI): every
    /// listener presenting it uses them for new handshakes; live connections keep theirs.
    Certificates { identity: String, cert: std::path::PathBuf, key: std::path::PathBuf },
}

/// What applying a control message did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// A policy snapshot is current; `revoked` live connections it denies were signalled.
    Policy { version: u64, policies: usize, revoked: usize },
    /// `listeners` present the new certificate of `identity`.
    Certificates { identity: String, listeners: usize },
}

/// The end a revocation gives a tracked connection: the decision that denied it.
#[derive(Debug, Default)]
pub struct Revocation {
    pub notify: Notify,
    pub decision: Mutex<Option<Decision>>,
}

struct Tracked {
    conn: Connection,
    revocation: Arc<Revocation>,
}

/// The policy state shared by every worker (one per process).
#[derive(Default)]
pub struct Enforcer {
    current: RwLock<Option<Arc<Snapshot>>>,
    live: Mutex<HashMap<u64, Tracked>>,
    next_id: AtomicU64,
}

/// Why a new connection is refused before anything is dialed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No snapshot applied yet: fail closed.
    NoPolicy,
    Denied(Decision),
}

impl Refusal {
    pub fn reason(&self) -> String {
        match self {
            Refusal::NoPolicy => "denied: no policy snapshot received yet (fail closed)".to_string(),
            Refusal::Denied(d) => d.reason(),
        }
    }

    pub fn policy(&self) -> Option<String> {
        match self {
            Refusal::NoPolicy => None,
            Refusal::Denied(d) => d.policy.as_deref().map(str::to_string),
        }
    }
}

/// A tracked, allowed connection; untracked when dropped.
pub struct Admission<'a> {
    enforcer: &'a Enforcer,
    id: u64,
    pub revocation: Arc<Revocation>,
    pub decision: Decision,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Ok(mut live) = self.enforcer.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Enforcer {
    pub fn global() -> &'static Enforcer {
        static GLOBAL: std::sync::OnceLock<Enforcer> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(Enforcer::default)
    }

    /// Decide a new connection; an allowed one is tracked until the `Admission` drops.
    /// Decided and tracked under the live-set lock, so a snapshot applied concurrently
    /// either sees this connection (and re-checks it) or was already current for it.
    pub fn admit(&self, conn: Connection) -> Result<Admission<'_>, Refusal> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.current.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot = current.ok_or(Refusal::NoPolicy)?;
        let decision = snapshot.rules.evaluate(&conn);
        if !decision.allowed {
            return Err(Refusal::Denied(decision));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revocation = Arc::new(Revocation::default());
        live.insert(id, Tracked { conn, revocation: revocation.clone() });
        Ok(Admission { enforcer: self, id, revocation, decision })
    }

    /// Read and apply one control message (a line). Side effects: replaces the current
    /// snapshot and signals every tracked connection the new one denies. On any error
    /// nothing changes and the error says what to fix.
    pub fn apply_line(&self, line: &str) -> Result<Applied, String> {
        let message: Message = serde_json::from_str(line).map_err(|e| format!("control message refused: {e} (this datapath reads the messages \"policy\" {{version, rules}} and \"certificates\" {{identity, cert, key}}; rebuild it from the same checkout as the agent)"))?;
        match message {
            Message::Policy { version, rules } => {
                let rules = RuleSet::from_json(&rules.to_string()).map_err(|e| format!("policy snapshot {version} refused, previous policy kept: {e}"))?;
                self.apply(Snapshot { version, rules })
            }
            Message::Certificates { identity, cert, key } => {
                let listeners = crate::tls::rotate(&identity, &cert, &key)?;
                Ok(Applied::Certificates { identity, listeners })
            }
        }
    }

    pub fn apply(&self, snapshot: Snapshot) -> Result<Applied, String> {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = current.as_ref() {
            if snapshot.version <= old.version {
                return Err(format!("policy snapshot {} refused, previous policy kept: its version is not newer than the applied {}", snapshot.version, old.version));
            }
        }
        let denied = revoked(&snapshot.rules, live.iter().map(|(id, t)| (*id, &t.conn)));
        for (id, decision) in &denied {
            if let Some(t) = live.get(id) {
                *t.revocation.decision.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision.clone());
                t.revocation.notify.notify_one();
            }
        }
        let applied = Applied::Policy { version: snapshot.version, policies: snapshot.rules.policies().len(), revoked: denied.len() };
        *current = Some(Arc::new(snapshot));
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const DENY_ALL: &str = r#"{"format":"meshagent.policy.compiled","version":1,"policies":[{"key":"ns/deny","namespace":"ns","mesh_wide":false,"selector":null,"action":"DENY","dry_run":false,"fail_closed":null,"rules":[{"clauses":[]}]}]}"#;
    const EMPTY: &str = r#"{"format":"meshagent.policy.compiled","version":1,"policies":[]}"#;

    fn conn() -> Connection {
        Connection { src_ip: Some("10.0.0.1".parse().unwrap()), src_identity: None, dst_ip: "10.0.0.2".parse().unwrap(), dst_port: 80, dst_namespace: "ns".into(), dst_labels: BTreeMap::new() }
    }

    fn line(version: u64, rules: &str) -> String {
        format!(r#"{{"message":"policy","version":{version},"rules":{rules}}}"#)
    }

    #[test]
    fn fail_closed_until_a_snapshot() {
        let e = Enforcer::default();
        assert_eq!(e.admit(conn()).err(), Some(Refusal::NoPolicy));
        e.apply_line(&line(1, EMPTY)).unwrap();
        assert!(e.admit(conn()).is_ok());
    }

    #[test]
    fn revocation_signals_tracked_connections() {
        let e = Enforcer::default();
        e.apply_line(&line(1, EMPTY)).unwrap();
        let admitted = e.admit(conn()).unwrap();
        let applied = e.apply_line(&line(2, DENY_ALL)).unwrap();
        assert_eq!(applied, Applied::Policy { version: 2, policies: 1, revoked: 1 });
        let decision = admitted.revocation.decision.lock().unwrap().clone().unwrap();
        assert_eq!(decision.policy.as_deref(), Some("ns/deny"));
        drop(admitted);
        assert!(e.live.lock().unwrap().is_empty());
    }

    #[test]
    fn bad_snapshots_keep_the_previous_one() {
        let e = Enforcer::default();
        e.apply_line(&line(1, EMPTY)).unwrap();
        assert!(e.apply_line(&line(2, r#"{"format":"meshagent.policy.compiled","version":1,"policies":[],"extra":1}"#)).unwrap_err().contains("previous policy kept"));
        assert!(e.apply_line(&line(1, DENY_ALL)).unwrap_err().contains("not newer"));
        assert!(e.apply_line(r#"{"message":"policy","version":3,"rules":{},"x":1}"#).unwrap_err().contains("refused"));
        assert!(e.apply_line(r#"{"message":"certificates"}"#).unwrap_err().contains("refused"));
        assert!(e.apply_line(r#"{"message":"drain"}"#).unwrap_err().contains("refused"));
        assert!(e.admit(conn()).is_ok());
    }
}
