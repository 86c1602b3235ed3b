//! The workloads of BENCH.md, written once over a call and an emit function, so switchboard
//! and each raw client run exactly the same loop.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::child::ChildServer;

/// The payload of every workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Person {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) email: String,
}

pub(crate) fn person(id: u64) -> Person {
    Person {
        id,
        name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
    }
}

/// Decodes a person and encodes it again: what every responder does.
pub(crate) fn echo_bytes(req: &[u8]) -> Vec<u8> {
    let p: Person = serde_json::from_slice(req).expect("decode");
    serde_json::to_vec(&p).expect("encode")
}

/// Checks an echoed reply.
pub(crate) fn check_reply(reply: &[u8], id: u64) {
    let p: Person = serde_json::from_slice(reply).expect("decode reply");
    assert_eq!(p.id, id, "the reply echoes the request");
}

pub(crate) fn encode(id: u64) -> Vec<u8> {
    serde_json::to_vec(&person(id)).expect("encode")
}

/// One measured figure of one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Figure {
    pub(crate) workload: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) value: f64,
    /// Lower is better (latency) or higher is better (throughput).
    pub(crate) lower_is_better: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub(crate) fn rate(workload: &'static str, unit: &'static str, n: u64, took: Duration) -> Figure {
    Figure {
        workload,
        unit,
        value: n as f64 / took.as_secs_f64(),
        lower_is_better: false,
    }
}

/// Message counts of the workloads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) warmup: u64,
    pub(crate) latency: u64,
    pub(crate) rr: u64,
    pub(crate) async_rr: u64,
    pub(crate) async_outstanding: usize,
    pub(crate) events: u64,
    pub(crate) events_outstanding: usize,
    /// How long `gateway_added_latency` calls at 1,000/s on each side.
    pub(crate) gateway: Duration,
}

/// The workload groups `--workloads` can pick.
pub(crate) const WORKLOADS: [&str; 4] = ["latency", "rr", "async_rr", "events"];

impl Counts {
    pub(crate) fn scaled(f: f64) -> Self {
        let s = |n: u64| ((n as f64 * f).round() as u64).max(10);
        Counts {
            warmup: s(1_000),
            latency: s(5_000),
            rr: s(20_000),
            async_rr: s(20_000),
            async_outstanding: 10_000,
            events: s(100_000),
            events_outstanding: 1_000,
            gateway: Duration::from_secs_f64((30.0 * f).max(1.0)),
        }
    }

    /// Only the workload groups named (of [`WORKLOADS`]); the others get no messages and
    /// report no figures. Unknown names are an error naming the known ones.
    pub(crate) fn only(mut self, names: &[String]) -> Result<Self, String> {
        if let Some(bad) = names.iter().find(|n| !WORKLOADS.contains(&n.as_str())) {
            return Err(format!(
                "unknown workload `{bad}` (known: {})",
                WORKLOADS.join(", ")
            ));
        }
        let on = |w: &str| names.iter().any(|n| n == w);
        if !on("latency") {
            self.latency = 0;
        }
        if !on("rr") {
            self.rr = 0;
        }
        if self.latency == 0 && self.rr == 0 {
            self.warmup = 0;
        }
        if !on("async_rr") {
            self.async_rr = 0;
        }
        if !on("events") {
            self.events = 0;
        }
        Ok(self)
    }
}

/// `rr_latency` (p50, p99) and `rr_throughput` over `call(i)`, which sends request `i` and
/// checks its reply.
pub(crate) async fn request_reply<F, Fut>(c: &Counts, call: F) -> Vec<Figure>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    for i in 0..c.warmup {
        call(i).await;
    }
    let mut samples = Vec::with_capacity(c.latency as usize);
    for i in 0..c.latency {
        let t = Instant::now();
        call(i).await;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut figs = Vec::new();
    if !samples.is_empty() {
        figs = vec![
            Figure {
                workload: "rr_latency_p50",
                unit: "us",
                value: us(percentile(&samples, 50.0)),
                lower_is_better: true,
            },
            Figure {
                workload: "rr_latency_p99",
                unit: "us",
                value: us(percentile(&samples, 99.0)),
                lower_is_better: true,
            },
        ];
    }
    if c.rr == 0 {
        return figs;
    }
    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (call, next, n) = (call.clone(), next.clone(), c.rr);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    call(i).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    figs.push(rate("rr_throughput", "req/s", c.rr, t.elapsed()));
    figs
}

/// `async_rr_throughput` for a raw client: requests as futures, at most
/// `async_outstanding` in flight, each matched to its reply by the client library.
pub(crate) async fn async_calls<F, Fut>(c: &Counts, call: F) -> Vec<Figure>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    if c.async_rr == 0 {
        return Vec::new();
    }
    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut sent, mut got) = (0u64, 0u64);
    while got < c.async_rr {
        while sent < c.async_rr && inflight.len() < c.async_outstanding {
            inflight.push(call(sent));
            sent += 1;
        }
        inflight.next().await.expect("a reply");
        got += 1;
    }
    vec![rate("async_rr_throughput", "replies/s", got, t.elapsed())]
}

/// `events_throughput`: `emit(i)` for every event, at most `events_outstanding` at once,
/// timed until the consumer counted all (60 s bound).
///
/// Also `emit_throughput`: the same emits timed until the last one returned (accepted by the
/// broker), whether consumed yet or not.
pub(crate) async fn events<F, Fut>(c: &Counts, emit: F, counter: &mut Counter) -> Vec<Figure>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    if c.events == 0 {
        return Vec::new();
    }
    let t = Instant::now();
    futures::stream::iter(0..c.events)
        .map(emit)
        .buffer_unordered(c.events_outstanding)
        .collect::<Vec<()>>()
        .await;
    let emitted = rate("emit_throughput", "events/s", c.events, t.elapsed());
    let arrived = counter.wait(c.events, Duration::from_secs(60)).await;
    let took = t.elapsed();
    if arrived < c.events {
        eprintln!(
            "events_throughput: only {arrived} of {} arrived within 60 s",
            c.events
        );
    }
    vec![
        emitted,
        rate("events_throughput", "events/s", arrived, took),
    ]
}

/// Where the consumer's count comes from: this process, or the server process.
pub(crate) enum Counter {
    /// The consumer runs here.
    Local(Arc<AtomicU64>, Arc<Notify>),
    /// The consumer runs in the server process, which reports its count.
    Child(ChildServer),
}

impl Counter {
    /// Waits until `total` events were counted or `limit` passed; returns the count.
    pub(crate) async fn wait(&mut self, total: u64, limit: Duration) -> u64 {
        match self {
            Counter::Local(n, all) => {
                if n.load(Ordering::Relaxed) < total {
                    let _ = tokio::time::timeout(limit, all.notified()).await;
                }
                n.load(Ordering::Relaxed)
            }
            Counter::Child(child) => child.counted(total, limit).await,
        }
    }
}

/// A counter for a local consumer expecting `total` events.
pub(crate) fn local_counter() -> (Arc<AtomicU64>, Arc<Notify>) {
    (Arc::new(AtomicU64::new(0)), Arc::new(Notify::new()))
}

/// Counts one event; wakes the waiter at `total`.
pub(crate) fn count(n: &AtomicU64, all: &Notify, total: u64) {
    if n.fetch_add(1, Ordering::Relaxed) + 1 == total {
        all.notify_one();
    }
}
