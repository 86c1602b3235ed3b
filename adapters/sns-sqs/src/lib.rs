//! # switchboard-sns-sqs
//!
//! The SNS/SQS transport of switchboard, **in progress**: this crate has its configuration
//! (`sns+sqs://` URLs), the names of its topics and queues, and its codec (envelope ⇄ body and
//! String attributes, [`codec`]) so far; the transport itself (aws-sdk-sns and aws-sdk-sqs)
//! is not written yet, and `switchboard::connect` does not take these URLs yet.
//!
//! The plan it is built to (SPEC §4, docs/wire.md):
//!
//! | call | SNS/SQS feature used |
//! | --- | --- |
//! | `emit` | publish to the pattern's SNS topic (`<prefix>-evt-…`) |
//! | event handlers | one SQS queue per (pattern, group) (`<prefix>-grp-…`), subscribed to the topic with raw message delivery; long polling; a redrive policy to `<prefix>-rdr-…` |
//! | `send`, `request` | a message on the pattern's SQS queue (`<prefix>-req-…`) carrying the client's reply queue; replies on one long-lived reply queue per client instance (`<prefix>-reply-…`), matched by correlation attribute; deleted at shutdown, stale ones reaped |
//! | order per key | FIFO topics and queues (`fifo=true`), the key as message group id |
//!
//! Envelope fields travel as String message attributes (Binary attributes are avoided: a
//! local emulator, moto, loses such messages).

pub mod codec;
mod config;
mod transport;

pub use config::{Kind, SnsSqsConfig};
pub use transport::SnsSqsTransport;

/// Connects a transport from a `sns+sqs://` (or `sqs://`) URL.
///
/// # Errors
/// `InvalidConfig` for a bad URL, `Connection` if SQS does not answer.
pub async fn connect(url: &url::Url) -> switchboard_core::Result<SnsSqsTransport> {
    SnsSqsTransport::connect(SnsSqsConfig::from_url(url)?).await
}

/// The adapter's name in errors and logs.
pub const NAME: &str = "sns-sqs";
/// URL schemes this adapter serves.
pub const SCHEMES: &[&str] = &["sns+sqs", "sqs"];
