//! The sockets the datapath opens, for the node's transparent datapath: listeners with
//! `IP_TRANSPARENT` (connections redirected to us by TPROXY/sk_assign keep their
//! original destination, which `getsockname()` of the accepted socket returns), and
//! dials bound to a foreign source address (the source pod's, or the client's on the
//! inbound side) with `IP_TRANSPARENT`. Every socket carries the configured `SO_MARK`,
//! by which the node's redirect rules (eBPF or nftables) recognise the datapath's own
//! traffic and leave it alone.
//!
//! As ztunnel src/socket.rs (`set_transparent`, `set_mark`) and src/proxy/pool.rs (the
//! outer connection bound to the workload's address). Side effects of each function:
//! creates one socket (and binds/connects it), nothing else.

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// How the datapath's sockets are made: the `SO_MARK` value, if configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct SocketOptions {
    pub mark: Option<u32>,
}

fn set_transparent(sock: SockRef<'_>, v6: bool) -> std::io::Result<()> {
    if v6 {
        sock.set_ip_transparent_v6(true)
    } else {
        sock.set_ip_transparent_v4(true)
    }
}

impl SocketOptions {
    fn apply(&self, sock: SockRef<'_>) -> Result<(), String> {
        if let Some(mark) = self.mark {
            sock.set_mark(mark).map_err(|e| format!("SO_MARK {mark:#x}: {e} (needs CAP_NET_ADMIN)"))?;
        }
        Ok(())
    }

    /// A listening socket on `addr` (SO_REUSEPORT, so each worker can hold a copy),
    /// `IP_TRANSPARENT` if `transparent` (needs CAP_NET_ADMIN).
    pub fn listener(&self, addr: SocketAddr, transparent: bool) -> Result<std::net::TcpListener, String> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(|e| format!("socket: {e}"))?;
        let _ = sock.set_reuse_address(true);
        sock.set_reuse_port(true).map_err(|e| format!("SO_REUSEPORT: {e}"))?;
        self.apply(SockRef::from(&sock))?;
        if transparent {
            set_transparent(SockRef::from(&sock), addr.is_ipv6()).map_err(|e| format!("IP_TRANSPARENT: {e} (needs CAP_NET_ADMIN)"))?;
        }
        sock.bind(&addr.into()).map_err(|e| format!("bind {addr}: {e}"))?;
        sock.listen(1024).map_err(|e| format!("listen: {e}"))?;
        sock.set_nonblocking(true).map_err(|e| format!("O_NONBLOCK: {e}"))?;
        Ok(sock.into())
    }

    /// Connect to `dst`, from `source` (any port) if given: that address need not be
    /// ours (`IP_TRANSPARENT` bind), as when the outer HBONE connection carries the
    /// source pod's address or the inbound dial carries the client's.
    pub async fn dial(&self, dst: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, String> {
        let sock = if dst.is_ipv6() { TcpSocket::new_v6() } else { TcpSocket::new_v4() }.map_err(|e| format!("socket: {e}"))?;
        self.apply(SockRef::from(&sock))?;
        if let Some(src) = source {
            if src.is_ipv6() != dst.is_ipv6() {
                return Err(format!("source {src} and destination {dst} are not of one address family"));
            }
            set_transparent(SockRef::from(&sock), src.is_ipv6()).map_err(|e| format!("IP_TRANSPARENT: {e} (needs CAP_NET_ADMIN)"))?;
            sock.bind(SocketAddr::new(src, 0)).map_err(|e| format!("bind {src}: {e}"))?;
        }
        sock.connect(dst).await.map_err(|e| format!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unprivileged: no mark, no transparency; a loopback round trip through both.
    #[tokio::test]
    async fn plain_listener_and_dial() {
        let opts = SocketOptions::default();
        let l = tokio::net::TcpListener::from_std(opts.listener("127.0.0.1:0".parse().unwrap(), false).unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(opts.dial(addr, None), l.accept());
        assert_eq!(dialed.unwrap().peer_addr().unwrap(), addr);
        assert_eq!(accepted.unwrap().0.local_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn mixed_families_refused() {
        let err = SocketOptions::default().dial("[::1]:1".parse().unwrap(), Some("127.0.0.1".parse().unwrap())).await.unwrap_err();
        assert!(err.contains("address family"), "{err}");
    }
}
