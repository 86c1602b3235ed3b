//! Helpers for adapters reading their configuration from a URL: typed option parsing with
//! errors that name the option, and [`Secret`], a string that never shows in logs or `Debug`.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};

/// A credential (password, token). Its `Debug` and `Display` print `***`; only
/// [`Secret::expose`] gives the value, at the one place that hands it to the broker client.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Parses option `key` as a positive number of milliseconds.
///
/// # Errors
/// `InvalidConfig` naming the option and the value.
pub fn parse_millis(adapter: &'static str, key: &str, value: &str) -> Result<Duration> {
    value
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| {
            Error::invalid_config(
                adapter,
                format!("`{key}` must be a positive number of milliseconds, got `{value}`"),
            )
        })
}

/// Parses option `key` as a positive integer.
///
/// # Errors
/// `InvalidConfig` naming the option and the value.
pub fn parse_count(adapter: &'static str, key: &str, value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            Error::invalid_config(
                adapter,
                format!("`{key}` must be a positive integer, got `{value}`"),
            )
        })
}

/// Parses option `key` as a boolean (`true`/`false`, `1`/`0`).
///
/// # Errors
/// `InvalidConfig` naming the option and the value.
pub fn parse_bool(adapter: &'static str, key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(Error::invalid_config(
            adapter,
            format!("`{key}` must be true or false, got `{value}`"),
        )),
    }
}

/// Decodes `%XX` escapes (as in a URL's user name or password); `+` stays `+`. A malformed
/// escape is kept as written.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The user name and password of a URL, decoded; `None` without a user name.
pub fn url_credentials(url: &url::Url) -> Option<(String, Secret)> {
    if url.username().is_empty() {
        return None;
    }
    Some((
        percent_decode(url.username()),
        Secret::new(url.password().map(percent_decode).unwrap_or_default()),
    ))
}

/// Parses option `nodes`: more cluster nodes, `host:port` separated by commas.
///
/// # Errors
/// `InvalidConfig` for an entry with a scheme, credentials or a path.
pub fn parse_nodes(adapter: &'static str, value: &str) -> Result<Vec<String>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|node| {
            if node.contains("://") || node.contains('@') || node.contains('/') {
                Err(Error::invalid_config(
                    adapter,
                    format!("`nodes` takes `host:port` entries separated by commas, got `{node}`"),
                ))
            } else {
                Ok(node.to_owned())
            }
        })
        .collect()
}

/// A hash of `parts` that is the same in every process and release (FNV-1a, parts separated),
/// for broker object names that must be unique and stable: queue and consumer names.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        let sep = (i > 0).then_some(0u8);
        for b in sep.into_iter().chain(part.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The error for an option an adapter does not know; `known` lists the ones it does.
pub fn unknown_option(adapter: &'static str, key: &str, known: &[&str]) -> Error {
    Error::invalid_config(
        adapter,
        format!(
            "unknown option `{key}` in {adapter} URL (known: {}, {})",
            known.join(", "),
            crate::ClientConfig::URL_KEYS.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn options_parse_or_name_themselves() {
        assert_eq!(
            parse_millis("x", "ack_wait_ms", "250").expect("ms"),
            Duration::from_millis(250)
        );
        let e = parse_millis("x", "ack_wait_ms", "0").expect_err("zero");
        assert!(e.to_string().contains("ack_wait_ms"), "{e}");
        assert!(parse_count("x", "n", "-1").is_err());
        assert!(parse_bool("x", "tls", "maybe").is_err());
        assert!(parse_bool("x", "tls", "true").expect("bool"));
    }

    #[test]
    fn stable_hash_separates_parts() {
        assert_eq!(stable_hash(&["a", "b"]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["a.b", ""]), stable_hash(&["a", "b"]));
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
    }

    #[test]
    fn credentials_and_nodes() {
        assert_eq!(percent_decode("p%40ss+word%2"), "p@ss+word%2");
        let url = url::Url::parse("nats://ada:s%2Fcr+t@h").expect("url");
        let (user, pass) = url_credentials(&url).expect("credentials");
        assert_eq!((user.as_str(), pass.expose()), ("ada", "s/cr+t"));
        assert_eq!(
            parse_nodes("x", "a:1, b:2,").expect("nodes"),
            ["a:1", "b:2"]
        );
        assert!(parse_nodes("x", "nats://a:1").is_err());
    }
}
