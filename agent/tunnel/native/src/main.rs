//! `meshagent-datapath`: reads one configuration message (JSON, control protocol v1)
//! from stdin (or `--config FILE`), binds its listeners, writes a `ready` event and then
//! one event per connection to stdout. It exits when stdin closes: the Python driver
//! owns its lifetime, so the data path never outlives the decisions behind it.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use meshagent_datapath::config::Config;
use meshagent_datapath::control::{self, emit, Event};
use meshagent_datapath::spiffe::parse_spiffe_id;
use meshagent_datapath::{client, server, tls};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

fn fail(message: String) -> ! {
    eprintln!("meshagent-datapath: {message}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (text, watch_stdin) = match args.get(1).map(String::as_str) {
        Some("--config") => match args.get(2) {
            Some(path) => (std::fs::read_to_string(path).unwrap_or_else(|e| fail(format!("cannot read {path}: {e}"))), false),
            None => fail("--config needs a file".into()),
        },
        Some("--version") => {
            println!("meshagent-datapath {} (control protocol {})", env!("CARGO_PKG_VERSION"), meshagent_datapath::config::PROTOCOL_VERSION);
            return;
        }
        Some(other) => fail(format!("unknown argument {other:?} (use --config FILE, or the config on stdin)")),
        None => {
            // The first line on stdin is the configuration.
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
            (String::from_utf8(line).unwrap_or_else(|_| fail("config is not UTF-8".into())), true)
        }
    };
    let cfg = Config::parse(&text).unwrap_or_else(|e| fail(e));
    let workers = if cfg.workers == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { cfg.workers };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("runtime: {e}")));
    rt.block_on(run(cfg, workers, watch_stdin));
}

async fn run(cfg: Config, workers: usize, watch_stdin: bool) {
    let _writer = control::start();
    let roots = Arc::new(tls::load_roots(&cfg.roots).unwrap_or_else(|e| fail(e)));
    let mut bound = BTreeMap::new();
    for l in &cfg.inbound {
        let identity = tls::WorkloadIdentity::load(&l.cert, &l.key).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        let sc = tls::server_config(identity, roots.clone(), &cfg.trust_domain).unwrap_or_else(|e| fail(format!("inbound {}: {e}", l.name)));
        let listener = TcpListener::bind(l.listen).await.unwrap_or_else(|e| fail(format!("inbound {}: bind {}: {e}", l.name, l.listen)));
        bound.insert(l.name.clone(), listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let inbound = Arc::new(server::Inbound { cfg: Arc::new(l.clone()), acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(sc)) });
        tokio::spawn(server::serve(listener, inbound));
    }
    for l in &cfg.outbound {
        let identity = tls::WorkloadIdentity::load(&l.cert, &l.key).unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let expected = l.peer_identities.iter().map(|s| parse_spiffe_id(s)).collect::<Result<Vec<_>, _>>().unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let cc = tls::client_config(identity, roots.clone(), &cfg.trust_domain, expected).unwrap_or_else(|e| fail(format!("outbound {}: {e}", l.name)));
        let listener = TcpListener::bind(l.listen).await.unwrap_or_else(|e| fail(format!("outbound {}: bind {}: {e}", l.name, l.listen)));
        bound.insert(l.name.clone(), listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
        let mut timers = client::PoolTimers::default();
        if let Some(ms) = l.pool_idle_ms {
            timers.idle = std::time::Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = l.keepalive_ms {
            timers.keepalive_interval = std::time::Duration::from_millis(ms.max(1));
        }
        let pool = client::Pool::new(l.peer, tokio_rustls::TlsConnector::from(Arc::new(cc)), timers);
        let outbound = Arc::new(client::Outbound { cfg: l.clone(), pool });
        tokio::spawn(client::serve(listener, outbound));
    }
    emit(Event::Ready { listeners: bound, workers });
    if watch_stdin {
        // Further lines are reserved for later protocol messages; EOF means the driver
        // is gone: stop (fail closed, nothing is served without its decisions).
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    } else {
        let _ = tokio::signal::ctrl_c().await;
    }
    std::process::exit(0);
}
