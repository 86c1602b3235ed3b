//! The conformance suite on NATS (JetStream events), against the real server at
//! `SB_NATS_URL` (default `nats://127.0.0.1:4222`; `scripts/test` starts it if needed).

#![cfg(feature = "nats")]

#[path = "common/nats.rs"]
mod nats_harness;

switchboard_conformance::conformance_suite!(nats_harness::harness().await);

/// Plain NATS clients take part in request-reply: a request to `sb.req.<pattern>` without any
/// header is answered; one with a deadline header past due is dropped before the handler; a
/// request on the deadline subject whose deadline token is not a number gets a codec error
/// reply (the handler never sees it) and the handler keeps serving.
#[tokio::test]
async fn foreign_nats_requests_are_served_and_malformed_ones_answered_with_an_error() {
    use futures::StreamExt;
    use switchboard::{HandlerError, header};
    use switchboard_conformance::within;

    let h = nats_harness::harness().await;
    let p = h.pattern("foreign-req");
    let server = h.client().await;
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = handled.clone();
    within(
        "register",
        server.handle(&p, move |n: u64, _ctx| {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok::<_, HandlerError>(n * 2) }
        }),
    )
    .await
    .expect("registers");
    let url = std::env::var("SB_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let raw = within(
        "connect",
        async_nats::connect(url.trim_start_matches("nats://")),
    )
    .await
    .expect("a plain client connects");

    // No headers at all: answered, as plain JSON.
    let reply = within(
        "plain request",
        raw.request(format!("sb.req.{p}"), "21".into()),
    )
    .await
    .expect("answered");
    assert_eq!(&reply.payload[..], b"42");
    assert!(
        reply.headers.is_none(),
        "a successful reply needs no headers"
    );

    // A deadline header already past: dropped before the handler, so no answer comes.
    let mut past = async_nats::HeaderMap::new();
    past.insert(header::DEADLINE, "1000");
    let req = async_nats::Request::new()
        .headers(past)
        .payload("1".into())
        .timeout(Some(std::time::Duration::from_millis(300)));
    let err = within(
        "expired request",
        raw.send_request(format!("sb.req.{p}"), req),
    )
    .await
    .expect_err("an expired request gets no reply");
    assert_eq!(err.kind(), async_nats::RequestErrorKind::TimedOut, "{err}");

    // A `send`-style reply subject whose deadline token is not a number: a codec error reply
    // naming it, sent to that reply subject.
    let reply_subject = "_SB_SEND.foreign.1.soon";
    let mut replies = within("subscribe", raw.subscribe(reply_subject))
        .await
        .expect("subscribes");
    within(
        "malformed deadline",
        raw.publish_with_reply(format!("sb.req.{p}"), reply_subject, "5".into()),
    )
    .await
    .expect("published");
    let reply = within("the error reply", replies.next())
        .await
        .expect("answered with an error");
    let headers = reply.headers.expect("an error reply has headers");
    assert_eq!(
        headers.get(header::ERROR_CODE).map(|v| v.as_str()),
        Some("codec")
    );
    let message = headers
        .get(header::ERROR_MESSAGE)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(message.contains("`soon`"), "{message}");

    // The handler saw only the first request, and still serves.
    assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 1);
    let doubled: u64 = within("send", h.client().await.send(&p, &8u64))
        .await
        .expect("still served");
    assert_eq!(doubled, 16);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
}
