//! Events to the Python driver: one JSON object per line on stdout (protocol version 2).
//! The driver turns `connection` events into Istio metrics and the access log, so the
//! byte counts in them are exact: bytes written to the far side, counted as written.

use serde::Serialize;
use std::io::Write;
use std::sync::OnceLock;
use tokio::sync::mpsc;

use crate::config::PROTOCOL_VERSION;

#[derive(Debug, Serialize, Clone)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both directions finished with FIN / END_STREAM.
    Closed,
    /// The TCP side was reset or failed; the stream was reset with CONNECT_ERROR.
    SocketReset,
    /// The stream was reset (or its connection lost); the TCP side got an RST.
    StreamReset,
    /// The CONNECT was answered with an error status (or the peer answered one).
    Rejected,
    /// The destination could not be dialed (503).
    DialFailed,
    /// The client reset the request before it was answered: nothing was dialed.
    Cancelled,
    /// The HBONE connection to the peer could not be made.
    ConnectFailed,
    /// Policy denied it: a new connection answered 401 (nothing dialed), or a live one
    /// revoked by a new snapshot (stream reset CANCEL, TCP side RST, counts kept).
    Denied,
}

#[derive(Debug, Serialize, Clone)]
pub struct ConnectionEvent {
    pub direction: Direction,
    pub listener: String,
    /// Client address of the tunnelled connection (outbound: the TCP client; inbound:
    /// the HBONE connection's TCP peer, never the Forwarded header).
    pub src: String,
    pub dst: String,
    pub peer_identity: Option<String>,
    pub outcome: Outcome,
    pub status: u16,
    pub bytes_to_destination: u64,
    pub bytes_from_destination: u64,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarded: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baggage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy (`namespace/name`) that decided, when one did (inbound).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready { listeners: std::collections::BTreeMap<String, String>, workers: usize },
    Connection(ConnectionEvent),
    /// An HBONE (TLS/HTTP/2) connection ended for a reason worth telling.
    HboneConnectionClosed { listener: String, peer: String, reason: String },
    Error { message: String },
    /// A policy snapshot is now current (`revoked`: live connections it ended).
    PolicyApplied { version: u64, policies: usize, revoked: usize },
    /// Listeners presenting `identity` now use its new certificate for new handshakes.
    CertificatesApplied { identity: String, listeners: usize },
}

#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(flatten)]
    event: &'a Event,
}

static SINK: OnceLock<mpsc::UnboundedSender<Event>> = OnceLock::new();

/// Start the writer thread (stdout, one line per event). Call once.
pub fn start() -> std::thread::JoinHandle<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let _ = SINK.set(tx);
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        while let Some(event) = rx.blocking_recv() {
            let mut out = stdout.lock();
            let line = serde_json::to_string(&Envelope { v: PROTOCOL_VERSION, event: &event }).unwrap_or_default();
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return; // the driver is gone; main exits on stdin EOF
            }
        }
    })
}

pub fn emit(event: Event) {
    match SINK.get() {
        Some(tx) => {
            let _ = tx.send(event);
        }
        None => {
            if let Ok(line) = serde_json::to_string(&Envelope { v: PROTOCOL_VERSION, event: &event }) {
                println!("{line}");
            }
        }
    }
}
