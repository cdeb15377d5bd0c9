//! A frame-boundary watcher in front of the h2 server: the one HTTP/2 parser this crate
//! owns (the `h2` crate parses everything else). Fuzzed in tests/fuzz.rs.
//!
//! The h2 crate already bounds what issue 11 lists as far as h2 can see it: CONTINUATION
//! floods and oversized header lists (src/codec/framed_read.rs, GOAWAY
//! ENHANCE_YOUR_CALM), rapid reset (`max_pending_accept_reset_streams`), streams over
//! the limit (REFUSED_STREAM), local error resets (`max_local_error_reset_streams`),
//! tiny DATA frames. PING and SETTINGS it answers one at a time and stops reading while
//! an answer is pending, which bounds memory but never ends the flood. This guard adds
//! the field's GOAWAY ENHANCE_YOUR_CALM for those: more than
//! [`MAX_CONTROL_FRAMES_PER_WINDOW`] PING or SETTINGS frames needing an ACK within
//! [`CONTROL_WINDOW`] (Go x/net/http2 bounds queued control frames at 10,000; the
//! Python implementation `agent/hbone/connection.py` uses the same number).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub const CLIENT_PREFACE_LEN: usize = 24;
pub const FRAME_HEADER_LEN: usize = 9;
pub const MAX_CONTROL_FRAMES_PER_WINDOW: u32 = 10_000;
pub const CONTROL_WINDOW: Duration = Duration::from_secs(10);
/// Lingering close: after our side of the transport is shut down (GOAWAY sent, then
/// close_notify and FIN), input is read and discarded for at most this long or this
/// many bytes, or until the peer's EOF, so that unread input does not make the kernel
/// answer with an RST that overtakes the GOAWAY at the peer. The Python server's
/// bounds (`agent/hbone/session.py` `GOAWAY_LINGER_SECONDS`, `GOAWAY_LINGER_BYTES`).
pub const LINGER_TIME: Duration = Duration::from_secs(1);
pub const LINGER_BYTES: usize = 4 * 1024 * 1024;

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

/// GOAWAY code for a violation: FRAME_SIZE_ERROR for an oversized frame (RFC 9113
/// 4.2), ENHANCE_YOUR_CALM for a flood.
pub fn violation_code(v: &str) -> h2::Reason {
    if v.starts_with(OVERSIZED) {
        h2::Reason::FRAME_SIZE_ERROR
    } else {
        h2::Reason::ENHANCE_YOUR_CALM
    }
}

const OVERSIZED: &str = "frame of";

/// Tracks frame boundaries in the received byte stream.
pub struct FrameGuard {
    preface_left: usize,
    body_left: u64,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    control_frames: u32,
    window_start: Option<Instant>,
    pub frames_seen: u64,
}

impl FrameGuard {
    pub fn new(preface_len: usize) -> Self {
        FrameGuard { preface_left: preface_len, body_left: 0, header: [0; FRAME_HEADER_LEN], header_len: 0, control_frames: 0, window_start: None, frames_seen: 0 }
    }

    /// Feed the next received bytes; the first violation, if any.
    pub fn feed(&mut self, mut data: &[u8], now: Instant) -> Option<Violation> {
        let taken = self.preface_left.min(data.len());
        self.preface_left -= taken;
        data = &data[taken..];
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = (self.body_left.min(data.len() as u64)) as usize;
                self.body_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let need = FRAME_HEADER_LEN - self.header_len;
            let n = need.min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                let h = self.header;
                let length = u64::from(h[0]) << 16 | u64::from(h[1]) << 8 | u64::from(h[2]);
                self.body_left = length;
                self.frames_seen += 1;
                // RFC 9113 4.2: a frame over the MAX_FRAME_SIZE we advertise is a
                // connection error, told before its body is buffered (h2 applies our
                // SETTINGS only once the peer ACKs them, and checks length after).
                if length > u64::from(crate::settings::MAX_FRAME_SIZE) {
                    return Some(Violation(format!("{OVERSIZED} {length} bytes exceeds our MAX_FRAME_SIZE {}", crate::settings::MAX_FRAME_SIZE)));
                }
                if let Some(v) = self.frame(h[3], h[4], now) {
                    return Some(v);
                }
            }
        }
        None
    }

    fn frame(&mut self, frame_type: u8, flags: u8, now: Instant) -> Option<Violation> {
        if !(frame_type == PING || frame_type == SETTINGS) || flags & ACK != 0 {
            return None;
        }
        match self.window_start {
            Some(start) if now.duration_since(start) < CONTROL_WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.control_frames = 0;
            }
        }
        self.control_frames += 1;
        if self.control_frames > MAX_CONTROL_FRAMES_PER_WINDOW {
            return Some(Violation(format!(
                "more than {MAX_CONTROL_FRAMES_PER_WINDOW} PING/SETTINGS frames in {}s",
                CONTROL_WINDOW.as_secs()
            )));
        }
        None
    }
}

/// The flag the connection task checks: set once the guard saw a violation.
#[derive(Clone, Default)]
pub struct Tripwire(Arc<(AtomicBool, std::sync::Mutex<Option<String>>)>);

impl Tripwire {
    pub fn tripped(&self) -> Option<String> {
        if self.0 .0.load(Ordering::Acquire) {
            Some(self.0 .1.lock().map(|r| r.clone().unwrap_or_default()).unwrap_or_default())
        } else {
            None
        }
    }
    fn trip(&self, reason: String) {
        if let Ok(mut r) = self.0 .1.lock() {
            *r = Some(reason);
        }
        self.0 .0.store(true, Ordering::Release);
    }
}

/// An I/O wrapper that feeds every received byte to a [`FrameGuard`]. After a
/// violation it delivers no more input (the connection task then sends GOAWAY).
/// Its shutdown is a lingering close (see [`LINGER_TIME`]): h2 shuts the transport
/// down after its GOAWAY (its own error GOAWAY, or the one the guard asked for), and
/// the shutdown completes only once the peer's EOF, the deadline or the byte bound is
/// reached.
pub struct GuardedIo<T> {
    inner: T,
    guard: FrameGuard,
    wire: Tripwire,
    linger: Option<Linger>,
}

struct Linger {
    deadline: Pin<Box<Sleep>>,
    discarded: usize,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, wire: Tripwire) -> Self {
        GuardedIo { inner, guard: FrameGuard::new(CLIENT_PREFACE_LEN), wire, linger: None }
    }
}

impl<T: AsyncRead + Unpin> GuardedIo<T> {
    /// Read and discard until EOF, a read error, the deadline or [`LINGER_BYTES`].
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let linger = self.linger.get_or_insert_with(|| Linger { deadline: Box::pin(tokio::time::sleep(LINGER_TIME)), discarded: 0 });
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if linger.deadline.as_mut().poll(cx).is_ready() || linger.discarded >= LINGER_BYTES {
                return Poll::Ready(());
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => linger.discarded += buf.filled().len(),
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.wire.tripped().is_some() {
            // Input stops here; the connection task is woken to send the GOAWAY.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if let Some(v) = this.guard.feed(&buf.filled()[before..], Instant::now()) {
                this.wire.trip(v.0);
                cx.waker().wake_by_ref();
            }
        }
        res
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            // Our GOAWAY (flushed by h2 before it shuts down), close_notify, FIN.
            std::task::ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
        }
        std::task::ready!(this.poll_linger(cx));
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags, 0, 0, 0, 0];
        f.extend(std::iter::repeat(0).take(len));
        f
    }

    #[test]
    fn ping_flood_trips_and_acks_do_not() {
        let now = Instant::now();
        let mut g = FrameGuard::new(0);
        for _ in 0..MAX_CONTROL_FRAMES_PER_WINDOW {
            assert!(g.feed(&frame(PING, ACK, 8), now).is_none());
            assert!(g.feed(&frame(PING, 0, 8), now).is_none());
        }
        assert!(g.feed(&frame(SETTINGS, 0, 0), now).is_some());
    }

    #[test]
    fn window_resets() {
        let now = Instant::now();
        let mut g = FrameGuard::new(0);
        for _ in 0..MAX_CONTROL_FRAMES_PER_WINDOW {
            assert!(g.feed(&frame(PING, 0, 8), now).is_none());
        }
        assert!(g.feed(&frame(PING, 0, 8), now + CONTROL_WINDOW).is_none());
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let mut data = vec![0u8; CLIENT_PREFACE_LEN];
        for i in 0..50 {
            data.extend(frame(if i % 2 == 0 { 0 } else { PING }, 0, i * 3));
        }
        let now = Instant::now();
        let mut whole = FrameGuard::new(CLIENT_PREFACE_LEN);
        whole.feed(&data, now);
        let mut bytes = FrameGuard::new(CLIENT_PREFACE_LEN);
        for b in &data {
            bytes.feed(std::slice::from_ref(b), now);
        }
        assert_eq!(whole.frames_seen, 50);
        assert_eq!(bytes.frames_seen, 50);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn oversized_frame_is_a_frame_size_error() {
        let len = crate::settings::MAX_FRAME_SIZE as usize + 1;
        let header = [(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x1, 0x4, 0, 0, 0, 1];
        let v = FrameGuard::new(0).feed(&header, Instant::now()).expect("violation");
        assert_eq!(violation_code(&v.0), h2::Reason::FRAME_SIZE_ERROR);
        let ok = [0x10, 0x00, 0x00, 0x0, 0x0, 0, 0, 0, 1]; // exactly 1 MiB
        assert!(FrameGuard::new(0).feed(&ok, Instant::now()).is_none());
    }
}

#[cfg(test)]
mod linger_tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A peer still sending when we shut down: its bytes are read (not left to make the
    /// kernel reset the connection), it sees our EOF, and the shutdown completes at its
    /// EOF.
    #[tokio::test]
    async fn shutdown_reads_until_the_peer_closes() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut io = GuardedIo::new(ours, Tripwire::default());
        let (mut their_rd, mut their_wr) = tokio::io::split(theirs);
        let peer = tokio::spawn(async move {
            // 1 MiB through a 64 KiB pipe: completes only if we keep reading.
            their_wr.write_all(&vec![0u8; 1024 * 1024]).await.unwrap();
            let mut rest = Vec::new();
            their_rd.read_to_end(&mut rest).await.unwrap(); // our EOF arrives
            their_wr.shutdown().await.unwrap();
        });
        io.shutdown().await.unwrap();
        peer.await.unwrap();
        assert!(io.linger.as_ref().map(|l| l.discarded) == Some(1024 * 1024));
    }

    /// A peer that neither closes nor sends: the shutdown still completes (deadline).
    #[tokio::test]
    async fn shutdown_is_bounded_when_the_peer_stays() {
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut io = GuardedIo::new(ours, Tripwire::default());
        let done = tokio::time::timeout(LINGER_TIME * 5, io.shutdown()).await;
        assert!(matches!(done, Ok(Ok(()))));
    }

    /// A peer that sends without end: the byte bound ends the linger.
    #[tokio::test]
    async fn shutdown_is_bounded_in_bytes() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut io = GuardedIo::new(ours, Tripwire::default());
        let (_their_rd, mut their_wr) = tokio::io::split(theirs);
        let flood = tokio::spawn(async move {
            let chunk = vec![0u8; 64 * 1024];
            while their_wr.write_all(&chunk).await.is_ok() {}
        });
        io.shutdown().await.unwrap();
        let discarded = io.linger.as_ref().map(|l| l.discarded).unwrap();
        assert!(discarded >= LINGER_BYTES || io.linger.as_mut().unwrap().deadline.is_elapsed());
        drop(io);
        flood.await.unwrap();
    }
}
