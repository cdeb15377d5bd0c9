//! SPIFFE IDs in Istio's form, read from a certificate's URI SAN (the same rules as
//! `agent/identity/spiffe.py`: exactly one
//! `spiffe://` URI SAN, `spiffe://<td>/ns/<ns>/sa/<sa>`).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty() && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn parse_spiffe_id(uri: &str) -> Result<SpiffeId, String> {
    let rest = uri.strip_prefix("spiffe://").ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] if valid_trust_domain(td) && valid_segment(ns) && valid_segment(sa) => {
            Ok(SpiffeId { trust_domain: td.to_string(), namespace: ns.to_string(), service_account: sa.to_string() })
        }
        _ => Err(format!("{uri:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>")),
    }
}

/// The SPIFFE ID of a DER certificate (exactly one `spiffe://` URI SAN).
pub fn spiffe_id_of_cert(der: &[u8]) -> Result<SpiffeId, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("certificate is not valid DER: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or_else(|| "certificate has no subjectAltName, so no SPIFFE ID".to_string())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    if uris.len() != 1 {
        return Err(format!("certificate must carry exactly one SPIFFE URI SAN, has {uris:?}"));
    }
    parse_spiffe_id(uris[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_form() {
        let id = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        for bad in ["spiffe://Cluster/ns/a/sa/b", "spiffe://td/ns/a/sa", "http://td/ns/a/sa/b",
                    "spiffe://td/ns/../sa/b", "spiffe://td/ns/a/sa/b/c", "spiffe:///ns/a/sa/b"] {
            assert!(parse_spiffe_id(bad).is_err(), "{bad}");
        }
    }
}
