//! `kafka://` URLs and the settings they carry.

use std::fmt;
use std::time::Duration;

use switchboard_core::config::{
    Secret, parse_count, parse_millis, parse_nodes, unknown_option, url_credentials,
};
use switchboard_core::{Error, Result};
use url::Url;

use crate::NAME;

/// Settings of the Kafka transport, read from
/// `kafka://[user:password@]host[:port][?option=value&...]`.
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `nodes` | more bootstrap brokers, `host:port,host:port` | none |
/// | `prefix` | first part of every topic and group name the transport uses | `sb` |
/// | `partitions` | partitions of the topics the transport creates | `3` |
/// | `replication` | replication factor of the topics the transport creates | `1` |
/// | `fetch_wait_ms` | longest a fetch waits for records (`fetch.wait.max.ms`) | `100` |
/// | `commit_interval_ms` | how often handled offsets are committed | `200` |
/// | `linger_ms` | how long the producer waits to fill a batch (`linger.ms`) | `5` |
/// | `batch_records` | most records in one produce batch (`batch.num.messages`) | `10000` |
/// | `publish_timeout_ms` | longest the producer keeps a record it could not deliver (`message.timeout.ms`); a publish with a shorter deadline gives up at its deadline | `30000` |
/// | `security_protocol` | `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` | `plaintext`, or `sasl_plaintext` with credentials |
/// | `sasl_mechanism` | `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` | `PLAIN` |
/// | `ssl_ca` | PEM file of the CA to trust | system roots |
/// | `connect_timeout_ms` | bound on the first metadata request | `5000` |
/// | `client_id` | client id shown by the broker | `switchboard` |
///
/// The URL's user info is the SASL user name and password. Credentials are kept as
/// [`Secret`]s: `Debug` and logs show `***`. librdkafka is built with the system's OpenSSL, so
/// `ssl`, `sasl_ssl` and the SCRAM mechanisms work; refused credentials fail `connect` with
/// `Unauthenticated`.
#[non_exhaustive]
#[derive(Clone)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// SASL user name.
    pub user: Option<String>,
    /// SASL password.
    pub password: Option<Secret>,
    /// `security.protocol`.
    pub security_protocol: String,
    /// `sasl.mechanism`.
    pub sasl_mechanism: String,
    /// CA file.
    pub ssl_ca: Option<String>,
    /// Topic and group name prefix.
    pub prefix: String,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication: i32,
    /// `fetch.wait.max.ms`.
    pub fetch_wait: Duration,
    /// Offset commit interval.
    pub commit_interval: Duration,
    /// `linger.ms` of the producer.
    pub linger: Duration,
    /// `batch.num.messages` of the producer.
    pub batch_records: usize,
    /// `message.timeout.ms` of the producer: the longest a publish waits.
    pub publish_timeout: Duration,
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// `client.id`.
    pub client_id: String,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("fetch_wait", &self.fetch_wait)
            .field("linger", &self.linger)
            .field("batch_records", &self.batch_records)
            .field("publish_timeout", &self.publish_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            user: None,
            password: None,
            security_protocol: "plaintext".to_owned(),
            sasl_mechanism: "PLAIN".to_owned(),
            ssl_ca: None,
            prefix: "sb".to_owned(),
            partitions: 3,
            replication: 1,
            fetch_wait: Duration::from_millis(100),
            commit_interval: Duration::from_millis(200),
            linger: Duration::from_millis(5),
            batch_records: 10_000,
            publish_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            client_id: "switchboard".to_owned(),
        }
    }
}

const KNOWN: &[&str] = &[
    "nodes",
    "prefix",
    "partitions",
    "replication",
    "fetch_wait_ms",
    "commit_interval_ms",
    "linger_ms",
    "batch_records",
    "publish_timeout_ms",
    "security_protocol",
    "sasl_mechanism",
    "ssl_ca",
    "connect_timeout_ms",
    "client_id",
];

impl KafkaConfig {
    /// Reads a `kafka://` URL.
    ///
    /// # Errors
    /// `InvalidConfig` naming the scheme, option or value that is wrong.
    pub fn from_url(url: &Url) -> Result<Self> {
        if url.scheme() != "kafka" {
            return Err(Error::invalid_config(
                NAME,
                format!("expected a `kafka://` URL, got scheme `{}`", url.scheme()),
            ));
        }
        let mut cfg = KafkaConfig::default();
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .unwrap_or("127.0.0.1");
        cfg.brokers = vec![format!("{host}:{}", url.port().unwrap_or(9092))];
        let mut protocol = None;
        if let Some((user, password)) = url_credentials(url) {
            cfg.user = Some(user);
            cfg.password = Some(password);
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "nodes" => cfg.brokers.extend(parse_nodes(NAME, &v)?),
                "prefix" => cfg.prefix = name_part(&k, &v)?,
                "partitions" => cfg.partitions = small_count(&k, &v)?,
                "replication" => cfg.replication = small_count(&k, &v)?,
                "fetch_wait_ms" => cfg.fetch_wait = millis_or_zero(&k, &v)?,
                "commit_interval_ms" => cfg.commit_interval = parse_millis(NAME, &k, &v)?,
                "linger_ms" => cfg.linger = millis_or_zero(&k, &v)?,
                "batch_records" => cfg.batch_records = parse_count(NAME, &k, &v)?.max(1),
                "publish_timeout_ms" => cfg.publish_timeout = parse_millis(NAME, &k, &v)?,
                "security_protocol" => {
                    let p = v.to_ascii_lowercase();
                    if !["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&p.as_str()) {
                        return Err(Error::invalid_config(
                            NAME,
                            format!(
                                "`security_protocol` must be plaintext, ssl, sasl_plaintext or sasl_ssl, got `{v}`"
                            ),
                        ));
                    }
                    protocol = Some(p);
                }
                "sasl_mechanism" => {
                    let m = v.to_ascii_uppercase();
                    if !["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&m.as_str()) {
                        return Err(Error::invalid_config(
                            NAME,
                            format!(
                                "`sasl_mechanism` must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, got `{v}`"
                            ),
                        ));
                    }
                    cfg.sasl_mechanism = m;
                }
                "ssl_ca" => cfg.ssl_ca = Some(v.into_owned()),
                "connect_timeout_ms" => cfg.connect_timeout = parse_millis(NAME, &k, &v)?,
                "client_id" => cfg.client_id = name_part(&k, &v)?,
                k if switchboard_core::ClientConfig::URL_KEYS.contains(&k) => {}
                other => return Err(unknown_option(NAME, other, KNOWN)),
            }
        }
        cfg.security_protocol = match protocol {
            Some(p) => p,
            None if cfg.user.is_some() => "sasl_plaintext".to_owned(),
            None => "plaintext".to_owned(),
        };
        if cfg.security_protocol.starts_with("sasl") && cfg.user.is_none() {
            return Err(Error::invalid_config(
                NAME,
                format!(
                    "`security_protocol={}` needs a user name and password in the URL",
                    cfg.security_protocol
                ),
            ));
        }
        Ok(cfg)
    }

    /// The librdkafka settings every client of this transport shares (brokers, security).
    pub(crate) fn client_config(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", &self.client_id)
            .set("security.protocol", &self.security_protocol)
            .set(
                "socket.connection.setup.timeout.ms",
                self.connect_timeout.as_millis().to_string(),
            );
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            c.set("sasl.mechanism", &self.sasl_mechanism)
                .set("sasl.username", user)
                .set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.ssl_ca {
            c.set("ssl.ca.location", ca);
        }
        c
    }

    /// `<prefix>.<kind>.<pattern>`: the topic of a pattern (kind `evt`, `req` or `dlq`), or a
    /// group or reply topic name.
    pub(crate) fn name(&self, kind: &str, rest: &str) -> String {
        let mut s = String::with_capacity(self.prefix.len() + kind.len() + rest.len() + 2);
        s.push_str(&self.prefix);
        s.push('.');
        s.push_str(kind);
        s.push('.');
        s.push_str(rest);
        s
    }
}

/// A part of a topic name: Kafka allows letters, digits, `.`, `_` and `-`.
fn name_part(key: &str, value: &str) -> Result<String> {
    if !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(value.to_owned())
    } else {
        Err(Error::invalid_config(
            NAME,
            format!("`{key}` must be letters, digits, `.`, `-` or `_`, got `{value}`"),
        ))
    }
}

fn small_count(key: &str, value: &str) -> Result<i32> {
    let n = parse_count(NAME, key, value)?;
    i32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
        Error::invalid_config(NAME, format!("`{key}` must be at least 1, got `{value}`"))
    })
}

fn millis_or_zero(key: &str, value: &str) -> Result<Duration> {
    value
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| {
            Error::invalid_config(
                NAME,
                format!("`{key}` must be a number of milliseconds, got `{value}`"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KafkaConfig> {
        KafkaConfig::from_url(&Url::parse(s).expect("url"))
    }

    #[test]
    fn reads_brokers_credentials_and_options() {
        let c = parse("kafka://ada:s%40cret@10.0.0.1:9093?nodes=10.0.0.2:9092&partitions=6&fetch_wait_ms=0&batch_records=1&publish_timeout_ms=120000&timeout_ms=100")
            .expect("parses");
        assert_eq!(c.brokers, ["10.0.0.1:9093", "10.0.0.2:9092"]);
        assert_eq!(c.user.as_deref(), Some("ada"));
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(c.security_protocol, "sasl_plaintext");
        assert_eq!(c.partitions, 6);
        assert_eq!(c.fetch_wait, Duration::ZERO);
        assert_eq!(c.batch_records, 1);
        assert_eq!(c.publish_timeout, Duration::from_secs(120));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s@cret") && shown.contains("***"),
            "{shown}"
        );
    }

    #[test]
    fn defaults() {
        let c = parse("kafka://").expect("parses");
        assert_eq!(c.brokers, ["127.0.0.1:9092"]);
        assert_eq!(c.security_protocol, "plaintext");
        assert_eq!(c.name("evt", "orders.created"), "sb.evt.orders.created");
    }

    #[test]
    fn bad_options_are_named() {
        for (url, needle) in [
            ("kafka://h?bogus=1", "unknown option `bogus`"),
            ("kafka://h?prefix=a/b", "`prefix`"),
            ("kafka://h?partitions=0", "`partitions`"),
            ("kafka://h?security_protocol=tls", "`security_protocol`"),
            ("kafka://h?security_protocol=sasl_ssl", "needs a user name"),
            ("kafka://h?sasl_mechanism=GSSAPI", "`sasl_mechanism`"),
            ("kafka://h?nodes=kafka://x:1", "`nodes`"),
            ("nats://h", "expected a `kafka://`"),
        ] {
            let e = parse(url).expect_err(url);
            assert_eq!(e.kind(), switchboard_core::ErrorKind::InvalidConfig);
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
    }
}
