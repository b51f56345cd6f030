//! TLS for QUIC: the hub's self-signed certificate (made on first start,
//! kept in its data dir) and the client's pinning of its SHA-256
//! fingerprint, like SSH's known hosts.

use crate::error::{Error, Result};
use crate::proto::ALPN;
use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The server name clients ask for (the certificate names it; pinning, not
/// the name, is what authenticates the hub).
pub const SERVER_NAME: &str = "dm-hub";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `sha256:` + hex of the SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex::encode(d.as_ref()))
}

/// Loads the hub certificate from `dir`, generating it on first use.
/// Returns (certificate chain, leaf first; private key).
pub fn load_or_create_cert(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    // A CA-issued certificate (chain) and key dropped into the data dir win
    // over the self-signed one (clients then use `dm remote add --ca`).
    let (pem_cert, pem_key) = (dir.join("hub-cert.pem"), dir.join("hub-key.pem"));
    match (pem_cert.exists(), pem_key.exists()) {
        (true, true) => return load_pem(&pem_cert, &pem_key),
        (false, false) => {}
        // Half a pair served the self-signed certificate without a word,
        // and clients with --ca were told only "UnknownIssuer".
        (cert, _) => {
            let (there, missing) = match cert {
                true => (&pem_cert, &pem_key),
                false => (&pem_key, &pem_cert),
            };
            return Err(Error::Tls(format!(
                "{} is there but {} is missing: a hub with a CA-issued certificate needs both \
                 (PEM; the key unencrypted); remove {} to use the self-signed certificate",
                there.display(),
                missing.display(),
                there.display()
            )));
        }
    }
    let cert_path = dir.join("hub-cert.der");
    let key_path = dir.join("hub-key.der");
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read(&cert_path)
            .map_err(Error::io(format!("reading {}", cert_path.display())))?;
        let key = std::fs::read(&key_path)
            .map_err(Error::io(format!("reading {}", key_path.display())))?;
        return Ok((
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string(), "localhost".into()])
        .map_err(|e| Error::Tls(format!("generating the hub certificate: {e}")))?;
    let cert = ck.cert.der().to_vec();
    let key = ck.key_pair.serialize_der();
    write_private(&key_path, &key)?;
    std::fs::write(&cert_path, &cert)
        .map_err(Error::io(format!("writing {}", cert_path.display())))?;
    Ok((
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    ))
}

/// Loads a PEM certificate chain (the hub's certificate first, then the
/// intermediate CAs that issued it, all sent to clients: a CA's
/// certificates come from intermediates, and a leaf alone never verified)
/// and its key.
fn load_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    use rustls::pki_types::pem::PemObject;
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("reading {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Tls(format!(
            "{} holds no PEM certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Tls(format!("reading {}: {e}", key.display())))?;
    Ok((chain, key))
}

/// Writes a file readable by its owner only (created 0600 from the start).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(Error::io(format!("creating {}", tmp.display())))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))
}

/// Streams a peer may have open at once, once authenticated.
pub const STREAMS: u32 = 32;
/// Bytes a peer may have in flight to us on one connection, once
/// authenticated (before: [`PRE_AUTH_WINDOW`], one stream).
pub const RECEIVE_WINDOW: u32 = 128 << 20;
/// What a hub lets a peer that has not authenticated send: enough for a
/// `Hello`, nothing to fill its memory with.
pub const PRE_AUTH_WINDOW: u32 = 64 << 10;

/// A peer silent this long (6 keep-alives missed) is gone: a push to a
/// hub that died says so after 30 s, not 60.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(STREAMS.into());
    t.stream_receive_window((32u32 << 20).into());
    t.receive_window(RECEIVE_WINDOW.into());
    t.send_window(128 << 20);
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    if let Ok(idle) = IDLE_TIMEOUT.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The QUIC endpoint config of a hub, whose stateless-reset key is derived
/// from its TLS key: a hub restarted on the same data dir answers packets
/// of connections it lost with resets their clients accept, so a transfer
/// cut by the restart fails at once instead of after [`IDLE_TIMEOUT`] of
/// silence (with quinn's random key per start, the client waited 30 s).
pub fn endpoint_config(key: &PrivateKeyDer<'_>) -> quinn::EndpointConfig {
    let derive = |what: &[u8]| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(what);
        ctx.update(key.secret_der());
        ctx.finish()
    };
    let reset = derive(b"dm hub stateless reset key\0");
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    // The connection ids it hands out must pass its check after a restart
    // too (a packet with an id it cannot have made gets no reset).
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derive(b"dm hub connection id key\0").as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    cfg
}

/// The QUIC server config of a hub.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // Until `Hello` passes (the hub then raises both, see server.rs).
    let mut t = transport();
    t.max_concurrent_bidi_streams(1u32.into());
    t.receive_window(PRE_AUTH_WINDOW.into());
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// How a client authenticates the hub.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The certificate must have this fingerprint (`sha256:HEX`).
    Pinned(String),
    /// Accept any certificate and record its fingerprint (first contact,
    /// `dm remote add`, which shows it to the user).
    FirstUse,
    /// The certificate must chain to one of these CA certificates (PEM) and
    /// name the host connected to (`dm remote add --ca FILE`).
    Ca(String),
}

/// Checks the hub's certificate against a pinned fingerprint, or through
/// `webpki` against the CA certificates of [`Trust::Ca`], and keeps what
/// was wrong with it in words for the user (rustls says only
/// `UnknownIssuer`, or an expiry in epoch seconds).
#[derive(Debug)]
struct PinVerifier {
    trust: Trust,
    seen: Mutex<Option<String>>,
    problem: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

/// A UTC time as RFC 3339 (`2026-12-06T17:00:00Z`).
fn utc(t: UnixTime) -> String {
    i64::try_from(t.as_secs())
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{} s after 1970", t.as_secs()))
}

/// What is wrong with a hub's certificate that did not verify against the
/// CA of `dm remote add --ca`, and what to do.
fn explain_ca_failure(e: &rustls::Error, name: &ServerName<'_>) -> String {
    use rustls::CertificateError as C;
    let name = name.to_str();
    let rustls::Error::InvalidCertificate(c) = e else {
        return format!("the hub's certificate did not verify: {e}");
    };
    match c {
        C::UnknownIssuer => "the hub's certificate was not issued by the CA given with --ca \
             (nor through an intermediate certificate the hub sent): give the CA that issued it; \
             a hub using dm's own self-signed certificate is added without --ca (its fingerprint is pinned)"
            .to_string(),
        C::BadSignature => "the hub's certificate names a CA of the file given with --ca as its issuer, \
             but that CA's key did not sign it (a CA made again under the same name?): give the CA \
             that issued it"
            .to_string(),
        C::ExpiredContext { time, not_after } => format!(
            "the hub's certificate expired at {} (it is {} here): the hub needs a new one \
             (hub-cert.pem in its data dir), or this machine's clock is wrong",
            utc(*not_after),
            utc(*time)
        ),
        C::Expired => "the hub's certificate has expired: the hub needs a new one \
             (hub-cert.pem in its data dir), or this machine's clock is wrong"
            .to_string(),
        C::NotValidYetContext { time, not_before } => format!(
            "the hub's certificate is valid only from {} (it is {} here): check this machine's clock and the hub's",
            utc(*not_before),
            utc(*time)
        ),
        C::NotValidYet => "the hub's certificate is not valid yet: check this machine's clock and the hub's"
            .to_string(),
        C::NotValidForNameContext { presented, .. } => format!(
            "the hub's certificate does not name {name} (it names {}): use a name it has in the \
             remote's address (`dm remote set-url`), or give the hub a certificate for {name}",
            match presented.is_empty() {
                true => "no host".to_string(),
                // Shown as `DnsName("localhost")`, `IpAddress(10.0.0.1)`.
                false => presented
                    .iter()
                    .map(|p| {
                        p.split_once('(')
                            .and_then(|(_, rest)| rest.strip_suffix(')'))
                            .map_or(p.as_str(), |inner| inner.trim_matches('"'))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        ),
        C::NotValidForName => format!(
            "the hub's certificate does not name {name}: use a name it has in the remote's address \
             (`dm remote set-url`), or give the hub a certificate for {name}"
        ),
        other => format!("the hub's certificate did not verify against the CA given with --ca: {other:?}"),
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        *self.seen.lock() = Some(fp.clone());
        let problem = match &self.trust {
            Trust::FirstUse => return Ok(ServerCertVerified::assertion()),
            Trust::Pinned(want) if want.eq_ignore_ascii_case(&fp) => {
                return Ok(ServerCertVerified::assertion())
            }
            Trust::Ca(_) => {
                let Some(webpki) = &self.webpki else {
                    return Err(rustls::Error::General(
                        "internal: CA trust without a CA verifier".into(),
                    ));
                };
                match webpki.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp,
                    now,
                ) {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        *self.problem.lock() = Some(explain_ca_failure(&e, server_name));
                        return Err(e);
                    }
                }
            }
            Trust::Pinned(want) => format!(
                "the hub's certificate fingerprint is {fp}, not the pinned {want}: the hub changed or someone is in between; if it really changed, `dm remote set-url REMOTE USER@HOST[:PORT]` pins the new one (upstreams kept)"
            ),
        };
        *self.problem.lock() = Some(problem.clone());
        Err(rustls::Error::General(problem))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config that trusts per `trust`; the returned cell receives the
/// fingerprint the hub presented.
pub fn client_config(trust: Trust) -> Result<(quinn::ClientConfig, Arc<PinSeen>)> {
    let provider = provider();
    let webpki = match &trust {
        Trust::Ca(pem) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| Error::Tls(format!("reading the CA file: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::Tls("the CA file holds no certificate".into()));
            }
            Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| Error::Tls(e.to_string()))?,
            )
        }
        _ => None,
    };
    let verifier = Arc::new(PinVerifier {
        trust,
        seen: Mutex::new(None),
        problem: Mutex::new(None),
        provider: provider.clone(),
        webpki,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok((cfg, Arc::new(PinSeen(verifier))))
}

/// The fingerprint a hub presented during a handshake.
pub struct PinSeen(Arc<PinVerifier>);

impl PinSeen {
    /// `sha256:HEX`, once the handshake got that far.
    pub fn get(&self) -> Option<String> {
        self.0.seen.lock().clone()
    }

    /// Why the hub's certificate was refused, in words, if it was.
    pub fn problem(&self) -> Option<String> {
        self.0.problem.lock().clone()
    }
}
