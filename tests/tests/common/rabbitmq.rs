//! The RabbitMQ harness shared by the suite and the restart case: the real server at
//! `SB_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/test` starts it if needed).

use switchboard_conformance::Harness;
use switchboard_rabbitmq::{RabbitConfig, RabbitTransport};

/// The broker.
fn url() -> String {
    std::env::var("SB_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub(crate) async fn harness() -> Harness {
    let url = url();
    let parsed = url::Url::parse(&url).expect("SB_AMQP_URL is a URL");
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
