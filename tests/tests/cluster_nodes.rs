//! A URL may list several nodes: with the first one down, the client connects to the next
//! and works. Against the real brokers (`scripts/brokers up`); port 1 on loopback has nothing.

use serde::{Deserialize, Serialize};
use switchboard::HandlerError;
use switchboard_conformance::within;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Ping {
    n: u32,
}

async fn round_trip(url: &str, pattern: &str) {
    let server = within("connect past the dead node", switchboard::connect(url))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    within(
        "handle",
        server.handle(pattern, |p: Ping, _ctx| async move {
            Ok::<_, HandlerError>(Ping { n: p.n * 2 })
        }),
    )
    .await
    .expect("handler");
    let client = within("connect", switchboard::connect(url))
        .await
        .expect("client connects");
    let r: Ping = within("send", client.send(pattern, &Ping { n: 21 }))
        .await
        .expect("reply");
    assert_eq!(r, Ping { n: 42 });
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connects_to_the_next_node() {
    round_trip(
        "nats://127.0.0.1:1?nodes=127.0.0.1:4222&connect_timeout_ms=4000",
        "nodes.nats.ping",
    )
    .await;
}

#[cfg(feature = "rabbitmq")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connects_to_the_next_node() {
    round_trip(
        "amqp://guest:guest@127.0.0.1:1/%2f?nodes=127.0.0.1:5672&connect_timeout_ms=4000",
        "nodes.rabbitmq.ping",
    )
    .await;
}
