//! The RabbitMQ harness shared by the suite and the restart case: the real server at
//! `SB_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/test` starts it if needed).

use switchboard_conformance::Harness;
use switchboard_rabbitmq::{RabbitConfig, RabbitTransport};

/// The broker's URL as given (`SB_AMQP_URL` or the local default).
pub(crate) fn broker_url() -> String {
    std::env::var("SB_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The broker for the suite. Every case makes its own groups and clients, so their queues are
/// given a lifetime: the broker deletes them two minutes after the case, rather than keeping
/// hundreds of queues from run to run.
fn url() -> url::Url {
    let mut url = url::Url::parse(&broker_url()).expect("SB_AMQP_URL is a URL");
    for key in ["queue_expires_ms", "reply_queue_expires_ms"] {
        if !url.query_pairs().any(|(k, _)| k == key) {
            url.query_pairs_mut().append_pair(key, "120000");
        }
    }
    url
}

pub(crate) async fn harness() -> Harness {
    let parsed = url();
    let url = parsed.to_string();
    let foreign = RabbitTransport::connect(RabbitConfig::from_url(&parsed).expect("config"))
        .await
        .expect("foreign producer connects to RabbitMQ");
    Harness::connecting_to("rabbitmq", url)
        .await
        .foreign_producer(move |pattern, headers, payload| {
            let foreign = foreign.clone();
            async move {
                let headers = switchboard_conformance::header_refs(&headers);
                foreign.publish_foreign(&pattern, &headers, payload).await
            }
        })
}
