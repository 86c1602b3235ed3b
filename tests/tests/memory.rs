//! The conformance suite on the in-memory transport: each test gets a bus of its own.

use switchboard_conformance::{Harness, conformance_suite};

async fn harness() -> Harness {
    let url = format!("memory://conformance-{}", uuid::Uuid::new_v4().simple());
    Harness::new("memory", move || {
        let url = url.clone();
        async move { switchboard::connect(&url).await }
    })
    .await
}

conformance_suite!(harness().await);
