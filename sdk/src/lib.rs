//! # switchboard
//!
//! Services talk to each other the same way whatever carries the message. Three calls:
//!
//! - [`Client::send`]: request-response; waits for the reply, always bounded by a deadline
//!   (default 5 s) that travels with the request.
//! - [`Client::emit`]: a fire-and-forget event; every consumer group gets it, one member per
//!   group handles it.
//! - [`Client::request`]: async request-reply; returns at once with a handle carrying the
//!   correlation id, awaited now or later (or replies taken as a [`ReplyStream`]).
//!
//! and two ways to serve: [`Client::handle`] for requests, [`Client::on_event`] for events.
//!
//! The transport is picked at run time by the URL given to [`connect`]. Service code does not
//! change when the broker does.
//!
//! | scheme | transport | cargo feature | status |
//! | --- | --- | --- | --- |
//! | `memory://[bus]` | in-process, broker semantics | always on | available |
//! | `grpc://host:port`, `grpcs://` | direct gRPC, or the gateway | `grpc` | available |
//! | `nats://host:port`, `tls://` | NATS + JetStream | `nats` | available |
//! | `amqp://`, `amqps://` | RabbitMQ | `rabbitmq` | available |
//! | `kafka://host:port` | Kafka API | `kafka` | available |
//! | `sns+sqs://`, `sqs://` | SNS/SQS | `sns-sqs` | available |
//!
//! ## Quick start
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchboard::HandlerError;
//!
//! #[derive(Serialize, Deserialize)]
//! struct GetUser { id: u64 }
//! #[derive(Serialize, Deserialize)]
//! struct User { id: u64, name: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchboard::Result<()> {
//! let users = switchboard::connect("memory://facade-doc").await?;
//! users
//!     .handle("users.get", |req: GetUser, _ctx| async move {
//!         Ok::<_, HandlerError>(User { id: req.id, name: "Ada".into() })
//!     })
//!     .await?;
//!
//! let web = switchboard::connect("memory://facade-doc?timeout_ms=500").await?;
//! let user: User = web.send("users.get", &GetUser { id: 1 }).await?;
//! assert_eq!(user.name, "Ada");
//! # users.shutdown().await?;
//! # Ok(()) }
//! ```

pub use switchboard_core::*;

/// Caller-side policies around `send` and `request`: timeout, retry, circuit breaker,
/// bulkhead, load shedding, fallback (docs/resilience.md).
pub use switchboard_resilience as resilience;

/// The RabbitMQ transport (feature `rabbitmq`).
#[cfg(feature = "rabbitmq")]
pub use switchboard_rabbitmq as rabbitmq;

/// The gRPC transport and server (feature `grpc`).
#[cfg(feature = "grpc")]
pub use switchboard_grpc as grpc;

/// The Kafka transport (feature `kafka`).
#[cfg(feature = "kafka")]
pub use switchboard_kafka as kafka;

/// The SNS/SQS transport (feature `sns-sqs`, in progress).
#[cfg(feature = "sns-sqs")]
pub use switchboard_sns_sqs as sns_sqs;

/// The NATS transport (feature `nats`).
#[cfg(feature = "nats")]
pub use switchboard_nats as nats;

use url::Url;

/// URL schemes this crate knows, with the cargo feature (and adapter crate) each needs.
const SCHEMES: &[(&str, &str)] = &[
    ("grpc", "grpc"),
    ("grpcs", "grpc"),
    ("nats", "nats"),
    ("tls", "nats"),
    ("amqp", "rabbitmq"),
    ("amqps", "rabbitmq"),
    ("kafka", "kafka"),
    ("sqs", "sns-sqs"),
    ("sns+sqs", "sns-sqs"),
];

/// Connects to the transport named by `url`'s scheme, with client settings from its query
/// (`timeout_ms`).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = switchboard::connect("memory://").await.expect("memory is always there");
/// let err = switchboard::connect("carrier-pigeon://coop").await.expect_err("no such transport");
/// assert_eq!(err.kind(), switchboard::ErrorKind::InvalidConfig);
/// # client.shutdown().await.unwrap();
/// # }
/// ```
///
/// # Errors
/// `InvalidConfig` for a malformed URL, an unknown scheme, a scheme whose cargo feature is not
/// compiled in (the message names the feature), or a bad option; transport errors while
/// connecting.
pub async fn connect(url: &str) -> Result<Client> {
    let parsed = Url::parse(url).map_err(|e| {
        Error::invalid_config("core", format!("malformed transport URL `{url}`: {e}"))
            .with_source(e)
    })?;
    let config = ClientConfig::from_url(&parsed)?;
    connect_with(&parsed, config).await
}

/// [`connect`] with client settings given in code (the URL's query is still read by the
/// transport).
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(url: &Url, config: ClientConfig) -> Result<Client> {
    match url.scheme() {
        memory::SCHEME => {
            let transport = memory::MemoryTransport::connect(memory::MemoryConfig::from_url(url)?);
            Ok(Client::new(transport, config))
        }
        #[cfg(feature = "nats")]
        "nats" | "tls" => {
            let transport = switchboard_nats::connect(url).await?;
            Ok(Client::new(transport, config))
        }
        #[cfg(feature = "grpc")]
        "grpc" | "grpcs" => {
            let transport = switchboard_grpc::connect(url).await?;
            Ok(Client::new(transport, config))
        }
        #[cfg(feature = "kafka")]
        "kafka" => {
            let transport = switchboard_kafka::connect(url).await?;
            Ok(Client::new(transport, config))
        }
        #[cfg(feature = "sns-sqs")]
        "sns+sqs" | "sqs" => {
            let transport = switchboard_sns_sqs::connect(url).await?;
            Ok(Client::new(transport, config))
        }
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => {
            let transport = switchboard_rabbitmq::connect(url).await?;
            Ok(Client::new(transport, config))
        }
        scheme => match SCHEMES.iter().find(|(s, _)| *s == scheme) {
            Some((_, feature)) => Err(Error::invalid_config(
                "core",
                format!(
                    "scheme `{scheme}` needs cargo feature `{feature}` of crate `switchboard`, \
                     which is not compiled into this build"
                ),
            )),
            None => Err(Error::invalid_config(
                "core",
                format!(
                    "unknown transport scheme `{scheme}` (known: memory, {})",
                    SCHEMES
                        .iter()
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_are_typed_errors() {
        for (url, needle) in [
            ("not a url", "malformed transport URL"),
            ("", "malformed transport URL"),
            (
                "carrier-pigeon://coop",
                "unknown transport scheme `carrier-pigeon`",
            ),
            ("memory://?timeout_ms=soon", "timeout_ms"),
            ("memory://?timeout_ms=0", "timeout_ms"),
            ("memory://?bogus=1", "unknown option `bogus`"),
        ]
        .into_iter()
        // (A workspace build may compile the feature in for another crate's sake.)
        .chain(
            cfg!(not(feature = "kafka"))
                .then_some(("kafka://127.0.0.1:9092", "needs cargo feature `kafka`")),
        )
        .chain(
            cfg!(not(feature = "sns-sqs"))
                .then_some(("sqs://127.0.0.1:5000", "needs cargo feature `sns-sqs`")),
        ) {
            let err = connect(url).await.expect_err(url);
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    /// A broker that is not there is a `Connection` error naming it, quickly, and the
    /// password given in the URL appears nowhere in the message.
    #[tokio::test]
    async fn unreachable_brokers_are_connection_errors_without_secrets() {
        let mut urls: Vec<&str> = Vec::new();
        if cfg!(feature = "nats") {
            urls.push("nats://ada:hunter2@127.0.0.1:1?connect_timeout_ms=2000");
        }
        if cfg!(feature = "rabbitmq") {
            urls.push("amqp://ada:hunter2@127.0.0.1:1/%2f?connect_timeout_ms=2000");
        }
        if cfg!(feature = "kafka") {
            urls.push("kafka://ada:hunter2@127.0.0.1:1?connect_timeout_ms=2000");
        }
        if cfg!(feature = "sns-sqs") {
            urls.push("sns+sqs://ada:hunter2@127.0.0.1:1?connect_timeout_ms=2000");
        }
        for url in urls {
            let started = std::time::Instant::now();
            let err = connect(url).await.expect_err(url);
            assert_eq!(err.kind(), ErrorKind::Connection, "{url}: {err}");
            assert!(err.is_retryable(), "{err}");
            assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn timeout_comes_from_the_url() {
        let c = connect("memory://?timeout_ms=250").await.expect("connects");
        assert_eq!(c.config().timeout, std::time::Duration::from_millis(250));
    }
}
