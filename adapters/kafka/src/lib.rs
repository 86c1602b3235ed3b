//! # switchboard-kafka
//!
//! The Kafka transport of switchboard (rdkafka, librdkafka built in), picked by `kafka://`
//! URLs when the `switchboard` crate is built with feature `kafka`.
//!
//! | call | Kafka feature used |
//! | --- | --- |
//! | `emit` | a record on `<prefix>.evt.<pattern>`, returning after the broker's acknowledgement (`acks=all`) |
//! | event handlers | a consumer group per (group, pattern), `<prefix>.grp.<group>.evt.<pattern>`; offsets committed only up to the lowest record not yet handled |
//! | `send`, `request` | a record on `<prefix>.req.<pattern>` carrying the client's reply topic; replies come back on that one topic per client instance, `<prefix>.reply.<client>`, read by assignment (no group) and matched by correlation id |
//! | request handlers | one consumer group per pattern, `<prefix>.grp.req.<pattern>`, so handlers compete |
//! | retries | a failed record without a key is published again to its topic with `sb-attempt` and `sb-not-before` headers, then its offset is released: the partition is not held up while it waits; a keyed record is handed out again by the same member after the delay, its key held (order per key) |
//! | dead letters | `<prefix>.dlq.<pattern>`, with the reason headers |
//!
//! Topics are created when first used, with `partitions` partitions (reply topics: one). The
//! record key is the message's key, so one key stays in one partition, and a keyed record waits
//! for the one before it with the same key. Envelope fields travel as record headers under the
//! names in `docs/wire.md`, less what the reader infers (see `docs/kafka.md`). See
//! [`KafkaConfig`] for the URL.

mod codec;
mod config;
mod transport;

pub use config::KafkaConfig;
pub use transport::{ATTEMPT, KafkaTransport, NOT_BEFORE};

/// The adapter's name in errors and logs.
pub const NAME: &str = "kafka";
/// URL schemes this adapter serves.
pub const SCHEMES: &[&str] = &["kafka"];

/// Connects a transport from a `kafka://` URL.
///
/// # Errors
/// `InvalidConfig` for a bad URL, `Connection` if no broker answers.
pub async fn connect(url: &url::Url) -> switchboard_core::Result<KafkaTransport> {
    KafkaTransport::connect(KafkaConfig::from_url(url)?).await
}
