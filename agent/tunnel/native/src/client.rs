//! The HBONE client: plain TCP in, a CONNECT stream out on a pooled mTLS HTTP/2
//! connection to the destination's HBONE peer.
//!
//! As ztunnel src/proxy/pool.rs and src/proxy/h2/client.rs: connections are pooled per
//! [`WorkloadKey`] (source address, identity presented, peer address, identities
//! expected: ztunnel's `WorkloadKey`); a stream goes on the pooled
//! connection with the fewest streams that still has room (the peer's
//! MAX_CONCURRENT_STREAMS, at most ours), otherwise a new connection is made; broken
//! connections are dropped from the pool. Each connection is driven by its own task,
//! so many connections spread over all runtime workers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::authority::{format_authority, format_forwarded_for};
use crate::config::OutboundListener;
use crate::control::{emit, ConnectionEvent, Direction, Event, Outcome};
use crate::relay::{abort_tcp, relay, Counts};
use crate::settings::*;
use crate::sockets::SocketOptions;
use crate::tls;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn h2_client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_max_send_streams(MAX_CONCURRENT_STREAMS as usize)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false);
    b
}

struct Pooled {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

/// `active` of a connection being closed for idleness: no stream may claim it.
const CLOSING: usize = usize::MAX / 2;

/// Pool timers, as the Python pool's (`agent/hbone/pool.py`: 60 s idle, PING every
/// 30 s answered within 10 s).
#[derive(Debug, Clone, Copy)]
pub struct PoolTimers {
    pub idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for PoolTimers {
    fn default() -> Self {
        PoolTimers { idle: Duration::from_secs(60), keepalive_interval: Duration::from_secs(30), keepalive_timeout: Duration::from_secs(10) }
    }
}

/// Streams on one pooled connection are capped at this (the Python pool's limit).
const MAX_STREAMS_PER_CONNECTION: usize = MAX_CONCURRENT_STREAMS as usize;

/// What a pooled connection is shared by: streams from the same source address (the
/// outer connection is bound to it on a transparent listener; None otherwise), under the
/// same presented identity, to the same peer, expecting the same identities. ztunnel
/// src/proxy/pool.rs `WorkloadKey` (src, src_id, dst, dst_id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub src: Option<IpAddr>,
    pub src_id: Arc<str>,
    pub dst: SocketAddr,
    pub dst_id: Arc<[String]>,
}

pub struct Pool {
    peer: SocketAddr,
    connector: TlsConnector,
    conns: Mutex<HashMap<WorkloadKey, Vec<Pooled>>>,
    timers: PoolTimers,
    sockets: SocketOptions,
    src_id: Arc<str>,
    dst_id: Arc<[String]>,
}

/// A claimed stream slot; gives the slot back when dropped.
pub struct Slot(Arc<AtomicUsize>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// A pool to `peer`, presenting `src_id` (the connector's certificate) and
    /// expecting `dst_id` (empty: any identity of the trust domain).
    pub fn new(peer: SocketAddr, connector: TlsConnector, timers: PoolTimers, sockets: SocketOptions, src_id: &str, dst_id: &[String]) -> Self {
        Pool { peer, connector, conns: Mutex::new(HashMap::new()), timers, sockets, src_id: src_id.into(), dst_id: dst_id.into() }
    }

    /// The key of a stream from `src` (None: the outer connection's source is ours).
    pub fn key(&self, src: Option<IpAddr>) -> WorkloadKey {
        WorkloadKey { src, src_id: self.src_id.clone(), dst: self.peer, dst_id: self.dst_id.clone() }
    }

    async fn connect(&self, key: &WorkloadKey) -> Result<Pooled, String> {
        let from = key.src.map(|ip| format!(" from {ip}")).unwrap_or_default();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.sockets.dial(self.peer, key.src))
            .await
            .map_err(|_| format!("connect {}{from}: timed out", self.peer))?
            .map_err(|e| format!("connect {}{from}: {e}", self.peer))?;
        let _ = tcp.set_nodelay(true);
        // The name is never checked (SPIFFE verifier); rustls needs one for the API.
        let name = ServerName::IpAddress(self.peer.ip().into());
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.connector.connect(name, tcp))
            .await
            .map_err(|_| format!("TLS to {}: timed out", self.peer))?
            .map_err(|e| format!("TLS to {}: {e}", self.peer))?;
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(format!("{} did not negotiate ALPN h2", self.peer));
        }
        let (send, mut conn) = h2_client_builder().handshake::<_, Bytes>(tls).await.map_err(|e| format!("HTTP/2 handshake with {}: {e}", self.peer))?;
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let active = Arc::new(AtomicUsize::new(0));
        let pings = conn.ping_pong();
        let timers = self.timers;
        let (alive2, active2) = (alive.clone(), active.clone());
        // The connection's driver: runs it until it ends, its keepalive PING goes
        // unanswered, or it has carried no stream for `idle` (then dropped: closed).
        tokio::spawn(async move {
            let dead = Arc::new(tokio::sync::Notify::new());
            if let Some(mut pings) = pings {
                let dead = dead.clone();
                let alive = alive2.clone();
                tokio::spawn(async move {
                    while alive.load(Ordering::Acquire) {
                        tokio::time::sleep(timers.keepalive_interval).await;
                        let pong = tokio::time::timeout(timers.keepalive_timeout, pings.ping(h2::Ping::opaque())).await;
                        if !matches!(pong, Ok(Ok(_))) {
                            dead.notify_one();
                            return;
                        }
                    }
                });
            }
            let mut idle_since = Instant::now();
            let mut tick = tokio::time::interval((timers.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)));
            loop {
                tokio::select! {
                    _ = &mut conn => break,
                    _ = dead.notified() => break,
                    _ = tick.tick() => {
                        if active2.load(Ordering::Acquire) != 0 {
                            idle_since = Instant::now();
                        } else if idle_since.elapsed() >= timers.idle
                            && active2.compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                            break;
                        }
                    }
                }
            }
            alive2.store(false, Ordering::Release);
        });
        Ok(Pooled { send, active, alive })
    }

    /// A ready sender and a claimed slot on a pooled (or new) connection for `key`.
    pub async fn checkout(&self, key: WorkloadKey) -> Result<(SendRequest<Bytes>, Slot), String> {
        let mut all = self.conns.lock().await;
        all.retain(|_, conns| {
            conns.retain(|c| c.alive.load(Ordering::Acquire));
            !conns.is_empty()
        });
        let conns = all.entry(key.clone()).or_default();
        let claim = |a: &AtomicUsize| a.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS_PER_CONNECTION).then_some(n + 1)).is_ok();
        let mut candidates: Vec<&Pooled> = conns.iter().filter(|c| c.send.current_max_send_streams() > c.active.load(Ordering::Acquire)).collect();
        candidates.sort_by_key(|c| c.active.load(Ordering::Acquire));
        let mut picked = None;
        for c in candidates {
            if claim(&c.active) {
                picked = Some((c.send.clone(), c.active.clone()));
                break;
            }
        }
        let (send, active) = match picked {
            Some(p) => p,
            None => {
                let c = self.connect(&key).await?;
                c.active.fetch_add(1, Ordering::AcqRel);
                let pair = (c.send.clone(), c.active.clone());
                conns.push(c);
                pair
            }
        };
        drop(all);
        let slot = Slot(active);
        let send = send.ready().await.map_err(|e| format!("HBONE connection to {} not usable: {e}", self.peer))?;
        Ok((send, slot))
    }
}

pub struct Outbound {
    pub cfg: OutboundListener,
    pub pool: Pool,
}

pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    loop {
        let (tcp, client) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let outbound = outbound.clone();
        tokio::spawn(async move { handle(tcp, client, outbound).await });
    }
}

/// A random W3C traceparent (version 0, flags 0), as ztunnel's `TraceParent::new`.
pub fn new_traceparent() -> String {
    use rustls::crypto::ring::default_provider;
    let mut bytes = [0u8; 24];
    if default_provider().secure_random.fill(&mut bytes).is_err() {
        bytes[0] = 1;
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&bytes[..16]), hex(&bytes[16..]))
}

async fn handle(tcp: TcpStream, client: SocketAddr, outbound: Arc<Outbound>) {
    let started = Instant::now();
    let cfg = &outbound.cfg;
    // Transparent: the original destination (TPROXY keeps it as our local address),
    // and the outer connection from the client's own address.
    let (authority, source) = match (cfg.transparent, cfg.authority) {
        (false, Some(a)) => (Ok(a), None),
        _ => (tcp.local_addr().map_err(|e| format!("original destination: {e}")), Some(client.ip())),
    };
    let traceparent = new_traceparent();
    let forwarded = cfg.forwarded_for.then(|| format_forwarded_for(&client.ip()));
    let mut event = ConnectionEvent {
        direction: Direction::Outbound,
        listener: cfg.name.clone(),
        src: client.to_string(),
        dst: authority.as_ref().map(format_authority).unwrap_or_default(),
        peer_identity: None,
        outcome: Outcome::ConnectFailed,
        status: 0,
        bytes_to_destination: 0,
        bytes_from_destination: 0,
        duration_us: 0,
        forwarded: forwarded.clone(),
        baggage: cfg.baggage.clone(),
        traceparent: Some(traceparent.clone()),
        reason: None,
        policy: None,
    };
    let finish = |mut event: ConnectionEvent| {
        event.duration_us = started.elapsed().as_micros() as u64;
        emit(Event::Connection(event));
    };
    let authority = match authority {
        Ok(a) => a,
        Err(e) => {
            event.reason = Some(e);
            abort_tcp(&tcp);
            return finish(event);
        }
    };
    let (mut send, _slot) = match outbound.pool.checkout(outbound.pool.key(source)).await {
        Ok(x) => x,
        Err(e) => {
            event.reason = Some(e);
            abort_tcp(&tcp);
            return finish(event);
        }
    };
    let mut req = Request::builder().method(Method::CONNECT).uri(format_authority(&authority));
    if let Some(f) = &forwarded {
        req = req.header("forwarded", f);
    }
    if let Some(b) = &cfg.baggage {
        if let Ok(v) = HeaderValue::from_str(b) {
            req = req.header("baggage", v);
        }
    }
    req = req.header("traceparent", &traceparent);
    let req = match req.body(()) {
        Ok(r) => r,
        Err(e) => {
            event.reason = Some(format!("request: {e}"));
            abort_tcp(&tcp);
            return finish(event);
        }
    };
    let (response, stream) = match send.send_request(req, false) {
        Ok(x) => x,
        Err(e) => {
            event.reason = Some(format!("send CONNECT: {e}"));
            abort_tcp(&tcp);
            return finish(event);
        }
    };
    let response = match response.await {
        Ok(r) => r,
        Err(e) => {
            event.outcome = Outcome::StreamReset;
            event.reason = Some(format!("CONNECT: {e}"));
            abort_tcp(&tcp);
            return finish(event);
        }
    };
    event.status = response.status().as_u16();
    if response.status() != StatusCode::OK {
        event.outcome = Outcome::Rejected;
        abort_tcp(&tcp);
        return finish(event);
    }
    let counts = Arc::new(Counts::default());
    event.outcome = relay(stream, response.into_body(), tcp, counts.clone()).await;
    event.bytes_to_destination = counts.up.load(Ordering::Relaxed);
    event.bytes_from_destination = counts.down.load(Ordering::Relaxed);
    finish(event)
}
