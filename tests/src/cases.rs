//! The cases, one async function each, named by the behaviour SPEC.md promises.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use switchboard::{
    Backoff, CallOptions, Client, Envelope, ErrorKind, HandlerError, HandlerOptions, Raw, Route,
    Subscription, header,
};
use tokio::sync::Semaphore;

use crate::{Harness, Outcome, STEP, eventually, holds_within, within, within_for};

/// The payload of most cases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// Identifies the message within a case.
    pub id: u64,
    /// Free text.
    pub name: String,
}

fn item(id: u64) -> Item {
    Item {
        id,
        name: "Ada Lovelace".into(),
    }
}

fn fast_retries(max_attempts: u32) -> HandlerOptions {
    HandlerOptions::new()
        .max_attempts(max_attempts)
        .backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(50),
        ))
}

async fn echo_server(h: &Harness, pattern: &str) -> Client {
    let server = h.client().await;
    within(
        "register echo handler",
        server.handle(pattern, |req: Item, _ctx| async move {
            Ok::<_, HandlerError>(req)
        }),
    )
    .await
    .expect("handler registers");
    server
}

/// Registers on `server` an echo handler for `pattern` that first waits for a permit of `gate`
/// when `gated(request)` holds: one permit per request; a closed gate lets everything through.
async fn gated_echo(
    server: &Client,
    pattern: &str,
    gate: &Arc<Semaphore>,
    gated: fn(&Item) -> bool,
) {
    let g = gate.clone();
    within(
        "register gated handler",
        server.handle(pattern, move |req: Item, _ctx| {
            let g = g.clone();
            async move {
                if gated(&req)
                    && let Ok(permit) = g.acquire().await
                {
                    permit.forget();
                }
                Ok::<_, HandlerError>(req)
            }
        }),
    )
    .await
    .expect("handler registers");
}

/// Registers on `server` a handler for events on `pattern` in `group` that records each id it
/// handles.
async fn recording_group(
    server: &Client,
    pattern: &str,
    group: &str,
    opts: HandlerOptions,
) -> Arc<Mutex<Vec<u64>>> {
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let hd = handled.clone();
    within(
        "subscribe recording handler",
        server.on_event_with(pattern, group, opts, move |e: Item, _ctx| {
            let hd = hd.clone();
            async move {
                hd.lock().expect("lock").push(e.id);
                Ok(())
            }
        }),
    )
    .await
    .expect("subscribes");
    handled
}

async fn next_dead_letter(sub: &mut Subscription) -> Envelope {
    let d = within("a dead letter", sub.next())
        .await
        .expect("dead-letter subscription ended");
    let env = d.envelope().clone();
    within("ack the dead letter", d.ack())
        .await
        .expect("dead letter acked");
    env
}

/// `send` returns the handler's reply.
pub async fn send_gets_its_reply(h: Harness) -> Outcome {
    let p = h.pattern("send");
    let server = echo_server(&h, &p).await;
    let client = h.client().await;
    for id in 0..20 {
        let reply: Item = within("send", client.send(&p, &item(id)))
            .await
            .expect("reply");
        assert_eq!(reply, item(id));
    }
    assert_eq!(client.stats().sent, 20);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A handler is reachable as soon as `handle` returns: a `send` from another client right
/// after it finds the handler, never `NoResponder` (the registration reached the broker, not
/// only the socket). Repeated, since the failure it guards against is a race.
pub async fn handler_is_reachable_once_handle_returns(h: Harness) -> Outcome {
    let server = h.client().await;
    let client = h.client().await;
    for round in 0..100 {
        let p = h.pattern("reachable");
        within(
            "register",
            server.handle(
                &p,
                |req: Item, _ctx| async move { Ok::<_, HandlerError>(req) },
            ),
        )
        .await
        .expect("registers");
        let reply: Item = within("send", client.send(&p, &item(round)))
            .await
            .unwrap_or_else(|e| panic!("round {round}: send right after handle: {e}"));
        assert_eq!(reply, item(round));
    }
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A handler's `Err` reaches the caller as a `Handler` error with its code: through `send` and
/// through `request`, at once and never as a timeout.
pub async fn handler_error_reaches_the_caller_as_a_typed_error(h: Harness) -> Outcome {
    let p = h.pattern("handler-error");
    let server = h.client().await;
    within(
        "register",
        server.handle(&p, |req: Item, _ctx| async move {
            Err::<Item, _>(HandlerError::new(
                "not_found",
                format!("no item {}", req.id),
            ))
        }),
    )
    .await
    .expect("registers");
    let client = h.client().await;
    let opts = CallOptions::new().timeout(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let err = within("send", client.send_with::<Item, Item>(&p, &item(7), &opts))
        .await
        .expect_err("handler error");
    assert_eq!(err.kind(), ErrorKind::Handler, "{err}");
    assert_eq!(err.code(), "not_found");
    assert!(err.message().contains("no item 7"), "{err}");
    assert!(!err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a handler error must not wait for the timeout"
    );
    let pending = within("request", client.request::<Item, Item>(&p, &item(8)))
        .await
        .expect("accepted");
    let err = within("reply", pending).await.expect_err("handler error");
    assert_eq!(err.kind(), ErrorKind::Handler);
    assert_eq!(err.code(), "not_found");
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// `send` to a pattern nobody serves fails with a clear error within its deadline:
/// `NoResponder` where the transport can tell, otherwise `Timeout` at the deadline.
pub async fn send_without_handler_fails_within_the_deadline(h: Harness) -> Outcome {
    let p = h.pattern("nobody");
    let client = h.client().await;
    let timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let err = within(
        "send",
        client.send_with::<Item, Item>(&p, &item(1), &CallOptions::new().timeout(timeout)),
    )
    .await
    .expect_err("nobody answers");
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_millis(400), "took {took:?}");
    if h.caps().detects_no_responder {
        assert_eq!(err.kind(), ErrorKind::NoResponder, "{err}");
        assert!(
            err.to_string().contains(&p),
            "the error names the pattern: {err}"
        );
        assert!(
            took < timeout,
            "no-responder is detected before the deadline"
        );
    } else {
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    }
    assert!(err.is_retryable());
    // The same through `request`: the handle learns it too, before its deadline.
    let started = std::time::Instant::now();
    let pending = within(
        "request",
        client.request_with::<Item, Item>(&p, &item(2), &CallOptions::new().timeout(timeout)),
    )
    .await;
    let err = match pending {
        Ok(handle) => within("await the handle", handle)
            .await
            .expect_err("nobody answers"),
        // Detected while publishing.
        Err(e) => e,
    };
    let took = started.elapsed();
    if h.caps().detects_no_responder {
        assert_eq!(err.kind(), ErrorKind::NoResponder, "request: {err}");
        assert!(err.to_string().contains(&p), "request: {err}");
        assert!(took < timeout, "request: detected before the deadline");
    } else {
        assert_eq!(err.kind(), ErrorKind::Timeout, "request: {err}");
    }
    Outcome::Passed
}

/// A `send` whose handler is too slow fails with `Timeout` at its deadline, not before and not
/// long after.
pub async fn send_times_out_at_its_deadline(h: Harness) -> Outcome {
    let p = h.pattern("slow");
    let gate = Arc::new(Semaphore::new(0));
    let server = h.client().await;
    gated_echo(&server, &p, &gate, |_| true).await;
    let client = h.client().await;
    let timeout = Duration::from_millis(300);
    let started = std::time::Instant::now();
    let err = within(
        "send",
        client.send_with::<Item, Item>(&p, &item(1), &CallOptions::new().timeout(timeout)),
    )
    .await
    .expect_err("times out");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("300ms"), "{err}");
    assert!(took >= timeout, "timed out early: {took:?}");
    assert!(
        took < timeout + Duration::from_millis(400),
        "timed out late: {took:?}"
    );
    gate.close();
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A request that waited in the queue past its deadline is dropped before its handler runs,
/// and counted.
pub async fn expired_request_never_reaches_its_handler(h: Harness) -> Outcome {
    let p = h.pattern("expired");
    let gate = Arc::new(Semaphore::new(0));
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let server = h.client().await;
    let (g, s) = (gate.clone(), seen.clone());
    within(
        "register",
        server.handle_with(
            &p,
            HandlerOptions::new().concurrency(1),
            move |req: Item, _ctx| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    s.lock().expect("lock").push(req.id);
                    if req.id == 1 {
                        let _ = g.acquire().await;
                    }
                    Ok::<_, HandlerError>(req)
                }
            },
        ),
    )
    .await
    .expect("registers");
    let client = h.client().await;
    // Request 1 occupies the only slot until the gate opens.
    let first = within(
        "request 1",
        client.request_with::<Item, Item>(&p, &item(1), &CallOptions::new().timeout(STEP)),
    )
    .await
    .expect("accepted");
    if !holds_within(STEP, || seen.lock().expect("lock").contains(&1)).await {
        // What became of the request says why (refused as having no responder, expired, or
        // still unanswered).
        let ended = tokio::time::timeout(STEP, first).await;
        panic!(
            "request 1 did not reach its handler within {STEP:?}; the request ended with: {ended:?}"
        );
    }
    // Request 2 waits behind it and its deadline passes.
    let err = within(
        "request 2",
        client.send_with::<Item, Item>(
            &p,
            &item(2),
            &CallOptions::new().timeout(Duration::from_millis(200)),
        ),
    )
    .await
    .expect_err("expires");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    gate.add_permits(1);
    assert_eq!(within("reply 1", first).await.expect("reply"), item(1));
    eventually(STEP, "the expired request is counted", || {
        server.stats().expired_dropped >= 1
    })
    .await;
    assert_eq!(
        *seen.lock().expect("lock"),
        vec![1],
        "request 2 reached its handler"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Event items handled, with their message ids, by (group, member).
type HandledBy = HashMap<(&'static str, usize), Vec<(u64, switchboard::MessageId)>>;

/// Every consumer group gets each event exactly once; within a group one member handles it;
/// every group sees the same message id for an event, and each event has its own.
pub async fn emit_reaches_every_group_once_and_one_member_per_group(h: Harness) -> Outcome {
    let p = h.pattern("fanout");
    let n = 60u64;
    // seen[(group, member)] = ids handled
    let seen: Arc<Mutex<HandledBy>> = Arc::default();
    let mut services = Vec::new();
    for (group, member) in [("billing", 0), ("billing", 1), ("audit", 0)] {
        let c = h.client().await;
        let s = seen.clone();
        within(
            "subscribe",
            c.on_event(&p, group, move |e: Item, ctx| {
                let s = s.clone();
                async move {
                    s.lock()
                        .expect("lock")
                        .entry((group, member))
                        .or_default()
                        .push((e.id, ctx.envelope().id));
                    Ok(())
                }
            }),
        )
        .await
        .expect("subscribes");
        services.push(c);
    }
    let emitter = h.client().await;
    for id in 0..n {
        within("emit", emitter.emit(&p, &item(id)))
            .await
            .expect("accepted");
    }
    let total = |seen: &HandledBy, g: &str| -> usize {
        seen.iter()
            .filter(|((gr, _), _)| *gr == g)
            .map(|(_, v)| v.len())
            .sum()
    };
    eventually(STEP * 2, "both groups handled every event", || {
        let s = seen.lock().expect("lock");
        total(&s, "billing") >= n as usize && total(&s, "audit") >= n as usize
    })
    .await;
    let s = seen.lock().expect("lock").clone();
    let mut message_ids = Vec::new();
    for g in ["billing", "audit"] {
        let ids: Vec<u64> = s
            .iter()
            .filter(|((gr, _), _)| *gr == g)
            .flat_map(|(_, v)| v.iter().map(|(id, _)| *id))
            .collect();
        let unique: HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(
            ids.len(),
            n as usize,
            "group {g} handled {} events",
            ids.len()
        );
        assert_eq!(unique.len(), n as usize, "group {g} handled duplicates");
        let by_item: HashMap<u64, switchboard::MessageId> = s
            .iter()
            .filter(|((gr, _), _)| *gr == g)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        message_ids.push(by_item);
    }
    // An event has one message id, whichever group reads it, and no two events share one.
    assert_eq!(
        message_ids[0], message_ids[1],
        "the groups saw different message ids for the same events"
    );
    let distinct: HashSet<_> = message_ids[0].values().collect();
    assert_eq!(distinct.len(), n as usize, "two events shared a message id");
    assert_eq!(emitter.stats().emitted, n);
    for c in services {
        within("shutdown", c.shutdown()).await.expect("shutdown");
    }
    Outcome::Passed
}

/// 10,000 `request`s in flight at once, on one reply channel, each matched to its own reply.
pub async fn ten_thousand_concurrent_requests_are_all_matched(h: Harness) -> Outcome {
    let p = h.pattern("many");
    let n = h.load("ten_thousand_concurrent_requests_are_all_matched", 10_000) as u64;
    let server = h.client().await;
    within(
        "register",
        server.handle_with(
            &p,
            HandlerOptions::new().concurrency(256),
            |req: Item, _ctx| async move { Ok::<_, HandlerError>(req) },
        ),
    )
    .await
    .expect("registers");
    let client = h.client().await;
    let opts = CallOptions::new().timeout(Duration::from_secs(60));
    let mut pending = Vec::with_capacity(n as usize);
    for id in 0..n {
        let handle = within(
            "request",
            client.request_with::<Item, Item>(&p, &item(id), &opts),
        )
        .await
        .expect("accepted");
        pending.push((id, handle));
    }
    let ids: HashSet<_> = pending.iter().map(|(_, p)| p.correlation_id()).collect();
    assert_eq!(ids.len(), n as usize, "correlation ids are unique");
    let replies = within_for(
        Duration::from_secs(90),
        "all replies",
        futures::future::join_all(
            pending
                .into_iter()
                .map(|(id, p)| async move { (id, p.await) }),
        ),
    )
    .await;
    for (id, r) in replies {
        let r = r.unwrap_or_else(|e| panic!("request {id} failed: {e}"));
        assert_eq!(r.id, id, "request {id} got the reply of request {}", r.id);
    }
    assert_eq!(client.requests_in_flight(), 0);
    assert_eq!(client.stats().late_replies, 0);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A reply stream yields each request's reply once, with its correlation id, and a timeout for
/// a request that got none; then it ends.
pub async fn reply_stream_yields_every_reply_and_timeout(h: Harness) -> Outcome {
    let p = h.pattern("stream");
    let slow = h.pattern("stream-slow");
    let server = echo_server(&h, &p).await;
    let gate = Arc::new(Semaphore::new(0));
    gated_echo(&server, &slow, &gate, |_| true).await;
    let client = h.client().await;
    let mut stream = within("open stream", client.reply_stream::<Item>())
        .await
        .expect("stream");
    let mut expected = HashMap::new();
    for id in 0..200 {
        let cid = within("request", stream.request(&p, &item(id)))
            .await
            .expect("accepted");
        expected.insert(cid, id);
    }
    let slow_id = within(
        "slow request",
        stream.request_with(
            &slow,
            &item(999),
            &CallOptions::new().timeout(Duration::from_millis(200)),
        ),
    )
    .await
    .expect("accepted");
    let mut timeouts = 0;
    while let Some((cid, r)) = within("next reply", stream.next()).await {
        if cid == slow_id {
            assert_eq!(r.expect_err("times out").kind(), ErrorKind::Timeout);
            timeouts += 1;
        } else {
            let want = expected
                .remove(&cid)
                .expect("a reply for a request of this stream, once");
            assert_eq!(r.expect("reply").id, want);
        }
    }
    assert!(expected.is_empty(), "{} replies missing", expected.len());
    assert_eq!(timeouts, 1);
    gate.close();
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A reply that arrived in time is returned even when its handle is awaited long after the
/// deadline.
pub async fn reply_awaited_long_after_it_arrived_is_returned(h: Harness) -> Outcome {
    let p = h.pattern("await-later");
    let server = echo_server(&h, &p).await;
    let client = h.client().await;
    // Long enough that the reply arrives before the deadline on a loaded machine (a broker
    // drops a request that outlives it), short enough to wait out below.
    let pending = within(
        "request",
        client.request_with::<Item, Item>(
            &p,
            &item(5),
            &CallOptions::new().timeout(Duration::from_millis(1500)),
        ),
    )
    .await
    .expect("accepted");
    eventually(STEP, "the reply has arrived", || {
        client.requests_in_flight() == 0
    })
    .await;
    // Deliberately let the deadline pass before awaiting.
    tokio::time::sleep_until(pending.deadline() + Duration::from_millis(100)).await;
    let reply = within("await the handle", pending)
        .await
        .expect("reply kept");
    assert_eq!(reply, item(5));
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A reply that arrives after its request's deadline is dropped and counted, and never handed
/// to another request.
pub async fn late_reply_is_dropped_and_counted(h: Harness) -> Outcome {
    let p = h.pattern("late");
    let gate = Arc::new(Semaphore::new(0));
    let server = h.client().await;
    gated_echo(&server, &p, &gate, |req| req.id == 1).await;
    let client = h.client().await;
    // Long enough for a slow broker to hand the request to its handler before it expires: a
    // request that arrives expired is dropped unhandled, and no late reply would come (the
    // likely cause of one failure on SNS/SQS under load with 200 ms).
    let short = CallOptions::new().timeout(Duration::from_secs(2));
    let err = within(
        "send 1",
        client.send_with::<Item, Item>(&p, &item(1), &short),
    )
    .await
    .expect_err("times out");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(client.stats().late_replies, 0, "no reply came yet");
    // The handler now replies, late, while no call waits: it is counted all the same (a
    // transport whose lone call reads its own replies must hand the reading back).
    gate.add_permits(1);
    // A transport whose `send` uses its client library's own request/reply may not see a
    // late reply at all (the library drops it); it says so, and only `request` is counted.
    let send_counts = client
        .transport()
        .requester()
        .is_none_or(|r| r.late_replies().is_some());
    let after_send = if send_counts {
        eventually(
            STEP,
            "the late reply is counted with no call waiting",
            || client.stats().late_replies == 1,
        )
        .await;
        1
    } else {
        eprintln!(
            "NOTE conformance `late_reply_is_dropped_and_counted` on `{}`: late replies to `send` are dropped by the client library unseen, so only `request`'s are counted",
            h.name()
        );
        0
    };
    let reply = within("send 2", client.send::<Item, Item>(&p, &item(2)))
        .await
        .expect("reply");
    assert_eq!(reply.id, 2, "the late reply went to the wrong request");
    assert_eq!(client.stats().late_replies, after_send, "counted once");
    // The same through a handle that is not awaited before its deadline: the reply arrives
    // late, is counted, and the handle reports a timeout rather than the stale reply.
    let pending = within(
        "request",
        client.request_with::<Item, Item>(&p, &item(1), &short),
    )
    .await
    .expect("accepted");
    tokio::time::sleep_until(pending.deadline() + Duration::from_millis(20)).await;
    gate.add_permits(1);
    eventually(STEP, "the late reply to the handle is counted", || {
        client.stats().late_replies == after_send + 1
    })
    .await;
    let err = within("await the late handle", pending)
        .await
        .expect_err("late reply is not handed over");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// An event whose handler failed is delivered again, with the attempt counted and the same
/// message id.
pub async fn nacked_event_is_redelivered(h: Harness) -> Outcome {
    if !h.caps().redelivery_on_nack {
        return Outcome::Skipped("transport declares no redelivery on nack".into());
    }
    let p = h.pattern("nack");
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let server = h.client().await;
    let a = attempts.clone();
    within(
        "subscribe",
        server.on_event_with(&p, "workers", fast_retries(5), move |e: Item, ctx| {
            let a = a.clone();
            async move {
                a.lock()
                    .expect("lock")
                    .push((e.id, ctx.attempt(), ctx.envelope().id));
                if ctx.attempt() < 2 {
                    Err(HandlerError::new("flaky", "first attempt fails"))
                } else {
                    Ok(())
                }
            }
        }),
    )
    .await
    .expect("subscribes");
    let emitter = h.client().await;
    within("emit", emitter.emit(&p, &item(1)))
        .await
        .expect("accepted");
    eventually(STEP, "handled on the second attempt", || {
        server.stats().handled == 1
    })
    .await;
    let seen = attempts.lock().expect("lock").clone();
    let items: Vec<_> = seen
        .iter()
        .map(|(id, attempt, _)| (*id, *attempt))
        .collect();
    assert_eq!(items, vec![(1, 1), (1, 2)]);
    assert_eq!(seen[0].2, seen[1].2, "a redelivery keeps the message id");
    let st = server.stats();
    assert_eq!((st.failed, st.retried, st.dead_lettered), (1, 1, 0));
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A handler that panics does not take the process down: the event is retried, then
/// dead-lettered with the reason, the attempt count, the pattern and the group in its
/// headers; the consumer keeps handling other events.
pub async fn panicking_handler_is_retried_then_dead_lettered_with_reason(h: Harness) -> Outcome {
    let p = h.pattern("panic");
    let runs = Arc::new(AtomicU32::new(0));
    let good = Arc::new(AtomicU32::new(0));
    let server = h.client().await;
    let mut dead = within("subscribe dead letters", server.dead_letters(&p))
        .await
        .expect("subscribes");
    let (r, g) = (runs.clone(), good.clone());
    within(
        "subscribe",
        server.on_event_with(&p, "fragile", fast_retries(3), move |e: Item, _ctx| {
            let (r, g) = (r.clone(), g.clone());
            async move {
                if e.id == 13 {
                    r.fetch_add(1, Ordering::SeqCst);
                    panic!("unlucky item {}", e.id);
                }
                g.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
    )
    .await
    .expect("subscribes");
    let emitter = h.client().await;
    within("emit", emitter.emit(&p, &item(13)))
        .await
        .expect("accepted");
    let dl = next_dead_letter(&mut dead).await;
    let expected_attempts = if h.caps().redelivery_on_nack { 3 } else { 1 };
    assert_eq!(runs.load(Ordering::SeqCst), expected_attempts);
    let reason = dl
        .headers
        .get(header::DEAD_LETTER_REASON)
        .expect("reason header");
    assert!(
        reason.contains("panicked") && reason.contains("unlucky item 13"),
        "{reason}"
    );
    assert_eq!(
        dl.headers
            .get(header::DEAD_LETTER_ATTEMPTS)
            .map(String::as_str),
        Some(expected_attempts.to_string().as_str())
    );
    assert_eq!(dl.headers.get(header::ORIGINAL_PATTERN), Some(&p));
    assert_eq!(
        dl.headers
            .get(header::DEAD_LETTER_GROUP)
            .map(String::as_str),
        Some("fragile")
    );
    let body: Item = serde_json::from_slice(&dl.payload).expect("original payload kept");
    assert_eq!(body.id, 13);
    // The consumer survived and keeps going.
    within("emit", emitter.emit(&p, &item(14)))
        .await
        .expect("accepted");
    eventually(STEP, "the next event is handled", || {
        good.load(Ordering::SeqCst) == 1
    })
    .await;
    // Counted once the broker has confirmed the dead letter, which can come after the dead
    // letter reached its reader.
    eventually(STEP, "the dead letter is counted", || {
        server.stats().dead_lettered >= 1
    })
    .await;
    assert_eq!(server.stats().dead_lettered, 1);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Bytes that do not decode go to the dead-letter destination at once, with the reason; the
/// consumer is not blocked and handles the next event.
pub async fn poison_message_is_dead_lettered_and_consumer_continues(h: Harness) -> Outcome {
    let p = h.pattern("poison");
    let server = h.client().await;
    let mut dead = within("subscribe dead letters", server.dead_letters(&p))
        .await
        .expect("subscribes");
    let handled = recording_group(&server, &p, "strict", fast_retries(5)).await;
    let emitter = h.client().await;
    // Not JSON at all, sent as JSON.
    let mut poison = Envelope::new(p.clone(), Bytes::from_static(b"\xff\xfe{not json"));
    poison.content_type = Some("application/json".into());
    within(
        "publish poison",
        emitter.transport().publish(Route::Event(&p), poison),
    )
    .await
    .expect("accepted");
    // Valid JSON, wrong shape.
    within(
        "emit wrong shape",
        emitter.emit(&p, &serde_json::json!({"nope": true})),
    )
    .await
    .expect("accepted");
    within("emit good", emitter.emit(&p, &item(3)))
        .await
        .expect("accepted");
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dl = next_dead_letter(&mut dead).await;
        let reason = dl
            .headers
            .get(header::DEAD_LETTER_REASON)
            .cloned()
            .expect("reason");
        assert!(reason.contains("codec"), "{reason}");
        assert_eq!(
            dl.headers
                .get(header::DEAD_LETTER_ATTEMPTS)
                .map(String::as_str),
            Some("1"),
            "poison is not retried"
        );
        reasons.push(reason);
    }
    eventually(STEP, "the good event is handled", || {
        handled.lock().expect("lock").contains(&3)
    })
    .await;
    assert_eq!(*handled.lock().expect("lock"), vec![3]);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Events with the same key are handled in order, even with a concurrent handler and a failed
/// attempt in the middle.
pub async fn order_per_key_is_kept(h: Harness) -> Outcome {
    if !h.caps().ordered {
        return Outcome::Skipped("transport declares no ordering per key".into());
    }
    let p = h.pattern("order");
    let per_key = 30u64;
    let keys = ["k0", "k1", "k2"];
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let failed_once = Arc::new(AtomicU32::new(0));
    let server = h.client().await;
    let (s, f) = (seen.clone(), failed_once.clone());
    within(
        "subscribe",
        server.on_event_with(
            &p,
            "ordered",
            fast_retries(5).concurrency(8),
            move |e: Item, ctx| {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    let key = ctx.envelope().key.clone().unwrap_or_default();
                    // Give other deliveries a chance to overtake, if the transport let them.
                    tokio::task::yield_now().await;
                    if key == "k1" && e.id == 5 && f.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(HandlerError::new("flaky", "fail once in the middle"));
                    }
                    s.lock().expect("lock").entry(key).or_default().push(e.id);
                    Ok(())
                }
            },
        ),
    )
    .await
    .expect("subscribes");
    let emitter = h.client().await;
    for seq in 0..per_key {
        for k in keys {
            within(
                "emit",
                emitter.emit_with(&p, &item(seq), &CallOptions::new().key(k)),
            )
            .await
            .expect("accepted");
        }
    }
    eventually(STEP * 2, "every keyed event handled", || {
        let s = seen.lock().expect("lock");
        keys.iter()
            .all(|k| s.get(*k).is_some_and(|v| v.len() == per_key as usize))
    })
    .await;
    let s = seen.lock().expect("lock").clone();
    for k in keys {
        let want: Vec<u64> = (0..per_key).collect();
        assert_eq!(s[k], want, "key {k} out of order");
    }
    assert_eq!(
        failed_once.load(Ordering::SeqCst),
        2,
        "the failing event ran twice"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

#[derive(Debug, Serialize, Deserialize)]
struct Seen {
    id: String,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
    /// Milliseconds the handler had left until the deadline it received.
    deadline_left_ms: Option<u64>,
    /// That deadline, in Unix milliseconds.
    deadline_ms: Option<u64>,
    tenant: Option<String>,
}

fn seen_of(env: &Envelope) -> Seen {
    Seen {
        id: env.id.to_string(),
        correlation_id: env.correlation_id.map(|c| c.to_string()),
        causation_id: env.causation_id.map(|c| c.to_string()),
        traceparent: env.headers.get(header::TRACEPARENT).cloned(),
        tracestate: env.headers.get(header::TRACESTATE).cloned(),
        deadline_left_ms: env
            .time_left()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        deadline_ms: env
            .deadline
            .map(switchboard::envelope::system_time_to_millis),
        tenant: env.headers.get("x-tenant").cloned(),
    }
}

/// Correlation id, causation id, deadline, W3C trace context and user headers travel A → B → C
/// and back.
pub async fn correlation_causation_and_trace_headers_round_trip(h: Harness) -> Outcome {
    let front = h.pattern("front");
    let back = h.pattern("back");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let server = h.client().await;
    within(
        "register back",
        server.handle(&back, |_: Item, ctx| async move {
            Ok::<_, HandlerError>(seen_of(ctx.envelope()))
        }),
    )
    .await
    .expect("registers");
    let b = back.clone();
    within(
        "register front",
        server.handle(&front, move |req: Item, ctx| {
            let b = b.clone();
            async move {
                let inner: Seen = ctx.send(&b, &req).await?;
                Ok::<_, HandlerError>((seen_of(ctx.envelope()), inner))
            }
        }),
    )
    .await
    .expect("registers");
    let client = h.client().await;
    let opts = CallOptions::new()
        .header(header::TRACEPARENT, tp)
        .header(header::TRACESTATE, "vendor=1")
        .header("x-tenant", "acme");
    let pending = within(
        "request",
        client.request_with::<Item, (Seen, Seen)>(&front, &item(1), &opts),
    )
    .await
    .expect("accepted");
    let cid = pending.correlation_id().to_string();
    let (a, c) = within("reply", pending).await.expect("reply");
    assert_eq!(
        a.correlation_id.as_deref(),
        Some(cid.as_str()),
        "correlation id reached B"
    );
    assert_eq!(a.traceparent.as_deref(), Some(tp));
    assert_eq!(a.tracestate.as_deref(), Some("vendor=1"));
    assert_eq!(a.tenant.as_deref(), Some("acme"));
    // The caller's default timeout, carried as a deadline: B sees (nearly) all of it left.
    let timeout_ms = u64::try_from(client.config().timeout.as_millis()).unwrap_or(u64::MAX);
    let a_left = a
        .deadline_left_ms
        .expect("the deadline travels with the request");
    assert!(
        a_left > 0 && a_left <= timeout_ms,
        "B has {a_left} ms of a {timeout_ms} ms deadline left"
    );
    assert_eq!(
        c.causation_id.as_deref(),
        Some(a.id.as_str()),
        "C was caused by B's message"
    );
    assert_eq!(
        c.traceparent.as_deref(),
        Some(tp),
        "trace context travels to C"
    );
    assert!(c.deadline_left_ms.is_some(), "the deadline travels to C");
    // C's deadline is B's (re-derived from the time B had left, so within a millisecond).
    let (b_at, c_at) = (a.deadline_ms.expect("B's"), c.deadline_ms.expect("C's"));
    assert!(
        c_at <= b_at + 1,
        "C inherits B's deadline: {c_at} at C, {b_at} at B (Unix ms)"
    );
    assert!(c.correlation_id.is_some());
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Stopping a handler finishes the deliveries it holds, acknowledges nothing unfinished, and
/// leaves the rest for the next member: every event is handled, none twice.
pub async fn graceful_shutdown_loses_nothing(h: Harness) -> Outcome {
    let p = h.pattern("drain");
    let n = 60usize;
    let started: Arc<Mutex<Vec<u64>>> = Arc::default();
    let finished: Arc<Mutex<Vec<u64>>> = Arc::default();
    // Once 8 are done, handlers wait at this gate until shutdown has begun: however fast or
    // slow the transport brings events, shutdown finds handlers mid-way and events unstarted.
    let gate = Arc::new(Semaphore::new(0));
    let handler = {
        let (st, fi, gate) = (started.clone(), finished.clone(), gate.clone());
        move |e: Item, _ctx: switchboard::Context| {
            let (st, fi, gate) = (st.clone(), fi.clone(), gate.clone());
            async move {
                st.lock().expect("lock").push(e.id);
                let hold = fi.lock().expect("lock").len() >= 8;
                if hold {
                    let _ = tokio::time::timeout(STEP * 6, gate.acquire()).await;
                }
                // Work that takes a while.
                tokio::time::sleep(Duration::from_millis(30)).await;
                fi.lock().expect("lock").push(e.id);
                Ok(())
            }
        }
    };
    let first = h.client().await;
    let service = within(
        "subscribe",
        first.on_event_with(
            &p,
            "drainers",
            HandlerOptions::new().concurrency(4),
            handler.clone(),
        ),
    )
    .await
    .expect("subscribes");
    let emitter = h.client().await;
    for id in 0..n as u64 {
        within("emit", emitter.emit(&p, &item(id)))
            .await
            .expect("accepted");
    }
    eventually(STEP, "some events handled", || {
        finished.lock().expect("lock").len() >= 8
    })
    .await;
    // Shutdown stops taking deliveries as it starts; then the held handlers may finish.
    let shutdown = service.shutdown();
    tokio::pin!(shutdown);
    let _ = futures::poll!(&mut shutdown);
    gate.close();
    within("graceful shutdown", shutdown).await;
    {
        let st = started.lock().expect("lock");
        let fi = finished.lock().expect("lock");
        let st_set: HashSet<_> = st.iter().collect();
        let fi_set: HashSet<_> = fi.iter().collect();
        assert_eq!(st_set, fi_set, "shutdown returned with handlers unfinished");
        assert!(fi.len() < n, "shutdown came too late to test anything");
    }
    let second = h.client().await;
    within(
        "subscribe again",
        second.on_event_with(
            &p,
            "drainers",
            HandlerOptions::new().concurrency(4),
            handler,
        ),
    )
    .await
    .expect("subscribes");
    eventually(STEP * 2, "every event handled", || {
        finished.lock().expect("lock").len() >= n
    })
    .await;
    let fi = finished.lock().expect("lock").clone();
    let unique: HashSet<_> = fi.iter().collect();
    assert_eq!(unique.len(), n, "events lost");
    assert_eq!(fi.len(), n, "events handled twice");
    within("shutdown", first.shutdown())
        .await
        .expect("shutdown");
    within("shutdown", second.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A handler never runs more deliveries at once than its concurrency allows.
pub async fn handler_concurrency_is_bounded(h: Harness) -> Outcome {
    let p = h.pattern("bounded");
    let limit = 3usize;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let server = h.client().await;
    let (nw, pk, dn) = (now.clone(), peak.clone(), done.clone());
    within(
        "subscribe",
        server.on_event_with(
            &p,
            "bounded",
            HandlerOptions::new().concurrency(limit),
            move |_: Item, _ctx| {
                let (nw, pk, dn) = (nw.clone(), pk.clone(), dn.clone());
                async move {
                    let cur = nw.fetch_add(1, Ordering::SeqCst) + 1;
                    pk.fetch_max(cur, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    nw.fetch_sub(1, Ordering::SeqCst);
                    dn.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ),
    )
    .await
    .expect("subscribes");
    let emitter = h.client().await;
    for id in 0..30 {
        within("emit", emitter.emit(&p, &item(id)))
            .await
            .expect("accepted");
    }
    eventually(STEP, "all handled", || done.load(Ordering::SeqCst) == 30).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak <= limit, "{peak} handlers ran at once, limit {limit}");
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A request handler never runs more requests at once than its concurrency allows, however
/// many `send`s wait (on the in-memory transport some run in their callers' tasks, some in the
/// handler's own: the bound holds across both), and every caller gets its own reply.
pub async fn request_handler_concurrency_is_bounded(h: Harness) -> Outcome {
    let p = h.pattern("bounded-rr");
    let limit = 3usize;
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let server = h.client().await;
    let (nw, pk) = (now.clone(), peak.clone());
    within(
        "register handler",
        server.handle_with(
            &p,
            HandlerOptions::new().concurrency(limit),
            move |req: Item, _ctx| {
                let (nw, pk) = (nw.clone(), pk.clone());
                async move {
                    let cur = nw.fetch_add(1, Ordering::SeqCst) + 1;
                    pk.fetch_max(cur, Ordering::SeqCst);
                    // Holds its place a while, so the other callers find the places taken.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    nw.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, HandlerError>(req)
                }
            },
        ),
    )
    .await
    .expect("handler registers");
    let client = h.client().await;
    let calls = (0..40u64).map(|id| {
        let client = client.clone();
        let p = p.clone();
        async move {
            let reply: Item = client
                .send_with(&p, &item(id), &CallOptions::new().timeout(STEP))
                .await
                .expect("reply");
            assert_eq!(reply.id, id, "a caller got another's reply");
        }
    });
    within("40 concurrent sends", futures::future::join_all(calls)).await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= limit,
        "{peak} requests handled at once, limit {limit}"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// `send`s keep getting their replies while request handlers join and leave the pattern (on
/// Kafka: two consumer-group rebalances of the responders' group). Callers send without pause;
/// a second handler joins, then the first leaves with a graceful shutdown, and the sends go on
/// after each change. Every send gets its own reply: none is lost, none hangs, none fails.
pub async fn replies_survive_handlers_joining_and_leaving(h: Harness) -> Outcome {
    let p = h.pattern("rebalance");
    let echo = |count: Arc<AtomicUsize>| {
        move |req: Item, _ctx: switchboard::Context| {
            let count = count.clone();
            async move {
                count.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(req)
            }
        }
    };
    let (by_first, by_second) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let first = h.client().await;
    let first_service = within("first handler", first.handle(&p, echo(by_first.clone())))
        .await
        .expect("registers");
    let caller = h.client().await;
    let (next, replied) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicUsize::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Eight callers, each sending again as soon as its reply came, until told to stop.
    let callers = futures::future::join_all((0..8).map(|_| {
        let (caller, p) = (caller.clone(), p.clone());
        let (next, replied, stop) = (next.clone(), replied.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::SeqCst) {
                let id = u64::from(next.fetch_add(1, Ordering::SeqCst));
                let reply: Item = caller
                    .send_with(&p, &item(id), &CallOptions::new().timeout(STEP * 4))
                    .await
                    .unwrap_or_else(|e| panic!("send {id} failed while handlers changed: {e}"));
                assert_eq!(reply.id, id, "send {id} got the reply of send {}", reply.id);
                replied.fetch_add(1, Ordering::SeqCst);
                // On the in-memory transport a `send` can finish without ever waiting: give
                // the membership changes below their turn.
                tokio::task::yield_now().await;
            }
        }
    }));
    let changes = async {
        let at_least = |n: usize| {
            let replied = replied.clone();
            move || replied.load(Ordering::SeqCst) >= n
        };
        eventually(STEP * 2, "50 replies", at_least(50)).await;
        let second = h.client().await;
        within("second handler", second.handle(&p, echo(by_second.clone())))
            .await
            .expect("registers");
        let joined = replied.load(Ordering::SeqCst);
        eventually(
            STEP * 4,
            "50 more replies after the join",
            at_least(joined + 50),
        )
        .await;
        within_for(
            STEP * 2,
            "the first handler leaves",
            first_service.shutdown(),
        )
        .await;
        let left = replied.load(Ordering::SeqCst);
        let second_before = by_second.load(Ordering::SeqCst);
        eventually(
            STEP * 4,
            "50 more replies after the leave",
            at_least(left + 50),
        )
        .await;
        stop.store(true, Ordering::SeqCst);
        (second, second_before)
    };
    let (_, (second, second_before)) = within_for(
        STEP * 12,
        "sends while handlers join and leave",
        futures::future::join(callers, changes),
    )
    .await;
    let sent = next.load(Ordering::SeqCst) as usize;
    assert_eq!(
        replied.load(Ordering::SeqCst),
        sent,
        "every send has its reply"
    );
    assert!(
        by_second.load(Ordering::SeqCst) > second_before,
        "after the first handler left, the second handled nothing"
    );
    for c in [first, second, caller] {
        within("shutdown", c.shutdown()).await.expect("shutdown");
    }
    Outcome::Passed
}

/// A caller that stops waiting (its deadline passed) does not cut its request's handler short:
/// the handler runs to its end, and a graceful shutdown of the service waits for it.
pub async fn handler_outlives_its_callers_timeout(h: Harness) -> Outcome {
    let p = h.pattern("outlive");
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let server = h.client().await;
    let (g, st, fi) = (gate.clone(), started.clone(), finished.clone());
    let service = within(
        "register handler",
        server.handle(&p, move |req: Item, _ctx| {
            let (g, st, fi) = (g.clone(), st.clone(), fi.clone());
            async move {
                st.fetch_add(1, Ordering::SeqCst);
                if let Ok(permit) = g.acquire().await {
                    permit.forget();
                }
                fi.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(req)
            }
        }),
    )
    .await
    .expect("handler registers");
    let client = h.client().await;
    let err = within(
        "send",
        client.send_with::<Item, Item>(
            &p,
            &item(1),
            &CallOptions::new().timeout(Duration::from_millis(300)),
        ),
    )
    .await
    .expect_err("times out");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the handler never started"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the handler did not wait"
    );
    // Shutdown must wait for the handler, which is still waiting at its gate.
    let drain = tokio::spawn(service.shutdown());
    gate.add_permits(1);
    within("graceful shutdown", drain)
        .await
        .expect("shutdown task");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the handler was cut short when its caller gave up"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A message with none of the SDK's metadata (no content type, no ids), as a foreign producer
/// would send it, still reaches an event handler with its payload as-is.
pub async fn event_without_sdk_metadata_is_delivered_as_is(h: Harness) -> Outcome {
    let p = h.pattern("foreign");
    let got: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let server = h.client().await;
    let g = got.clone();
    within(
        "subscribe raw",
        server.on_event(&p, "raw", move |body: Raw, _ctx| {
            let g = g.clone();
            async move {
                g.lock().expect("lock").push(body.0);
                Ok(())
            }
        }),
    )
    .await
    .expect("subscribes");
    let typed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let t = typed.clone();
    within(
        "subscribe typed",
        server.on_event(&p, "typed", move |e: Item, _ctx| {
            let t = t.clone();
            async move {
                t.lock().expect("lock").push(e.id);
                Ok(())
            }
        }),
    )
    .await
    .expect("subscribes");
    let body = Bytes::from_static(br#"{"id":42,"name":"x"}"#);
    match h.publish_foreign(&p, &[], body.clone()).await {
        Some(r) => r.expect("foreign publish accepted"),
        None => {
            eprintln!(
                "NOTE conformance `event_without_sdk_metadata_is_delivered_as_is` on `{}`: no foreign producer in the harness; publishing a bare envelope through the SPI instead",
                h.name()
            );
            let bare = Envelope::new(p.clone(), body);
            assert!(bare.content_type.is_none());
            let emitter = h.client().await;
            within(
                "publish",
                emitter.transport().publish(Route::Event(&p), bare),
            )
            .await
            .expect("accepted");
        }
    }
    eventually(STEP, "both groups got it", || {
        !got.lock().expect("lock").is_empty() && !typed.lock().expect("lock").is_empty()
    })
    .await;
    assert_eq!(
        &got.lock().expect("lock")[0][..],
        br#"{"id":42,"name":"x"}"#
    );
    assert_eq!(*typed.lock().expect("lock"), vec![42]);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// A foreign message whose SDK headers are present but malformed goes to the dead-letter
/// destination with the reason; the consumer keeps going.
pub async fn malformed_foreign_message_is_dead_lettered_with_reason(h: Harness) -> Outcome {
    let p = h.pattern("malformed");
    let server = h.client().await;
    let mut dead = within("subscribe dead letters", server.dead_letters(&p))
        .await
        .expect("subscribes");
    let handled = recording_group(&server, &p, "careful", HandlerOptions::new()).await;
    let body = Bytes::from_static(br#"{"id":1,"name":"x"}"#);
    let bad_headers = [
        ("ce-id", "not-a-uuid"),
        ("content-type", "application/json"),
    ];
    match h.publish_foreign(&p, &bad_headers, body).await {
        Some(r) => r.expect("foreign publish accepted"),
        None => {
            return Outcome::Skipped(
                "the harness has no foreign producer for this transport".into(),
            );
        }
    }
    let dl = next_dead_letter(&mut dead).await;
    let reason = dl
        .headers
        .get(header::DEAD_LETTER_REASON)
        .expect("reason header");
    assert!(
        reason.contains("malformed") && reason.contains("ce-id"),
        "{reason}"
    );
    assert_eq!(
        &dl.payload[..],
        br#"{"id":1,"name":"x"}"#,
        "payload kept as received"
    );
    let emitter = h.client().await;
    within("emit", emitter.emit(&p, &item(2)))
        .await
        .expect("accepted");
    eventually(STEP, "the next event is handled", || {
        handled.lock().expect("lock").contains(&2)
    })
    .await;
    assert_eq!(*handled.lock().expect("lock"), vec![2]);
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Bad input is a typed error with a clear message, never a panic: malformed patterns, an
/// oversized payload, a reply that does not decode.
pub async fn bad_input_is_a_typed_error(h: Harness) -> Outcome {
    let client = h.client().await;
    for bad in ["", "a..b", ".a", "a.", "has space", "a/b", "ünï"] {
        let err = within("emit", client.emit(bad, &item(1)))
            .await
            .expect_err("bad pattern");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad:?}: {err}");
        assert!(err.to_string().contains("invalid pattern"), "{err}");
    }
    let p = h.pattern("big");
    let big = Raw(Bytes::from(vec![7u8; h.caps().max_payload + 1]));
    let err = within("emit big", client.emit(&p, &big))
        .await
        .expect_err("too large");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(err.to_string().contains("exceeds the limit"), "{err}");
    // A reply that does not decode as the caller's type is a codec error.
    let server = echo_server(&h, &p).await;
    let err = within("send", client.send::<Item, Vec<String>>(&p, &item(1)))
        .await
        .expect_err("wrong reply type");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    // A request that does not decode as the handler's type comes back as a codec error.
    let err = within(
        "send",
        client.send::<_, Item>(&p, &serde_json::json!({"nope": 1})),
    )
    .await
    .expect_err("wrong request type");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    // A reply too large for the transport comes back as that error, not as a timeout.
    let huge = h.pattern("huge-reply");
    let limit = h.caps().max_payload;
    within(
        "register",
        server.handle(&huge, move |_: Item, _ctx| async move {
            Ok::<_, HandlerError>(Raw(Bytes::from(vec![1u8; limit + 1])))
        }),
    )
    .await
    .expect("registers");
    let started = std::time::Instant::now();
    let err = within("send", client.send::<Item, Raw>(&huge, &item(1)))
        .await
        .expect_err("reply too large");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reported at once"
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// Shutting a client down fails its requests still waiting for a reply with `Closed` at once,
/// rather than leaving them to their deadline; later calls fail with `Closed` too.
pub async fn requests_waiting_at_shutdown_fail_with_closed(h: Harness) -> Outcome {
    let p = h.pattern("closing");
    let gate = Arc::new(Semaphore::new(0));
    let server = h.client().await;
    gated_echo(&server, &p, &gate, |_| true).await;
    let client = h.client().await;
    let opts = CallOptions::new().timeout(Duration::from_secs(30));
    let pending = within(
        "request",
        client.request_with::<Item, Item>(&p, &item(1), &opts),
    )
    .await
    .expect("accepted");
    within("client shutdown", client.shutdown())
        .await
        .expect("shutdown");
    let err = within("the waiting request", pending)
        .await
        .expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = within(
        "send after shutdown",
        client.send::<Item, Item>(&p, &item(2)),
    )
    .await
    .expect_err("closed");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    gate.close();
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}

/// The broker restarts while 10,000 events are emitted and a `send` waits for its reply.
/// Every event whose `emit` returned `Ok` is handled afterwards (lost must be 0); duplicates
/// are counted and reported. The waiting `send` fails with a retryable error well before its
/// deadline, and requests are served again once the broker is back.
pub async fn broker_restart_loses_no_accepted_event(h: Harness) -> Outcome {
    if !h.caps().durable {
        return Outcome::Skipped("transport declares events not durable across a restart".into());
    }
    if h.restart_broker_available().is_none() {
        return Outcome::Skipped("the harness cannot restart this transport's broker".into());
    }
    let p = h.pattern("restart");
    let n = h.load("broker_restart_loses_no_accepted_event", 10_000);
    let counts: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let server = h.client().await;
    let c = counts.clone();
    within(
        "subscribe",
        server.on_event_with(
            &p,
            "survivors",
            HandlerOptions::new().concurrency(64),
            move |e: Item, _ctx| {
                let c = c.clone();
                async move {
                    *c.lock().expect("lock").entry(e.id).or_default() += 1;
                    Ok(())
                }
            },
        ),
    )
    .await
    .expect("subscribes");

    // A send that is waiting for its reply when the broker goes away.
    let slow = h.pattern("restart-send");
    let gate = Arc::new(Semaphore::new(0));
    gated_echo(&server, &slow, &gate, |req| req.id == 0).await;
    let caller = h.client().await;
    let deadline = Duration::from_secs(30);
    let waiting = {
        let (caller, slow) = (caller.clone(), slow.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let r = caller
                .send_with::<Item, Item>(&slow, &item(0), &CallOptions::new().timeout(deadline))
                .await;
            (r, started.elapsed())
        })
    };

    // The emitter: 64 emits outstanding at a time, recording which were accepted.
    let emitter = h.client().await;
    let done = Arc::new(AtomicUsize::new(0));
    let emitting = {
        let (emitter, p, done) = (emitter.clone(), p.clone(), done.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..n as u64)
                .map(|id| {
                    let (emitter, p, done) = (emitter.clone(), p.clone(), done.clone());
                    async move {
                        let r = emitter.emit(&p, &item(id)).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        (id, r)
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
        })
    };
    eventually(
        Duration::from_secs(60),
        "a fifth of the events emitted",
        || done.load(Ordering::Relaxed) >= n / 5,
    )
    .await;
    let restart = within_for(
        Duration::from_secs(130),
        "restart the broker",
        h.restart_broker(),
    )
    .await
    .expect("the harness can restart the broker");
    restart.unwrap_or_else(|e| panic!("restarting the broker failed: {e}"));

    let (sent, took) = within_for(deadline + STEP, "the waiting send ends", waiting)
        .await
        .expect("send task");
    let err = sent.expect_err("the send cannot have been answered: its handler was gated");
    assert!(
        err.is_retryable(),
        "a send cut off by a restart fails with a retryable error: {err}"
    );
    assert!(
        took < deadline,
        "the send failed at its deadline ({took:?}), not when the connection went: {err}"
    );

    let results = within_for(Duration::from_secs(120), "the emits finish", emitting)
        .await
        .expect("emit task");
    let accepted: Vec<u64> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| *id)
        .collect();
    let refused = results.len() - accepted.len();
    let first_refusal = results.iter().find_map(|(_, r)| r.as_ref().err());
    if let Some(e) = first_refusal {
        assert!(
            e.is_retryable(),
            "an emit refused during the restart says it can be retried: {e}"
        );
    }
    let all_in = || {
        let c = counts.lock().expect("lock");
        accepted.iter().all(|id| c.contains_key(id))
    };
    // Redelivery after a restart can take an ack-wait; the bound is generous.
    let deadline_all = std::time::Instant::now() + Duration::from_secs(90);
    while !all_in() && std::time::Instant::now() < deadline_all {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (lost, duplicates) = {
        let c = counts.lock().expect("lock");
        let lost = accepted.iter().filter(|id| !c.contains_key(id)).count();
        let dups: u32 = c.values().map(|k| k - 1).sum();
        (lost, dups)
    };
    eprintln!(
        "NOTE conformance `broker_restart_loses_no_accepted_event` on `{}`: {n} emits, {} accepted, {refused} refused during the restart{}; lost {lost}, duplicated {duplicates}",
        h.name(),
        accepted.len(),
        first_refusal
            .map(|e| format!(" (the first: {e})"))
            .unwrap_or_default()
    );
    assert_eq!(lost, 0, "events whose emit returned Ok were lost");
    assert!(!accepted.is_empty(), "no emit was accepted at all");

    // Requests are served again once the broker is back.
    let echo = h.pattern("restart-echo");
    let _ = echo_server(&h, &echo).await;
    let mut answered = None;
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while answered.is_none() && std::time::Instant::now() < until {
        match caller
            .send_with::<Item, Item>(&echo, &item(7), &CallOptions::new().timeout(STEP))
            .await
        {
            Ok(r) => answered = Some(r),
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(answered.map(|r| r.id), Some(7), "requests are served again");
    gate.close();
    // Bounded by the drain timeout (30 s) plus closing. After a RabbitMQ restart the shutdown
    // has been seen to take longer than a step (1 run in 4, not yet explained): reported
    // loudly, not hidden.
    let t = std::time::Instant::now();
    let _ = within_for(
        Duration::from_secs(45),
        "shutdown after the restart",
        server.shutdown(),
    )
    .await;
    if t.elapsed() > STEP {
        eprintln!(
            "NOTE conformance `broker_restart_loses_no_accepted_event` on `{}`: shutdown after the restart took {:?}",
            h.name(),
            t.elapsed()
        );
    }
    Outcome::Passed
}

/// A handler on `pattern` that counts its calls and fails with the transient code
/// `unavailable` on the calls `fail(call number)` names.
async fn flaky_server(
    h: &Harness,
    pattern: &str,
    fail: impl Fn(u32) -> bool + Send + Sync + 'static,
) -> (Client, Arc<AtomicU32>) {
    let server = h.client().await;
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    within(
        "register flaky handler",
        server.handle(pattern, move |n: u32, _ctx| {
            let call = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let failed = fail(call);
            async move {
                if failed {
                    Err(HandlerError::new("unavailable", "down for a moment"))
                } else {
                    Ok(n + 1)
                }
            }
        }),
    )
    .await
    .expect("handler registers");
    (server, calls)
}

/// The caller-side retry policy across this transport: a transient failure is retried and
/// recovered; a service that keeps failing is retried only until the call's deadline, which
/// the last attempt does not outlive.
pub async fn policy_retries_transient_failures_until_the_deadline(h: Harness) -> Outcome {
    use switchboard::resilience::{Policies, Policy, Resilient, Retry};
    let (recovering, always) = (h.pattern("retry-recover"), h.pattern("retry-deadline"));
    let (server_a, calls_a) = flaky_server(&h, &recovering, |call| call <= 2).await;
    let (server_b, calls_b) = flaky_server(&h, &always, |_| true).await;
    let backoff = Backoff::exponential(Duration::from_millis(20), Duration::from_millis(100));
    let deadline = Duration::from_secs(2);
    let policies = Policies::new()
        .pattern(
            &recovering,
            Policy::new().retry(Retry::attempts(5).backoff(backoff)),
        )
        .pattern(
            &always,
            Policy::new()
                .timeout(deadline)
                .retry(Retry::attempts(10_000).backoff(backoff)),
        );
    let client = Resilient::new(h.client().await, policies).expect("valid policies");

    let got: u32 = within("send with retries", client.send(&recovering, &1u32))
        .await
        .expect("the third attempt succeeds");
    assert_eq!(got, 2);
    assert_eq!(calls_a.load(Ordering::SeqCst), 3);

    let started = tokio::time::Instant::now();
    let err = within(
        "send until the deadline",
        client.send::<_, u32>(&always, &1u32),
    )
    .await
    .expect_err("the service keeps failing");
    let took = started.elapsed();
    assert!(
        err.code() == "unavailable" || err.kind() == ErrorKind::Timeout,
        "{err}"
    );
    assert!(
        took <= deadline + Duration::from_millis(250),
        "retries outlived the deadline: {took:?}"
    );
    let attempts = calls_b.load(Ordering::SeqCst);
    assert!(attempts >= 2, "retried: {attempts} attempts");
    for s in [server_a, server_b] {
        within("shutdown", s.shutdown()).await.expect("shutdown");
    }
    Outcome::Passed
}

/// The caller-side circuit breaker across this transport: it opens once the failure rate over
/// the minimum volume reaches the threshold, fails calls at once while open (the service is
/// not called), lets a probe through after the reset timeout, and closes when it succeeds.
pub async fn policy_circuit_breaker_opens_half_opens_and_closes(h: Harness) -> Outcome {
    use switchboard::resilience::{
        CircuitBreaker, CircuitState, Policies, Policy, PolicyEvent, Resilient, Window,
    };
    let p = h.pattern("breaker");
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let now_failing = failing.clone();
    let (server, calls) = flaky_server(&h, &p, move |_| now_failing.load(Ordering::SeqCst)).await;
    let transitions = Arc::new(Mutex::new(Vec::new()));
    let heard = transitions.clone();
    let open_for = Duration::from_millis(500);
    let policies = Policies::new()
        .pattern(
            &p,
            Policy::new().circuit_breaker(
                CircuitBreaker::new()
                    .failure_rate(0.5)
                    .window(Window::Calls(10))
                    .minimum_calls(4)
                    .open_for(open_for)
                    .half_open_calls(1),
            ),
        )
        .on_event(move |e| {
            if let PolicyEvent::CircuitStateChanged { from, to, .. } = e {
                heard.lock().expect("events").push((*from, *to));
            }
        });
    let client = Resilient::new(h.client().await, policies).expect("valid policies");

    for _ in 0..4 {
        let err = within("failing send", client.send::<_, u32>(&p, &1u32))
            .await
            .expect_err("the service fails");
        assert_eq!(err.code(), "unavailable", "{err}");
    }
    let opened = tokio::time::Instant::now();
    assert_eq!(client.circuit_state(&p), Some(CircuitState::Open));
    let started = tokio::time::Instant::now();
    let err = within("send on an open circuit", client.send::<_, u32>(&p, &1u32))
        .await
        .expect_err("open");
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{err}");
    // At once, well inside the 500 ms the circuit stays open (the calls count below shows the
    // service was not called); the bound leaves room for a loaded machine's scheduler.
    assert!(started.elapsed() < open_for / 2, "{:?}", started.elapsed());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "an open circuit calls nobody"
    );

    failing.store(false, Ordering::SeqCst);
    // The reset timeout is the behaviour under test: the probe goes at its end.
    tokio::time::sleep_until(opened + open_for).await;
    let got: u32 = within("probe", client.send(&p, &1u32))
        .await
        .expect("the probe succeeds");
    assert_eq!(got, 2);
    assert_eq!(client.circuit_state(&p), Some(CircuitState::Closed));
    assert_eq!(
        *transitions.lock().expect("events"),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
    Outcome::Passed
}
