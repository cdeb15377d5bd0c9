//! The one copy loop: a CONNECT stream <-> a TCP connection, TCP's semantics end to end
//! (the same contract as `agent/tunnel/relay.py` `pipe_stream_and_socket`):
//! FIN -> END_STREAM and END_STREAM -> FIN (half-close, each direction on its own);
//! a TCP reset or error -> RST_STREAM CONNECT_ERROR (RFC 9113 8.5); a stream reset or a
//! lost HBONE connection -> the TCP side closed with RST (SO_LINGER 0).
//! Flow control is end to end: received DATA is released to the peer's window only once
//! written to the socket, so each direction buffers at most one window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::control::Outcome;
use crate::settings::RELAY_CHUNK;

/// Live byte counters: readable while the relay runs (a revocation that aborts the
/// relay still reports exactly what was copied).
#[derive(Default, Debug)]
pub struct Counts {
    /// socket -> stream
    pub up: AtomicU64,
    /// stream -> socket
    pub down: AtomicU64,
}

enum Failure {
    Socket,
    Stream,
    /// The caller's `abort` fired (a policy revocation).
    Aborted,
}

/// Close a TCP connection with RST instead of FIN. Side effect: SO_LINGER 0 on it.
pub fn abort_tcp(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

async fn socket_to_stream(mut rd: OwnedReadHalf, send: &mut SendStream<Bytes>, counts: &Counts) -> Result<OwnedReadHalf, Failure> {
    let mut buf = BytesMut::with_capacity(RELAY_CHUNK);
    loop {
        if buf.capacity() < RELAY_CHUNK / 4 {
            buf.reserve(RELAY_CHUNK);
        }
        let n = rd.read_buf(&mut buf).await.map_err(|_| Failure::Socket)?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(|_| Failure::Stream)?;
            return Ok(rd);
        }
        let mut chunk = buf.split().freeze();
        while !chunk.is_empty() {
            send.reserve_capacity(chunk.len());
            let cap = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(cap)) => cap,
                _ => return Err(Failure::Stream),
            };
            if cap == 0 {
                continue;
            }
            let part = chunk.split_to(cap.min(chunk.len()));
            let len = part.len() as u64;
            send.send_data(part, false).map_err(|_| Failure::Stream)?;
            counts.up.fetch_add(len, Ordering::Relaxed);
        }
    }
}

async fn stream_to_socket(mut recv: RecvStream, wr: &mut OwnedWriteHalf, counts: &Counts) -> Result<(), Failure> {
    loop {
        match recv.data().await {
            None => {
                // END_STREAM: half-close our side of the TCP connection.
                let _ = wr.shutdown().await;
                return Ok(());
            }
            Some(Err(_)) => return Err(Failure::Stream),
            Some(Ok(data)) => {
                let n = data.len();
                wr.write_all(&data).await.map_err(|_| Failure::Socket)?;
                counts.down.fetch_add(n as u64, Ordering::Relaxed);
                let _ = recv.flow_control().release_capacity(n);
            }
        }
    }
}

/// Relay until both directions are done. Never fails: the outcome says how it ended.
/// Side effects: closes `tcp` (FIN after a clean end, RST after a failure) and ends or
/// resets the stream.
pub async fn relay(send: SendStream<Bytes>, recv: RecvStream, tcp: TcpStream, counts: Arc<Counts>) -> Outcome {
    relay_until(send, recv, tcp, counts, std::future::pending()).await
}

/// [`relay`], ended early when `abort` completes: then the stream is reset with CANCEL,
/// the TCP side gets an RST, and the outcome is `Denied` (a revocation). The counts keep
/// what was copied until then.
pub async fn relay_until(mut send: SendStream<Bytes>, recv: RecvStream, tcp: TcpStream, counts: Arc<Counts>, abort: impl std::future::Future<Output = ()>) -> Outcome {
    let _ = tcp.set_nodelay(true);
    let (rd, mut wr) = tcp.into_split();
    let (failure, up_done) = {
        let up = socket_to_stream(rd, &mut send, &counts);
        let down = stream_to_socket(recv, &mut wr, &counts);
        tokio::pin!(up);
        tokio::pin!(down);
        tokio::pin!(abort);
        let mut up_done: Option<OwnedReadHalf> = None;
        let mut down_done = false;
        let failure = loop {
            tokio::select! {
                r = &mut up, if up_done.is_none() => match r {
                    Ok(rd) => { up_done = Some(rd); if down_done { break None } }
                    Err(f) => break Some(f),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => { down_done = true; if up_done.is_some() { break None } }
                    Err(f) => break Some(f),
                },
                _ = &mut abort => break Some(Failure::Aborted),
            }
        };
        (failure, up_done)
    };
    match failure {
        None => {
            if let Some(rd) = up_done {
                drop(rd.reunite(wr));
            }
            Outcome::Closed
        }
        Some(f) => {
            let outcome = match f {
                Failure::Socket => {
                    send.send_reset(Reason::CONNECT_ERROR);
                    Outcome::SocketReset
                }
                Failure::Stream => {
                    send.send_reset(Reason::CANCEL);
                    Outcome::StreamReset
                }
                Failure::Aborted => {
                    send.send_reset(Reason::CANCEL);
                    Outcome::Denied
                }
            };
            abort_tcp(wr.as_ref());
            // No FIN first: the fd closes (with RST) once both halves are gone.
            wr.forget();
            outcome
        }
    }
}
