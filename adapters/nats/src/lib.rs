//! # switchboard-nats
//!
//! The NATS transport of switchboard, picked by `nats://` (or `tls://`) URLs when the
//! `switchboard` crate is built with feature `nats`.
//!
//! | call | NATS feature used |
//! | --- | --- |
//! | `send` | core request/reply: the reply subject is `_SB_SEND.<connection>.<sequence>`, read by one wildcard subscription per connection and matched by sequence (late replies counted); requests made while others wait are handed to the client in batches, so they go out in one write; a pattern nobody serves fails at once (the server's no-responders notice) |
//! | `request` | switchboard's inbox for the client: the reply subject is `_SB_INBOX.<client>.<correlation id>.<pattern>`, replies arrive on one wildcard subscription and are matched by correlation id; the no-responders notice fails that request at once |
//! | `emit` | JetStream publish, returning after the stream's ack (or, with `events=core`, a core publish: at-most-once) |
//! | event handlers | one durable JetStream pull consumer per (pattern, group); members of a group share it |
//! | request handlers | a queue group per pattern, so handlers compete |
//! | dead letters | the `SWITCHBOARD_DLQ` work-queue stream, kept until read |
//!
//! Subjects: `<prefix>.evt.<pattern>`, `<prefix>.req.<pattern>`, `<prefix>.dlq.<pattern>`
//! (prefix `sb` by default); a `send`'s reply subject is `_SB_SEND.<connection>.<seq>.<deadline
//! ms>`. Envelope fields travel as NATS headers under the names in `docs/wire.md`, except what
//! the subjects carry. See [`NatsConfig`] for the URL options.
//!
//! Reconnection is automatic. While the connection is down, `send` fails at once with a
//! retryable `Connection` error, and a `send` waiting for its reply when the connection
//! drops fails the same way, never at its deadline. An `emit` that returned `Ok` was stored
//! by JetStream and is delivered after a server restart.

mod codec;
mod config;
mod inbox;
mod mux;
mod transport;

pub use config::{EventMode, NatsConfig};
pub use transport::NatsTransport;

/// The adapter's name in errors and logs.
pub const NAME: &str = "nats";
/// URL schemes this adapter serves.
pub const SCHEMES: &[&str] = &["nats", "tls"];

/// Connects a transport from a `nats://` or `tls://` URL.
///
/// # Errors
/// `InvalidConfig` for a bad URL, `Connection` if no server answers.
pub async fn connect(url: &url::Url) -> switchboard_core::Result<NatsTransport> {
    NatsTransport::connect(NatsConfig::from_url(url)?).await
}
