//! `gateway_added_latency`: 1,000 requests/s for 30 s with a 1 KB payload, client → gateway →
//! handler (a `Serve` client, as a service in any language serves through the gateway)
//! against client → handler directly (a tonic server answering the same `Send` call). Both
//! calls are tonic unary `Send`s from this process; the gateway, or the direct handler, runs
//! in the server process. Figures: p50, p90 and p99 round trip of each side; the added
//! latency is their difference.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchboard_proto::pb;
use switchboard_proto::pb::switchboard_client::SwitchboardClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use crate::workload::{Counts, Figure};

const PATTERN: &str = "bench.echo1k";
const RATE: u64 = 1_000;

fn addr(url: &str) -> String {
    let u = url::Url::parse(url).expect("grpc URL");
    format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().expect("a port")
    )
}

/// The server process of the switchboard side: the gateway on the URL's address.
pub(crate) async fn serve_gateway(url: &str) -> switchboard_gateway::Gateway {
    let cfg = switchboard_gateway::GatewayConfig::new(
        addr(url).parse().expect("address"),
        format!("memory://gateway-bench-{}", std::process::id()),
    );
    switchboard_gateway::Gateway::start(cfg)
        .await
        .expect("the gateway starts")
}

async fn connect(addr: &str) -> SwitchboardClient<Channel> {
    SwitchboardClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// A `Serve` client echoing every request's payload, until the returned sender is dropped.
async fn serve_echo(addr: &str) -> mpsc::UnboundedSender<pb::ServeRequest> {
    let mut client = connect(addr).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::ServeRequest {
        msg: Some(pb::serve_request::Msg::Register(pb::ServeRegister {
            request_patterns: vec![PATTERN.into()],
            concurrency: 256,
            ..Default::default()
        })),
    })
    .expect("queued");
    let mut work = client
        .serve(UnboundedReceiverStream::new(rx))
        .await
        .expect("serve")
        .into_inner();
    let first = work.message().await.expect("registered");
    assert!(matches!(
        first,
        Some(pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Registered(_))
        })
    ));
    let answers = tx.clone();
    tokio::spawn(async move {
        while let Some(Ok(pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Work(w)),
        })) = work.next().await
        {
            let payload = w.envelope.map(|e| e.payload).unwrap_or_default();
            let _ = answers.send(pb::ServeRequest {
                msg: Some(pb::serve_request::Msg::Result(pb::WorkResult {
                    work_id: w.work_id,
                    outcome: Some(pb::work_result::Outcome::Reply(pb::Envelope {
                        payload,
                        content_type: "application/json".into(),
                        ..Default::default()
                    })),
                })),
            });
        }
    });
    tx
}

/// 1 KB of JSON: `{"id":n,"pad":"xxx…"}`.
fn payload(i: u64) -> bytes::Bytes {
    let head = format!("{{\"id\":{i},\"pad\":\"");
    let pad = 1024 - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad)).into()
}

/// Calls at `RATE` per second for `duration` (open loop: a call starts every millisecond
/// whether or not the previous ones finished); returns every round trip.
async fn paced(client: &SwitchboardClient<Channel>, duration: Duration) -> Vec<Duration> {
    let samples = Arc::new(Mutex::new(Vec::with_capacity(
        (duration.as_secs_f64() * RATE as f64) as usize,
    )));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < duration {
        tick.tick().await;
        i += 1;
        let (mut client, samples) = (client.clone(), samples.clone());
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client
                .send(pb::SendRequest {
                    envelope: Some(pb::Envelope {
                        pattern: PATTERN.into(),
                        payload: payload(i),
                        content_type: "application/json".into(),
                        ..Default::default()
                    }),
                })
                .await
                .expect("send");
            let took = t.elapsed();
            assert_eq!(r.into_inner().reply.expect("reply").payload.len(), 1024);
            samples.lock().expect("lock").push(took);
        }));
    }
    for c in calls {
        c.await.expect("call");
    }
    let mut v = std::mem::take(&mut *samples.lock().expect("lock"));
    v.sort_unstable();
    v
}

fn figures(sorted: &[Duration]) -> Vec<Figure> {
    let at = |p: f64| {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1e3
    };
    [
        ("gateway_latency_p50", 50.0),
        ("gateway_latency_p90", 90.0),
        ("gateway_latency_p99", 99.0),
    ]
    .into_iter()
    .map(|(workload, p)| Figure {
        workload,
        unit: "ms",
        value: at(p),
        lower_is_better: true,
    })
    .collect()
}

/// One side: through the gateway (`switchboard`) or directly (`raw`).
pub(crate) async fn run(system: &str, url: &str, c: &Counts) -> Vec<Figure> {
    let (target, _handler) = if system == "switchboard" {
        let a = addr(url);
        let handler = serve_echo(&a).await;
        (a, Some(handler))
    } else {
        (crate::grpc::raw_addr(url).to_string(), None)
    };
    let client = connect(&target).await;
    // One second of warm-up at the same rate, then the measured stretch.
    paced(&client, Duration::from_secs(1)).await;
    figures(&paced(&client, c.gateway).await)
}
