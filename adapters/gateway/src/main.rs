//! `switchboard-gateway`: the gRPC gateway as a program. See the crate docs and docs/grpc.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchboard::config::Secret;
use switchboard_gateway::{Gateway, GatewayConfig, TlsFiles};

/// Serves switchboard over gRPC to services in any language, bridged onto a broker.
#[derive(Debug, Parser)]
#[command(name = "switchboard-gateway", version)]
struct Args {
    /// Address to listen on (port 0: any free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// The transport to bridge onto: memory://, nats://host:port, amqp://user:pass@host/vhost.
    #[arg(long, default_value = "memory://")]
    backend: String,
    /// Require this bearer token on every call (or set SWITCHBOARD_GATEWAY_TOKEN).
    #[arg(long, env = "SWITCHBOARD_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mutual TLS); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Largest payload accepted in a message, in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_message_bytes: usize,
    /// How long calls in progress may take to finish at shutdown, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    drain_ms: u64,
    /// Serve Prometheus metrics on `http://ADDR/metrics` (off unless set; port 0: any free
    /// port, printed).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Log format: text or json (filter with RUST_LOG, default info).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    // Before the backend connects: its client registers its metrics with the recorder.
    let metrics = match args.metrics_listen {
        None => None,
        Some(addr) => match switchboard_gateway::metrics::serve_metrics(addr).await {
            Ok((bound, task)) => Some((bound, task)),
            Err(e) => {
                tracing::error!(error = %e, "metrics endpoint did not start");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut cfg = GatewayConfig::new(args.listen, args.backend.clone())
        .max_message_bytes(args.max_message_bytes);
    if let Some(t) = args.token.filter(|t| !t.is_empty()) {
        cfg = cfg.token(Secret::new(t));
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        cfg = cfg.tls(TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        });
    }
    let gateway = match Gateway::start(cfg).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "gateway did not start");
            return ExitCode::FAILURE;
        }
    };
    // One line on stdout for whoever started the gateway with port 0.
    println!("switchboard-gateway listening on {}", gateway.local_addr());
    if let Some((bound, _)) = &metrics {
        println!("switchboard-gateway metrics on http://{bound}/metrics");
    }
    stopped().await;
    tracing::info!("stopping: draining calls in progress");
    match gateway.shutdown(Duration::from_millis(args.drain_ms)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gateway stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Returns at SIGTERM or ctrl-c.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
