//! # switchboard-sns-sqs
//!
//! The SNS/SQS transport of switchboard (aws-sdk-sns, aws-sdk-sqs), picked by `sns+sqs://`
//! (or `sqs://`) URLs when the `switchboard` crate is built with feature `sns-sqs`. See
//! [`SnsSqsConfig`] for the URL and `docs/sns-sqs.md` for the whole mapping. Still to come: the
//! restart case.
//!
//! | call | SNS/SQS feature used |
//! | --- | --- |
//! | `emit` | publish to the pattern's SNS topic (`<prefix>-evt-…`), returning once SNS accepted it |
//! | event handlers | one SQS queue per (pattern, group) (`<prefix>-grp-…`), subscribed to the topic with raw message delivery; long polling; a redrive policy to the pattern's dead-letter queue |
//! | ack, nack | delete the message; make it visible again after the retry delay |
//! | dead letters | `<prefix>-dlq-…`, with the reason headers |
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
