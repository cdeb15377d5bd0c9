//! `meshagent-datapath`: reads one configuration message (JSON, control protocol v2)
//! from stdin (or `--config FILE`), binds its listeners, writes a `ready` event and then
//! one event per connection to stdout. It exits when stdin closes: the Python driver
//! owns its lifetime, so the data path never outlives the decisions behind it.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshagent_datapath::config::{Config, InboundListener, OutboundListener, RuntimeKind};
use meshagent_datapath::control::{self, emit, Event};
use meshagent_datapath::sockets::SocketOptions;
use meshagent_datapath::spiffe::parse_spiffe_id;
use meshagent_datapath::{client, enforce, server, tls};

fn fail(message: String) -> ! {
    eprintln!("meshagent-datapath: {message}");
    std::process::exit(2);
}

fn read_config_line() -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut stdin = std::io::stdin();
    loop {
        match stdin.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => fail(format!("reading stdin: {e}")),
        }
        if line.len() > 1 << 20 {
            fail("config line over 1 MiB".into());
        }
    }
    String::from_utf8(line).unwrap_or_else(|_| fail("config is not UTF-8".into()))
}

/// Everything a worker needs, built once: TLS configs are shared, pools are per worker.
struct Plan {
    inbound: Vec<(InboundListener, tokio_rustls::TlsAcceptor)>,
    outbound: Vec<(OutboundListener, tokio_rustls::TlsConnector, client::PoolTimers, String)>,
    sockets: SocketOptions,
}

fn plan(cfg: &Config) -> Plan {
    let roots = Arc::new(tls::load_roots(&cfg.roots).unwrap_or_else(|e| fail(e)));
    let mut inbound = Vec::new();
    for l in &cfg.inbound {
        let identity = tls::WorkloadIdentity::load(&l.cert, &l.key).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        let identity = tls::RotatingCert::new(identity).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        tls::certificates().lock().unwrap_or_else(|e| e.into_inner()).push(identity.clone());
        let sc = tls::server_config(identity, roots.clone(), &cfg.trust_domain).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        inbound.push((l.clone(), tokio_rustls::TlsAcceptor::from(Arc::new(sc))));
    }
    let mut outbound = Vec::new();
    for l in &cfg.outbound {
        let identity = tls::WorkloadIdentity::load(&l.cert, &l.key).unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let identity = tls::RotatingCert::new(identity).unwrap_or_else(|e| fail(format!("outbound {}: {} {e}", l.name, l.cert.display())));
        tls::certificates().lock().unwrap_or_else(|e| e.into_inner()).push(identity.clone());
        let src_id = identity.identity.to_string();
        let expected = l.peer_identities.iter().map(|s| parse_spiffe_id(s)).collect::<Result<Vec<_>, _>>().unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let cc = tls::client_config(identity, roots.clone(), &cfg.trust_domain, expected).unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let mut timers = client::PoolTimers::default();
        if let Some(ms) = l.pool_idle_ms {
            timers.idle = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = l.keepalive_ms {
            timers.keepalive_interval = Duration::from_millis(ms.max(1));
        }
        outbound.push((l.clone(), tokio_rustls::TlsConnector::from(Arc::new(cc)), timers, src_id));
    }
    Plan { inbound, outbound, sockets: SocketOptions { mark: cfg.mark } }
}

/// `copies` listening sockets on `addr` (SO_REUSEPORT; the first decides a port 0).
fn bind(sockets: &SocketOptions, addr: SocketAddr, transparent: bool, copies: usize, what: &str) -> Vec<std::net::TcpListener> {
    let mut out = Vec::new();
    let mut addr = addr;
    for _ in 0..copies {
        let listener = sockets.listener(addr, transparent).unwrap_or_else(|e| fail(format!("{what}: {e}")));
        if addr.port() == 0 {
            addr = listener.local_addr().unwrap_or_else(|e| fail(format!("{what}: {e}")));
        }
        out.push(listener);
    }
    out
}

/// Serve the given listeners on the current runtime; one pool per call.
fn spawn_listeners(plan: &Plan, inbound: Vec<std::net::TcpListener>, outbound: Vec<std::net::TcpListener>) {
    for ((l, acceptor), sock) in plan.inbound.iter().zip(inbound) {
        let listener = tokio::net::TcpListener::from_std(sock).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        let inbound = Arc::new(server::Inbound { cfg: Arc::new(l.clone()), acceptor: acceptor.clone(), sockets: plan.sockets });
        tokio::spawn(server::serve(listener, inbound));
    }
    for ((l, connector, timers, src_id), sock) in plan.outbound.iter().zip(outbound) {
        let listener = tokio::net::TcpListener::from_std(sock).unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let pool = client::Pool::new(l.peer, connector.clone(), *timers, plan.sockets, src_id, &l.peer_identities);
        tokio::spawn(client::serve(listener, Arc::new(client::Outbound { cfg: l.clone(), pool })));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (text, watch_stdin) = match args.get(1).map(String::as_str) {
        Some("--config") => match (args.get(2), args.get(3).map(String::as_str), args.get(4), args.get(5)) {
            (Some(path), Some("--policy"), Some(policy), None) => {
                let read = |p: &String| std::fs::read_to_string(p).unwrap_or_else(|e| fail(format!("cannot read {p}: {e}")));
                let message = read(policy);
                enforce::Enforcer::global().apply_line(message.trim_end()).unwrap_or_else(|e| fail(format!("{policy}: {e}")));
                (read(path), false)
            }
            _ => fail("use --config FILE --policy FILE (a policy message: without one every inbound connection is denied)".into()),
        },
        Some("--version") => {
            println!("meshagent-datapath {} (control protocol {})", env!("CARGO_PKG_VERSION"), meshagent_datapath::config::PROTOCOL_VERSION);
            return;
        }
        Some(other) => fail(format!("unknown argument {other:?} (use --config FILE, or the config on stdin)")),
        None => (read_config_line(), true),
    };
    let cfg = Config::parse(&text).unwrap_or_else(|e| fail(e));
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cfg.workers };
    let _writer = control::start();
    let plan = Arc::new(plan(&cfg));
    let copies = if cfg.runtime == RuntimeKind::PerCore { workers } else { 1 };
    // Bind everything up front (so a bad address fails before `ready`), `copies` each.
    let mut bound = BTreeMap::new();
    let mut inbound: Vec<Vec<std::net::TcpListener>> = (0..copies).map(|_| Vec::new()).collect();
    let mut outbound: Vec<Vec<std::net::TcpListener>> = (0..copies).map(|_| Vec::new()).collect();
    for (l, _) in &plan.inbound {
        let socks = bind(&plan.sockets, l.listen, l.transparent, copies, &format!("inbound {}", l.name));
        bound.insert(l.name.clone(), socks[0].local_addr().map(|a| a.to_string()).unwrap_or_default());
        for (i, s) in socks.into_iter().enumerate() {
            inbound[i].push(s);
        }
    }
    for (l, _, _, _) in &plan.outbound {
        let socks = bind(&plan.sockets, l.listen, l.transparent, copies, &format!("outbound {}", l.name));
        bound.insert(l.name.clone(), socks[0].local_addr().map(|a| a.to_string()).unwrap_or_default());
        for (i, s) in socks.into_iter().enumerate() {
            outbound[i].push(s);
        }
    }
    match cfg.runtime {
        RuntimeKind::MultiThread => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().unwrap_or_else(|e| fail(format!("runtime: {e}")));
            let (i, o) = (inbound.pop().unwrap_or_default(), outbound.pop().unwrap_or_default());
            let plan2 = plan.clone();
            rt.spawn(async move { spawn_listeners(&plan2, i, o) });
            std::mem::forget(rt); // lives until exit
        }
        RuntimeKind::PerCore => {
            for (i, (ins, outs)) in inbound.into_iter().zip(outbound).enumerate() {
                let plan = plan.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| fail(format!("runtime: {e}")));
                        rt.block_on(async move {
                            spawn_listeners(&plan, ins, outs);
                            std::future::pending::<()>().await
                        })
                    })
                    .unwrap_or_else(|e| fail(format!("worker thread: {e}")));
            }
        }
    }
    emit(Event::Ready { listeners: bound, workers });
    if watch_stdin {
        // Every further line is a control message (a policy snapshot); each one is
        // applied whole or refused with an `error` event (the previous policy stays).
        // EOF means the driver is gone: stop (fail closed, nothing is served without
        // its decisions).
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match enforce::Enforcer::global().apply_line(&line) {
                Ok(enforce::Applied::Policy { version, policies, revoked }) => emit(Event::PolicyApplied { version, policies, revoked }),
                Ok(enforce::Applied::Certificates { identity, listeners }) => emit(Event::CertificatesApplied { identity, listeners }),
                Err(message) => emit(Event::Error { message }),
            }
        }
        std::process::exit(0);
    }
    loop {
        std::thread::park(); // --config mode: ended by a signal
    }
}
