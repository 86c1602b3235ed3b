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
    // A foreign producer: a bare transport on the server's bus, publishing headers and bytes.
    let foreign = Arc::new(MemoryTransport::connect(MemoryConfig::default().bus(bus)));
    Harness::new("grpc", move || {
        // Each client keeps the server alive for as long as the harness makes clients.
        let (url, _server) = (url.clone(), server.clone());
        async move { switchboard::connect(&url).await }
    })
    .await
    .foreign_producer(move |pattern, headers, payload| {
        let foreign = foreign.clone();
        async move {
            let headers = switchboard_conformance::header_refs(&headers);
            foreign.publish_foreign(&pattern, &headers, payload)
        }
    })
}

conformance_suite!(harness().await);

// The server's bus lives in this process: there is no broker to restart, and the case
// reports itself skipped.
switchboard_conformance::restart_case!(harness().await);
