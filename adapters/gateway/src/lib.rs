//! # switchboard-gateway
//!
//! The gRPC gateway: serves `switchboard.v1.Switchboard` (`proto/switchboard/v1/`) over
//! whichever transport it is started with (`memory://` by default; NATS and RabbitMQ when
//! built with those features), so that services in any language send, emit, request,
//! subscribe and serve handlers through it. It also serves the standard gRPC health
//! (`grpc.health.v1.Health`) and reflection (`grpc.reflection.v1`) services.
//!
//! - **Deadlines**: a call's gRPC deadline becomes its message's deadline.
//! - **Errors** map to status codes with the SDK's error kind and code as trailers
//!   (`sb-error-kind`, `sb-error-code`; the table is in docs/grpc.md).
//! - **Sizes**: payloads over `max_message_bytes` are refused with `RESOURCE_EXHAUSTED`.
//! - **Credentials**: an optional bearer token (`authorization: Bearer <token>`) on every
//!   `Switchboard` call; optional TLS, and mutual TLS with a client CA. Health and reflection
//!   stay open, as load balancers and tools expect.
//! - **Shutdown**: [`Gateway::shutdown`] reports `NOT_SERVING`, stops accepting calls, lets
//!   those in progress finish, then shuts the backend client down.
//!
//! - **Metrics**: the binary serves Prometheus metrics on `--metrics-listen ADDR` (off by
//!   default; [`metrics::serve_metrics`]).
//!
//! The gateway keeps no state beyond its open streams: run as many as needed behind a load
//! balancer, all on the same broker.

pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use switchboard::config::Secret;
use switchboard::{Client, Error, ErrorKind, Result};
use switchboard_grpc::{ServiceOptions, SwitchboardService};
use switchboard_proto::pb::switchboard_server::SwitchboardServer;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The adapter's name in errors and logs.
pub const NAME: &str = "gateway";

/// TLS files of the gateway (PEM).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// A CA that client certificates must be signed by (mutual TLS); `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// How to run a gateway.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen (port 0 picks a free port; see [`Gateway::local_addr`]).
    pub listen: SocketAddr,
    /// The backend's URL (`memory://`, `nats://...`, `amqp://...`).
    pub backend: String,
    /// Require this bearer token on every `Switchboard` call.
    pub token: Option<Secret>,
    /// Serve TLS with these files.
    pub tls: Option<TlsFiles>,
    /// Largest payload accepted in a message, in bytes.
    pub max_message_bytes: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            backend: "memory://".to_owned(),
            token: None,
            tls: None,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }
}

impl GatewayConfig {
    /// A gateway on `listen` bridging onto `backend`, with the other settings at their
    /// defaults.
    pub fn new(listen: SocketAddr, backend: impl Into<String>) -> Self {
        GatewayConfig {
            listen,
            backend: backend.into(),
            ..GatewayConfig::default()
        }
    }

    /// Requires the bearer token `token`.
    pub fn token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Serves TLS.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    backend: Client,
    service: SwitchboardService,
    health: tonic_health::server::HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
}

fn gateway_error(kind: ErrorKind, message: String) -> Error {
    Error::new(kind, NAME, message)
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        gateway_error(
            ErrorKind::InvalidConfig,
            format!("cannot read the {what} {}: {e}", path.display()),
        )
    })
}

impl Gateway {
    /// Connects the backend, binds the address and starts serving.
    ///
    /// # Errors
    /// `InvalidConfig` for a bad backend URL or unreadable TLS files; `Connection` if the
    /// backend does not answer or the address cannot be bound.
    pub async fn start(cfg: GatewayConfig) -> Result<Gateway> {
        let backend = switchboard::connect(&cfg.backend).await?;
        let mut options = ServiceOptions::default().max_payload(cfg.max_message_bytes);
        if let Some(t) = &cfg.token {
            options = options.token(t.clone());
        }
        let service = SwitchboardService::new(backend.clone(), options);
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<SwitchboardServer<SwitchboardService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| gateway_error(ErrorKind::Other, format!("reflection service: {e}")))?;
        let mut builder = tonic::transport::Server::builder()
            .initial_connection_window_size(switchboard_grpc::CONNECTION_WINDOW)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .trace_fn(|req| tracing::debug_span!("grpc", path = %req.uri().path()));
        if let Some(tls) = &cfg.tls {
            let identity = Identity::from_pem(
                read(&tls.cert, "TLS certificate")?,
                read(&tls.key, "TLS key")?,
            );
            let mut server_tls = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &tls.client_ca {
                server_tls =
                    server_tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
            }
            builder = builder.tls_config(server_tls).map_err(|e| {
                gateway_error(ErrorKind::InvalidConfig, format!("TLS settings: {e}"))
            })?;
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| {
                gateway_error(
                    ErrorKind::Connection,
                    format!("cannot listen on {}: {e}", cfg.listen),
                )
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| gateway_error(ErrorKind::Connection, e.to_string()))?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (stop, stopped) = oneshot::channel::<()>();
        let router = builder
            .layer(tower::util::MapResponseLayer::new(
                switchboard_grpc::status::normalize,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service.clone().into_server());
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, backend = %backend.transport().name(), tls = cfg.tls.is_some(), auth = cfg.token.is_some(), "gateway listening");
        Ok(Gateway {
            addr,
            backend,
            service,
            health,
            stop: Some(stop),
            task,
        })
    }

    /// Where the gateway listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend client the gateway bridges onto.
    pub fn backend(&self) -> &Client {
        &self.backend
    }

    /// Reports `NOT_SERVING`, ends the open streams (unsettled deliveries go back to the
    /// broker; a `SendStream` takes no more calls and ends once those in hand are answered),
    /// stops accepting calls, lets the unary calls in progress finish (at most `drain`), then
    /// shuts the backend down.
    ///
    /// # Errors
    /// `Connection` if the server failed while running; the backend's errors while closing.
    pub async fn shutdown(mut self, drain: Duration) -> Result<()> {
        self.health
            .set_not_serving::<SwitchboardServer<SwitchboardService>>()
            .await;
        // Streams stay open as long as their clients keep them: end them, so their clients
        // see the gateway go (and reconnect elsewhere) and the drain is about unary calls.
        self.service.close_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let served = match tokio::time::timeout(drain, &mut self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(gateway_error(
                ErrorKind::Connection,
                format!("the gRPC server failed: {e}"),
            )),
            Ok(Err(e)) => Err(gateway_error(
                ErrorKind::Other,
                format!("the gRPC server task failed: {e}"),
            )),
            Err(_) => {
                tracing::warn!(
                    ?drain,
                    "calls still open after the drain time; closing them"
                );
                self.task.abort();
                Ok(())
            }
        };
        let closed = self.backend.shutdown().await;
        tracing::info!(addr = %self.addr, "gateway stopped");
        served.and(closed)
    }
}
