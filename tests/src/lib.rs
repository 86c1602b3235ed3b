//! # switchboard-conformance
//!
//! SPEC.md made executable: one suite of cases, written once over a [`Harness`], that every
//! transport runs. A transport is done when the whole suite passes on it, or each skip is
//! explained by a capability it declares.
//!
//! Each transport wires itself in with one small file in `tests/tests/` that calls
//! [`conformance_suite!`], which expands to one `#[tokio::test]` per case so every case shows by
//! name in the test output. A case that a transport's capabilities exclude prints a loud
//! `SKIPPED` line with the reason and passes.
//!
//! Every await in a case is bounded ([`within`], [`eventually`]); every case owns its
//! patterns ([`Harness::pattern`]).

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use switchboard::{Capabilities, Client, Result};

pub mod cases;

/// The default bound on one await in a case.
pub const STEP: Duration = Duration::from_secs(5);

/// How a case ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every assertion held.
    Passed,
    /// The transport's declared capabilities exclude the case; the reason is printed.
    Skipped(String),
}

type Connect = dyn Fn() -> BoxFuture<'static, Result<Client>> + Send + Sync;

/// Publishes an event the way a producer without the SDK would: the transport's native client,
/// string headers of its choosing, raw payload bytes.
pub type ForeignProducer =
    dyn Fn(String, Vec<(String, String)>, Bytes) -> BoxFuture<'static, Result<()>> + Send + Sync;

/// What a case needs from a transport: fresh clients on the same transport, unique names, the
/// declared capabilities, and how much load the transport can take.
#[derive(Clone)]
pub struct Harness {
    name: &'static str,
    connect: Arc<Connect>,
    caps: Capabilities,
    load_scale: f64,
    foreign: Option<Arc<ForeignProducer>>,
    restart: Option<Arc<Restart>>,
}

/// Restarts the transport's broker: stops it, starts it again, returns once it answers.
pub type Restart = dyn Fn() -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync;

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("name", &self.name)
            .field("caps", &self.caps)
            .field("load_scale", &self.load_scale)
            .finish()
    }
}

impl Harness {
    /// A harness for transport `name`; `connect` makes a new client (a new "service
    /// instance") on the same transport each time it is called.
    pub async fn new<F, Fut>(name: &'static str, connect: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Client>> + Send + 'static,
    {
        let connect: Arc<Connect> = Arc::new(move || Box::pin(connect()));
        let probe = within("connect a probe client", connect())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {name}: {e}"));
        let caps = probe.transport().capabilities();
        let _ = probe.shutdown().await;
        Harness {
            name,
            connect,
            caps,
            load_scale: 1.0,
            foreign: None,
            restart: None,
        }
    }

    /// A harness whose clients connect to `url` with [`switchboard::connect`].
    pub async fn connecting_to(name: &'static str, url: String) -> Self {
        Harness::new(name, move || {
            let url = url.clone();
            async move { switchboard::connect(&url).await }
        })
        .await
    }

    /// Gives the cases a way to publish as a foreign (non-SDK) producer would: `f(pattern,
    /// headers, payload)` with the transport's own client.
    pub fn foreign_producer<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(String, Vec<(String, String)>, Bytes) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.foreign = Some(Arc::new(move |p, h, b| Box::pin(f(p, h, b))));
        self
    }

    /// The foreign producer of an in-memory bus (`memory://<bus>`, or a gRPC server's bus): a
    /// bare memory transport on that bus, publishing string headers and bytes.
    pub fn memory_foreign_producer(self, bus: impl Into<String>) -> Self {
        use switchboard::memory::{MemoryConfig, MemoryTransport};
        let foreign = Arc::new(MemoryTransport::connect(MemoryConfig::default().bus(bus)));
        self.foreign_producer(move |pattern, headers, payload| {
            let foreign = foreign.clone();
            async move { foreign.publish_foreign(&pattern, &header_refs(&headers), payload) }
        })
    }

    /// Publishes as a foreign producer, if the harness can.
    pub async fn publish_foreign(
        &self,
        pattern: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Option<Result<()>> {
        let f = self.foreign.as_ref()?;
        let headers = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Some(within("foreign publish", f(pattern.to_owned(), headers, payload)).await)
    }

    /// Gives the restart case a way to restart the broker.
    pub fn broker_restart<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        self.restart = Some(Arc::new(move || Box::pin(f())));
        self
    }

    /// Restarts the broker with `scripts/brokers restart <broker>`, bounded to two minutes.
    pub fn broker_restart_script(self, broker: &'static str) -> Self {
        self.broker_restart(move || async move {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/brokers");
            let run = tokio::task::spawn_blocking(move || {
                std::process::Command::new(script)
                    .args(["restart", broker])
                    .env("SB_BROKER_WAIT_SECS", "110")
                    .output()
            });
            match tokio::time::timeout(Duration::from_secs(120), run).await {
                Ok(Ok(Ok(out))) if out.status.success() => Ok(()),
                Ok(Ok(Ok(out))) => Err(format!(
                    "`scripts/brokers restart {broker}` failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                )),
                Ok(Ok(Err(e))) => Err(format!("cannot run {script}: {e}")),
                Ok(Err(e)) => Err(format!("restart task failed: {e}")),
                Err(_) => Err(format!("restarting {broker} took over two minutes")),
            }
        })
    }

    /// Whether the harness can restart the broker.
    pub fn restart_broker_available(&self) -> Option<()> {
        self.restart.as_ref().map(|_| ())
    }

    /// Restarts the broker, if the harness can.
    pub async fn restart_broker(&self) -> Option<std::result::Result<(), String>> {
        let f = self.restart.as_ref()?;
        Some(f().await)
    }

    /// Scales the load cases (10,000 concurrent requests, ...) by `factor`, for emulators that
    /// cannot take full load. The cases say so in their output.
    pub fn scale_load(mut self, factor: f64) -> Self {
        self.load_scale = factor;
        self
    }

    /// The transport's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The transport's declared capabilities.
    pub fn caps(&self) -> Capabilities {
        self.caps
    }

    /// A new client on the transport.
    pub async fn client(&self) -> Client {
        within("connect a client", (self.connect)())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.name))
    }

    /// A pattern no other case uses: `conformance.<base>.<random>`.
    pub fn pattern(&self, base: &str) -> String {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        format!("conformance.{base}.{}", &tag[..12])
    }

    /// `n` scaled by the harness's load factor (at least 1); prints when scaled.
    pub fn load(&self, case: &str, n: usize) -> usize {
        let scaled = ((n as f64) * self.load_scale).round().max(1.0) as usize;
        if scaled != n {
            eprintln!(
                "NOTE conformance `{case}` on `{}`: load scaled from {n} to {scaled} for this transport",
                self.name
            );
        }
        scaled
    }
}

/// Borrowed views of owned header pairs, as the transports' foreign-publish functions take
/// them.
pub fn header_refs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// Awaits `fut` for at most [`STEP`]; panics naming `what` if it takes longer.
pub async fn within<T>(what: &str, fut: impl IntoFuture<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

/// Awaits `fut` for at most `limit`; panics naming `what` if it takes longer.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl IntoFuture<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
    }
}

/// Waits until `cond` holds, checking every 5 ms, for at most `limit`; panics naming `what`
/// otherwise.
pub async fn eventually(limit: Duration, what: &str, cond: impl FnMut() -> bool) {
    if !holds_within(limit, cond).await {
        panic!("timed out after {limit:?} waiting until: {what}");
    }
}

/// Whether `cond` came to hold within `limit` (checked every 5 ms), for a case that says more
/// than [`eventually`] when it does not.
pub async fn holds_within(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Cases that load the broker on purpose. Each runs alone: its flood would otherwise hold up
/// the cases beside it for longer than their [`STEP`]-bounded waits, and they would fail for
/// a reason that is not theirs.
const LOAD_CASES: &[&str] = &["ten_thousand_concurrent_requests_are_all_matched"];

/// Held shared by every case of this test binary and exclusively by a [`LOAD_CASES`] case.
static LOAD_GATE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The password of user `switchboard` on the secure brokers `scripts/brokers` starts
/// (`nats-secure`, `kafka-secure`).
pub const SECURE_PASSWORD: &str = "test-s3cret";

/// The test CA `scripts/brokers` makes for the secure brokers (`$SB_TLS_DIR/ca.pem`, default
/// `/tmp/switchboard-tls`).
pub fn test_ca() -> String {
    let dir = std::env::var("SB_TLS_DIR").unwrap_or_else(|_| "/tmp/switchboard-tls".into());
    format!("{dir}/ca.pem")
}

/// The secure-connection check of a transport (TLS with credentials): a service connected
/// with `url` answers a `send` and handles an event emitted by a second client on the same
/// URL, and the transport's `Debug` output does not show `secret`. `broker` names the server
/// in the panic message when the first connect fails.
pub async fn secure_round_trip(url: &str, secret: &str, broker: &str) {
    use serde::{Deserialize, Serialize};
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Ping {
        n: u32,
    }
    let server = within("connect", switchboard::connect(url))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {broker} (scripts/brokers up): {e}"));
    let shown = format!("{:?}", server.transport());
    assert!(
        !shown.contains(secret),
        "the secret shows in Debug: {shown}"
    );
    within(
        "handle",
        server.handle("secure.ping", |p: Ping, _ctx| async move {
            Ok::<_, switchboard::HandlerError>(Ping { n: p.n + 1 })
        }),
    )
    .await
    .expect("handler");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    within(
        "on_event",
        server.on_event("secure.seen", "audit", move |p: Ping, _ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(p.n);
                Ok(())
            }
        }),
    )
    .await
    .expect("subscribe");
    let client = within("connect", switchboard::connect(url))
        .await
        .expect("client connects");
    let r: Ping = within("send", client.send("secure.ping", &Ping { n: 1 }))
        .await
        .expect("reply over the secure connection");
    assert_eq!(r, Ping { n: 2 });
    within("emit", client.emit("secure.seen", &Ping { n: 7 }))
        .await
        .expect("accepted");
    assert_eq!(within("event", rx.recv()).await, Some(7));
    within("shutdown", client.shutdown())
        .await
        .expect("shutdown");
    within("shutdown", server.shutdown())
        .await
        .expect("shutdown");
}

/// Connects to `url`, which the broker must refuse: the error, and how long the refusal took.
pub async fn refused_connect(url: &str) -> (switchboard::Error, Duration) {
    let started = std::time::Instant::now();
    let err = within("connect", switchboard::connect(url))
        .await
        .expect_err("the connection is refused");
    (err, started.elapsed())
}

/// The wrong-password check of a secure broker: connecting with `url`, which carries `secret`
/// as its password, fails as `Unauthenticated` within `bound`, and `secret` shows neither in
/// the error's message nor in its `Debug` output.
pub async fn wrong_password_is_refused(url: &str, secret: &str, bound: Duration) {
    let (err, took) = refused_connect(url).await;
    assert_eq!(err.kind(), switchboard::ErrorKind::Unauthenticated, "{err}");
    assert!(!format!("{err} {err:?}").contains(secret), "{err:?}");
    assert!(took < bound, "bounded: {took:?}");
}

/// Runs one case on a harness, bounded to four minutes, and reports a skip loudly. A load
/// case waits until no other case runs, and the others wait while it runs (bounded too).
pub async fn run_case<F, Fut>(harness: Harness, case: &str, f: F)
where
    F: FnOnce(Harness) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let name = harness.name;
    let gate = Duration::from_secs(300);
    let (_shared, _alone);
    if LOAD_CASES.contains(&case) {
        _alone = within_for(gate, "the other cases to finish", LOAD_GATE.write()).await;
    } else {
        _shared = within_for(gate, "the load case to finish", LOAD_GATE.read()).await;
    }
    match within_for(Duration::from_secs(240), case, f(harness)).await {
        Outcome::Passed => {}
        Outcome::Skipped(why) => {
            let line = format!("SKIPPED conformance case `{case}` on `{name}`: {why}");
            eprintln!("{line}");
            // The test script collects skips here and prints them with its total, since
            // cargo test hides what passing tests print.
            if let Ok(path) = std::env::var("SB_SKIP_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    let _ = writeln!(f, "{line}");
                }
            }
        }
    }
}

/// Expands to the restart case alone: it stops and starts the broker, so it goes in a test
/// file of its own (cargo runs test files one after another, so no other case sees the
/// broker go away).
///
/// ```text
/// switchboard_conformance::restart_case!(nats_harness().await);
/// ```
#[macro_export]
macro_rules! restart_case {
    ($make:expr) => {
        $crate::conformance_suite!(@each $make; broker_restart_loses_no_accepted_event);
    };
}

/// Expands to one `#[tokio::test]` per conformance case, each built on the harness that
/// `$make` (an async expression, evaluated per test) produces.
///
/// ```text
/// switchboard_conformance::conformance_suite!(memory_harness().await);
/// ```
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr) => {
        $crate::conformance_suite!(@cases $make;
            send_gets_its_reply,
            handler_is_reachable_once_handle_returns,
            handler_error_reaches_the_caller_as_a_typed_error,
            send_without_handler_fails_within_the_deadline,
            send_times_out_at_its_deadline,
            expired_request_never_reaches_its_handler,
            emit_reaches_every_group_once_and_one_member_per_group,
            ten_thousand_concurrent_requests_are_all_matched,
            reply_stream_yields_every_reply_and_timeout,
            reply_awaited_long_after_it_arrived_is_returned,
            late_reply_is_dropped_and_counted,
            nacked_event_is_redelivered,
            panicking_handler_is_retried_then_dead_lettered_with_reason,
            poison_message_is_dead_lettered_and_consumer_continues,
            order_per_key_is_kept,
            correlation_causation_and_trace_headers_round_trip,
            graceful_shutdown_loses_nothing,
            handler_concurrency_is_bounded,
            request_handler_concurrency_is_bounded,
            handler_outlives_its_callers_timeout,
            replies_survive_handlers_joining_and_leaving,
            event_without_sdk_metadata_is_delivered_as_is,
            bad_input_is_a_typed_error,
            requests_waiting_at_shutdown_fail_with_closed,
            malformed_foreign_message_is_dead_lettered_with_reason,
            policy_retries_transient_failures_until_the_deadline,
            policy_circuit_breaker_opens_half_opens_and_closes,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $crate::conformance_suite!(@each $make; $($case),*);
    };
    (@each $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::run_case(harness, stringify!($case), $crate::cases::$case).await;
            }
        )*
    };
}
