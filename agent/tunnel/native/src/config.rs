//! The configuration message of the control protocol (version 2): what to listen on,
//! which identity each listener presents, where outbound streams go. JSON, one object.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// 2: inbound listeners name their workload, policy snapshots follow the configuration
/// on stdin (`src/enforce.rs`), inbound connections are denied until one is applied.
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    pub trust_domain: String,
    /// PEM file of the mesh trust anchors.
    pub roots: PathBuf,
    /// Runtime worker threads; 0 = one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// How the workers share the work (default: per_core).
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// `SO_MARK` on every socket the datapath opens (listeners, HBONE connections,
    /// dials), so the node's redirect rules leave the datapath's own traffic alone.
    #[serde(default)]
    pub mark: Option<u32>,
    #[serde(default)]
    pub inbound: Vec<InboundListener>,
    #[serde(default)]
    pub outbound: Vec<OutboundListener>,
}

/// `per_core`: one single-threaded runtime per worker, each with its own SO_REUSEPORT
/// listeners and its own connection pool, so a connection, its stream and its pooled
/// HBONE connection stay on one thread (no cross-thread wakeups; Envoy's worker model).
/// `multi_thread`: one work-stealing runtime over all workers (ztunnel's model).
#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    #[default]
    PerCore,
    MultiThread,
}

/// An HBONE server (15008): mTLS, client certificate required, CONNECT only.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct InboundListener {
    pub name: String,
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Destinations a CONNECT may name; anything else is answered 400 on its stream.
    /// Empty: the listener's own local address with any port (the production rule:
    /// only CONNECT to the connection's own destination).
    #[serde(default)]
    pub destinations: Vec<SocketAddr>,
    /// Peer identities allowed to connect (empty: any identity of the trust domain).
    #[serde(default)]
    pub allowed_peers: Vec<String>,
    /// `IP_TRANSPARENT` listener (connections redirected to it keep their original
    /// destination), and each destination is dialed from the client's address (the
    /// HBONE peer's, which is the source pod's), as ztunnel's inbound does.
    #[serde(default)]
    pub transparent: bool,
    /// The destination workload behind this listener, as policy sees it.
    pub workload: WorkloadAttributes,
}

/// What a policy's scope looks at of the destination workload.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct WorkloadAttributes {
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A plain TCP listener whose connections become CONNECT streams to an HBONE peer.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutboundListener {
    pub name: String,
    pub listen: SocketAddr,
    /// The HBONE peer (ip:15008).
    pub peer: SocketAddr,
    /// `:authority` of the CONNECT: the destination behind the peer. Absent exactly
    /// when `transparent`: then each connection's original destination.
    #[serde(default)]
    pub authority: Option<SocketAddr>,
    /// `IP_TRANSPARENT` listener for redirected pod traffic (15001): the `:authority`
    /// is the accepted socket's original destination (`getsockname()`), and the outer
    /// HBONE connection is bound to the client's (source pod's) address.
    #[serde(default)]
    pub transparent: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SPIFFE IDs the peer may present (empty: any identity of the trust domain).
    #[serde(default)]
    pub peer_identities: Vec<String>,
    /// A ready W3C baggage value to send (ztunnel's form), if any.
    #[serde(default)]
    pub baggage: Option<String>,
    /// Send `Forwarded: for="<client ip>"` (default true, as ztunnel).
    #[serde(default = "yes")]
    pub forwarded_for: bool,
    /// Close a pooled connection after it carried no stream this long (default 60 s).
    #[serde(default)]
    pub pool_idle_ms: Option<u64>,
    /// Keepalive PING interval on pooled connections (default 30 s; answered in 10 s).
    #[serde(default)]
    pub keepalive_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = serde_json::from_str(text).map_err(|e| format!("config is not valid: {e}"))?;
        if cfg.version != PROTOCOL_VERSION {
            return Err(format!(
                "control protocol version {} is not supported (this datapath speaks {PROTOCOL_VERSION}): \
                 rebuild the datapath from the same checkout as the agent (scripts/setup.sh)",
                cfg.version
            ));
        }
        for l in &cfg.outbound {
            match (l.transparent, l.authority) {
                (true, Some(a)) => return Err(format!("outbound {}: a transparent listener takes each connection's original destination; remove \"authority\" ({a})", l.name)),
                (false, None) => return Err(format!("outbound {}: \"authority\" is required unless the listener is transparent", l.name)),
                _ => {}
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""version":2,"trust_domain":"cluster.local","roots":"/r""#;

    fn outbound(extra: &str) -> String {
        format!(r#"{{{BASE},"mark":1336,"outbound":[{{"name":"o","listen":"0.0.0.0:15001","peer":"10.0.0.2:15008","cert":"c","key":"k"{extra}}}]}}"#)
    }

    #[test]
    fn transparent_fields() {
        let cfg = Config::parse(&outbound(r#","transparent":true"#)).unwrap();
        assert_eq!(cfg.mark, Some(1336));
        assert!(cfg.outbound[0].transparent && cfg.outbound[0].authority.is_none());
        assert!(Config::parse(&outbound(r#","authority":"10.1.1.1:80""#)).unwrap().outbound[0].authority.is_some());
    }

    #[test]
    fn authority_exactly_when_not_transparent() {
        assert!(Config::parse(&outbound("")).unwrap_err().contains("required unless"));
        assert!(Config::parse(&outbound(r#","transparent":true,"authority":"10.1.1.1:80""#)).unwrap_err().contains("remove"));
    }

    #[test]
    fn unknown_fields_still_refused() {
        assert!(Config::parse(&outbound(r#","transparent":true,"tproxy":true"#)).unwrap_err().contains("unknown field"));
        assert!(Config::parse(&format!(r#"{{{BASE},"marks":1}}"#)).unwrap_err().contains("unknown field"));
    }
}
