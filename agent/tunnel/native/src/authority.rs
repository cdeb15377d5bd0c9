//! `:authority` of an HBONE CONNECT: `ip:port` or `[ipv6]:port`, nothing else.
//!
//! The same rules as the Python implementation (`agent/hbone/headers.py`
//! `parse_authority`): no host names, a decimal port of at most five digits in 1..=65535,
//! IPv6 only in brackets, brackets only for IPv6. Pure; fuzzed in tests/fuzz.rs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorityError(pub String);

impl std::fmt::Display for AuthorityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn parse_authority(authority: &str) -> Result<SocketAddr, AuthorityError> {
    let err = |why: &str| AuthorityError(format!("authority {authority:?}: {why}"));
    let (ip, port_text): (IpAddr, &str) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, port) = rest.split_once("]:").ok_or_else(|| err("expected [ipv6]:port"))?;
        let v6: Ipv6Addr = host.parse().map_err(|_| err("not an IPv6 address"))?;
        (IpAddr::V6(v6), port)
    } else {
        let (host, port) = authority.rsplit_once(':').ok_or_else(|| err("expected ip:port"))?;
        if host.is_empty() {
            return Err(err("expected ip:port"));
        }
        if host.contains(':') {
            return Err(err("IPv6 must be written [addr]:port"));
        }
        let v4: Ipv4Addr = host.parse().map_err(|_| err("not an IP address (host names are not HBONE)"))?;
        (IpAddr::V4(v4), port)
    };
    if port_text.is_empty() || port_text.len() > 5 || !port_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("port must be a decimal number"));
    }
    let port: u32 = port_text.parse().map_err(|_| err("port must be a decimal number"))?;
    if port == 0 || port > 65535 {
        return Err(err("port out of range"));
    }
    Ok(SocketAddr::new(ip, port as u16))
}

/// `ip:port`, IPv6 bracketed, as ztunnel writes `:authority`.
pub fn format_authority(addr: &SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// RFC 7239 `for="<ip>"` (IPv6 bracketed inside the quotes), as the Python client sends it.
pub fn format_forwarded_for(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("for=\"{a}\""),
        IpAddr::V6(a) => format!("for=\"[{a}]\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_python_accepts() {
        assert_eq!(parse_authority("10.0.0.1:80").unwrap(), "10.0.0.1:80".parse().unwrap());
        assert_eq!(parse_authority("[fd00::1]:8080").unwrap(), "[fd00::1]:8080".parse().unwrap());
        assert_eq!(parse_authority("10.0.0.1:00080").unwrap().port(), 80);
    }

    #[test]
    fn refuses_what_python_refuses() {
        for bad in ["example.com:80", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536",
                    "10.0.0.1:000080", "fd00::1:80", "[10.0.0.1]:80", "[fd00::1]", ":80",
                    "10.0.0.1:+80", "10.0.0.1: 80", "", "[]:80", "01.2.3.4:80"] {
            assert!(parse_authority(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_authority(&"[fd00::1]:80".parse().unwrap()), "[fd00::1]:80");
        assert_eq!(format_forwarded_for(&"fd00::2".parse().unwrap()), "for=\"[fd00::2]\"");
        assert_eq!(format_forwarded_for(&"10.1.2.3".parse().unwrap()), "for=\"10.1.2.3\"");
    }
}
