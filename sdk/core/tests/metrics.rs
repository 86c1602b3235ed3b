//! The metrics a client and its handlers record through the `metrics` facade (a debugging
//! recorder, installed for this test binary alone).

use std::collections::HashMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::{Backoff, Client, ClientConfig, HandlerError, HandlerOptions};
use tokio::time::{Instant, timeout};

const STEP: Duration = Duration::from_secs(5);

type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// Counter values by name and sorted labels (`name{k=v,...}`).
fn counters(snapshot: &Snapshot) -> HashMap<String, u64> {
    snapshot
        .iter()
        .filter_map(|(key, _, _, value)| {
            let DebugValue::Counter(n) = value else {
                return None;
            };
            let n = *n;
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            Some((format!("{}{{{}}}", key.name(), labels.join(",")), n))
        })
        .collect()
}

fn histogram_len(snapshot: &Snapshot, name: &str) -> usize {
    snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == name)
        .map(|(.., value)| match value {
            DebugValue::Histogram(v) => v.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn calls_and_handlers_are_counted_and_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let bus = MemoryConfig::default().bus("metrics");
    let server = Client::new(
        MemoryTransport::connect(bus.clone()),
        ClientConfig::default(),
    );
    let client = Client::new(MemoryTransport::connect(bus), ClientConfig::default());
    server
        .handle("m.double", |n: u32, _ctx| async move {
            if n == 0 {
                return Err(HandlerError::new("zero", "no"));
            }
            Ok(n * 2)
        })
        .await
        .expect("registers");
    let opts = HandlerOptions::new()
        .max_attempts(2)
        .backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(2),
        ));
    server
        .on_event_with("m.happened", "g", opts, |_n: u32, _ctx| async move {
            Err::<(), _>(HandlerError::new("broken", "always"))
        })
        .await
        .expect("subscribes");

    let doubled: u32 = client.send("m.double", &4u32).await.expect("answered");
    assert_eq!(doubled, 8);
    client
        .send::<_, u32>("m.double", &0u32)
        .await
        .expect_err("handler error");
    client.emit("m.happened", &1u32).await.expect("accepted");

    let deadline = Instant::now() + STEP;
    while server.stats().dead_lettered < 1 {
        assert!(Instant::now() < deadline, "the event was not dead-lettered");
        tokio::task::yield_now().await;
    }
    // One snapshot: taking one drains the histograms.
    let snapshot: Snapshot = snapshotter.snapshot().into_vec();
    let c = counters(&snapshot);
    let get = |k: &str| {
        c.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {c:#?}"))
    };
    assert_eq!(
        get("switchboard_messages_sent_total{call=send,transport=memory}"),
        2
    );
    assert_eq!(
        get("switchboard_messages_sent_total{call=emit,transport=memory}"),
        1
    );
    assert_eq!(
        get("switchboard_calls_failed_total{call=send,error=handler,transport=memory}"),
        1
    );
    let req = "kind=request,pattern=m.double,transport=memory";
    assert_eq!(
        get(&format!("switchboard_messages_received_total{{{req}}}")),
        2
    );
    assert_eq!(
        get(&format!("switchboard_messages_handled_total{{{req}}}")),
        1
    );
    assert_eq!(
        get(&format!("switchboard_messages_failed_total{{{req}}}")),
        1
    );
    let ev = "kind=event,pattern=m.happened,transport=memory";
    assert_eq!(
        get(&format!("switchboard_messages_received_total{{{ev}}}")),
        2
    );
    assert_eq!(
        get(&format!("switchboard_messages_failed_total{{{ev}}}")),
        2
    );
    assert_eq!(
        get(&format!("switchboard_messages_retried_total{{{ev}}}")),
        1
    );
    assert_eq!(
        get(&format!("switchboard_messages_dead_lettered_total{{{ev}}}")),
        1
    );
    assert_eq!(
        histogram_len(&snapshot, "switchboard_send_duration_seconds"),
        2
    );
    assert_eq!(
        histogram_len(&snapshot, "switchboard_handle_duration_seconds"),
        4
    );
    timeout(STEP, server.shutdown())
        .await
        .expect("bounded")
        .expect("shutdown");
}
