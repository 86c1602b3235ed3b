//! The conformance suite on the in-memory transport: each test gets a bus of its own.

use switchboard::memory::{MemoryConfig, MemoryTransport};
use switchboard_conformance::{Harness, conformance_suite};

async fn harness() -> Harness {
    let bus = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    let url = format!("memory://{bus}");
    // A foreign producer: a bare transport on the same bus, publishing headers and bytes.
    let foreign = MemoryTransport::connect(MemoryConfig::default().bus(bus));
    let foreign = std::sync::Arc::new(foreign);
    Harness::connecting_to("memory", url)
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

// memory has no broker to restart: the case reports itself skipped.
switchboard_conformance::restart_case!(harness().await);
