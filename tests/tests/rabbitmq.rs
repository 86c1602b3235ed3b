//! The conformance suite on RabbitMQ, against the real server at
//! `SB_AMQP_URL` (default `amqp://127.0.0.1:5672`; `scripts/test` starts it if needed).

#![cfg(feature = "rabbitmq")]

#[path = "common/rabbitmq.rs"]
mod rabbitmq_harness;

switchboard_conformance::conformance_suite!(rabbitmq_harness::harness().await);

/// A reply that comes after its `send` gave up is counted as late even when no other call
/// waits: a lone `send` reads its own reply (the reader task pauses meanwhile), so the reader
/// task must take the replies again once no call waits.
#[tokio::test]
async fn late_reply_with_no_call_waiting_is_counted() {
    use std::sync::Arc;
    use std::time::Duration;
    use switchboard::{CallOptions, ErrorKind, HandlerError};
    use switchboard_conformance::{STEP, eventually, within};

    let h = rabbitmq_harness::harness().await;
    let p = h.pattern("late-alone");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = h.client().await;
    let g = gate.clone();
    within(
        "register",
        server.handle(&p, move |n: u64, _ctx| {
            let g = g.clone();
            async move {
                if let Ok(permit) = g.acquire().await {
                    permit.forget();
                }
                Ok::<_, HandlerError>(n)
            }
        }),
    )
    .await
    .expect("registers");
    let client = h.client().await;
    let short = CallOptions::new().timeout(Duration::from_millis(500));
    let err = within(
        "the lone send",
        client.send_with::<u64, u64>(&p, &1, &short),
    )
    .await
    .expect_err("times out");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(client.stats().late_replies, 0);
    // The handler replies now, with no call waiting.
    gate.add_permits(1);
    eventually(STEP, "the late reply is counted", || {
        client.stats().late_replies == 1
    })
    .await;
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
}
