//! # switchboard-rabbitmq
//!
//! The RabbitMQ transport of switchboard, picked by `amqp://` (or `amqps://`) URLs when the
//! `switchboard` crate is built with feature `rabbitmq`.
//!
//! | call | RabbitMQ feature used |
//! | --- | --- |
//! | `send` | direct reply-to (`amq.rabbitmq.reply-to`) on one channel per connection, replies matched by correlation id, many in flight (a `send` waiting alone reads its reply itself, without the reader task between); the request is published mandatory (without publisher confirms), so the broker returns a request no queue takes and a pattern nobody serves fails at once |
//! | `request` | the same request queue, replies to a durable per-client reply queue (`<prefix>.reply.<client>`, deleted on shutdown or after `reply_queue_expires_ms` unused) |
//! | `emit` | a persistent publish to the topic exchange (`sb.events`, routing key = pattern), returning after the publisher confirm |
//! | event handlers | one durable queue per (pattern, group), `<prefix>.evt.<pattern>.<group>`, bound by pattern; prefetch = handler concurrency; ack after the handler succeeds |
//! | request handlers | an auto-delete queue per pattern, `<prefix>.req.<pattern>`, shared by the handlers; requests carry their remaining time as AMQP expiration |
//! | dead letters | the dead-letter exchange (`sb.dead-letters`, routing key = pattern) into `<prefix>.dlq.<pattern>`; group queues name it as their `x-dead-letter-exchange` too |
//!
//! Envelope fields map onto AMQP properties where one exists (`message_id`, `type`,
//! `content_type`, `correlation_id`, `reply_to`) and onto the headers table otherwise (see
//! `docs/wire.md`). See [`RabbitConfig`] for the URL options.
//!
//! Reconnection is automatic (nodes tried in order), subscriptions resume. A `send` waiting
//! for its reply when the connection drops fails at once with a retryable `Connection`
//! error. An `emit` that returned `Ok` was confirmed by the broker into durable queues.

mod codec;
mod config;
mod transport;

pub use config::{QueueType, RabbitConfig};
pub use transport::RabbitTransport;

/// The adapter's name in errors and logs.
pub const NAME: &str = "rabbitmq";
/// URL schemes this adapter serves.
pub const SCHEMES: &[&str] = &["amqp", "amqps"];

/// Connects a transport from an `amqp://` or `amqps://` URL.
///
/// # Errors
/// `InvalidConfig` for a bad URL, `Connection` if no node answers.
pub async fn connect(url: &url::Url) -> switchboard_core::Result<RabbitTransport> {
    RabbitTransport::connect(RabbitConfig::from_url(url)?).await
}
