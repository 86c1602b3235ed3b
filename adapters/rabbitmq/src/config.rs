//! `amqp://` URLs and the settings they carry.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use switchboard_core::config::{
    Secret, parse_count, parse_millis, parse_nodes, percent_decode, unknown_option, url_credentials,
};
use switchboard_core::{Error, Result};
use url::Url;

use crate::NAME;

/// The kind of queue each consumer group gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Quorum queues (the default): replicated, and the broker counts deliveries
    /// (`x-delivery-count`), so attempts survive a consumer crash.
    Quorum,
    /// Classic durable queues: lighter; attempts are counted from the redelivered flag only
    /// (a redelivered message counts as attempt 2).
    Classic,
}

/// Settings of the RabbitMQ transport, read from
/// `amqp://[user:password@]host[:port][/vhost][?option=value&...]` (`amqps://` for TLS).
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `nodes` | more cluster nodes, `host:port,host:port`, tried in order on (re)connect | none |
/// | `exchange` | topic exchange events are published to | `sb.events` |
/// | `dead_letter_exchange` | direct exchange dead letters go to | `sb.dead-letters` |
/// | `prefix` | first part of every queue name | `sb` |
/// | `queue_type` | `quorum` or `classic`, for group queues | `quorum` |
/// | `heartbeat` | AMQP heartbeat, seconds | `10` |
/// | `connect_timeout_ms` | bound on connecting to one node | `5000` |
/// | `reply_queue_expires_ms` | a client's reply queue is deleted after it is unused this long | `1800000` |
/// | `queue_expires_ms` | group and dead-letter queues are deleted, with what they hold, once unused (not consumed from) this long: for short-lived groups and tests; dead letters nobody reads within it are lost | never |
/// | `max_payload` | largest payload accepted, bytes | `8388608` |
/// | `tls_ca` | PEM file of the CA to trust (`amqps://`) | system roots |
/// | `name` | connection name shown by the broker | `switchboard` |
///
/// The password is kept as a [`Secret`]: `Debug` and logs show `***`.
#[non_exhaustive]
#[derive(Clone)]
pub struct RabbitConfig {
    /// `amqps://`.
    pub tls: bool,
    /// Nodes, `host:port`, first the URL's own.
    pub nodes: Vec<String>,
    /// User name (default `guest`).
    pub user: String,
    /// Password (default `guest`).
    pub password: Secret,
    /// Virtual host (default `/`).
    pub vhost: String,
    /// Event exchange.
    pub exchange: String,
    /// Dead-letter exchange.
    pub dead_letter_exchange: String,
    /// Queue name prefix.
    pub prefix: String,
    /// Group queue type.
    pub queue_type: QueueType,
    /// Heartbeat, seconds.
    pub heartbeat: u16,
    /// Bound on connecting to one node.
    pub connect_timeout: Duration,
    /// Idle time after which the broker deletes a client's reply queue.
    pub reply_queue_expires: Duration,
    /// Idle time after which the broker deletes a group or dead-letter queue, and what it
    /// holds (`x-expires`); `None`, the default, keeps them until deleted by hand.
    pub queue_expires: Option<Duration>,
    /// Largest payload accepted.
    pub max_payload: usize,
    /// CA to trust.
    pub tls_ca: Option<PathBuf>,
    /// Connection name.
    pub name: String,
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("tls", &self.tls)
            .field("nodes", &self.nodes)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("vhost", &self.vhost)
            .field("exchange", &self.exchange)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("queue_type", &self.queue_type)
            .field("queue_expires", &self.queue_expires)
            .finish_non_exhaustive()
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        RabbitConfig {
            tls: false,
            nodes: vec!["127.0.0.1:5672".to_owned()],
            user: "guest".to_owned(),
            password: Secret::new("guest"),
            vhost: "/".to_owned(),
            exchange: "sb.events".to_owned(),
            dead_letter_exchange: "sb.dead-letters".to_owned(),
            prefix: "sb".to_owned(),
            queue_type: QueueType::Quorum,
            heartbeat: 10,
            connect_timeout: Duration::from_secs(5),
            reply_queue_expires: Duration::from_secs(30 * 60),
            queue_expires: None,
            max_payload: 8 * 1024 * 1024,
            tls_ca: None,
            name: "switchboard".to_owned(),
        }
    }
}

const KNOWN: &[&str] = &[
    "nodes",
    "exchange",
    "dead_letter_exchange",
    "prefix",
    "queue_type",
    "heartbeat",
    "connect_timeout_ms",
    "reply_queue_expires_ms",
    "queue_expires_ms",
    "max_payload",
    "tls_ca",
    "name",
];

impl RabbitConfig {
    /// Reads an `amqp://` or `amqps://` URL.
    ///
    /// # Errors
    /// `InvalidConfig` naming the scheme, option or value that is wrong.
    pub fn from_url(url: &Url) -> Result<Self> {
        let mut cfg = RabbitConfig::default();
        let default_port = match url.scheme() {
            "amqp" => 5672,
            "amqps" => {
                cfg.tls = true;
                5671
            }
            other => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("expected an `amqp://` or `amqps://` URL, got scheme `{other}`"),
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("127.0.0.1");
        cfg.nodes = vec![format!("{host}:{}", url.port().unwrap_or(default_port))];
        if let Some((user, password)) = url_credentials(url) {
            cfg.user = user;
            cfg.password = password;
        }
        let path = url.path().trim_start_matches('/');
        if !path.is_empty() {
            cfg.vhost = percent_decode(path);
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "nodes" => cfg.nodes.extend(parse_nodes(NAME, &v)?),
                "exchange" => cfg.exchange = name(&k, &v)?,
                "dead_letter_exchange" => cfg.dead_letter_exchange = name(&k, &v)?,
                "prefix" => cfg.prefix = name(&k, &v)?,
                "queue_type" => {
                    cfg.queue_type = match v.as_ref() {
                        "quorum" => QueueType::Quorum,
                        "classic" => QueueType::Classic,
                        other => {
                            return Err(Error::invalid_config(
                                NAME,
                                format!(
                                    "`queue_type` must be `quorum` or `classic`, got `{other}`"
                                ),
                            ));
                        }
                    }
                }
                "heartbeat" => {
                    cfg.heartbeat = v.parse().map_err(|_| {
                        Error::invalid_config(
                            NAME,
                            format!("`heartbeat` must be a number of seconds (0-65535), got `{v}`"),
                        )
                    })?
                }
                "connect_timeout_ms" => cfg.connect_timeout = parse_millis(NAME, &k, &v)?,
                "reply_queue_expires_ms" => cfg.reply_queue_expires = parse_millis(NAME, &k, &v)?,
                "queue_expires_ms" => cfg.queue_expires = Some(parse_millis(NAME, &k, &v)?),
                "max_payload" => cfg.max_payload = parse_count(NAME, &k, &v)?,
                "tls_ca" => cfg.tls_ca = Some(PathBuf::from(v.as_ref())),
                "name" => cfg.name = v.into_owned(),
                k if switchboard_core::ClientConfig::URL_KEYS.contains(&k) => {}
                other => return Err(unknown_option(NAME, other, KNOWN)),
            }
        }
        Ok(cfg)
    }

    /// The AMQP URI lapin connects with for node `i`: credentials included, so it is never
    /// logged.
    pub(crate) fn uri(&self, node: &str) -> String {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        format!(
            "{}://{}:{}@{node}/{}?heartbeat={}&connection_timeout={}",
            if self.tls { "amqps" } else { "amqp" },
            enc(&self.user),
            enc(self.password.expose()),
            enc(&self.vhost),
            self.heartbeat,
            self.connect_timeout.as_millis()
        )
    }
}

/// An exchange or queue-name part: letters, digits, `-`, `_`, `.`.
fn name(key: &str, value: &str) -> Result<String> {
    if !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(value.to_owned())
    } else {
        Err(Error::invalid_config(
            NAME,
            format!("`{key}` must be up to 64 letters, digits, `-`, `_` or `.`, got `{value}`"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<RabbitConfig> {
        RabbitConfig::from_url(&Url::parse(s).expect("url"))
    }

    #[test]
    fn reads_credentials_vhost_nodes_and_options() {
        let c = parse(
            "amqps://ada:p%40ss@mq1:5673/orders?nodes=mq2:5671&queue_type=classic&timeout_ms=50&queue_expires_ms=60000",
        )
        .expect("parses");
        assert!(c.tls);
        assert_eq!(c.nodes, ["mq1:5673", "mq2:5671"]);
        assert_eq!(c.user, "ada");
        assert_eq!(c.password.expose(), "p@ss");
        assert_eq!(c.vhost, "orders");
        assert_eq!(c.queue_type, QueueType::Classic);
        assert_eq!(c.queue_expires, Some(Duration::from_secs(60)));
        let shown = format!("{c:?}");
        assert!(!shown.contains("p@ss") && shown.contains("***"), "{shown}");
        assert!(
            c.uri("mq1:5673")
                .starts_with("amqps://ada:p%40ss@mq1:5673/orders?")
        );
    }

    #[test]
    fn defaults() {
        let c = parse("amqp://").expect("parses");
        assert_eq!(c.nodes, ["127.0.0.1:5672"]);
        assert_eq!(c.user, "guest");
        assert_eq!(c.vhost, "/");
        assert_eq!(c.queue_expires, None);
        assert!(c.uri("h:1").contains("@h:1/%2F?"));
    }

    #[test]
    fn bad_options_are_named() {
        for (url, needle) in [
            ("amqp://h?queue_type=fast", "`queue_type`"),
            ("amqp://h?bogus=1", "unknown option `bogus`"),
            ("amqp://h?exchange=a%20b", "`exchange`"),
            ("amqp://h?heartbeat=-1", "`heartbeat`"),
            ("amqp://h?nodes=amqp://x", "`nodes`"),
            ("nats://h", "expected an `amqp://`"),
        ] {
            let e = parse(url).expect_err(url);
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
    }
}
