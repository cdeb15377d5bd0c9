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

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const CLIENT_PREFACE_LEN: usize = 24;
pub const FRAME_HEADER_LEN: usize = 9;
pub const MAX_CONTROL_FRAMES_PER_WINDOW: u32 = 10_000;
pub const CONTROL_WINDOW: Duration = Duration::from_secs(10);

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
pub struct GuardedIo<T> {
    inner: T,
    guard: FrameGuard,
    wire: Tripwire,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, wire: Tripwire) -> Self {
        GuardedIo { inner, guard: FrameGuard::new(CLIENT_PREFACE_LEN), wire }
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

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
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
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
