//! The byte stream a migration runs over: plain TCP, or TLS 1.3 with mutual
//! certificate authentication (M11).
//!
//! # TLS
//!
//! Both hosts hold a certificate and key signed by the cluster's CA (PEM
//! files given by path; a `vigil`-generated cluster CA comes later). The
//! source checks that the target's certificate names the host it dialled;
//! the target requires a client certificate from the same CA. The
//! handshake completes inside [`connect_tls`] / [`accept_tls`], before the
//! engine sends or reads one frame, so a peer that fails authentication
//! gets nothing but a TLS alert: no hello, no VM facts, no memory.
//! TLS 1.3 only, with the `ring` provider (no C toolchain beyond `cc`).

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A bidirectional stream with read timeouts (so readers can poll for
/// cancellation) and a way to cut it.
pub trait Channel: Read + Write + Send {
    /// Sets how long a read may block; `None` blocks forever.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Sets how long a write may block: a peer that stops reading must not
    /// hang the source (cancel is only seen between writes).
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Closes both directions; the peer sees end of stream.
    fn shutdown(&mut self);
}

impl Channel for TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn shutdown(&mut self) {
        // Already closed is fine: we only want it closed.
        let _ = TcpStream::shutdown(self, Shutdown::Both);
    }
}

/// Prepares a TCP stream for migration traffic: no Nagle delay on the
/// small control frames.
pub fn tune_tcp(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

/// Where this host's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This host's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The cluster CA that signs every host's certificate (PEM).
    pub ca: PathBuf,
}

/// TLS set-up and handshake errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file held no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// Its path.
        path: PathBuf,
    },
    /// rustls refused the material (bad key, CA unusable...).
    #[error("TLS configuration from {cert} is unusable")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// rustls' reason.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("cannot require client certificates signed by {ca}")]
    Verifier {
        /// The CA file.
        ca: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The target name is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid host name for TLS")]
    ServerName(String),
    /// The handshake failed: wrong CA, wrong name, no client certificate...
    #[error("TLS handshake with {peer} failed (certificate not signed by the cluster CA, wrong host name, or not TLS)")]
    Handshake {
        /// The peer.
        peer: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what: "certificates",
        path: path.to_path_buf(),
        source,
    };
    let list = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if list.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(list)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "the private key",
        path: path.to_path_buf(),
        source,
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path)? {
        store.add(c).map_err(|source| TlsError::Config {
            cert: path.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// The source's TLS configuration: trusts the cluster CA, presents this
/// host's certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        source,
    };
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(cfg_err)?;
    Ok(Arc::new(cfg))
}

/// The target's TLS configuration: presents this host's certificate and
/// requires a client certificate signed by the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let cfg_err = |source| TlsError::Config {
        cert: files.cert.clone(),
        source,
    };
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
            .build()
            .map_err(|source| TlsError::Verifier {
                ca: files.ca.clone(),
                source,
            })?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(cfg_err)?;
    Ok(Arc::new(cfg))
}

/// A TLS client stream (the source side).
pub type TlsClient = StreamOwned<ClientConnection, TcpStream>;
/// A TLS server stream (the target side).
pub type TlsServer = StreamOwned<ServerConnection, TcpStream>;

/// Runs the handshake to its end so authentication is settled before any
/// frame moves. In TLS 1.3 the client's last flight (with its
/// certificate) is checked by the server after the client thinks it is
/// done; the server's verdict reaches the client as an alert on its first
/// read, which the engine reports as a failed `Hello`.
fn handshake<C, D>(conn: &mut C, sock: &mut TcpStream, peer: &str) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    while conn.is_handshaking() {
        conn.complete_io(sock)
            .map_err(|source| TlsError::Handshake {
                peer: peer.to_string(),
                source,
            })?;
    }
    Ok(())
}

/// Source side: TLS over `sock` to the target named `host` (must match its
/// certificate).
pub fn connect_tls(
    mut sock: TcpStream,
    host: &str,
    cfg: Arc<ClientConfig>,
) -> Result<TlsClient, TlsError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::ServerName(host.to_string()))?;
    let mut conn = ClientConnection::new(cfg, name).map_err(|source| TlsError::Config {
        cert: PathBuf::from(host),
        source,
    })?;
    handshake(&mut conn, &mut sock, host)?;
    Ok(StreamOwned::new(conn, sock))
}

/// Target side: TLS over an accepted `sock`; fails unless the client shows
/// a certificate signed by the cluster CA.
pub fn accept_tls(mut sock: TcpStream, cfg: Arc<ServerConfig>) -> Result<TlsServer, TlsError> {
    let peer = sock
        .peer_addr()
        .map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
    let mut conn = ServerConnection::new(cfg).map_err(|source| TlsError::Config {
        cert: PathBuf::from(&peer),
        source,
    })?;
    handshake(&mut conn, &mut sock, &peer)?;
    Ok(StreamOwned::new(conn, sock))
}

macro_rules! tls_channel {
    ($t:ty) => {
        impl Channel for $t {
            fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
                self.sock.set_read_timeout(timeout)
            }
            fn set_write_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
                self.sock.set_write_timeout(timeout)
            }
            fn shutdown(&mut self) {
                self.conn.send_close_notify();
                let _ = self.conn.complete_io(&mut self.sock);
                let _ = self.sock.shutdown(Shutdown::Both);
            }
        }
    };
}

tls_channel!(TlsClient);
tls_channel!(TlsServer);
