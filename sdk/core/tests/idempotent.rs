//! Idempotent consumers on the in-memory transport: a message that comes again (same id) is
//! acknowledged without running the handler, per consumer group; a failed attempt does not
//! count as handled, so its redelivery runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::{
    Backoff, Client, ClientConfig, Envelope, ErrorKind, HandlerError, HandlerOptions, Idempotency,
    Route, content_type,
};
use tokio::time::{Instant, timeout};

const STEP: Duration = Duration::from_secs(5);

type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// An event handler of `group` that counts runs per payload, failing the first run of `"flaky"`.
async fn consumer(client: &Client, pattern: &str, group: &str, seen: Seen) {
    let opts = HandlerOptions::new()
        .max_attempts(3)
        .backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(10),
        ))
        .idempotent(Idempotency::in_memory(Duration::from_secs(60), 1_000));
    client
        .on_event_with(pattern, group, opts, move |name: String, _ctx| {
            let runs = {
                let mut seen = seen.lock().expect("seen");
                let n = seen.entry(name.clone()).or_default();
                *n += 1;
                *n
            };
            async move {
                if name == "flaky" && runs == 1 {
                    return Err(HandlerError::new("unavailable", "first run fails"));
                }
                Ok(())
            }
        })
        .await
        .expect("subscribes");
}

fn event(pattern: &str, name: &str) -> Envelope {
    Envelope::new(pattern, format!("\"{name}\"")).with_content_type(content_type::JSON)
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn duplicates_are_dropped_per_group_and_failed_attempts_do_not_count() {
    let bus = MemoryConfig::default().bus("idempotent");
    let server = Client::new(
        MemoryTransport::connect(bus.clone()),
        ClientConfig::default(),
    );
    let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    let (billing, audit): (Seen, Seen) = Default::default();
    consumer(&server, "orders.placed", "billing", billing.clone()).await;
    consumer(&server, "orders.placed", "audit", audit.clone()).await;

    let order = event("orders.placed", "order-1");
    let flaky = event("orders.placed", "flaky");
    for env in [order.clone(), order.clone(), flaky.clone(), order] {
        timeout(
            STEP,
            client.publish_envelope(Route::Event("orders.placed"), env),
        )
        .await
        .expect("bounded")
        .expect("accepted");
    }
    // Each group drops the two copies of `order-1`; `flaky` runs twice (fail, then succeed).
    until("every delivery settled", || {
        let s = server.stats();
        s.duplicates_dropped == 4 && s.handled == 4
    })
    .await;
    for group in [&billing, &audit] {
        let runs = group.lock().expect("seen").clone();
        assert_eq!(runs.get("order-1"), Some(&1), "{runs:?}");
        assert_eq!(runs.get("flaky"), Some(&2), "{runs:?}");
    }
    let s = server.stats();
    assert_eq!((s.failed, s.retried, s.dead_lettered), (2, 2, 0));
}

#[tokio::test]
async fn request_handlers_refuse_to_be_idempotent() {
    let client = Client::new(
        MemoryTransport::connect(MemoryConfig::default()),
        ClientConfig::default(),
    );
    let err = client
        .handle_with(
            "users.get",
            HandlerOptions::new().idempotent(Idempotency::in_memory(Duration::from_secs(1), 10)),
            |n: u32, _ctx| async move { Ok::<_, HandlerError>(n) },
        )
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("event handlers"), "{err}");
}
