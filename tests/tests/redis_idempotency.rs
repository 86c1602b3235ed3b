//! Idempotent consumers with their keys in Redis (`SB_REDIS_URL`, default
//! `redis://127.0.0.1:6379`; `scripts/test` starts it if needed), over RabbitMQ: the members
//! of a group, each with a client of its own, share the store, so a message that comes again
//! is dropped whichever member it reaches.
//!
//! RabbitMQ carries each event's own id (`message_id`), so a message published twice is a
//! duplicate. (On JetStream and Kafka a plain event's id is the broker's identity of the
//! stored message: there, redeliveries are the duplicates; see docs/resilience.md.)

#![cfg(all(feature = "redis", feature = "rabbitmq"))]

#[path = "common/rabbitmq.rs"]
mod rabbitmq_harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use switchboard::resilience::RedisIdempotencyStore;
use switchboard::{
    Envelope, ErrorKind, HandlerError, HandlerOptions, Idempotency, Route, content_type,
};
use switchboard_conformance::{eventually, within};

fn redis_url() -> String {
    std::env::var("SB_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_group_share_the_redis_store() {
    let h = rabbitmq_harness::harness().await;
    let p = h.pattern("idem");
    let store = within(
        "connect to Redis",
        RedisIdempotencyStore::connect(&redis_url()),
    )
    .await
    .expect("Redis answers (scripts/brokers up redis)")
    .prefix(format!("sb:test:{p}:"));
    let store = Arc::new(store);
    let runs = Arc::new(AtomicU32::new(0));
    let mut members = Vec::new();
    for _ in 0..2 {
        let member = h.client().await;
        let runs = runs.clone();
        let opts = HandlerOptions::new().idempotent(Idempotency::with_store(
            store.clone(),
            Duration::from_secs(60),
        ));
        within(
            "subscribe",
            member.on_event_with(&p, "billing", opts, move |_order: String, _ctx| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            }),
        )
        .await
        .expect("subscribes");
        members.push(member);
    }

    let producer = h.client().await;
    let order = Envelope::new(p.clone(), "\"order-1\"").with_content_type(content_type::JSON);
    for _ in 0..3 {
        within(
            "publish a copy",
            producer.publish_envelope(Route::Event(&p), order.clone()),
        )
        .await
        .expect("accepted");
    }
    eventually(Duration::from_secs(10), "every copy settled", || {
        let dropped: u64 = members.iter().map(|m| m.stats().duplicates_dropped).sum();
        let handled: u64 = members.iter().map(|m| m.stats().handled).sum();
        dropped == 2 && handled == 1
    })
    .await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "handled once across the group"
    );
    for m in members.into_iter().chain([producer]) {
        within("shutdown", m.shutdown()).await.expect("shutdown");
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_a_typed_connection_error() {
    let err = within(
        "connect to nothing",
        RedisIdempotencyStore::connect("redis://127.0.0.1:1"),
    )
    .await
    .expect_err("nobody listens on port 1");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let err = RedisIdempotencyStore::connect("not a url")
        .await
        .expect_err("malformed");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
}
