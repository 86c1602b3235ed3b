//! # switchboard-grpc
//!
//! The gRPC transport of switchboard, picked by `grpc://host:port` (or `grpcs://`) URLs when
//! the `switchboard` crate is built with feature `grpc`: Rust services talk to a switchboard
//! server directly, with no broker in between. The same service,
//! `switchboard.v1.Switchboard` (`proto/switchboard/v1/switchboard.proto`), is what the
//! gateway serves to services in any language.
//!
//! | call | gRPC call used |
//! | --- | --- |
//! | `send` | a message on the transport's one `SendStream` (opened at the first `send`, again after it ends; unary `Send` with a server that lacks it); the deadline travels in the envelope (`deadline_unix_ms`) and the client stops waiting when it passes |
//! | `emit` | unary `Emit`, returning once the server's backend accepted the event |
//! | `request` | unary `Request` (returns at once), the reply on the client's one `Replies` stream |
//! | handlers | one bidirectional `Subscribe` stream per pattern: deliveries down, acks and nacks up |
//! | replies, dead letters | unary `Publish` |
//!
//! The server ([`serve`], [`SwitchboardService`]) bridges every call onto a backend
//! [`switchboard_core::Client`]: for the direct transport, an in-memory bus in the server's
//! process, which gives the clients the in-memory transport's semantics (consumer groups,
//! redelivery on nack, dead letters) across processes.
//!
//! ```no_run
//! # async fn demo() -> switchboard_core::Result<()> {
//! use switchboard_core::{Client, ClientConfig, memory::{MemoryConfig, MemoryTransport}};
//! use switchboard_grpc::{ServiceOptions, SwitchboardService};
//!
//! // The server process: a bus, served on a port.
//! let bus = Client::new(MemoryTransport::connect(MemoryConfig::default()), ClientConfig::default());
//! let server = switchboard_grpc::serve(
//!     "127.0.0.1:50051".parse().expect("address"),
//!     SwitchboardService::new(bus, ServiceOptions::default()),
//! )
//! .await?;
//!
//! // Any other process: a client of it.
//! let url = url::Url::parse(&server.url()).expect("url");
//! let client = Client::new(switchboard_grpc::connect(&url).await?, ClientConfig::default());
//! # Ok(()) }
//! ```

mod config;
mod lane;
mod server;
pub mod status;
mod transport;

pub use config::{DEFAULT_MAX_MESSAGE_BYTES, GrpcConfig};
pub use server::{
    CONNECTION_WINDOW, RunningServer, SHUTDOWN_WITHIN, ServiceOptions, SwitchboardService, serve,
};
pub use transport::GrpcTransport;

/// The adapter's name in errors and logs.
pub const NAME: &str = "grpc";
/// URL schemes this adapter serves.
pub const SCHEMES: &[&str] = &["grpc", "grpcs"];

/// Connects a transport from a `grpc://` or `grpcs://` URL.
///
/// # Errors
/// `InvalidConfig` for a bad URL, `Connection` if no server answers, `Unauthenticated` if it
/// refuses the token.
pub async fn connect(url: &url::Url) -> switchboard_core::Result<GrpcTransport> {
    GrpcTransport::connect(GrpcConfig::from_url(url)?).await
}
