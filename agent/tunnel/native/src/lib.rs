//! meshagent's native HBONE byte path.
//!
//! Only the byte path lives here: TLS 1.3 (rustls), HTTP/2 CONNECT framing and flow
//! control (the `h2` crate ztunnel uses), the relay loops, and the per-connection L4
//! policy decision over the rule set Python compiles ([`policy`], [`enforce`]).
//! Everything else that decides (the policy model and loader, identity issuance,
//! workloads, metrics, the access log's consumers) stays in Python, which drives this
//! process over the versioned protocol in [`control`].
//! See docs/native-datapath.md.

pub mod authority;
pub mod client;
pub mod config;
pub mod control;
pub mod enforce;
pub mod guard;
pub mod policy;
pub mod relay;
pub mod server;
pub mod sockets;
pub mod spiffe;
pub mod tls;

/// HTTP/2 settings both sides advertise: ztunnel's (src/config.rs `DEFAULT_WINDOW_SIZE`,
/// `DEFAULT_CONNECTION_WINDOW_SIZE`, `DEFAULT_FRAME_SIZE`), the same values as the Python
/// implementation's `agent/hbone/config.py` `HboneSettings`.
pub mod settings {
    pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
    pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
    pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
    pub const MAX_CONCURRENT_STREAMS: u32 = 100;
    pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
    /// Rust h2's rapid-reset bound (CVE-2023-44487), as `HboneSettings`.
    pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
    /// Streams we reset for the peer's bad input before GOAWAY ENHANCE_YOUR_CALM.
    pub const MAX_LOCAL_ERROR_RESETS: usize = 1024;
    /// Largest amount the h2 layer buffers for one stream's sends (ztunnel's client
    /// sets it to the stream window).
    pub const MAX_SEND_BUFFER: usize = 4 * 1024 * 1024;
    /// Relay read size (socket -> stream).
    pub const RELAY_CHUNK: usize = 256 * 1024;
}
