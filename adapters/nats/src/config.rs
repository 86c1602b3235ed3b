//! `nats://` URLs and the settings they carry.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use switchboard_core::config::{
    Secret, parse_bool, parse_millis, parse_nodes, unknown_option, url_credentials,
};
use switchboard_core::{Error, Result};
use url::Url;

use crate::NAME;

/// How events travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventMode {
    /// JetStream (the default): at-least-once, durable consumer per group, acknowledged after
    /// the handler succeeds, redelivered with backoff, survives a server restart.
    JetStream,
    /// Core NATS queue groups: at-most-once. An event published while a group has no member,
    /// or in flight when a member fails or the connection drops, is gone. No redelivery:
    /// a failed handler's event goes straight to the dead-letter stream. For users who want
    /// raw speed and can lose events.
    Core,
}

/// Settings of the NATS transport, read from
/// `nats://[user:password@]host[:port][?option=value&...]` (or `tls://` for TLS).
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `nodes` | more cluster nodes, `host:port,host:port` | none |
/// | `events` | `jetstream` (at-least-once) or `core` (at-most-once) | `jetstream` |
/// | `prefix` | first token of every subject the transport uses | `sb` |
/// | `stream` | JetStream stream for events | `SWITCHBOARD_EVENTS` |
/// | `dlq_stream` | JetStream stream for dead letters (a work queue: kept until read) | `SWITCHBOARD_DLQ` |
/// | `retention_ms` | how long the event stream keeps an event (read or not) | `86400000` (a day) |
/// | `ack_wait_ms` | how long JetStream waits for an ack before redelivering | `30000` |
/// | `group_idle_ms` | delete a group's durable consumer after it had no member this long | never |
/// | `connect_timeout_ms` | bound on connecting | `5000` |
/// | `token` | token authentication | none |
/// | `creds` | path of a `.creds` file (JWT + nkey) | none |
/// | `tls` | require TLS (`tls://` implies it) | `false` |
/// | `tls_ca` | PEM file of the CA to trust | system roots |
/// | `tls_cert`, `tls_key` | client certificate and key (PEM) for mutual TLS | none |
/// | `name` | connection name shown by the server | `switchboard` |
///
/// Credentials are kept as [`Secret`]s: `Debug` and logs show `***`.
#[non_exhaustive]
#[derive(Clone)]
pub struct NatsConfig {
    /// Server addresses, `host:port`.
    pub servers: Vec<String>,
    /// User name, from the URL's user info.
    pub user: Option<String>,
    /// Password, from the URL's user info.
    pub password: Option<Secret>,
    /// Token (`token=`).
    pub token: Option<Secret>,
    /// Credentials file (`creds=`).
    pub creds: Option<PathBuf>,
    /// Require TLS.
    pub tls: bool,
    /// CA to trust.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
    /// How events travel.
    pub events: EventMode,
    /// First subject token.
    pub prefix: String,
    /// JetStream stream for events.
    pub stream: String,
    /// JetStream stream for dead letters.
    pub dlq_stream: String,
    /// How long the event stream keeps an event, read or not.
    pub retention: Duration,
    /// JetStream ack wait.
    pub ack_wait: Duration,
    /// Inactivity after which a group's durable consumer is deleted by the server.
    pub group_idle: Option<Duration>,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Connection name.
    pub name: String,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("creds", &self.creds)
            .field("tls", &self.tls)
            .field("events", &self.events)
            .field("prefix", &self.prefix)
            .field("stream", &self.stream)
            .field("dlq_stream", &self.dlq_stream)
            .field("retention", &self.retention)
            .field("ack_wait", &self.ack_wait)
            .field("group_idle", &self.group_idle)
            .finish_non_exhaustive()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: vec!["127.0.0.1:4222".to_owned()],
            user: None,
            password: None,
            token: None,
            creds: None,
            tls: false,
            tls_ca: None,
            tls_client: None,
            events: EventMode::JetStream,
            prefix: "sb".to_owned(),
            stream: "SWITCHBOARD_EVENTS".to_owned(),
            dlq_stream: "SWITCHBOARD_DLQ".to_owned(),
            retention: Duration::from_secs(24 * 3600),
            ack_wait: Duration::from_secs(30),
            group_idle: None,
            connect_timeout: Duration::from_secs(5),
            name: "switchboard".to_owned(),
        }
    }
}

const KNOWN: &[&str] = &[
    "nodes",
    "events",
    "prefix",
    "stream",
    "dlq_stream",
    "retention_ms",
    "ack_wait_ms",
    "group_idle_ms",
    "connect_timeout_ms",
    "token",
    "creds",
    "tls",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "name",
];

impl NatsConfig {
    /// Reads a `nats://` or `tls://` URL.
    ///
    /// # Errors
    /// `InvalidConfig` naming the scheme, option or value that is wrong.
    pub fn from_url(url: &Url) -> Result<Self> {
        let mut cfg = NatsConfig::default();
        match url.scheme() {
            "nats" => {}
            "tls" => cfg.tls = true,
            other => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("expected a `nats://` or `tls://` URL, got scheme `{other}`"),
                ));
            }
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("127.0.0.1");
        cfg.servers = vec![format!("{host}:{}", url.port().unwrap_or(4222))];
        if let Some((user, password)) = url_credentials(url) {
            cfg.user = Some(user);
            cfg.password = Some(password);
        }
        let mut cert = None;
        let mut key = None;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "nodes" => cfg.servers.extend(parse_nodes(NAME, &v)?),
                "events" => {
                    cfg.events = match v.as_ref() {
                        "jetstream" => EventMode::JetStream,
                        "core" => EventMode::Core,
                        other => {
                            return Err(Error::invalid_config(
                                NAME,
                                format!("`events` must be `jetstream` or `core`, got `{other}`"),
                            ));
                        }
                    }
                }
                "prefix" => cfg.prefix = token(&k, &v)?,
                "stream" => cfg.stream = token(&k, &v)?,
                "dlq_stream" => cfg.dlq_stream = token(&k, &v)?,
                "retention_ms" => cfg.retention = parse_millis(NAME, &k, &v)?,
                "ack_wait_ms" => cfg.ack_wait = parse_millis(NAME, &k, &v)?,
                "group_idle_ms" => cfg.group_idle = Some(parse_millis(NAME, &k, &v)?),
                "connect_timeout_ms" => cfg.connect_timeout = parse_millis(NAME, &k, &v)?,
                "token" => cfg.token = Some(Secret::new(v.into_owned())),
                "creds" => cfg.creds = Some(PathBuf::from(v.as_ref())),
                "tls" => cfg.tls = cfg.tls || parse_bool(NAME, &k, &v)?,
                "tls_ca" => cfg.tls_ca = Some(PathBuf::from(v.as_ref())),
                "tls_cert" => cert = Some(PathBuf::from(v.as_ref())),
                "tls_key" => key = Some(PathBuf::from(v.as_ref())),
                "name" => cfg.name = v.into_owned(),
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
        Ok(cfg)
    }

    /// Subject events on `pattern` are published to.
    pub(crate) fn event_subject(&self, pattern: &str) -> String {
        self.subject(".evt.", pattern)
    }

    /// Subject requests to `pattern` are published to.
    pub(crate) fn request_subject(&self, pattern: &str) -> String {
        self.subject(".req.", pattern)
    }

    /// Subject dead letters of `pattern` are kept under.
    pub(crate) fn dead_letter_subject(&self, pattern: &str) -> String {
        self.subject(".dlq.", pattern)
    }

    /// `<prefix><kind><pattern>`, built in one exact allocation (one per message: no
    /// formatting machinery).
    fn subject(&self, kind: &str, pattern: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + kind.len() + pattern.len());
        s.push_str(&self.prefix);
        s.push_str(kind);
        s.push_str(pattern);
        s
    }
}

/// A subject token or stream name: letters, digits, `-`, `_`.
fn token(key: &str, value: &str) -> Result<String> {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(value.to_owned())
    } else {
        Err(Error::invalid_config(
            NAME,
            format!("`{key}` must be letters, digits, `-` or `_`, got `{value}`"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NatsConfig> {
        NatsConfig::from_url(&Url::parse(s).expect("url"))
    }

    #[test]
    fn reads_nodes_credentials_and_options() {
        let c = parse("nats://ada:s%40cret@10.0.0.1:4223?nodes=10.0.0.2:4222,10.0.0.3:4222&events=core&ack_wait_ms=500&timeout_ms=100")
            .expect("parses");
        assert_eq!(
            c.servers,
            ["10.0.0.1:4223", "10.0.0.2:4222", "10.0.0.3:4222"]
        );
        assert_eq!(c.user.as_deref(), Some("ada"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(c.events, EventMode::Core);
        assert_eq!(c.ack_wait, Duration::from_millis(500));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s@cret") && shown.contains("***"),
            "{shown}"
        );
    }

    #[test]
    fn tls_scheme_and_defaults() {
        let c = parse("tls://nats.example").expect("parses");
        assert!(c.tls);
        assert_eq!(c.servers, ["nats.example:4222"]);
        assert_eq!(c.events, EventMode::JetStream);
        let c = parse("nats://").expect("parses");
        assert_eq!(c.servers, ["127.0.0.1:4222"]);
    }

    #[test]
    fn bad_options_are_named() {
        for (url, needle) in [
            ("nats://h?events=sometimes", "`events`"),
            ("nats://h?bogus=1", "unknown option `bogus`"),
            ("nats://h?prefix=a.b", "`prefix`"),
            ("nats://h?tls_cert=a.pem", "`tls_cert` and `tls_key`"),
            ("nats://h?nodes=nats://x:1", "`nodes`"),
            ("nats://h?ack_wait_ms=soon", "`ack_wait_ms`"),
            ("amqp://h", "expected a `nats://`"),
        ] {
            let e = parse(url).expect_err(url);
            assert_eq!(e.kind(), switchboard_core::ErrorKind::InvalidConfig);
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
    }
}
