//! `queue_expires_ms`: a group's queue and its dead-letter queue are deleted by the broker once
//! they are unused (not consumed from) that long; a queue in use stays. Against the real server at `SB_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; `scripts/test` starts it if needed).

#![cfg(feature = "rabbitmq")]

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use switchboard::HandlerError;
use switchboard_conformance::within;

// Only the harness's broker URL is used here.
#[allow(dead_code)]
#[path = "common/rabbitmq.rs"]
mod rabbitmq_harness;

/// Whether queue `name` exists, asked with a passive declare on a channel of its own (a
/// missing queue closes the channel it is asked on).
async fn exists(conn: &Connection, name: &str) -> bool {
    let ch = within("open a channel", conn.create_channel())
        .await
        .expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = within(
        "passive declare",
        ch.queue_declare(name.into(), passive, FieldTable::default()),
    )
    .await
    .is_ok();
    if found {
        let _ = ch.close(200, "done".into()).await;
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_group_and_dead_letter_queues_expire() {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let pattern = format!("expiry.{}", &tag[..12]);
    let (group_q, dlq) = (
        format!("sb.evt.{pattern}.workers"),
        format!("sb.dlq.{pattern}"),
    );
    let base = rabbitmq_harness::broker_url();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}queue_expires_ms=3000");

    let client = within("connect", switchboard::connect(&url))
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let service = within(
        "subscribe",
        client.on_event(&pattern, "workers", |_: String, _ctx| async move {
            Ok::<_, HandlerError>(())
        }),
    )
    .await
    .expect("subscribes");
    let probe = within(
        "probe connects",
        Connection::connect(&base, ConnectionProperties::default()),
    )
    .await
    .expect("probe connection");
    assert!(exists(&probe, &group_q).await, "{group_q} while subscribed");
    assert!(exists(&probe, &dlq).await, "{dlq} once subscribed");

    // In use (consumed from), the group's queue stays past its expiry.
    let held = Duration::from_millis(4000);
    within("hold", tokio::time::sleep(held)).await;
    assert!(
        exists(&probe, &group_q).await,
        "{group_q} expired while in use"
    );

    drop(service);
    within("shutdown", client.shutdown())
        .await
        .expect("shutdown");
    // Unused, both go: the broker checks expiry on its own timer, so poll (bounded).
    let gone = async {
        while exists(&probe, &group_q).await || exists(&probe, &dlq).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), gone)
        .await
        .unwrap_or_else(|_| panic!("{group_q} or {dlq} still there 20 s after its last use"));
    let _ = probe.close(200, "done".into()).await;
}
