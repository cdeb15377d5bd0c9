//! mTLS 1.3 for HBONE with SPIFFE identities (rustls, ring).
//!
//! As ztunnel (src/tls/workload.rs: `TrustDomainVerifier` wrapping webpki's client
//! verifier, `IdentityVerifier` for servers): the chain is verified by webpki against
//! the mesh roots (validity, key usage, EKU), hostnames are never checked, and the
//! peer's identity is its one SPIFFE URI SAN, which must be in our trust domain (both
//! directions) and, for a client, be the identity it meant to reach. TLS 1.3 only,
//! ALPN `h2` only; a server requires a client certificate.

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use crate::spiffe::{spiffe_id_of_cert, SpiffeId};

pub const ALPN_H2: &[u8] = b"h2";

pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(provider::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let f = File::open(path).map_err(|e| format!("cannot open certificate file {}: {e}", path.display()))?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut BufReader::new(f)).collect();
    let certs = certs.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let f = File::open(path).map_err(|e| format!("cannot open key file {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(f))
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key in it", path.display()))
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn identity_error(why: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(IdentityMismatch(why)))))
}

#[derive(Debug)]
struct IdentityMismatch(String);
impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for IdentityMismatch {}

fn check_identity(end_entity: &CertificateDer<'_>, trust_domain: &str, expected: &[SpiffeId]) -> Result<SpiffeId, Error> {
    let id = spiffe_id_of_cert(end_entity).map_err(identity_error)?;
    if id.trust_domain != trust_domain {
        return Err(identity_error(format!("peer {id} is outside trust domain {trust_domain:?}")));
    }
    if !expected.is_empty() && !expected.contains(&id) {
        return Err(identity_error(format!("peer {id} is not the expected identity")));
    }
    Ok(id)
}

/// Server side (15008): webpki client verification, then the SPIFFE trust-domain check.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Result<ClientCertVerified, Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_identity(end_entity, &self.trust_domain, &[])?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain to the mesh roots (no hostname), then trust domain and the
/// identities the destination may have.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
    trust_domain: String,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], _server_name: &ServerName<'_>, _ocsp: &[u8], now: UnixTime) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, self.algs.all)?;
        check_identity(end_entity, &self.trust_domain, &self.expected)?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }
    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What a workload presents: its leaf (plus any intermediates) and key.
pub struct WorkloadIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl WorkloadIdentity {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, String> {
        Ok(WorkloadIdentity { chain: load_certs(cert)?, key: load_key(key)? })
    }
}

/// A listener's certificate, replaceable while it runs (rotation): every new handshake
/// presents the current one; established connections keep the one they started with.
/// As ztunnel's `SecretManager` hands out the current certificate per identity.
#[derive(Debug)]
pub struct RotatingCert {
    pub identity: SpiffeId,
    current: RwLock<Arc<CertifiedKey>>,
}

fn certified(identity: WorkloadIdentity) -> Result<(SpiffeId, Arc<CertifiedKey>), String> {
    let id = peer_identity(Some(&identity.chain)).ok_or_else(|| "the certificate has no SPIFFE identity".to_string())?;
    let key = CertifiedKey::from_der(identity.chain, identity.key, &crypto_provider()).map_err(|e| format!("certificate/key: {e}"))?;
    Ok((id, Arc::new(key)))
}

impl RotatingCert {
    pub fn new(identity: WorkloadIdentity) -> Result<Arc<RotatingCert>, String> {
        let (identity, key) = certified(identity)?;
        Ok(Arc::new(RotatingCert { identity, current: RwLock::new(key) }))
    }

    fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl rustls::server::ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for RotatingCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Every listener's certificate, so a `certificates` message can reach them.
pub fn certificates() -> &'static Mutex<Vec<Arc<RotatingCert>>> {
    static ALL: std::sync::OnceLock<Mutex<Vec<Arc<RotatingCert>>>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| Mutex::new(Vec::new()))
}

/// Rotate every listener certificate of `identity` (a SPIFFE URI) to the new files.
/// Returns how many listeners now present it; all of them or none change.
pub fn rotate(identity: &str, cert: &Path, key: &Path) -> Result<usize, String> {
    let wanted = crate::spiffe::parse_spiffe_id(identity).map_err(|e| format!("certificates for {identity:?}: {e}"))?;
    let all = certificates().lock().unwrap_or_else(|e| e.into_inner());
    let targets: Vec<&Arc<RotatingCert>> = all.iter().filter(|c| c.identity == wanted).collect();
    if targets.is_empty() {
        return Err(format!("certificates for {identity} refused: no listener presents that identity"));
    }
    let refused = |e: String| format!("certificates for {identity} refused, the current ones kept: {e}");
    let (id, key) = certified(WorkloadIdentity::load(cert, key).map_err(refused)?).map_err(refused)?;
    if id != wanted {
        return Err(format!("certificates for {identity} refused: {} is for {id}", cert.display()));
    }
    for t in &targets {
        *t.current.write().unwrap_or_else(|e| e.into_inner()) = key.clone();
    }
    Ok(targets.len())
}

pub fn server_config(identity: Arc<RotatingCert>, roots: Arc<RootCertStore>, trust_domain: &str) -> Result<rustls::ServerConfig, String> {
    let provider = crypto_provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner, trust_domain: trust_domain.to_string() });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

pub fn client_config(identity: Arc<RotatingCert>, roots: Arc<RootCertStore>, trust_domain: &str, expected: Vec<SpiffeId>) -> Result<rustls::ClientConfig, String> {
    let provider = crypto_provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        algs: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_string(),
        expected,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity);
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// The peer's SPIFFE ID of an established connection (already verified in the handshake).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(|c| spiffe_id_of_cert(c).ok())
}
