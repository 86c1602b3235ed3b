//! Each policy's behaviour on the in-memory transport.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::{Backoff, Client, ClientConfig, ErrorKind, HandlerError};
use switchboard_resilience::{
    Bulkhead, CircuitBreaker, CircuitState, Fallback, LoadShed, NAME, Policies, Policy,
    PolicyEvent, Rejection, Resilient, Retry, Window,
};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout};

const STEP: Duration = Duration::from_secs(5);

/// A service and a caller on a bus of their own.
fn pair(bus: &str) -> (Client, Client) {
    let bus = MemoryConfig::default().bus(bus);
    (
        Client::new(
            MemoryTransport::connect(bus.clone()),
            ClientConfig::default(),
        ),
        Client::new(MemoryTransport::connect(bus), ClientConfig::default()),
    )
}

fn fast_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(40))
}

/// Events heard, in order.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<PolicyEvent>>>);

impl Heard {
    fn listen(&self, p: Policies) -> Policies {
        let heard = self.0.clone();
        p.on_event(move |e| heard.lock().expect("events").push(e.clone()))
    }

    fn all(&self) -> Vec<PolicyEvent> {
        self.0.lock().expect("events").clone()
    }

    fn circuit(&self) -> Vec<(CircuitState, CircuitState)> {
        self.all()
            .into_iter()
            .filter_map(|e| match e {
                PolicyEvent::CircuitStateChanged { from, to, .. } => Some((from, to)),
                _ => None,
            })
            .collect()
    }

    fn retries(&self) -> usize {
        self.all()
            .iter()
            .filter(|e| matches!(e, PolicyEvent::Retrying { .. }))
            .count()
    }
}

/// A handler on `pattern` that counts its calls and fails with `unavailable` while `failing`.
async fn flaky(server: &Client, pattern: &str, failing: Arc<AtomicBool>) -> Arc<AtomicU32> {
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    server
        .handle(pattern, move |n: u32, _ctx| {
            seen.fetch_add(1, Ordering::SeqCst);
            let fail = failing.load(Ordering::SeqCst);
            async move {
                if fail {
                    Err(HandlerError::new("unavailable", "down for a moment"))
                } else {
                    Ok(n + 1)
                }
            }
        })
        .await
        .expect("registers");
    calls
}

#[tokio::test]
async fn retry_recovers_a_transient_failure_and_leaves_other_errors_alone() {
    let (server, client) = pair("policy-retry");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    server
        .handle("stock.get", move |n: u32, _ctx| {
            let call = seen.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                match (n, call) {
                    (0, _) => Err(HandlerError::new("not_found", "no item 0")),
                    (_, 1 | 2) => Err(HandlerError::new("unavailable", "warming up")),
                    _ => Ok(n * 10),
                }
            }
        })
        .await
        .expect("registers");
    let heard = Heard::default();
    let policies = heard.listen(Policies::new().pattern(
        "stock.get",
        Policy::new().retry(Retry::attempts(5).backoff(fast_backoff())),
    ));
    let client = Resilient::new(client, policies).expect("valid");

    let got: u32 = timeout(STEP, client.send("stock.get", &4u32))
        .await
        .expect("bounded")
        .expect("third attempt succeeds");
    assert_eq!(got, 40);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(heard.retries(), 2);

    // A handler's own error that is not transient is not retried.
    calls.store(10, Ordering::SeqCst);
    let err = timeout(STEP, client.send::<_, u32>("stock.get", &0u32))
        .await
        .expect("bounded")
        .expect_err("not found");
    assert_eq!((err.kind(), err.code()), (ErrorKind::Handler, "not_found"));
    assert_eq!(calls.load(Ordering::SeqCst), 11, "one attempt only");
    assert_eq!(heard.retries(), 2);
}

/// A caller of a service that always fails with `unavailable`, retrying up to 1,000 times
/// with `backoff` within `within`: the caller, the calls counter and the events heard.
async fn retrying_until(
    bus: &str,
    pattern: &str,
    within: Duration,
    backoff: Backoff,
) -> (Resilient, Arc<AtomicU32>, Heard, Client) {
    let (server, client) = pair(bus);
    let calls = flaky(&server, pattern, Arc::new(AtomicBool::new(true))).await;
    let heard = Heard::default();
    let policies = heard.listen(
        Policies::new().pattern(
            pattern,
            Policy::new()
                .timeout(within)
                .retry(Retry::attempts(1_000).backoff(backoff)),
        ),
    );
    let client = Resilient::new(client, policies).expect("valid");
    (client, calls, heard, server)
}

#[tokio::test]
async fn retries_stop_at_the_deadline() {
    let (client, calls, heard, _server) = retrying_until(
        "policy-deadline",
        "rates.get",
        Duration::from_millis(300),
        Backoff::exponential(Duration::from_millis(40), Duration::from_millis(80)),
    )
    .await;
    let started = Instant::now();
    let err = timeout(STEP, client.send::<_, u32>("rates.get", &1u32))
        .await
        .expect("bounded")
        .expect_err("always unavailable");
    let took = started.elapsed();
    // The service's own error; or, when the last retry started close to the deadline on a
    // loaded machine, that attempt's timeout from the transport. Never a timeout the policy
    // made up for an attempt it did not start.
    let last_attempt_ran_out = err.kind() == ErrorKind::Timeout && err.adapter() != NAME;
    assert!(
        err.code() == "unavailable" || last_attempt_ran_out,
        "{err} ({})",
        err.adapter()
    );
    // Ends at the deadline, give or take the timer's tick and the scheduler: not after a
    // thousand attempts' backoff.
    assert!(
        took < Duration::from_millis(300 + 50),
        "ended at the deadline: {took:?}"
    );
    let attempts = calls.load(Ordering::SeqCst);
    assert!(
        (2..=10).contains(&attempts),
        "{attempts} attempts in 300 ms"
    );
    assert!(
        heard.all().iter().any(|e| matches!(
            e,
            PolicyEvent::RetriesExhausted { reason, .. } if reason.contains("deadline")
        )),
        "{:?}",
        heard.all()
    );
}

/// The backoff's timer wakes on the tick after its instant: a retry that was due before the
/// deadline can wake after it. The call then ends with the service's last error, not with a
/// timeout for an attempt that never started. Paused time makes this exact: the backoffs are
/// under half a millisecond (each wakes on the next tick, one attempt per millisecond) and the
/// deadline falls half-way between two ticks.
#[tokio::test(start_paused = true)]
async fn a_retry_whose_timer_wakes_past_the_deadline_ends_with_the_last_error() {
    let (client, calls, heard, _server) = retrying_until(
        "policy-late-timer",
        "quotes.get",
        Duration::from_micros(10_500),
        Backoff::exponential(Duration::from_micros(300), Duration::from_micros(300)),
    )
    .await;
    let err = timeout(STEP, client.send::<_, u32>("quotes.get", &1u32))
        .await
        .expect("bounded")
        .expect_err("always unavailable");
    assert_eq!(
        (err.kind(), err.code()),
        (ErrorKind::Handler, "unavailable"),
        "{err}"
    );
    let attempts = calls.load(Ordering::SeqCst);
    assert!((10..=12).contains(&attempts), "{attempts} attempts");
    assert!(
        heard.all().iter().any(|e| matches!(
            e,
            PolicyEvent::RetriesExhausted { reason, .. }
                if *reason == "the deadline passed while waiting to retry"
        )),
        "{:?}",
        heard.all()
    );
}

#[tokio::test]
async fn a_slow_attempt_is_cut_at_the_attempt_timeout_and_retried() {
    let (server, client) = pair("policy-attempt-timeout");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    server
        .handle("slow.get", move |n: u32, _ctx| {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Ok::<_, HandlerError>(n)
            }
        })
        .await
        .expect("registers");
    let policies = Policies::new().pattern(
        "slow.get",
        Policy::new()
            .timeout(Duration::from_secs(1))
            .attempt_timeout(Duration::from_millis(100))
            .retry(Retry::attempts(3).backoff(fast_backoff())),
    );
    let client = Resilient::new(client, policies).expect("valid");
    let started = Instant::now();
    let got: u32 = timeout(STEP, client.send("slow.get", &7u32))
        .await
        .expect("bounded")
        .expect("second attempt answers");
    assert_eq!(got, 7);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn breaker_opens_at_the_threshold_half_opens_after_the_reset_and_closes_on_success() {
    let (server, client) = pair("policy-breaker");
    let failing = Arc::new(AtomicBool::new(true));
    let calls = flaky(&server, "geo.lookup", failing.clone()).await;
    let heard = Heard::default();
    let open_for = Duration::from_millis(300);
    let policies = heard.listen(
        Policies::new().pattern(
            "geo.lookup",
            Policy::new().circuit_breaker(
                CircuitBreaker::new()
                    .failure_rate(0.5)
                    .window(Window::Calls(10))
                    .minimum_calls(4)
                    .open_for(open_for)
                    .half_open_calls(1),
            ),
        ),
    );
    let client = Resilient::new(client, policies).expect("valid");

    // Below the minimum volume the circuit stays closed, failures or not.
    for _ in 0..3 {
        let err = client
            .send::<_, u32>("geo.lookup", &1u32)
            .await
            .expect_err("failing");
        assert_eq!(err.code(), "unavailable");
    }
    assert_eq!(
        client.circuit_state("geo.lookup"),
        Some(CircuitState::Closed)
    );
    // The fourth failure reaches the threshold.
    let _ = client.send::<_, u32>("geo.lookup", &1u32).await;
    let opened = Instant::now();
    assert_eq!(client.circuit_state("geo.lookup"), Some(CircuitState::Open));
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // Open: calls fail at once, without reaching the service.
    let err = client
        .send::<_, u32>("geo.lookup", &1u32)
        .await
        .expect_err("open");
    assert_eq!(err.kind(), ErrorKind::CircuitOpen, "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 4);

    // After the reset timeout one probe goes through; it succeeds and closes the circuit.
    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep_until(opened + open_for).await;
    let got: u32 = client
        .send("geo.lookup", &1u32)
        .await
        .expect("the probe succeeds");
    assert_eq!(got, 2);
    assert_eq!(
        client.circuit_state("geo.lookup"),
        Some(CircuitState::Closed)
    );
    assert_eq!(
        heard.circuit(),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Closed),
        ]
    );
    assert!(heard.all().contains(&PolicyEvent::Rejected {
        pattern: "geo.lookup".into(),
        by: Rejection::CircuitOpen,
    }));
}

#[tokio::test]
async fn a_failed_probe_opens_the_circuit_again() {
    let (server, client) = pair("policy-breaker-reopen");
    let _calls = flaky(&server, "geo.route", Arc::new(AtomicBool::new(true))).await;
    let heard = Heard::default();
    let open_for = Duration::from_millis(200);
    let policies = heard.listen(
        Policies::new().pattern(
            "geo.route",
            Policy::new().circuit_breaker(
                CircuitBreaker::new()
                    .minimum_calls(2)
                    .window(Window::Calls(4))
                    .open_for(open_for)
                    .half_open_calls(1),
            ),
        ),
    );
    let client = Resilient::new(client, policies).expect("valid");
    for _ in 0..2 {
        let _ = client.send::<_, u32>("geo.route", &1u32).await;
    }
    let opened = Instant::now();
    assert_eq!(client.circuit_state("geo.route"), Some(CircuitState::Open));
    tokio::time::sleep_until(opened + open_for).await;
    let err = client
        .send::<_, u32>("geo.route", &1u32)
        .await
        .expect_err("probe fails");
    assert_eq!(err.code(), "unavailable");
    assert_eq!(client.circuit_state("geo.route"), Some(CircuitState::Open));
    assert_eq!(
        heard.circuit(),
        [
            (CircuitState::Closed, CircuitState::Open),
            (CircuitState::Open, CircuitState::HalfOpen),
            (CircuitState::HalfOpen, CircuitState::Open),
        ]
    );
}

/// A handler on `pattern` that holds each call until `gate` gives it a permit.
async fn gated(server: &Client, pattern: &str, gate: Arc<Semaphore>, entered: Arc<AtomicU32>) {
    server
        .handle(pattern, move |n: u32, _ctx| {
            let (gate, entered) = (gate.clone(), entered.clone());
            async move {
                entered.fetch_add(1, Ordering::SeqCst);
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|_| HandlerError::new("closed", "gate"))?;
                Ok::<_, HandlerError>(n)
            }
        })
        .await
        .expect("registers");
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    timeout(STEP, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test]
async fn bulkhead_rejects_beyond_its_limit_and_queue_without_blocking_other_patterns() {
    let (server, client) = pair("policy-bulkhead");
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicU32::new(0));
    gated(&server, "report.build", gate.clone(), entered.clone()).await;
    let other = Arc::new(AtomicU32::new(0));
    gated(
        &server,
        "report.list",
        Arc::new(Semaphore::new(100)),
        other.clone(),
    )
    .await;
    let heard = Heard::default();
    // Every pattern gets a bulkhead of its own from the default policy.
    let policies = heard.listen(
        Policies::new().default_policy(
            Policy::new()
                .timeout(Duration::from_secs(5))
                .bulkhead(Bulkhead::new(2, 1)),
        ),
    );
    let client = Resilient::new(client, policies).expect("valid");

    let running: Vec<_> = (0..3u32)
        .map(|n| {
            let c = client.clone();
            tokio::spawn(async move { c.send::<_, u32>("report.build", &n).await })
        })
        .collect();
    until("two calls running and one queued", || {
        entered.load(Ordering::SeqCst) == 2
            && client
                .bulkhead_usage("report.build")
                .is_some_and(|u| (u.running, u.waiting) == (2, 1))
    })
    .await;

    let started = Instant::now();
    let err = client
        .send::<_, u32>("report.build", &9u32)
        .await
        .expect_err("full");
    assert_eq!(err.kind(), ErrorKind::Overloaded, "{err}");
    // At once: a queued call would wait for a place until its 5 s deadline. The bound leaves
    // room for a loaded machine's scheduler.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(heard.all().contains(&PolicyEvent::Rejected {
        pattern: "report.build".into(),
        by: Rejection::Bulkhead,
    }));

    // Another pattern's bulkhead has its own places.
    let listed: u32 = timeout(STEP, client.send("report.list", &5u32))
        .await
        .expect("not blocked")
        .expect("served");
    assert_eq!(listed, 5);

    gate.add_permits(3);
    for (n, call) in running.into_iter().enumerate() {
        let got = timeout(STEP, call).await.expect("bounded").expect("task");
        assert_eq!(got.expect("served once let through"), n as u32);
    }
    assert_eq!(entered.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn shed_calls_fail_fast_with_overloaded() {
    let (server, client) = pair("policy-shed");
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(AtomicU32::new(0));
    gated(&server, "search.run", gate.clone(), entered.clone()).await;
    let heard = Heard::default();
    let policies = heard
        .listen(Policies::new().pattern("search.run", Policy::new().load_shed(LoadShed::new(2))));
    let client = Resilient::new(client, policies).expect("valid");
    let running: Vec<_> = (0..2u32)
        .map(|n| {
            let c = client.clone();
            tokio::spawn(async move { c.send::<_, u32>("search.run", &n).await })
        })
        .collect();
    until("two calls in flight", || {
        entered.load(Ordering::SeqCst) == 2
    })
    .await;

    let started = Instant::now();
    let err = client
        .send::<_, u32>("search.run", &3u32)
        .await
        .expect_err("shed");
    assert_eq!(err.kind(), ErrorKind::Overloaded, "{err}");
    // At once: the calls in hand are gated and never finish on their own. The bound leaves
    // room for a loaded machine's scheduler.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert!(heard.all().contains(&PolicyEvent::Rejected {
        pattern: "search.run".into(),
        by: Rejection::LoadShed,
    }));

    gate.add_permits(2);
    for call in running {
        timeout(STEP, call)
            .await
            .expect("bounded")
            .expect("task")
            .expect("served");
    }
    // With room again, calls go through.
    gate.add_permits(1);
    let got: u32 = timeout(STEP, client.send("search.run", &4u32))
        .await
        .expect("bounded")
        .expect("served");
    assert_eq!(got, 4);
}

#[tokio::test]
async fn fallback_answers_transient_failures_and_open_circuits_but_not_other_errors() {
    let (server, client) = pair("policy-fallback");
    server
        .handle("quote.get", |n: u32, _ctx| async move {
            match n {
                0 => Err::<u32, _>(HandlerError::new("bad_request", "no quote for 0")),
                _ => Err(HandlerError::new("unavailable", "market closed")),
            }
        })
        .await
        .expect("registers");
    let heard = Heard::default();
    let policies = heard.listen(
        Policies::new()
            .pattern(
                "quote.get",
                Policy::new()
                    .circuit_breaker(
                        CircuitBreaker::new()
                            .minimum_calls(2)
                            .window(Window::Calls(2)),
                    )
                    .fallback(Fallback::value(&999u32).expect("encodes")),
            )
            .pattern(
                "quote.none",
                Policy::new()
                    .timeout(Duration::from_millis(200))
                    .fallback(Fallback::function(|e: &switchboard_core::Error| {
                        (e.kind() == ErrorKind::NoResponder || e.kind() == ErrorKind::Timeout)
                            .then_some(0u32)
                    })),
            ),
    );
    let client = Resilient::new(client, policies).expect("valid");

    for _ in 0..2 {
        let got: u32 = client.send("quote.get", &1u32).await.expect("fallback");
        assert_eq!(got, 999);
    }
    assert_eq!(client.circuit_state("quote.get"), Some(CircuitState::Open));
    let got: u32 = client
        .send("quote.get", &1u32)
        .await
        .expect("fallback on an open circuit");
    assert_eq!(got, 999);
    let used = heard
        .all()
        .iter()
        .filter(|e| matches!(e, PolicyEvent::FallbackUsed { .. }))
        .count();
    assert_eq!(used, 3);
    assert!(heard.all().iter().any(|e| matches!(
        e,
        PolicyEvent::FallbackUsed {
            kind: ErrorKind::CircuitOpen,
            ..
        }
    )));

    // Nobody serves `quote.none`: the function's value answers.
    let got: u32 = timeout(STEP, client.send("quote.none", &1u32))
        .await
        .expect("bounded")
        .expect("fallback fn");
    assert_eq!(got, 0);

    // A fresh breaker, and an error that is the caller's own: passed through.
    let plain = Resilient::new(
        client.client().clone(),
        Policies::new().pattern(
            "quote.get",
            Policy::new().fallback(Fallback::value(&1u32).expect("encodes")),
        ),
    )
    .expect("valid");
    let err = plain
        .send::<_, u32>("quote.get", &0u32)
        .await
        .expect_err("not transient");
    assert_eq!(err.code(), "bad_request");
}

#[tokio::test]
async fn request_through_the_policies_returns_a_handle_and_retries() {
    let (server, client) = pair("policy-request");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    server
        .handle("job.run", move |n: u32, _ctx| {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err(HandlerError::new("unavailable", "busy"))
                } else {
                    Ok(n + 100)
                }
            }
        })
        .await
        .expect("registers");
    let policies = Policies::new().pattern(
        "job.run",
        Policy::new().retry(Retry::attempts(3).backoff(fast_backoff())),
    );
    let client = Resilient::new(client, policies).expect("valid");
    let pending = client
        .request::<_, u32>("job.run", &1u32)
        .await
        .expect("accepted");
    let _id = pending.correlation_id();
    let got = timeout(STEP, pending)
        .await
        .expect("bounded")
        .expect("retried");
    assert_eq!(got, 101);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn patterns_without_policies_go_straight_to_the_client() {
    let (server, client) = pair("policy-none");
    let calls = flaky(&server, "plain.get", Arc::new(AtomicBool::new(true))).await;
    let client = Resilient::new(client, Policies::new()).expect("valid");
    let err = client
        .send::<_, u32>("plain.get", &1u32)
        .await
        .expect_err("no retry");
    assert_eq!(err.code(), "unavailable");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(client.circuit_state("plain.get"), None);
}

#[test]
fn policies_are_read_from_toml() {
    let policies = Policies::from_toml(
        r#"
        [default]
        timeout_ms = 2000
        [default.retry]
        max_attempts = 4
        initial_backoff_ms = 20
        max_backoff_ms = 500

        [patterns."users.get"]
        attempt_timeout_ms = 300
        transient_codes = ["unavailable", "busy"]
        [patterns."users.get".circuit_breaker]
        failure_rate = 0.25
        window_ms = 10000
        minimum_calls = 5
        open_ms = 1500
        [patterns."users.get".bulkhead]
        max_concurrent = 8
        max_queue = 16
        [patterns."users.get".load_shed]
        max_in_flight = 64
        [patterns."users.get".fallback]
        json = { id = 0, name = "unknown" }
        "#,
    )
    .expect("valid");
    let users = policies.policy_for("users.get");
    assert_eq!(users.timeout, Some(Duration::from_secs(2)), "inherited");
    assert_eq!(users.attempt_timeout, Some(Duration::from_millis(300)));
    let retry = users.retry.expect("inherited retry");
    assert_eq!(retry.max_attempts, 4);
    assert_eq!(retry.backoff.initial, Duration::from_millis(20));
    let breaker = users.circuit_breaker.expect("breaker");
    assert_eq!(breaker.failure_rate, 0.25);
    assert_eq!(breaker.window, Window::Time(Duration::from_secs(10)));
    assert_eq!(breaker.open_for, Duration::from_millis(1500));
    assert_eq!(
        breaker.half_open_calls,
        CircuitBreaker::default().half_open_calls
    );
    assert_eq!(users.bulkhead, Some(Bulkhead::new(8, 16)));
    assert_eq!(users.load_shed, Some(LoadShed::new(64)));
    assert_eq!(
        users.transient_codes.as_deref(),
        Some(&["unavailable".to_owned(), "busy".to_owned()][..])
    );
    match users.fallback.expect("fallback") {
        Fallback::Value { payload, .. } => {
            assert_eq!(&payload[..], br#"{"id":0,"name":"unknown"}"#);
        }
        other => panic!("{other:?}"),
    }
    let other = policies.policy_for("orders.list");
    assert!(other.circuit_breaker.is_none() && other.retry.is_some());
}

#[test]
fn bad_policy_files_are_refused_with_what_is_wrong() {
    for (text, says) in [
        ("[default]\ntimeout = 3", "unknown field `timeout`"),
        ("[default.retry]\nmax_attempts = 0", "max_attempts"),
        (
            "[patterns.\"a.b\".circuit_breaker]\nfailure_rate = 1.5",
            "policy of `a.b`",
        ),
        ("[patterns.\"a b\"]\ntimeout_ms = 5", "invalid pattern"),
        (
            "[patterns.x.circuit_breaker]\nwindow_calls = 5\nwindow_ms = 5",
            "not both",
        ),
        (
            "[patterns.x.bulkhead]\nmax_concurrent = 0",
            "max_concurrent",
        ),
        ("not toml at all [", "policy file"),
    ] {
        let err = Policies::from_toml(text).expect_err(text);
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains(says), "{text:?}: {err}");
    }
    let err = Policies::from_toml_file("/nonexistent/policies.toml").expect_err("no file");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}

#[tokio::test]
async fn envelopes_built_elsewhere_go_through_the_same_policies() {
    let (server, client) = pair("policy-envelope");
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    server
        .handle("relay.get", move |n: u32, _ctx| {
            let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    Err(HandlerError::new("unavailable", "busy"))
                } else {
                    Ok(n * 3)
                }
            }
        })
        .await
        .expect("registers");
    let policies = Policies::new().pattern(
        "relay.get",
        Policy::new().retry(Retry::attempts(2).backoff(fast_backoff())),
    );
    let client = Resilient::new(client, policies).expect("valid");
    let env =
        switchboard_core::Envelope::new("relay.get", "5").with_content_type("application/json");
    let reply = timeout(STEP, client.send_envelope(env))
        .await
        .expect("bounded")
        .expect("retried");
    assert_eq!(&reply.payload[..], b"15");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // An error reply is an `Err`, as with `send`: here the handler could not decode it.
    let env =
        switchboard_core::Envelope::new("relay.get", "x").with_content_type("application/json");
    let err = timeout(STEP, client.send_envelope(env))
        .await
        .expect("bounded")
        .expect_err("codec");
    assert_eq!(err.kind(), ErrorKind::Codec, "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "not retried, and the handler never ran"
    );
}

#[tokio::test]
async fn as_a_tower_service_the_policies_still_apply() {
    use tower::{Service, ServiceExt};

    let (server, client) = pair("policy-tower");
    let failing = Arc::new(AtomicBool::new(true));
    let calls = flaky(&server, "stock.get", failing.clone()).await;
    let policies = Policies::new().pattern(
        "stock.get",
        Policy::new()
            .retry(Retry::attempts(2).backoff(fast_backoff()))
            .fallback(Fallback::value(&0u32).expect("encodes")),
    );
    let resilient = Resilient::new(client, policies).expect("valid");
    // Composed with a tower layer of the caller's own: the reply's payload, as text.
    let mut service =
        tower::util::MapResponse::new(resilient, |reply: switchboard_core::Envelope| {
            String::from_utf8_lossy(&reply.payload).into_owned()
        });
    let request =
        || switchboard_core::Envelope::new("stock.get", "41").with_content_type("application/json");
    let answer = timeout(STEP, service.ready().await.expect("ready").call(request()))
        .await
        .expect("bounded")
        .expect("the fallback answers");
    assert_eq!(answer, "0", "both attempts failed; the fallback answered");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "retried once");
    failing.store(false, Ordering::SeqCst);
    let answer = timeout(STEP, service.oneshot(request()))
        .await
        .expect("bounded")
        .expect("answered");
    assert_eq!(answer, "42");
}
