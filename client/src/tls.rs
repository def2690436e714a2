//! TLS for every connection of the client (the pool, the LISTEN session,
//! event waits), with rustls, chosen by the connection string's `sslmode` the
//! way libpq chooses:
//!
//! - `disable`: no TLS;
//! - `prefer` (the default) and `allow`: TLS when the server offers it,
//!   the certificate not verified (libpq without a root certificate);
//! - `require`: TLS or no connection; the certificate is verified like
//!   `verify-ca` when `sslrootcert` is given (as libpq does), else not;
//! - `verify-ca`: TLS, the server's chain verified against `sslrootcert`;
//! - `verify-full`: that, and the certificate names the host connected to
//!   (its DNS name or IP address).
//!
//! `sslrootcert` is a PEM file of trusted certificates; for the verifying
//! modes it defaults to `~/.postgresql/root.crt`, as in libpq. tokio-postgres
//! itself knows only `disable`, `prefer` and `require`, and no `sslrootcert`:
//! both are taken out of the string here before it is parsed.

use crate::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::sync::Arc;
use tokio_postgres::config::SslMode;
pub use tokio_postgres_rustls::MakeRustlsConnect;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndName,
}

/// Parse a connection string (URL or `key=value` form): the tokio-postgres
/// config and the TLS connector its `sslmode` asks for.
pub fn connect_config(conn: &str) -> Result<(tokio_postgres::Config, MakeRustlsConnect)> {
    let mut sslmode = None;
    let mut rootcert = None;
    let rest = strip_options(conn, |key, value| match key {
        "sslmode" => {
            sslmode = Some(value.to_string());
            true
        }
        "sslrootcert" => {
            rootcert = Some(value.to_string());
            true
        }
        _ => false,
    });
    let (mode, verify) = match sslmode.as_deref() {
        None | Some("prefer") | Some("allow") => (SslMode::Prefer, Verify::Nothing),
        Some("disable") => (SslMode::Disable, Verify::Nothing),
        Some("require") if rootcert.is_some() => (SslMode::Require, Verify::Chain),
        Some("require") => (SslMode::Require, Verify::Nothing),
        Some("verify-ca") => (SslMode::Require, Verify::Chain),
        Some("verify-full") => (SslMode::Require, Verify::ChainAndName),
        Some(other) => {
            return Err(Error::Tls(format!(
                "sslmode must be disable, allow, prefer, require, verify-ca or verify-full, not {other:?}"
            )))
        }
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(Error::Connection)?;
    config.ssl_mode(mode);
    let tls = match verify {
        Verify::Nothing => connector(Arc::new(AnyCertificate(provider())))?,
        _ => {
            let path = rootcert.unwrap_or_else(default_root_cert);
            let roots = read_roots(&path)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| Error::Tls(format!("sslrootcert {path}: {e}")))?;
            if verify == Verify::Chain {
                connector(Arc::new(ChainOnly(webpki)))?
            } else {
                connector(webpki)?
            }
        }
    };
    Ok((config, tls))
}

/// The connector for a config parsed elsewhere (`Client::from_pool`): TLS as
/// its `sslmode` says, the certificate not verified.
pub(crate) fn unverified() -> MakeRustlsConnect {
    connector(Arc::new(AnyCertificate(provider()))).expect("the default protocol versions")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn connector(verifier: Arc<dyn ServerCertVerifier>) -> Result<MakeRustlsConnect> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn default_root_cert() -> String {
    let home = std::env::var("HOME").unwrap_or_default();
    format!("{home}/.postgresql/root.crt")
}

fn read_roots(path: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::Tls(format!("sslrootcert {path}: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| Error::Tls(format!("sslrootcert {path}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::Tls(format!("sslrootcert {path}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls(format!(
            "sslrootcert {path}: no certificate in it"
        )));
    }
    Ok(roots)
}

/// The string without the options `take` claims (called with each option's
/// key and value), in the URL form (`postgres://…?k=v&…`) or the `key=value`
/// form.
fn strip_options(conn: &str, mut take: impl FnMut(&str, &str) -> bool) -> String {
    let mut took = false;
    let mut take = |k: &str, v: &str| {
        let t = take(k, v);
        took |= t;
        t
    };
    let rest = strip_each(conn, &mut take);
    // unchanged unless an option was taken out (the key=value form is
    // rebuilt with single spaces)
    if took {
        rest
    } else {
        conn.to_string()
    }
}

fn strip_each(conn: &str, take: &mut impl FnMut(&str, &str) -> bool) -> String {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let Some((base, query)) = conn.split_once('?') else {
            return conn.to_string();
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                !take(k, &v)
            })
            .collect();
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        conn.split_whitespace()
            .filter(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                !take(k.trim(), v.trim_matches('\''))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `prefer`, `allow` and `require` without a root certificate: encrypted,
/// not authenticated (the handshake's signatures are still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
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

/// `verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
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
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_are_taken_out_of_both_forms() {
        let mut seen = Vec::new();
        let url = strip_options(
            "postgres://u@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
            |k, v| {
                seen.push((k.to_string(), v.to_string()));
                k.starts_with("ssl")
            },
        );
        assert_eq!(url, "postgres://u@h:5432/db?application_name=x");
        assert!(seen.contains(&("sslrootcert".into(), "/tmp/ca.pem".into())));
        let kv = strip_options("host=h sslmode=require dbname=db", |k, _| k == "sslmode");
        assert_eq!(kv, "host=h dbname=db");
        // nothing taken: the string is left as it was, spaces in quotes too
        let kept = "host=h password='a  b'";
        assert_eq!(strip_options(kept, |k, _| k == "sslmode"), kept);
    }

    #[test]
    fn an_unknown_sslmode_is_refused_by_name() {
        let e = connect_config("postgres://u@h/db?sslmode=maybe")
            .err()
            .unwrap();
        assert!(e.to_string().contains("sslmode"), "{e}");
    }

    #[test]
    fn a_missing_root_certificate_is_refused_by_name() {
        let e =
            connect_config("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .err()
                .unwrap();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
    }
}
