//! The configuration message of the control protocol (version 1): what to listen on,
//! which identity each listener presents, where outbound streams go. JSON, one object.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

pub const PROTOCOL_VERSION: u32 = 1;

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
}

/// A plain TCP listener whose connections become CONNECT streams to an HBONE peer.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutboundListener {
    pub name: String,
    pub listen: SocketAddr,
    /// The HBONE peer (ip:15008).
    pub peer: SocketAddr,
    /// `:authority` of the CONNECT: the destination behind the peer.
    pub authority: SocketAddr,
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
        Ok(cfg)
    }
}
