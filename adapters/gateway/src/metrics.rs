//! The Prometheus endpoint of the gateway binary (`--metrics-listen ADDR`, off by default):
//! `GET /metrics` answers with every metric of the process in the Prometheus text format
//! (the SDK's are listed in `switchboard::metrics`).
//!
//! The recorder is process-wide: install it before connecting, so the gateway's backend
//! client registers its metrics with it. The HTTP side is a few lines over a `TcpListener`:
//! one GET per connection, no keep-alive, which is what a scraper needs.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use switchboard::{Error, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Installs the Prometheus recorder and serves `/metrics` on `addr` (port 0: any free port).
/// Returns the address bound and the server's task.
///
/// # Errors
/// `InvalidConfig` if a recorder is already installed or `addr` cannot be bound.
pub async fn serve_metrics(addr: SocketAddr) -> Result<(SocketAddr, JoinHandle<()>)> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0,
        ])
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| {
            Error::invalid_config("gateway", format!("metrics recorder: {e}")).with_source(e)
        })?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::invalid_config(
            "gateway",
            format!("cannot listen for metrics on {addr}: {e}"),
        )
        .with_source(e)
    })?;
    let bound = listener.local_addr().map_err(|e| {
        Error::invalid_config("gateway", format!("metrics listener: {e}")).with_source(e)
    })?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, handle.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "metrics listener: accept failed"),
            }
        }
    });
    Ok((bound, task))
}

/// Answers one request: `GET /metrics` with the metrics, anything else with 404.
async fn answer(mut stream: TcpStream, handle: PrometheusHandle) {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await;
    let Ok(Ok(n)) = read else { return };
    let request = String::from_utf8_lossy(&buf[..n]);
    let line = request.lines().next().unwrap_or("");
    let response = if line.starts_with("GET /metrics ") || line == "GET /metrics" {
        handle.run_upkeep();
        let body = handle.render();
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
    };
    if let Err(e) = stream.write_all(response.as_bytes()).await {
        tracing::debug!(error = %e, "metrics: client went away");
    }
    let _ = stream.shutdown().await;
}
