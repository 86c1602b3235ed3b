//! SNS/SQS: a handler that runs longer than the queue's visibility timeout keeps its message.
//! The transport extends the visibility of the messages in hand while their handlers run;
//! without that, SQS hands the message to another consumer once the timeout passes, and it is
//! handled twice.

#![cfg(feature = "sns-sqs")]

#[path = "common/sns_sqs.rs"]
mod sns_sqs_harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchboard::HandlerOptions;
use switchboard_conformance::{within, within_for};
use tokio::sync::mpsc;

#[tokio::test]
async fn a_handler_longer_than_the_visibility_timeout_keeps_its_message() {
    // Visibility 2 s; the handler works for 7 s. Its consumer has a second place free, and a
    // second member waits on the queue too: a message visible again would be taken at once.
    let h = sns_sqs_harness::harness("sns-sqs", sns_sqs_harness::url("&visibility_s=2")).await;
    let p = h.pattern("long-handler");
    let started = Arc::new(AtomicUsize::new(0));
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let handler = {
        let started = started.clone();
        move |_n: u64, _ctx: switchboard::Context| {
            let (started, done_tx) = (started.clone(), done_tx.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                // The work itself: longer than three visibility timeouts.
                tokio::time::sleep(Duration::from_secs(7)).await;
                let _ = done_tx.send(());
                Ok(())
            }
        }
    };
    let mut members = Vec::new();
    for _ in 0..2 {
        let c = h.client().await;
        within(
            "subscribe",
            c.on_event_with(
                &p,
                "slow",
                HandlerOptions::new().concurrency(2),
                handler.clone(),
            ),
        )
        .await
        .expect("subscribes");
        members.push(c);
    }
    let emitter = h.client().await;
    within("emit", emitter.emit(&p, &1u64))
        .await
        .expect("accepted");
    within_for(Duration::from_secs(30), "the handler finishes", done.recv())
        .await
        .expect("open");
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the message was handed out again while its handler ran"
    );
    for c in members.iter().chain([&emitter]) {
        within("shutdown", c.shutdown()).await.expect("shutdown");
    }
}
