//! The benchmark program for the workloads in docs/benchmarks.md, switchboard beside the raw
//! client of the same transport in the same run, interleaved, reported as ratios.
//!
//! Run (an optimised build; numbers from a debug build mean nothing):
//!
//! ```text
//! cargo run --profile bench-release -p switchboard-conformance --bin switchboard-bench -- \
//!     --transport nats --runs 5 --out bench-nats.jsonl
//! ```
//!
//! Output: one JSON object per line and figure (median over runs, with min and max), with
//! `"system":"switchboard"` or `"system":"raw"`, then a table with the ratio switchboard/raw.
//!
//! For a broker the responder and the event consumer run in a second process (this program
//! started with `--serve`), one per run and side; the raw side is the broker's own Rust client
//! (async-nats, lapin, rdkafka, aws-sdk-sqs/sns) doing the same work. For `memory` the raw side is plain tokio channels
//! and both sides run in one process (an in-memory transport cannot cross processes).

mod child;
#[cfg(feature = "grpc")]
mod gateway;
#[cfg(feature = "grpc")]
mod grpc;
#[cfg(feature = "kafka")]
mod kafka;
mod memory;
#[cfg(feature = "nats")]
mod nats;
mod policies;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
mod sb;
#[cfg(feature = "sns-sqs")]
mod sns_sqs;
mod workload;

use std::io::Write;

use clap::Parser;
use serde::Serialize;

use crate::child::{ChildServer, MachineTicks};
use crate::workload::{Counter, Counts, Figure};

#[derive(Parser, Debug)]
#[command(about = "switchboard benchmarks beside the raw client, as JSON lines and a ratio table")]
struct Args {
    /// Transport to measure: memory, nats, rabbitmq, kafka, sns-sqs, grpc; or `gateway` for
    /// `gateway_added_latency` (through the gateway against directly); or `policies` for
    /// `send` on memory through the full stack of resilience policies (`switchboard`)
    /// against the plain client (`raw`).
    #[arg(long, default_value = "memory")]
    transport: String,
    /// The broker's URL (default: the local broker of the transport).
    #[arg(long)]
    url: Option<String>,
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
    /// Run only these workload groups, comma-separated: `latency` (sequential `send`s), `rr`
    /// (`send`s, 64 in flight), `async_rr`, `events` (for profiling one path). Default: all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Internal: run as the server process of `switchboard` or `raw`.
    #[arg(long, hide = true)]
    serve: Option<String>,
    /// Internal: how many events the server process should expect.
    #[arg(long, hide = true, default_value_t = 0)]
    expect_events: u64,
}

/// The default URL of each transport: the local brokers the test script starts. NATS gets a
/// stream and subjects of its own, kept ten minutes, so benchmark events do not pile up.
fn default_url(transport: &str) -> Option<&'static str> {
    Some(match transport {
        "memory" => "memory://bench",
        "policies" => "memory://bench-policies",
        "nats" => {
            "nats://127.0.0.1:4222?prefix=sbbench&stream=SWITCHBOARD_BENCH&dlq_stream=SWITCHBOARD_BENCH_DLQ&retention_ms=600000"
        }
        "rabbitmq" => "amqp://guest:guest@127.0.0.1:5672/%2f",
        // tansu (scripts/brokers up kafka) holds every fetch for `fetch.wait.max.ms`: 5 ms.
        // Each run adds a prefix of its own (fresh topics; see kafka.rs).
        "kafka" => "kafka://127.0.0.1:9092?fetch_wait_ms=5",
        // moto (scripts/brokers up sqs); each run adds a prefix of its own.
        "sns-sqs" => "sns+sqs://test:test@127.0.0.1:4566?wait_s=1",
        // The switchboard server's address; the raw tonic server takes the next port.
        "grpc" => "grpc://127.0.0.1:50151",
        // The gateway's address; the direct handler takes the next port.
        "gateway" => "grpc://127.0.0.1:50161",
        _ => return None,
    })
}

fn compiled(transport: &str) -> bool {
    transport == "memory"
        || transport == "policies"
        || (transport == "nats" && cfg!(feature = "nats"))
        || (transport == "rabbitmq" && cfg!(feature = "rabbitmq"))
        || (transport == "kafka" && cfg!(feature = "kafka"))
        || (transport == "sns-sqs" && cfg!(feature = "sns-sqs"))
        || ((transport == "grpc" || transport == "gateway") && cfg!(feature = "grpc"))
}

/// The server process: handlers of one side, until the parent goes away.
async fn serve(system: &str, transport: &str, url: &str, total: u64) {
    let (counted, all) = workload::local_counter();
    #[cfg(feature = "grpc")]
    let _grpc_server = match (system, transport) {
        ("switchboard", "grpc") => {
            Some(grpc::serve_switchboard(url, counted.clone(), all.clone(), total).await)
        }
        _ => None,
    };
    #[cfg(feature = "grpc")]
    let _gateway = match (system, transport) {
        ("switchboard", "gateway") => Some(gateway::serve_gateway(url).await),
        _ => None,
    };
    let keep = match system {
        #[cfg(feature = "grpc")]
        "switchboard" if transport == "grpc" || transport == "gateway" => None,
        "switchboard" => Some(sb::serve(url, counted.clone(), all.clone(), total).await),
        "raw" => {
            match transport {
                #[cfg(feature = "nats")]
                "nats" => nats::serve(url, counted.clone(), all.clone(), total).await,
                #[cfg(feature = "rabbitmq")]
                "rabbitmq" => rabbitmq::serve(url, counted.clone(), all.clone(), total).await,
                #[cfg(feature = "kafka")]
                "kafka" => kafka::serve(url, counted.clone(), all.clone(), total).await,
                #[cfg(feature = "sns-sqs")]
                "sns-sqs" => sns_sqs::serve(url, counted.clone(), all.clone(), total).await,
                #[cfg(feature = "grpc")]
                "grpc" | "gateway" => {
                    grpc::serve_raw(url, counted.clone(), all.clone(), total).await
                }
                other => panic!("no raw server for `{other}`"),
            }
            None
        }
        other => panic!("--serve takes switchboard or raw, not `{other}`"),
    };
    child::watch(counted, all);
    child::say("ready");
    std::future::pending::<()>().await;
    drop(keep);
}

/// One run of one side against a broker: a fresh server process, then the client workloads.
async fn broker_run(system: &str, transport: &str, url: &str, c: &Counts) -> Vec<Figure> {
    let server = ChildServer::spawn(system, transport, url, c.events).await;
    let server_before = server.cpu_time();
    let client_before = child::cpu_time("self");
    let mut counter = Counter::Child(server);
    let mut figs = match (system, transport) {
        #[cfg(feature = "grpc")]
        (_, "gateway") => gateway::run(system, url, c).await,
        ("switchboard", _) => sb::run(url, c, &mut counter).await,
        #[cfg(feature = "nats")]
        ("raw", "nats") => nats::run(url, c, &mut counter).await,
        #[cfg(feature = "rabbitmq")]
        ("raw", "rabbitmq") => rabbitmq::run(url, c, &mut counter).await,
        #[cfg(feature = "kafka")]
        ("raw", "kafka") => kafka::run(url, c, &mut counter).await,
        #[cfg(feature = "sns-sqs")]
        ("raw", "sns-sqs") => sns_sqs::run(url, c, &mut counter).await,
        #[cfg(feature = "grpc")]
        ("raw", "grpc") => grpc::run_raw(url, c, &mut counter).await,
        (s, t) => panic!("no {s} client for `{t}`"),
    };
    // CPU each process spent on all the workloads of the run (the broker's own is not counted).
    let Counter::Child(server) = &counter else {
        unreachable!("a broker run counts in the server process")
    };
    let spent = |after: Option<std::time::Duration>, before: Option<std::time::Duration>| {
        after
            .zip(before)
            .map(|(a, b)| a.saturating_sub(b).as_secs_f64() * 1e3)
    };
    for (workload, ms) in [
        ("client_cpu", spent(child::cpu_time("self"), client_before)),
        ("server_cpu", spent(server.cpu_time(), server_before)),
    ] {
        if let Some(ms) = ms {
            figs.push(Figure {
                workload,
                unit: "ms",
                value: ms,
                lower_is_better: true,
            });
        }
    }
    figs
}

async fn run_side(system: &str, transport: &str, url: &str, run: usize, c: &Counts) -> Vec<Figure> {
    if transport == "policies" {
        let url = format!("{url}-{run}{system}");
        let (counted, all) = workload::local_counter();
        let (server, _events) = sb::serve(&url, counted, all, 0).await;
        let figs = policies::run(system, &url, c).await;
        server.shutdown().await.expect("shutdown");
        return figs;
    }
    if transport == "memory" {
        if system == "raw" {
            return memory::raw_run(c).await;
        }
        let url = format!("{url}-{run}");
        let (counted, all) = workload::local_counter();
        let (server, _events) = sb::serve(&url, counted.clone(), all.clone(), c.events).await;
        let mut counter = Counter::Local(counted, all);
        let figs = sb::run(&url, c, &mut counter).await;
        server.shutdown().await.expect("shutdown");
        return figs;
    }
    if transport == "kafka" || transport == "sns-sqs" {
        // Topics (and queues) of this run and side alone.
        let sep = if url.contains('?') { '&' } else { '?' };
        let url = format!(
            "{url}{sep}prefix=sbbench{}r{run}{}",
            std::process::id(),
            &system[..1]
        );
        return broker_run(system, transport, &url, c).await;
    }
    broker_run(system, transport, url, c).await
}

// ---------------------------------------------------------------- report

/// `machine_idle` and `machine_steal` of one side (percent of the machine's CPU time while its
/// runs went on), summarized over runs like its figures.
fn machine_summary(machine: &[(&str, [f64; 2])], side: &str) -> Vec<(Figure, f64, f64)> {
    let runs: Vec<Vec<Figure>> = machine
        .iter()
        .filter(|(s, _)| *s == side)
        .map(|(_, shares)| {
            ["machine_idle", "machine_steal"]
                .into_iter()
                .zip(shares)
                .map(|(workload, &value)| Figure {
                    workload,
                    unit: "% of CPU",
                    value,
                    lower_is_better: true,
                })
                .collect()
        })
        .collect();
    summarize(&runs)
}

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
    if !compiled(&args.transport) {
        eprintln!(
            "transport `{}` is not available in this build of the bench (known: memory, nats, rabbitmq, kafka, sns-sqs, grpc; the others need the crate features of the same name)",
            args.transport
        );
        std::process::exit(2);
    }
    let url = args
        .url
        .clone()
        .or_else(|| default_url(&args.transport).map(str::to_owned))
        .expect("a URL");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(system) = args.serve.as_deref() {
        rt.block_on(serve(system, &args.transport, &url, args.expect_events));
        return;
    }
    let (sb, raw) = match args.only.as_deref() {
        None => (true, true),
        Some("switchboard") => (true, false),
        Some("raw") => (false, true),
        Some(other) => {
            eprintln!("--only takes `switchboard` or `raw`, not `{other}`");
            std::process::exit(2);
        }
    };
    let mut counts = Counts::scaled(args.scale);
    if !args.workloads.is_empty() {
        counts = counts.only(&args.workloads).unwrap_or_else(|e| {
            eprintln!("--workloads: {e}");
            std::process::exit(2);
        });
    }
    let mut sb_runs = Vec::new();
    let mut raw_runs = Vec::new();
    // How busy the machine was while each side ran: idle and stolen CPU shares per run.
    let mut machine: Vec<(&str, [f64; 2])> = Vec::new();
    rt.block_on(async {
        for run in 0..args.runs {
            // Interleave, alternating which side goes first.
            let order: [&str; 2] = if run % 2 == 0 {
                ["switchboard", "raw"]
            } else {
                ["raw", "switchboard"]
            };
            for system in order {
                let before = MachineTicks::now();
                match system {
                    "switchboard" if sb => {
                        sb_runs.push(run_side(system, &args.transport, &url, run, &counts).await)
                    }
                    "raw" if raw => {
                        raw_runs.push(run_side(system, &args.transport, &url, run, &counts).await)
                    }
                    _ => continue,
                }
                if let Some(shares) = MachineTicks::now()
                    .zip(before)
                    .and_then(|(after, before)| after.shares_since(&before))
                {
                    machine.push((system, shares));
                }
            }
            eprintln!("run {}/{} done", run + 1, args.runs);
        }
    });
    let sb = summarize(&sb_runs);
    let raw = summarize(&raw_runs);
    let sb_machine = machine_summary(&machine, "switchboard");
    let raw_machine = machine_summary(&machine, "raw");
    let mut out = std::fs::File::create(&args.out).expect("create output file");
    for (system, rows) in [
        ("switchboard", &sb),
        ("raw", &raw),
        ("switchboard", &sb_machine),
        ("raw", &raw_machine),
    ] {
        for (f, min, max) in rows {
            let line = Line {
                system,
                transport: &args.transport,
                workload: f.workload,
                unit: f.unit,
                value: (f.value * 1000.0).round() / 1000.0,
                runs: args.runs,
                min: (min * 1000.0).round() / 1000.0,
                max: (max * 1000.0).round() / 1000.0,
            };
            writeln!(out, "{}", serde_json::to_string(&line).expect("json")).expect("write");
        }
    }
    if sb_runs.is_empty() || raw_runs.is_empty() {
        eprintln!(
            "one side only (--only): no ratio table; figures in {}",
            args.out
        );
        return;
    }
    // Each run measures both sides back to back, so the ratio within a run is paired: the
    // machine's drift between runs cancels out. Its median over runs is reported beside the
    // ratio of the medians.
    let paired: Vec<(f64, f64, f64)> = (0..sb.len())
        .map(|i| {
            let ratios: Vec<Vec<Figure>> = sb_runs
                .iter()
                .zip(&raw_runs)
                .map(|(s, r)| {
                    vec![Figure {
                        value: s[i].value / r[i].value,
                        ..s[i]
                    }]
                })
                .collect();
            let (m, lo, hi) = summarize(&ratios).pop().expect("one figure");
            (m.value, lo, hi)
        })
        .collect();
    println!(
        "| transport | workload | unit | switchboard (median, min–max) | raw (median, min–max) | switchboard/raw | per-run ratio (median, min–max) | better is |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (((s, smin, smax), (r, rmin, rmax)), (pm, plo, phi)) in
        sb.iter().zip(raw.iter()).zip(paired)
    {
        // Milliseconds of latency need more digits than microseconds or rates.
        let d = if s.unit == "ms" && s.lower_is_better && s.value < 10.0 {
            3
        } else {
            1
        };
        println!(
            "| {} | {} | {} | {:.d$} ({:.d$}–{:.d$}) | {:.d$} ({:.d$}–{:.d$}) | {:.2} | {:.2} ({:.2}–{:.2}) | {} |",
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
            pm,
            plo,
            phi,
            if s.lower_is_better { "lower" } else { "higher" }
        );
    }
    if args.transport == "gateway" {
        // The added latency: through the gateway minus directly, per run (paired), for each
        // percentile.
        println!();
        println!("| workload | unit | added (median over runs, min–max) |");
        println!("| --- | --- | --- |");
        for (i, name) in [
            "gateway_added_latency_p50",
            "gateway_added_latency_p90",
            "gateway_added_latency_p99",
        ]
        .into_iter()
        .enumerate()
        {
            let added: Vec<Vec<Figure>> = sb_runs
                .iter()
                .zip(&raw_runs)
                .map(|(s, r)| {
                    vec![Figure {
                        workload: name,
                        value: s[i].value - r[i].value,
                        ..s[i]
                    }]
                })
                .collect();
            let (m, lo, hi) = summarize(&added).pop().expect("one figure");
            println!("| {name} | ms | {:.3} ({lo:.3}–{hi:.3}) |", m.value);
            let line = Line {
                system: "added",
                transport: &args.transport,
                workload: name,
                unit: "ms",
                value: (m.value * 1000.0).round() / 1000.0,
                runs: args.runs,
                min: (lo * 1000.0).round() / 1000.0,
                max: (hi * 1000.0).round() / 1000.0,
            };
            writeln!(out, "{}", serde_json::to_string(&line).expect("json")).expect("write");
        }
    } else {
        println!("(gateway_added_latency: measured with --transport gateway)");
    }
    println!();
    println!(
        "The machine while each side ran (whole machine, both cores; median, min–max over runs):"
    );
    println!();
    println!("| side | machine | median | min–max |");
    println!("| --- | --- | --- | --- |");
    for (system, rows) in [("switchboard", &sb_machine), ("raw", &raw_machine)] {
        for (f, min, max) in rows {
            println!(
                "| {system} | {} % | {:.1} | {min:.1}–{max:.1} |",
                f.workload, f.value
            );
        }
    }
    eprintln!("wrote {}", args.out);
}
