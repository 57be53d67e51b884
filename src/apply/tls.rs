//! TLS to PostgreSQL with libpq's meaning of `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey`, for every connection the worker and its commands
//! make (they all come through [`super::session`]); and the one place that
//! turns a failed connection into a sentence saying what was refused.
//!
//! What each mode promises, as libpq's:
//! - `disable`: plain connections only.
//! - `prefer` (the default): TLS when the server offers it, without checking
//!   its certificate; plain when the server has no TLS, or refuses the TLS
//!   connection (libpq then tries once more without TLS).
//! - `require`: TLS or nothing, the certificate unchecked, unless
//!   `sslrootcert` is given: then checked as by `verify-ca`.
//! - `verify-ca`: the server's chain must end at a CA of `sslrootcert`.
//! - `verify-full`: and its certificate must name the host connected to
//!   (a DNS name, or an IP address for a host given as one).
//!
//! Why rustls (through tokio-postgres-rustls) and not OpenSSL: the binary
//! already carries rustls with the aws-lc-rs provider for the schema
//! registry's HTTPS, so PostgreSQL's TLS adds no crypto library; and its
//! errors are typed, so an untrusted CA and a host name mismatch can be told
//! apart and named (OpenSSL reports both as "certificate verify failed").
//! librdkafka keeps its own OpenSSL (vendored): a C library cannot use
//! rustls.

use std::fmt;
use std::sync::Arc;

use anyhow::Context as _;
use deadpool_postgres::Connect;
use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

use crate::config::{PostgresConfig, SslMode};

/// Connects the pools: the TLS connector and what `sslmode` asks of it.
#[derive(Clone)]
pub struct TlsConnect {
    mode: SslMode,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for TlsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConnect")
            .field("mode", &self.mode)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The connector for `pg`'s TLS settings; reads the CA, certificate and key
/// files (so a bad file is named before anything connects).
pub fn connector(pg: &PostgresConfig) -> anyhow::Result<TlsConnect> {
    let provider = provider();
    let roots = match &pg.sslrootcert {
        Some(file) => {
            let mut roots = RootCertStore::empty();
            let certs = read_certs(file).with_context(|| format!("postgres.sslrootcert {file}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("postgres.sslrootcert {file}: no usable CA certificate in it");
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (pg.sslmode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .context("postgres.sslrootcert")?
        }
        // libpq: require with a root certificate verifies like verify-ca.
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly(
            WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .context("postgres.sslrootcert")?,
        )),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            anyhow::bail!(
                "postgres.sslrootcert: sslmode {} needs the CA that signed the server's certificate",
                pg.sslmode.as_str()
            )
        }
        // prefer (whatever the roots, as libpq), require without roots,
        // disable (never used).
        _ => Arc::new(Unchecked(provider.clone())),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&pg.sslcert, &pg.sslkey) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).with_context(|| format!("postgres.sslcert {cert}"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow::anyhow!("postgres.sslkey {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .context("postgres.sslcert and sslkey do not make a client certificate")?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConnect {
        mode: pg.sslmode,
        tls: MakeRustlsConnect::new(config),
    })
}

fn read_certs(file: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if certs.is_empty() {
        anyhow::bail!("no PEM certificate in it");
    }
    Ok(certs)
}

impl Connect for TlsConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(tokio_postgres::Client, JoinHandle<()>), tokio_postgres::Error>>
    {
        let mut pg = pg_config.clone();
        Box::pin(async move {
            let (client, connection) = match self.mode {
                SslMode::Disable => {
                    pg.ssl_mode(PgSslMode::Disable);
                    let (client, c) = pg.connect(tokio_postgres::NoTls).await?;
                    (client, spawn(c))
                }
                SslMode::Prefer => {
                    // tokio-postgres falls back when the server has no TLS;
                    // libpq also tries again without TLS when the server
                    // refuses the TLS connection (e.g. pg_hba.conf allows
                    // only hostnossl). If that fails too, the TLS attempt's
                    // error is the one that says most.
                    pg.ssl_mode(PgSslMode::Prefer);
                    match pg.connect(self.tls.clone()).await {
                        Ok((client, c)) => (client, spawn(c)),
                        Err(tls_error) if tls_error.as_db_error().is_some() => {
                            pg.ssl_mode(PgSslMode::Disable);
                            match pg.connect(tokio_postgres::NoTls).await {
                                Ok((client, c)) => (client, spawn(c)),
                                Err(_) => return Err(tls_error),
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    pg.ssl_mode(PgSslMode::Require);
                    let (client, c) = pg.connect(self.tls.clone()).await?;
                    (client, spawn(c))
                }
            };
            Ok((client, connection))
        })
    }
}

fn spawn<F>(connection: F) -> JoinHandle<()>
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(error = %e, "PostgreSQL connection closed");
        }
    })
}

/// `prefer` and `require` without a root certificate: encryption without
/// authentication of the server, as libpq's. The handshake's signatures are
/// still checked (the server holds the certificate's key).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must end at a trusted CA; the name is not checked.
/// webpki checks the chain before the name, so a name error means the
/// chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Why a connection to PostgreSQL failed, in words that name what was
/// refused: the password, the server's certificate (untrusted CA, host name
/// mismatch), a missing client certificate, or the address. Never holds a
/// secret: neither tokio-postgres nor rustls puts one in an error.
pub fn explain(e: &tokio_postgres::Error, pg: &PostgresConfig) -> String {
    if let Some(db) = e.as_db_error() {
        let msg = db.message();
        return match db.code().code() {
            "28P01" => format!(
                "PostgreSQL refused the password of user {} (wrong password): {msg}",
                pg.user
            ),
            "28000" if msg.contains("certificate") => format!(
                "PostgreSQL requires a client certificate for user {} (set postgres.sslcert and postgres.sslkey): {msg}",
                pg.user
            ),
            "28000" => format!(
                "PostgreSQL refused user {} (pg_hba.conf): {msg}",
                pg.user
            ),
            _ => format!("PostgreSQL: {msg}"),
        };
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        let rustls_error = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = rustls_error {
            return explain_tls(r, pg);
        }
        source = err.source();
    }
    format!(
        "connecting to PostgreSQL at {}:{}: {}",
        pg.host,
        pg.port,
        chain(e)
    )
}

fn explain_tls(e: &rustls::Error, pg: &PostgresConfig) -> String {
    let ca = pg.sslrootcert.as_deref().unwrap_or("(none)");
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "host name mismatch: PostgreSQL's certificate is not valid for {:?} (sslmode verify-full): {e}",
            pg.host
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "untrusted CA: PostgreSQL's certificate is not signed by a CA in postgres.sslrootcert {ca}: {e}"
        ),
        rustls::Error::InvalidCertificate(_) => {
            format!("PostgreSQL's certificate was refused: {e}")
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => format!(
            "PostgreSQL requires a client certificate (set postgres.sslcert and postgres.sslkey): {e}"
        ),
        _ => format!("TLS with PostgreSQL at {}:{} failed: {e}", pg.host, pg.port),
    }
}

/// An error and its sources, joined by ": ".
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// [`explain`] for an error of the pool: a failed connection, or a failed
/// session set-up (whose message already says what to do).
pub fn explain_pool(e: &deadpool_postgres::PoolError, pg: &PostgresConfig) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => explain(e, pg),
        deadpool_postgres::PoolError::PostCreateHook(deadpool_postgres::HookError::Backend(e)) => {
            explain(e, pg)
        }
        other => other.to_string(),
    }
}
