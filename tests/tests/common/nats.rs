//! The NATS harness shared by the suite and the restart case: the real server at
//! `SB_NATS_URL` (default `nats://127.0.0.1:4222`; `scripts/test` starts it if needed).

use switchboard_conformance::Harness;
use switchboard_nats::{NatsConfig, NatsTransport};

/// The server, with durable groups of finished test runs deleted by the server after ten
/// idle minutes (each case makes its own patterns and groups).
fn url() -> String {
    let base = std::env::var("SB_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}group_idle_ms=600000")
}

pub(crate) async fn harness() -> Harness {
    let url = url();
    let parsed = url::Url::parse(&url).expect("SB_NATS_URL is a URL");
    let foreign = NatsTransport::connect(NatsConfig::from_url(&parsed).expect("config"))
        .await
        .expect("foreign producer connects to NATS");
    Harness::connecting_to("nats", url)
        .await
        .foreign_producer(move |pattern, headers, payload| {
            let foreign = foreign.clone();
            async move {
                let headers = switchboard_conformance::header_refs(&headers);
                foreign.publish_foreign(&pattern, &headers, payload).await
            }
        })
}
