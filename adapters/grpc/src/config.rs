//! `grpc://` URLs and the settings they carry.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use switchboard_core::config::{Secret, parse_count, parse_millis, unknown_option};
use switchboard_core::{Error, Result};
use url::Url;

use crate::NAME;

/// Settings of the gRPC transport, read from
/// `grpc://host:port[?option=value&...]` (or `grpcs://` for TLS).
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `token` | bearer token sent with every call (`authorization: Bearer <token>`) | none |
/// | `tls_ca` | PEM file of the CA to trust (`grpcs://`) | system roots |
/// | `tls_domain` | server name to verify (`grpcs://`) | the URL's host |
/// | `tls_cert`, `tls_key` | client certificate and key (PEM) for mutual TLS (`grpcs://`) | none |
/// | `connect_timeout_ms` | bound on connecting, and on opening a stream | `5000` |
/// | `max_message_bytes` | largest gRPC message sent or received | `4194304` (4 MiB) |
///
/// The token is kept as a [`Secret`]: `Debug` and logs show `***`.
#[non_exhaustive]
#[derive(Clone)]
pub struct GrpcConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// Host name, for TLS verification.
    pub host: String,
    /// Bearer token.
    pub token: Option<Secret>,
    /// Connect over TLS.
    pub tls: bool,
    /// CA to trust.
    pub tls_ca: Option<PathBuf>,
    /// Server name to verify.
    pub tls_domain: Option<String>,
    /// Client certificate and key, for mutual TLS.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// Bound on connecting and on opening a stream.
    pub connect_timeout: Duration,
    /// Largest message sent or received.
    pub max_message_bytes: usize,
}

impl fmt::Debug for GrpcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_domain", &self.tls_domain)
            .field("tls_client", &self.tls_client)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

/// Default largest message, as gRPC's own default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

const KNOWN: &[&str] = &[
    "token",
    "tls_ca",
    "tls_domain",
    "tls_cert",
    "tls_key",
    "connect_timeout_ms",
    "max_message_bytes",
];

impl GrpcConfig {
    /// Reads a `grpc://` or `grpcs://` URL. The port is required (there is no standard one).
    ///
    /// # Errors
    /// `InvalidConfig` naming the scheme, option or value that is wrong.
    pub fn from_url(url: &Url) -> Result<Self> {
        let tls = match url.scheme() {
            "grpc" => false,
            "grpcs" => true,
            other => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("expected a `grpc://` or `grpcs://` URL, got scheme `{other}`"),
                ));
            }
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
            Error::invalid_config(
                NAME,
                "a grpc:// URL needs a host, as in grpc://127.0.0.1:50051",
            )
        })?;
        let port = url.port().ok_or_else(|| {
            Error::invalid_config(
                NAME,
                "a grpc:// URL needs a port, as in grpc://127.0.0.1:50051",
            )
        })?;
        if !url.username().is_empty() {
            return Err(Error::invalid_config(
                NAME,
                "credentials go in option `token` (a bearer token), not in the URL's user info",
            ));
        }
        let mut cfg = GrpcConfig {
            endpoint: format!("{}://{host}:{port}", if tls { "https" } else { "http" }),
            host: host.trim_matches(['[', ']']).to_owned(),
            token: None,
            tls,
            tls_ca: None,
            tls_domain: None,
            tls_client: None,
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        };
        let (mut cert, mut key) = (None, None);
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "token" => cfg.token = Some(Secret::new(v.into_owned())),
                "tls_cert" => cert = Some(PathBuf::from(v.as_ref())),
                "tls_key" => key = Some(PathBuf::from(v.as_ref())),
                "tls_ca" => cfg.tls_ca = Some(PathBuf::from(v.as_ref())),
                "tls_domain" => cfg.tls_domain = Some(v.into_owned()),
                "connect_timeout_ms" => cfg.connect_timeout = parse_millis(NAME, &k, &v)?,
                "max_message_bytes" => cfg.max_message_bytes = parse_count(NAME, &k, &v)?,
                k if switchboard_core::ClientConfig::URL_KEYS.contains(&k) => {}
                other => return Err(unknown_option(NAME, other, KNOWN)),
            }
        }
        match (cert, key) {
            (Some(c), Some(k)) => cfg.tls_client = Some((c, k)),
            (None, None) => {}
            _ => {
                return Err(Error::invalid_config(
                    NAME,
                    "`tls_cert` and `tls_key` go together: give both or neither",
                ));
            }
        }
        if !cfg.tls
            && (cfg.tls_ca.is_some() || cfg.tls_domain.is_some() || cfg.tls_client.is_some())
        {
            return Err(Error::invalid_config(
                NAME,
                "`tls_ca`, `tls_domain`, `tls_cert` and `tls_key` need a `grpcs://` URL",
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> Result<GrpcConfig> {
        GrpcConfig::from_url(&Url::parse(url).expect("url"))
    }

    #[test]
    fn reads_the_url() {
        let c = cfg("grpc://127.0.0.1:50051?token=s3cret&connect_timeout_ms=250&timeout_ms=900")
            .expect("valid");
        assert_eq!(c.endpoint, "http://127.0.0.1:50051");
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.token.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"), "no secret in Debug");
        let s = cfg("grpcs://gw.example:443?tls_domain=gw").expect("valid");
        assert!(s.tls);
        assert_eq!(s.endpoint, "https://gw.example:443");
    }

    #[test]
    fn bad_urls_name_what_is_wrong() {
        for (url, needle) in [
            ("grpc://127.0.0.1", "needs a port"),
            ("grpc://u:p@h:1", "option `token`"),
            ("grpc://h:1?bogus=1", "unknown option `bogus`"),
            ("grpc://h:1?connect_timeout_ms=soon", "connect_timeout_ms"),
            ("grpc://h:1?tls_ca=/x.pem", "grpcs://"),
            ("grpcs://h:1?tls_cert=/c.pem", "go together"),
            ("http://h:1", "expected a `grpc://`"),
        ] {
            let err = cfg(url).expect_err(url);
            assert_eq!(
                err.kind(),
                switchboard_core::ErrorKind::InvalidConfig,
                "{url}"
            );
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }
}
