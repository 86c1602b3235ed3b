//! # switchboard-core
//!
//! The contract of switchboard, with no broker dependency: the [`Envelope`] and its wire
//! headers, [`Error`]s classified by what the caller can do, payload codecs ([`Encode`], [`Decode`]: JSON by
//! default, [`Proto`] for protobuf, [`Raw`] bytes), the service-facing [`Client`] (`send`,
//! `emit`, `request`, handlers), the adapter SPI ([`transport`]) with the request-reply
//! correlator for transports without native request-reply, and the in-memory transport
//! ([`memory`]), the embedded default.
//!
//! Services normally depend on the `switchboard` facade crate, which re-exports all of this and
//! adds `connect(url)`.
//!
//! ## Layout
//! - [`envelope`]: `Envelope`, ids, reserved header names (`docs/wire.md`).
//! - [`codec`]: `Encode`, `Decode`, `Proto`, `Raw`.
//! - [`client`]: `Client`, `CallOptions`, `PendingReply`, `ReplyStream`.
//! - [`serve`]: handlers (`Client::handle`, `Client::on_event`), `Context`, `Service`.
//! - [`transport`]: the SPI adapters implement (`Publisher`, `Subscriber`, `Requester`).
//! - [`memory`]: the `memory://` transport.
//!
//! ## Quick start
//! ```
//! use switchboard_core::{Client, ClientConfig, HandlerError, memory::{MemoryConfig, MemoryTransport}};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchboard_core::Result<()> {
//! let bus = MemoryConfig::default().bus("doc-quickstart");
//! let server = Client::new(MemoryTransport::connect(bus.clone()), ClientConfig::default());
//! server
//!     .handle("math.double", |n: u64, _ctx| async move { Ok::<_, HandlerError>(n * 2) })
//!     .await?;
//! let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
//! let doubled: u64 = client.send("math.double", &21u64).await?;
//! assert_eq!(doubled, 42);
//! # server.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod codec;
pub mod config;
mod correlator;
pub mod envelope;
pub mod error;
pub mod idempotency;
pub mod memory;
pub mod metrics;
pub mod serve;
mod stats;
pub mod trace;
pub mod transport;

pub use client::{CallOptions, Client, ClientConfig, PendingReply, ReplyStream, validate_pattern};
pub use codec::{Body, Decode, Encode, Payload, Proto, Raw};
pub use envelope::{CorrelationId, Envelope, MessageId, ReplyError, content_type, header};
pub use error::{BoxError, Error, ErrorKind, HandlerError, Result};
pub use idempotency::{Idempotency, IdempotencyStore, MemoryIdempotencyStore};
pub use serve::{Backoff, Context, HandlerOptions, Service};
pub use stats::Stats;
pub use transport::{Capabilities, Delivery, Route, SubscribeOptions, Subscription, Transport};
