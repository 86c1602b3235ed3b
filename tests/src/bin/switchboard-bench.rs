//! The benchmark program for the workloads in docs/benchmarks.md, switchboard beside the raw
//! client of the same transport in the same run, interleaved, reported as ratios.
//!
//! Run (an optimised build; numbers from a debug build mean nothing):
//!
//! ```text
//! cargo run --profile bench-release -p switchboard-conformance --bin switchboard-bench -- \
//!     --transport memory --runs 7 --out bench-memory.jsonl
//! ```
//!
//! Output: one JSON object per line and figure (median over runs, with min and max), with
//! `"system":"switchboard"` or `"system":"raw"`, then a table with the ratio switchboard/raw.
//!
//! For `memory` the "raw client" is plain tokio channels doing the same work (JSON decode and
//! re-encode, id check), so the ratio is the SDK's whole overhead over bare in-process
//! messaging. Both sides run in one process: an in-memory transport cannot cross processes.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use futures::{StreamExt, stream::FuturesUnordered};
use serde::{Deserialize, Serialize};
use switchboard::{CallOptions, Client, HandlerError, HandlerOptions};
use tokio::sync::{Notify, mpsc, oneshot};

#[derive(Parser, Debug)]
#[command(about = "switchboard benchmarks beside the raw client, as JSON lines and a ratio table")]
struct Args {
    /// Transport to measure (available: memory).
    #[arg(long, default_value = "memory")]
    transport: String,
    /// Runs per workload; figures are medians over runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Where to write the JSON lines.
    #[arg(long, default_value = "bench-results.jsonl")]
    out: String,
    /// Scale every workload's message count by this factor (for quick checks).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Measure only one side (for profiling): `switchboard` or `raw`. The ratio table needs both.
    #[arg(long)]
    only: Option<String>,
}

/// The payload of every workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Person {
    id: u64,
    name: String,
    email: String,
}

fn person(id: u64) -> Person {
    Person {
        id,
        name: "Ada Lovelace".into(),
        email: "ada@example.com".into(),
    }
}

/// One measured figure of one run.
#[derive(Debug, Clone, Copy)]
struct Figure {
    workload: &'static str,
    unit: &'static str,
    value: f64,
    /// Lower is better (latency) or higher is better (throughput).
    lower_is_better: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn latency_figures(mut samples: Vec<Duration>) -> Vec<Figure> {
    samples.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    vec![
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
    ]
}

fn rate(workload: &'static str, unit: &'static str, n: u64, took: Duration) -> Figure {
    Figure {
        workload,
        unit,
        value: n as f64 / took.as_secs_f64(),
        lower_is_better: false,
    }
}

struct Counts {
    warmup: u64,
    latency: u64,
    rr: u64,
    async_rr: u64,
    async_outstanding: usize,
    events: u64,
    events_outstanding: usize,
}

impl Counts {
    fn scaled(f: f64) -> Self {
        let s = |n: u64| ((n as f64 * f).round() as u64).max(10);
        Counts {
            warmup: s(1_000),
            latency: s(5_000),
            rr: s(20_000),
            async_rr: s(20_000),
            async_outstanding: 10_000,
            events: s(100_000),
            events_outstanding: 1_000,
        }
    }
}

// ---------------------------------------------------------------- switchboard side

async fn sb_pair(url: &str) -> (Client, Client) {
    let server = switchboard::connect(url).await.expect("connect server");
    server
        .handle_with(
            "bench.echo",
            HandlerOptions::new().concurrency(128),
            |p: Person, _ctx| async move { Ok::<_, HandlerError>(p) },
        )
        .await
        .expect("handler");
    let client = switchboard::connect(url).await.expect("connect client");
    (server, client)
}

async fn sb_run(url: &str, c: &Counts) -> Vec<Figure> {
    let (server, client) = sb_pair(url).await;
    let mut figs = Vec::new();

    for i in 0..c.warmup {
        let r: Person = client.send("bench.echo", &person(i)).await.expect("send");
        assert_eq!(r.id, i);
    }
    let mut samples = Vec::with_capacity(c.latency as usize);
    for i in 0..c.latency {
        let t = Instant::now();
        let r: Person = client.send("bench.echo", &person(i)).await.expect("send");
        samples.push(t.elapsed());
        assert_eq!(r.id, i);
    }
    figs.extend(latency_figures(samples));

    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            let n = c.rr;
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r: Person = client.send("bench.echo", &person(i)).await.expect("send");
                    assert_eq!(r.id, i);
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    figs.push(rate("rr_throughput", "req/s", c.rr, t.elapsed()));

    let mut stream = client.reply_stream::<Person>().await.expect("stream");
    let opts = CallOptions::new().timeout(Duration::from_secs(60));
    let mut ids = HashMap::with_capacity(c.async_outstanding);
    let (mut sent, mut got) = (0u64, 0u64);
    let t = Instant::now();
    while got < c.async_rr {
        while sent < c.async_rr && stream.outstanding() < c.async_outstanding {
            let cid = stream
                .request_with("bench.echo", &person(sent), &opts)
                .await
                .expect("request");
            ids.insert(cid, sent);
            sent += 1;
        }
        let (cid, r) = stream.next().await.expect("a reply");
        assert_eq!(r.expect("reply").id, ids.remove(&cid).expect("known id"));
        got += 1;
    }
    figs.push(rate("async_rr_throughput", "replies/s", got, t.elapsed()));
    drop(stream);

    let counted = Arc::new(AtomicU64::new(0));
    let all = Arc::new(Notify::new());
    let (cn, al, total) = (counted.clone(), all.clone(), c.events);
    let events = server
        .on_event_with(
            "bench.events",
            "bench",
            HandlerOptions::new().concurrency(64),
            move |_p: Person, _ctx| {
                let (cn, al) = (cn.clone(), al.clone());
                async move {
                    if cn.fetch_add(1, Ordering::Relaxed) + 1 == total {
                        al.notify_one();
                    }
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .expect("subscribe");
    let t = Instant::now();
    futures::stream::iter(0..c.events)
        .map(|i| {
            let client = client.clone();
            async move { client.emit("bench.events", &person(i)).await.expect("emit") }
        })
        .buffer_unordered(c.events_outstanding)
        .collect::<Vec<()>>()
        .await;
    let done = tokio::time::timeout(Duration::from_secs(60), all.notified()).await;
    let took = t.elapsed();
    let arrived = counted.load(Ordering::Relaxed);
    if done.is_err() {
        eprintln!("events_throughput: only {arrived} of {total} arrived within 60 s");
    }
    figs.push(rate("events_throughput", "events/s", arrived, took));
    events.shutdown().await;
    client.shutdown().await.expect("shutdown");
    server.shutdown().await.expect("shutdown");
    figs
}

// ---------------------------------------------------------------- raw side (memory: tokio channels)

type RawReq = (Bytes, oneshot::Sender<Bytes>);

fn raw_responder() -> mpsc::Sender<RawReq> {
    let (tx, mut rx) = mpsc::channel::<RawReq>(1024);
    tokio::spawn(async move {
        while let Some((req, reply)) = rx.recv().await {
            let p: Person = serde_json::from_slice(&req).expect("decode");
            let out = Bytes::from(serde_json::to_vec(&p).expect("encode"));
            let _ = reply.send(out);
        }
    });
    tx
}

async fn raw_call(tx: &mpsc::Sender<RawReq>, i: u64) {
    let req = Bytes::from(serde_json::to_vec(&person(i)).expect("encode"));
    let (rtx, rrx) = oneshot::channel();
    tx.send((req, rtx)).await.expect("send");
    let r: Person = serde_json::from_slice(&rrx.await.expect("reply")).expect("decode");
    assert_eq!(r.id, i);
}

async fn raw_memory_run(c: &Counts) -> Vec<Figure> {
    let tx = raw_responder();
    let mut figs = Vec::new();
    for i in 0..c.warmup {
        raw_call(&tx, i).await;
    }
    let mut samples = Vec::with_capacity(c.latency as usize);
    for i in 0..c.latency {
        let t = Instant::now();
        raw_call(&tx, i).await;
        samples.push(t.elapsed());
    }
    figs.extend(latency_figures(samples));

    let t = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (tx, next, n) = (tx.clone(), next.clone(), c.rr);
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    raw_call(&tx, i).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    figs.push(rate("rr_throughput", "req/s", c.rr, t.elapsed()));

    let t = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let (mut sent, mut got) = (0u64, 0u64);
    while got < c.async_rr {
        while sent < c.async_rr && inflight.len() < c.async_outstanding {
            let req = Bytes::from(serde_json::to_vec(&person(sent)).expect("encode"));
            let (rtx, rrx) = oneshot::channel();
            tx.send((req, rtx)).await.expect("send");
            let id = sent;
            inflight.push(async move { (id, rrx.await) });
            sent += 1;
        }
        let (id, r) = inflight.next().await.expect("a reply");
        let p: Person = serde_json::from_slice(&r.expect("reply")).expect("decode");
        assert_eq!(p.id, id);
        got += 1;
    }
    figs.push(rate("async_rr_throughput", "replies/s", got, t.elapsed()));

    let (etx, mut erx) = mpsc::channel::<Bytes>(c.events_outstanding);
    let total = c.events;
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(b) = erx.recv().await {
            let _p: Person = serde_json::from_slice(&b).expect("decode");
            n += 1;
            if n == total {
                break;
            }
        }
        n
    });
    let t = Instant::now();
    for i in 0..c.events {
        let b = Bytes::from(serde_json::to_vec(&person(i)).expect("encode"));
        etx.send(b).await.expect("send");
    }
    let arrived = tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .map(|r| r.expect("consumer"))
        .unwrap_or(0);
    figs.push(rate("events_throughput", "events/s", arrived, t.elapsed()));
    figs
}

// ---------------------------------------------------------------- report

#[derive(Serialize)]
struct Line<'a> {
    system: &'a str,
    transport: &'a str,
    workload: &'a str,
    unit: &'a str,
    value: f64,
    runs: usize,
    min: f64,
    max: f64,
}

fn summarize(runs: &[Vec<Figure>]) -> Vec<(Figure, f64, f64)> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut vals: Vec<f64> = runs.iter().map(|r| r[i].value).collect();
            vals.sort_by(f64::total_cmp);
            let median = if vals.len() % 2 == 1 {
                vals[vals.len() / 2]
            } else {
                (vals[vals.len() / 2 - 1] + vals[vals.len() / 2]) / 2.0
            };
            (
                Figure {
                    value: median,
                    ..*f
                },
                vals[0],
                vals[vals.len() - 1],
            )
        })
        .collect()
}

fn main() {
    let args = Args::parse();
    if args.transport != "memory" {
        eprintln!(
            "transport `{}` is not available in this build of the bench (available: memory)",
            args.transport
        );
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let counts = Counts::scaled(args.scale);
    let mut sb_runs = Vec::new();
    let mut raw_runs = Vec::new();
    rt.block_on(async {
        for run in 0..args.runs {
            let url = format!("memory://bench-{run}");
            // Interleave, alternating which side goes first.
            let (sb, raw) = match args.only.as_deref() {
                None => (true, true),
                Some("switchboard") => (true, false),
                Some("raw") => (false, true),
                Some(other) => {
                    eprintln!("--only takes `switchboard` or `raw`, not `{other}`");
                    std::process::exit(2);
                }
            };
            if run % 2 == 0 {
                if sb {
                    sb_runs.push(sb_run(&url, &counts).await);
                }
                if raw {
                    raw_runs.push(raw_memory_run(&counts).await);
                }
            } else {
                if raw {
                    raw_runs.push(raw_memory_run(&counts).await);
                }
                if sb {
                    sb_runs.push(sb_run(&url, &counts).await);
                }
            }
            eprintln!("run {}/{} done", run + 1, args.runs);
        }
    });
    let sb = summarize(&sb_runs);
    let raw = summarize(&raw_runs);
    let mut out = std::fs::File::create(&args.out).expect("create output file");
    for (system, rows) in [("switchboard", &sb), ("raw", &raw)] {
        for (f, min, max) in rows {
            let line = Line {
                system,
                transport: &args.transport,
                workload: f.workload,
                unit: f.unit,
                value: (f.value * 10.0).round() / 10.0,
                runs: args.runs,
                min: (min * 10.0).round() / 10.0,
                max: (max * 10.0).round() / 10.0,
            };
            writeln!(out, "{}", serde_json::to_string(&line).expect("json")).expect("write");
        }
    }
    println!(
        "| transport | workload | unit | switchboard (median, min–max) | raw (median, min–max) | switchboard/raw | better is |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for ((s, smin, smax), (r, rmin, rmax)) in sb.iter().zip(raw.iter()) {
        println!(
            "| {} | {} | {} | {:.1} ({:.1}–{:.1}) | {:.1} ({:.1}–{:.1}) | {:.2} | {} |",
            args.transport,
            s.workload,
            s.unit,
            s.value,
            smin,
            smax,
            r.value,
            rmin,
            rmax,
            s.value / r.value,
            if s.lower_is_better { "lower" } else { "higher" }
        );
    }
    println!("(gateway_added_latency: not applicable until the gateway exists)");
    eprintln!("wrote {}", args.out);
}
