//! The HBONE server (15008): mTLS 1.3 with the client certificate required, HTTP/2 with
//! ztunnel's settings, CONNECT only, each bad request answered on its own stream.
//!
//! Follows ztunnel src/proxy/h2/server.rs (`serve_connection`: builder settings, one task
//! per stream) and src/proxy/inbound.rs (`build_inbound_request`: 400 for a bad request,
//! 503 when the destination cannot be dialed, 200 then the copy loop).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::authority::parse_authority;
use crate::config::InboundListener;
use crate::control::{emit, ConnectionEvent, Direction, Event, Outcome};
use crate::guard::{GuardedIo, Tripwire};
use crate::enforce::Enforcer;
use crate::policy::{Connection, Identity};
use crate::relay::{relay_until, Counts};
use crate::settings::*;
use crate::sockets::SocketOptions;
use crate::spiffe::SpiffeId;
use crate::tls;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    pub cfg: Arc<InboundListener>,
    pub acceptor: TlsAcceptor,
    pub sockets: SocketOptions,
}

pub fn h2_server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_send_buffer_size(MAX_SEND_BUFFER);
    b
}

pub async fn serve(listener: TcpListener, inbound: Arc<Inbound>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let inbound = inbound.clone();
        tokio::spawn(async move {
            if let Err(reason) = serve_connection(tcp, peer, inbound.clone()).await {
                emit(Event::HboneConnectionClosed { listener: inbound.cfg.name.clone(), peer: peer.to_string(), reason });
            }
        });
    }
}

/// One HBONE connection: TLS, then HTTP/2, one task per CONNECT stream.
pub async fn serve_connection(tcp: TcpStream, peer: SocketAddr, inbound: Arc<Inbound>) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.acceptor.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err("peer did not negotiate ALPN h2".into());
    }
    let peer_id = tls::peer_identity(session.peer_certificates());
    let peer_id = peer_id.ok_or_else(|| "peer presented no SPIFFE identity".to_string())?;
    if !inbound.cfg.allowed_peers.is_empty() && !inbound.cfg.allowed_peers.contains(&peer_id.to_string()) {
        return Err(format!("peer {peer_id} is not allowed on this listener"));
    }
    serve_h2(tls, peer, local, peer_id, inbound.cfg.clone(), inbound.sockets).await
}

/// HTTP/2 over an established (TLS) transport: the part the fuzz test drives directly.
pub async fn serve_h2<T>(io: T, peer: SocketAddr, local: SocketAddr, peer_id: SpiffeId, cfg: Arc<InboundListener>, sockets: SocketOptions) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let wire = Tripwire::default();
    let io = GuardedIo::new(io, wire.clone());
    let mut conn = h2_server_builder().handshake::<_, Bytes>(io).await.map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    let peer_id = Arc::new(peer_id);
    let mut calmed = false;
    loop {
        let next = std::future::poll_fn(|cx| {
            if !calmed {
                if let Some(reason) = wire.tripped() {
                    conn.abrupt_shutdown(crate::guard::violation_code(&reason));
                    calmed = true;
                }
            }
            conn.poll_accept(cx)
        })
        .await;
        match next {
            Some(Ok((req, respond))) => {
                tokio::spawn(handle_stream(req, respond, peer, local, peer_id.clone(), cfg.clone(), sockets));
            }
            Some(Err(e)) => {
                return match wire.tripped() {
                    Some(reason) => Err(format!("GOAWAY {:?}: {reason}", crate::guard::violation_code(&reason))),
                    None if e.is_go_away() || e.is_io() => Err(format!("HTTP/2 connection ended: {e}")),
                    None => Err(format!("HTTP/2 error: {e}")),
                };
            }
            None => {
                return match wire.tripped() {
                    Some(reason) => Err(format!("GOAWAY {:?}: {reason}", crate::guard::violation_code(&reason))),
                    None => Ok(()),
                };
            }
        }
    }
}

fn header(req: &Request<RecvStream>, name: &str) -> Option<String> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// What a CONNECT request asks for, or the status to refuse it with (pure).
pub fn check_request(method: &Method, authority: Option<&str>, has_protocol: bool, local: SocketAddr, destinations: &[SocketAddr]) -> Result<SocketAddr, (StatusCode, String)> {
    if method != Method::CONNECT {
        return Err((StatusCode::BAD_REQUEST, format!("method {method} is not CONNECT")));
    }
    if has_protocol {
        return Err((StatusCode::BAD_REQUEST, "extended CONNECT is not HBONE".into()));
    }
    let authority = authority.ok_or((StatusCode::BAD_REQUEST, "CONNECT without :authority".to_string()))?;
    let target = parse_authority(authority).map_err(|e| (StatusCode::BAD_REQUEST, e.0))?;
    let allowed = if destinations.is_empty() { target.ip() == local.ip() } else { destinations.contains(&target) };
    if !allowed {
        return Err((StatusCode::BAD_REQUEST, format!("{target} is not a destination of this connection")));
    }
    Ok(target)
}

async fn handle_stream(req: Request<RecvStream>, mut respond: SendResponse<Bytes>, peer: SocketAddr, local: SocketAddr, peer_id: Arc<SpiffeId>, cfg: Arc<InboundListener>, sockets: SocketOptions) {
    let started = Instant::now();
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let has_protocol = req.extensions().get::<h2::ext::Protocol>().is_some();
    let mut event = ConnectionEvent {
        direction: Direction::Inbound,
        listener: cfg.name.clone(),
        src: peer.to_string(),
        dst: authority.clone().unwrap_or_default(),
        peer_identity: Some(peer_id.to_string()),
        outcome: Outcome::Rejected,
        status: 0,
        bytes_to_destination: 0,
        bytes_from_destination: 0,
        duration_us: 0,
        forwarded: header(&req, "forwarded"),
        baggage: header(&req, "baggage"),
        traceparent: header(&req, "traceparent"),
        reason: None,
        policy: None,
    };
    let finish = |mut event: ConnectionEvent| {
        event.duration_us = started.elapsed().as_micros() as u64;
        emit(Event::Connection(event));
    };
    let target = match check_request(req.method(), authority.as_deref(), has_protocol, local, &cfg.destinations) {
        Ok(t) => t,
        Err((status, reason)) => {
            event.status = status.as_u16();
            event.reason = Some(reason);
            answer_error(&mut respond, status);
            return finish(event);
        }
    };
    // Policy, before anything is dialed (ztunnel `assert_rbac`); denied: 401, as the
    // Python tunnel answers (agent/tunnel/hbone_inbound.py).
    let attributes = Connection {
        src_ip: Some(peer.ip()),
        src_identity: Some(Identity::from(peer_id.as_ref())),
        dst_ip: target.ip(),
        dst_port: target.port(),
        dst_namespace: cfg.workload.namespace.clone(),
        dst_labels: cfg.workload.labels.clone(),
    };
    let admission = match Enforcer::global().admit(attributes) {
        Ok(a) => a,
        Err(refusal) => {
            event.outcome = Outcome::Denied;
            event.status = StatusCode::UNAUTHORIZED.as_u16();
            event.reason = Some(refusal.reason());
            event.policy = refusal.policy();
            answer_error(&mut respond, StatusCode::UNAUTHORIZED);
            return finish(event);
        }
    };
    event.policy = admission.decision.policy.as_deref().map(str::to_string);
    // Never dial for a stream the client already cancelled (rapid reset): the dial
    // races the stream's reset, and a reset wins.
    let dialed = tokio::select! {
        biased;
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => None,
        // Transparent: from the client's address (the HBONE peer's: the source pod's).
        r = tokio::time::timeout(DIAL_TIMEOUT, sockets.dial(target, cfg.transparent.then(|| peer.ip()))) => Some(r),
    };
    let tcp = match dialed {
        None => {
            event.outcome = Outcome::Cancelled;
            return finish(event);
        }
        Some(Ok(Ok(tcp))) => tcp,
        Some(Ok(Err(e))) => {
            event.outcome = Outcome::DialFailed;
            event.status = 503;
            event.reason = Some(format!("dial {target}: {e}"));
            answer_error(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return finish(event);
        }
        Some(Err(_)) => {
            event.outcome = Outcome::DialFailed;
            event.status = 503;
            event.reason = Some(format!("dial {target}: timed out"));
            answer_error(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return finish(event);
        }
    };
    let send = match respond.send_response(Response::builder().status(StatusCode::OK).body(()).expect("static response"), false) {
        Ok(s) => s,
        Err(e) => {
            event.outcome = Outcome::Cancelled;
            event.reason = Some(format!("stream gone before 200: {e}"));
            crate::relay::abort_tcp(&tcp);
            return finish(event);
        }
    };
    event.status = 200;
    let counts = Arc::new(Counts::default());
    let recv = req.into_body();
    let revocation = admission.revocation.clone();
    event.outcome = relay_until(send, recv, tcp, counts.clone(), revocation.notify.notified()).await;
    if event.outcome == Outcome::Denied {
        // Revoked by a new snapshot: the record names the policy that denied it.
        if let Some(d) = revocation.decision.lock().unwrap_or_else(|e| e.into_inner()).take() {
            event.reason = Some(d.reason());
            event.policy = d.policy.as_deref().map(str::to_string);
        }
    }
    drop(admission);
    // Inbound: the stream carries client -> destination.
    event.bytes_to_destination = counts.down.load(std::sync::atomic::Ordering::Relaxed);
    event.bytes_from_destination = counts.up.load(std::sync::atomic::Ordering::Relaxed);
    finish(event)
}

/// An error status with END_STREAM. If the client is still sending, h2 follows it with
/// RST_STREAM NO_ERROR once the response is out (RFC 9113 8.1: `maybe_cancel` when the
/// request body is dropped), as the Python server does. An explicit reset here would
/// discard the queued response.
fn answer_error(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let response = Response::builder().status(status).body(()).expect("static response");
    let _ = respond.send_response(response, true);
}
