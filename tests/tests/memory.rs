//! The conformance suite on the in-memory transport: each test gets a bus of its own.

use switchboard_conformance::{Harness, conformance_suite};

async fn harness() -> Harness {
    let bus = format!("conformance-{}", uuid::Uuid::new_v4().simple());
    let url = format!("memory://{bus}");
    Harness::connecting_to("memory", url)
        .await
        .memory_foreign_producer(bus)
}

conformance_suite!(harness().await);

// memory has no broker to restart: the case reports itself skipped.
switchboard_conformance::restart_case!(harness().await);
