//! `sns+sqs://` URLs and the settings they carry, and the names of the topics and queues.

use std::fmt;
use std::time::Duration;

use switchboard_core::config::{
    Secret, parse_bool, parse_count, parse_millis, stable_hash, unknown_option, url_credentials,
};
use switchboard_core::{Error, Result};
use url::Url;

use crate::NAME;

/// Settings of the SNS/SQS transport, read from
/// `sns+sqs://[access_key_id:secret_access_key@][host[:port]][?option=value&...]` (`sqs://` is
/// the same).
///
/// With a host, every SNS and SQS call goes to that endpoint (`http://host:port`, or `https://`
/// with `tls=true`): a local emulator, a VPC endpoint. Without one (`sns+sqs://` or
/// `sns+sqs://aws`), to AWS's own endpoints for the region.
///
/// | option | meaning | default |
/// | --- | --- | --- |
/// | `region` | AWS region | the standard chain (`AWS_REGION`, profile), else `us-east-1` |
/// | `tls` | `https://` to the endpoint given as host | `false` |
/// | `prefix` | first part of every topic and queue name | `sb` |
/// | `wait_s` | long-polling wait of a receive, 0–20 s | `20` |
/// | `visibility_s` | visibility timeout of a received message, s | `30` |
/// | `max_receives` | receives after which SQS moves a message to the queue's dead-letter queue (redrive), a safety net behind the SDK's own dead-lettering | `10` |
/// | `receive_batch` | messages taken per receive, 1–10 | `10` |
/// | `fifo` | FIFO topics and queues, so messages with the same key are handled in order | `false` |
/// | `reply_ttl_s` | a reply queue not seen in use for this long is deleted by other clients (stale reaping) | `3600` |
/// | `connect_timeout_ms` | bound on connecting to the endpoint | `5000` |
///
/// Credentials in the URL are static credentials (access key id and secret); without them the
/// standard AWS chain is used (environment, profile, web identity, instance metadata). The
/// secret is kept as a [`Secret`]: `Debug` and logs show `***`.
#[non_exhaustive]
#[derive(Clone)]
pub struct SnsSqsConfig {
    /// The endpoint every call goes to (`http://host:port`), or `None` for AWS's own.
    pub endpoint: Option<String>,
    /// Region; `None` leaves it to the standard chain.
    pub region: Option<String>,
    /// Access key id of static credentials.
    pub access_key_id: Option<String>,
    /// Secret access key of static credentials.
    pub secret_access_key: Option<Secret>,
    /// Topic and queue name prefix.
    pub prefix: String,
    /// Long-polling wait.
    pub wait: Duration,
    /// Visibility timeout.
    pub visibility: Duration,
    /// Redrive `maxReceiveCount`.
    pub max_receives: u32,
    /// Messages per receive.
    pub receive_batch: i32,
    /// FIFO topics and queues.
    pub fifo: bool,
    /// Age after which an unused reply queue is reaped.
    pub reply_ttl: Duration,
    /// Bound on connecting.
    pub connect_timeout: Duration,
}

impl fmt::Debug for SnsSqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnsSqsConfig")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("prefix", &self.prefix)
            .field("wait", &self.wait)
            .field("visibility", &self.visibility)
            .field("max_receives", &self.max_receives)
            .field("fifo", &self.fifo)
            .finish_non_exhaustive()
    }
}

impl Default for SnsSqsConfig {
    fn default() -> Self {
        SnsSqsConfig {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            prefix: "sb".to_owned(),
            wait: Duration::from_secs(20),
            visibility: Duration::from_secs(30),
            max_receives: 10,
            receive_batch: 10,
            fifo: false,
            reply_ttl: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

const KNOWN: &[&str] = &[
    "region",
    "tls",
    "prefix",
    "wait_s",
    "visibility_s",
    "max_receives",
    "receive_batch",
    "fifo",
    "reply_ttl_s",
    "connect_timeout_ms",
];

/// The longest SQS queue name.
const MAX_QUEUE_NAME: usize = 80;

/// What a topic or queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The SNS topic of an event pattern.
    Events,
    /// The SQS queue of one group's events of a pattern.
    Group,
    /// The SQS queue of a request pattern.
    Requests,
    /// The SQS queue of a pattern's dead letters (also the redrive target of its other
    /// queues).
    DeadLetters,
    /// A client's reply queue.
    Replies,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Kind::Events => "evt",
            Kind::Group => "grp",
            Kind::Requests => "req",
            Kind::DeadLetters => "dlq",
            Kind::Replies => "reply",
        }
    }
}

impl SnsSqsConfig {
    /// Reads a `sns+sqs://` (or `sqs://`) URL.
    ///
    /// # Errors
    /// `InvalidConfig` naming the scheme, option or value that is wrong.
    pub fn from_url(url: &Url) -> Result<Self> {
        if !crate::SCHEMES.contains(&url.scheme()) {
            return Err(Error::invalid_config(
                NAME,
                format!(
                    "expected a `sns+sqs://` or `sqs://` URL, got scheme `{}`",
                    url.scheme()
                ),
            ));
        }
        let mut cfg = SnsSqsConfig::default();
        if let Some((user, secret)) = url_credentials(url) {
            cfg.access_key_id = Some(user);
            cfg.secret_access_key = Some(secret);
        }
        let mut tls = false;
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "region" => cfg.region = Some(region(&v)?),
                "tls" => tls = parse_bool(NAME, &k, &v)?,
                "prefix" => cfg.prefix = prefix(&v)?,
                "wait_s" => {
                    let s = parse_count(NAME, &k, &v)?;
                    if s > 20 {
                        return Err(Error::invalid_config(
                            NAME,
                            format!("`wait_s` is at most 20 (SQS's longest poll), got `{v}`"),
                        ));
                    }
                    cfg.wait = Duration::from_secs(s as u64);
                }
                "visibility_s" => cfg.visibility = seconds(&k, &v, 1, 43_200)?,
                "max_receives" => cfg.max_receives = bounded(&k, &v, 1, 1000)?,
                "receive_batch" => cfg.receive_batch = bounded(&k, &v, 1, 10)? as i32,
                "fifo" => cfg.fifo = parse_bool(NAME, &k, &v)?,
                "reply_ttl_s" => cfg.reply_ttl = seconds(&k, &v, 60, u32::MAX)?,
                "connect_timeout_ms" => cfg.connect_timeout = parse_millis(NAME, &k, &v)?,
                k if switchboard_core::ClientConfig::URL_KEYS.contains(&k) => {}
                other => return Err(unknown_option(NAME, other, KNOWN)),
            }
        }
        cfg.endpoint = match url.host_str() {
            None | Some("") | Some("aws") => None,
            Some(host) => {
                let scheme = if tls { "https" } else { "http" };
                Some(match url.port() {
                    Some(p) => format!("{scheme}://{host}:{p}"),
                    None => format!("{scheme}://{host}"),
                })
            }
        };
        Ok(cfg)
    }

    /// The AWS SDK settings these options make: region, endpoint, credentials (static, or the
    /// standard chain), connect timeout, and an HTTPS client on rustls with ring (as every other
    /// TLS client of the project: aws-lc-rs beside ring leaves rustls without a process
    /// default). For `aws_sdk_sqs::Client::new` and `aws_sdk_sns::Client::new`, also outside
    /// the transport (tests, benchmarks).
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        use aws_config::{BehaviorVersion, Region};
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(self.connect_timeout)
                .build(),
        );
        match (&self.region, &self.endpoint) {
            (Some(r), _) => loader = loader.region(Region::new(r.clone())),
            // A local endpoint: no region lookup (it could ask instance metadata).
            (None, Some(_)) => loader = loader.region(Region::new("us-east-1")),
            (None, None) => {}
        }
        if let Some(e) = &self.endpoint {
            loader = loader.endpoint_url(e);
        }
        if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
            loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
                id,
                secret.expose(),
                None,
                None,
                "switchboard URL",
            ));
        }
        let https = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        loader.http_client(https).load().await
    }

    /// The name of the topic or queue of `kind` for `pattern` (a group queue: `pattern` and
    /// `group`; a reply queue: the client's name). SNS and SQS allow only letters, digits, `-`
    /// and `_` (queues: at most 80), so the readable part keeps those and writes `.` as `_`,
    /// and a hash of the exact pattern (and group) keeps two names from meeting; FIFO names
    /// end in `.fifo`.
    pub fn name(&self, kind: Kind, pattern: &str, group: Option<&str>) -> String {
        let hash = match group {
            Some(g) => stable_hash(&[kind.tag(), pattern, g]),
            None => stable_hash(&[kind.tag(), pattern]),
        };
        let suffix = if self.fifo && kind != Kind::Replies {
            ".fifo"
        } else {
            ""
        };
        let mut readable: String = match group {
            Some(g) => format!("{pattern}-{g}"),
            None => pattern.to_owned(),
        }
        .chars()
        .map(|c| if c == '.' { '_' } else { c })
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
        let fixed = self.prefix.len() + kind.tag().len() + 2 + 1 + 8 + suffix.len();
        readable.truncate(MAX_QUEUE_NAME.saturating_sub(fixed));
        format!(
            "{}-{}-{readable}-{:08x}{suffix}",
            self.prefix,
            kind.tag(),
            hash as u32
        )
    }
}

fn region(v: &str) -> Result<String> {
    if !v.is_empty()
        && v.len() <= 32
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        Ok(v.to_owned())
    } else {
        Err(Error::invalid_config(
            NAME,
            format!("`region` must look like `us-east-1`, got `{v}`"),
        ))
    }
}

/// A name prefix: letters, digits, `-` and `_`, short enough to leave room for the rest.
fn prefix(v: &str) -> Result<String> {
    if !v.is_empty()
        && v.len() <= 20
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        Ok(v.to_owned())
    } else {
        Err(Error::invalid_config(
            NAME,
            format!("`prefix` must be 1–20 letters, digits, `-` or `_`, got `{v}`"),
        ))
    }
}

fn bounded(key: &str, v: &str, lo: u32, hi: u32) -> Result<u32> {
    let n = parse_count(NAME, key, v)?;
    u32::try_from(n)
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| {
            Error::invalid_config(
                NAME,
                format!("`{key}` must be between {lo} and {hi}, got `{v}`"),
            )
        })
}

fn seconds(key: &str, v: &str, lo: u32, hi: u32) -> Result<Duration> {
    bounded(key, v, lo, hi).map(|s| Duration::from_secs(u64::from(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::ErrorKind;

    fn parse(s: &str) -> Result<SnsSqsConfig> {
        SnsSqsConfig::from_url(&Url::parse(s).expect("url"))
    }

    #[test]
    fn reads_endpoint_credentials_and_options() {
        let c = parse("sns+sqs://AKIDEXAMPLE:s%2Fcret@127.0.0.1:4566?region=eu-west-1&wait_s=1&visibility_s=5&max_receives=3&fifo=true&timeout_ms=100")
            .expect("parses");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.access_key_id.as_deref(), Some("AKIDEXAMPLE"));
        assert_eq!(
            c.secret_access_key.as_ref().map(Secret::expose),
            Some("s/cret")
        );
        assert_eq!(c.wait, Duration::from_secs(1));
        assert_eq!(c.visibility, Duration::from_secs(5));
        assert_eq!(c.max_receives, 3);
        assert!(c.fifo);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s/cret") && shown.contains("***"),
            "{shown}"
        );
    }

    #[test]
    fn without_a_host_it_is_aws_itself() {
        for url in ["sns+sqs://", "sqs://aws?region=us-west-2"] {
            let c = parse(url).expect(url);
            assert_eq!(c.endpoint, None, "{url}");
            assert_eq!(c.access_key_id, None, "{url}");
        }
        let c = parse("sqs://vpce.example:443?tls=true").expect("tls endpoint");
        assert_eq!(c.endpoint.as_deref(), Some("https://vpce.example:443"));
    }

    #[test]
    fn names_are_valid_distinct_and_bounded() {
        let c = SnsSqsConfig::default();
        let a = c.name(Kind::Group, "orders.placed", Some("billing"));
        let b = c.name(Kind::Group, "orders_placed", Some("billing"));
        assert!(a.starts_with("sb-grp-orders_placed-billing-"), "{a}");
        assert_ne!(a, b, "`.` and `_` patterns do not meet");
        assert_ne!(
            c.name(Kind::Requests, "a.b", None),
            c.name(Kind::DeadLetters, "a.b", None)
        );
        let long = "x".repeat(200);
        let fifo = SnsSqsConfig {
            fifo: true,
            ..SnsSqsConfig::default()
        };
        for name in [
            c.name(Kind::Group, &long, Some(&long)),
            fifo.name(Kind::Group, &long, Some("g")),
            fifo.name(Kind::Replies, "client-1", None),
        ] {
            assert!(name.len() <= MAX_QUEUE_NAME, "{name}: {}", name.len());
            let stem = name.strip_suffix(".fifo").unwrap_or(&name);
            assert!(
                stem.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_')),
                "{name}"
            );
        }
        assert!(fifo.name(Kind::Events, "a.b", None).ends_with(".fifo"));
        assert!(!fifo.name(Kind::Replies, "c", None).ends_with(".fifo"));
    }

    #[test]
    fn bad_options_are_named() {
        for (url, needle) in [
            ("sqs://h?bogus=1", "unknown option `bogus`"),
            ("sqs://h?region=US_EAST", "`region`"),
            ("sqs://h?prefix=a.b", "`prefix`"),
            ("sqs://h?wait_s=21", "`wait_s`"),
            ("sqs://h?receive_batch=11", "`receive_batch`"),
            ("sqs://h?max_receives=0", "`max_receives`"),
            ("sqs://h?fifo=maybe", "`fifo`"),
            ("kafka://h", "expected a `sns+sqs://`"),
        ] {
            let e = parse(url).expect_err(url);
            assert_eq!(e.kind(), ErrorKind::InvalidConfig);
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
    }
}
