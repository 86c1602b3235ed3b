//! The conformance suite on the gRPC transport: each test gets a switchboard server of its
//! own on 127.0.0.1:0, in this process, bridging onto an in-memory bus; the clients connect
//! to it with `grpc://127.0.0.1:<port>`, as services in other processes would.

use std::sync::Arc;

use switchboard::grpc::{RunningServer, ServiceOptions, SwitchboardService};
use switchboard::memory::{MemoryConfig, MemoryTransport};
use switchboard::{Client, ClientConfig};
use switchboard_conformance::{Harness, conformance_suite};

async fn harness() -> Harness {
    let bus = format!("grpc-conformance-{}", uuid::Uuid::new_v4().simple());
    let backend = Client::new(
        MemoryTransport::connect(MemoryConfig::default().bus(bus.clone())),
        ClientConfig::default(),
    );
    let server: Arc<RunningServer> = Arc::new(
        switchboard::grpc::serve(
            "127.0.0.1:0".parse().expect("address"),
            SwitchboardService::new(backend, ServiceOptions::default()),
        )
        .await
        .expect("the server listens"),
    );
    let url = server.url();
    Harness::new("grpc", move || {
        // The harness's clients keep the server alive as long as it makes clients.
        let _alive = &server;
        let url = url.clone();
        async move { switchboard::connect(&url).await }
    })
    .await
    .memory_foreign_producer(bus)
}

conformance_suite!(harness().await);

// The server's bus lives in this process: there is no broker to restart, and the case
// reports itself skipped.
switchboard_conformance::restart_case!(harness().await);
