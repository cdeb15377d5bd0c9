//! Bounded fuzzing on stable Rust (cargo-fuzz needs nightly and a libFuzzer build this
//! project does not want in its test path): a seeded xorshift generator drives
//! (1) the `:authority` parser, (2) the frame-boundary guard, (3) the whole HTTP/2
//! server (h2 + our guard + CONNECT handling) with structured random frames over an
//! in-memory pipe. Budget: `MESHAGENT_FUZZ_CASES` server cases (default 400) and a
//! wall-clock cap; each case has its own timeout. A failure prints its seed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshagent_datapath::authority::{format_authority, parse_authority};
use meshagent_datapath::config::{InboundListener, WorkloadAttributes};
use meshagent_datapath::guard::{FrameGuard, CLIENT_PREFACE_LEN};
use meshagent_datapath::server::serve_h2;
use meshagent_datapath::sockets::SocketOptions;
use meshagent_datapath::spiffe::SpiffeId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn budget() -> usize {
    std::env::var("MESHAGENT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
}

#[test]
fn fuzz_authority_parser() {
    let alphabet = b"0123456789.:[]abcdef%+- fF";
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for _ in 0..50 * budget() {
        let len = rng.below(40) as usize;
        let s: String = (0..len).map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char).collect();
        if let Ok(addr) = parse_authority(&s) {
            assert_ne!(addr.port(), 0, "{s:?}");
            assert_eq!(parse_authority(&format_authority(&addr)), Ok(addr), "{s:?}");
        }
    }
    // Arbitrary bytes (lossy UTF-8) never panic.
    for _ in 0..10 * budget() {
        let len = rng.below(64) as usize;
        let _ = parse_authority(&String::from_utf8_lossy(&rng.bytes(len)));
    }
}

#[test]
fn fuzz_frame_guard_chunking() {
    let mut rng = Rng(0xD1B54A32D192ED03);
    for case in 0..budget() {
        let mut data = rng.bytes(CLIENT_PREFACE_LEN);
        let frames = rng.below(40) as usize;
        for _ in 0..frames {
            let len = rng.below(300) as usize;
            data.extend([(len >> 16) as u8, (len >> 8) as u8, len as u8, rng.below(12) as u8, rng.next() as u8]);
            data.extend(rng.bytes(4));
            data.extend(rng.bytes(len));
        }
        let now = Instant::now();
        let mut whole = FrameGuard::new(CLIENT_PREFACE_LEN);
        let a = whole.feed(&data, now);
        let mut pieces = FrameGuard::new(CLIENT_PREFACE_LEN);
        let mut offset = 0;
        let mut b = None;
        while offset < data.len() {
            let n = (1 + rng.below(64) as usize).min(data.len() - offset);
            if let Some(v) = pieces.feed(&data[offset..offset + n], now) {
                b = Some(v);
                break;
            }
            offset += n;
        }
        assert_eq!(a.is_some(), b.is_some(), "case {case}");
        if a.is_none() {
            assert_eq!(whole.frames_seen, frames as u64, "case {case}");
            assert_eq!(pieces.frames_seen, frames as u64, "case {case}");
        }
    }
}

fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2).
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

fn frame(out: &mut Vec<u8>, ty: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len();
    out.extend([(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A client byte stream: the preface, an empty SETTINGS, then structured random frames.
fn client_bytes(rng: &mut Rng) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let streams = [0u32, 1, 3, 5, 7, 2, 0x7fff_ffff];
    // Half the cases are well-formed on the whole (new odd streams in order, rare
    // garbage): they get past the connection preface checks into CONNECT handling.
    let tame = rng.below(2) == 0;
    let mut next_stream = 1u32;
    if tame {
        for step in 0..rng.below(30) {
            if step == 0 || rng.below(3) == 0 {
                if step > 0 {
                    next_stream += 2;
                }
                let mut block = Vec::new();
                let methods: [&[u8]; 4] = [b"CONNECT", b"CONNECT", b"CONNECT", b"GET"];
                hpack_literal(&mut block, b":method", methods[rng.below(4) as usize]);
                let authorities: [&[u8]; 4] = [b"127.0.0.1:1", b"127.0.0.1:1", b"example.com:80", b"127.0.0.2:1"];
                hpack_literal(&mut block, b":authority", authorities[rng.below(4) as usize]);
                frame(&mut out, 0x1, 0x4 | (rng.next() as u8 & 0x1), next_stream, &block);
                continue;
            }
            match rng.below(4) {
                0 => {
                    let n = rng.below(64) as usize;
                    let payload = rng.bytes(n);
                    frame(&mut out, 0x0, rng.next() as u8 & 0x1, next_stream, &payload);
                }
                1 => frame(&mut out, 0x3, 0, next_stream, &(rng.below(16) as u32).to_be_bytes()),
                2 => frame(&mut out, 0x8, 0, next_stream, &(1 + rng.below(1 << 20) as u32).to_be_bytes()),
                _ => frame(&mut out, 0x6, 0, 0, &rng.bytes(8)),
            }
        }
        return out;
    }
    for _ in 0..rng.below(30) {
        let stream = if rng.below(4) == 0 {
            rng.next() as u32
        } else {
            streams[rng.below(streams.len() as u64) as usize]
        };
        match rng.below(6) {
            0 | 1 => {
                // HEADERS: a CONNECT (good or bad), or random header bytes.
                let mut block = Vec::new();
                if rng.below(3) == 0 {
                    let n = rng.below(40) as usize;
                    block = rng.bytes(n);
                } else {
                    let methods: [&[u8]; 3] = [b"CONNECT", b"GET", b"connect"];
                    hpack_literal(&mut block, b":method", methods[rng.below(3) as usize]);
                    let authorities: [&[u8]; 4] = [b"127.0.0.1:1", b"example.com:80", b"[::1]:1", b"127.0.0.1:0"];
                    if rng.below(5) != 0 {
                        hpack_literal(&mut block, b":authority", authorities[rng.below(4) as usize]);
                    }
                    if rng.below(4) == 0 {
                        hpack_literal(&mut block, b":path", b"/");
                    }
                    if rng.below(6) == 0 {
                        hpack_literal(&mut block, b":protocol", b"websocket");
                    }
                }
                // END_STREAM at random; END_HEADERS mostly; PADDED / PRIORITY rarely.
                let mut flags = (rng.next() as u8) & 0x1;
                if rng.below(5) != 0 {
                    flags |= 0x4;
                }
                if rng.below(10) == 0 {
                    flags |= [0x8u8, 0x20][rng.below(2) as usize];
                }
                frame(&mut out, 0x1, flags, stream, &block);
            }
            2 => {
                let len = rng.below(64) as usize;
                let payload = rng.bytes(len);
                frame(&mut out, 0x0, rng.next() as u8 & 0x9, stream, &payload);
            }
            3 => frame(&mut out, 0x3, 0, stream, &(rng.below(16) as u32).to_be_bytes()),
            4 => {
                let ty = [0x2u8, 0x4, 0x6, 0x7, 0x8, 0x9, 0x5, 0xa, 0xff][rng.below(9) as usize];
                let len = [0usize, 4, 5, 6, 8, 12][rng.below(6) as usize];
                let payload = rng.bytes(len);
                frame(&mut out, ty, rng.next() as u8, stream, &payload);
            }
            _ => {
                let len = rng.below(32) as usize;
                out.extend(rng.bytes(len)); // garbage between frames
            }
        }
    }
    out
}

#[test]
fn fuzz_h2_server() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = Arc::new(InboundListener {
        name: "fuzz".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: "-".into(),
        key: "-".into(),
        destinations: vec!["127.0.0.1:1".parse().unwrap()],
        allowed_peers: vec![],
        transparent: false,
        workload: WorkloadAttributes { namespace: "fuzz".into(), labels: Default::default() },
    });
    // An allow-all snapshot, so well-formed CONNECTs reach the dial (the default is deny).
    meshagent_datapath::enforce::Enforcer::global()
        .apply_line(r#"{"message":"policy","version":1,"rules":{"format":"meshagent.policy.compiled","version":1,"policies":[]}}"#)
        .unwrap();
    let peer_id = SpiffeId { trust_domain: "cluster.local".into(), namespace: "fuzz".into(), service_account: "fuzz".into() };
    let started = Instant::now();
    let cap = Duration::from_secs(60);
    let mut rng = Rng(0xA0761D6478BD642F);
    let mut cases = 0;
    let mut seen = [0u64; 10]; // frames the server sent, by type
    while cases < budget() && started.elapsed() < cap {
        let seed = rng.next();
        let mut case_rng = Rng(seed | 1);
        let input = client_bytes(&mut case_rng);
        let cfg = cfg.clone();
        let peer_id = peer_id.clone();
        let result = rt.block_on(async move {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
            let local: SocketAddr = "127.0.0.1:15008".parse().unwrap();
            let srv = tokio::spawn(serve_h2(server, peer, local, peer_id, cfg, SocketOptions::default()));
            let (mut rd, mut wr) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                let _ = wr.write_all(&input).await;
                // Give answers (dials to a closed port, 503) a moment before our EOF.
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = wr.shutdown().await;
            });
            let mut sink = Vec::new();
            let drain = rd.read_to_end(&mut sink);
            let ok = tokio::time::timeout(Duration::from_secs(5), drain).await.is_ok();
            let _ = writer.await;
            let outcome = tokio::time::timeout(Duration::from_secs(5), srv).await;
            (ok, outcome, sink)
        });
        let (drained, outcome, output) = result;
        // What the server said: frame types in its output (it writes no preface).
        let mut offset = 0;
        while offset + 9 <= output.len() {
            let len = (output[offset] as usize) << 16 | (output[offset + 1] as usize) << 8 | output[offset + 2] as usize;
            seen[output[offset + 3].min(9) as usize] += 1;
            offset += 9 + len;
        }
        assert!(drained, "seed {seed:#x}: server kept the connection open after the client closed");
        match outcome {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("seed {seed:#x}: server task panicked: {e}"),
            Err(_) => panic!("seed {seed:#x}: server did not finish"),
        }
        cases += 1;
    }
    assert!(cases >= budget().min(50), "only {cases} cases ran within the time cap");
    // The generator reaches CONNECT handling (responses) and the error paths.
    eprintln!("fuzz_h2_server: {cases} cases; server frames by type {seen:?}");
    assert!(seen[0x1] > 0, "no case got a response HEADERS: {seen:?}");
    assert!(seen[0x3] > 0, "no case got a RST_STREAM: {seen:?}");
    assert!(seen[0x7] > 0, "no case got a GOAWAY: {seen:?}");
}

