//! The gRPC transport's benchmark: switchboard's `grpc://` transport against a switchboard
//! server, beside raw tonic unary calls against a tonic server doing the same JSON work.
//!
//! Both servers speak `switchboard.v1.Switchboard`, so the raw side sends the same protobuf
//! messages; its server implements `Send` as an echo and `Emit` as a counting consumer, with
//! nothing of switchboard in between. On the switchboard side the server process hosts its
//! handlers on the server's own in-memory bus, as a Rust service that listens would.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use switchboard::grpc::{ServiceOptions, SwitchboardService};
use switchboard::{Client, Service};
use switchboard_proto::pb;
use switchboard_proto::pb::switchboard_client::SwitchboardClient;
use switchboard_proto::pb::switchboard_server::Switchboard;
use tokio::sync::Notify;
use tonic::{Request, Response, Status, Streaming};

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

/// Set (to anything) to make the raw side's calls carry what switchboard's do: a message id
/// and a deadline (`grpc-timeout`), so what that metadata costs is measured apart.
const METADATA_ENV: &str = "SB_BENCH_RAW_METADATA";

/// Set (to anything) to make the raw side's `send` workloads calls on one `SendStream`
/// ([`RawStream`]) instead of unary calls (`emit` stays unary).
const STREAM_ENV: &str = "SB_BENCH_RAW_STREAM";

/// The raw server listens one port above the switchboard server.
pub(crate) fn raw_addr(url: &str) -> SocketAddr {
    let u = url::Url::parse(url).expect("grpc URL");
    let port = u.port().expect("a port") + 1;
    format!("{}:{port}", u.host_str().unwrap_or("127.0.0.1"))
        .parse()
        .expect("address")
}

/// The switchboard server process: a switchboard server on the URL's address over an
/// in-memory bus, with the bench's handlers on that bus.
pub(crate) async fn serve_switchboard(
    url: &str,
    counted: Arc<AtomicU64>,
    all: Arc<Notify>,
    total: u64,
) -> (Client, Service, switchboard::grpc::RunningServer) {
    let bus = format!("memory://grpc-bench-{}", std::process::id());
    let (backend, events) = crate::sb::serve(&bus, counted, all, total).await;
    let u = url::Url::parse(url).expect("grpc URL");
    let addr = format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().expect("a port")
    )
    .parse()
    .expect("address");
    let server = switchboard::grpc::serve(
        addr,
        SwitchboardService::new(backend.clone(), ServiceOptions::default()),
    )
    .await
    .expect("the switchboard server listens");
    (backend, events, server)
}

/// The raw tonic server: `Send` echoes (the JSON workloads decode and re-encode; the
/// gateway's 1 KB payload, which is not a person, comes back as it is), `Emit` counts.
struct Raw {
    counted: Arc<AtomicU64>,
    all: Arc<Notify>,
    total: u64,
}

type Never<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Switchboard for Raw {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let env = req.into_inner().envelope.unwrap_or_default();
        let payload = if env.pattern == "bench.echo1k" {
            env.payload
        } else {
            echo_bytes(&env.payload).into()
        };
        Ok(Response::new(pb::SendResponse {
            reply: Some(pb::Envelope {
                payload,
                ..Default::default()
            }),
        }))
    }

    async fn emit(
        &self,
        req: Request<pb::EmitRequest>,
    ) -> Result<Response<pb::EmitResponse>, Status> {
        let env = req.into_inner().envelope.unwrap_or_default();
        let _p: workload::Person = serde_json::from_slice(&env.payload).expect("decode");
        workload::count(&self.counted, &self.all, self.total);
        Ok(Response::new(pb::EmitResponse::default()))
    }

    async fn request(
        &self,
        _: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    type RepliesStream = Never<pb::RepliesResponse>;
    async fn replies(
        &self,
        _: Request<pb::RepliesRequest>,
    ) -> Result<Response<Self::RepliesStream>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    type SubscribeStream = Never<pb::SubscribeResponse>;
    async fn subscribe(
        &self,
        _: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    type ServeStream = Never<pb::ServeResponse>;
    async fn serve(
        &self,
        _: Request<Streaming<pb::ServeRequest>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    async fn publish(
        &self,
        _: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Err(Status::unimplemented("raw bench server"))
    }

    type SendStreamStream = Never<pb::SendOutcome>;
    /// Echoes each call of the stream in the order they come, in one task.
    async fn send_stream(
        &self,
        req: Request<Streaming<pb::SendCall>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(c)) = inbound.message().await {
                let payload = echo_bytes(&c.envelope.unwrap_or_default().payload);
                let out = pb::SendOutcome {
                    call: c.call,
                    reply: Some(pb::Envelope {
                        payload: payload.into(),
                        ..Default::default()
                    }),
                    error: None,
                };
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The raw side's calls on one `SendStream` (with `SB_BENCH_RAW_STREAM` set): the same
/// design as switchboard's `send` (a number per call, a map of waiters, a task reading the
/// outcomes), with nothing else, to measure switchboard's cost over that design apart from
/// what the design saves over unary calls.
struct RawStream {
    calls: tokio::sync::mpsc::Sender<pb::SendCall>,
    waiters: dashmap::DashMap<u64, tokio::sync::oneshot::Sender<pb::SendOutcome>>,
    next: AtomicU64,
}

impl RawStream {
    async fn open(client: &mut SwitchboardClient<tonic::transport::Channel>) -> Arc<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut outcomes = client
            .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("open the stream")
            .into_inner();
        let lane = Arc::new(RawStream {
            calls: tx,
            waiters: dashmap::DashMap::new(),
            next: AtomicU64::new(0),
        });
        let reader = lane.clone();
        tokio::spawn(async move {
            while let Ok(Some(o)) = outcomes.message().await {
                if let Some((_, tx)) = reader.waiters.remove(&o.call) {
                    let _ = tx.send(o);
                }
            }
        });
        lane
    }

    async fn call(&self, envelope: pb::Envelope) -> pb::Envelope {
        let call = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters.insert(call, tx);
        self.calls
            .send(pb::SendCall {
                call,
                envelope: Some(envelope),
            })
            .await
            .expect("the stream takes the call");
        rx.await.expect("an outcome").reply.expect("a reply")
    }
}

pub(crate) async fn serve_raw(url: &str, counted: Arc<AtomicU64>, all: Arc<Notify>, total: u64) {
    let addr = raw_addr(url);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("raw server listens");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let svc = pb::switchboard_server::SwitchboardServer::new(Raw {
        counted,
        all,
        total,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .initial_connection_window_size(switchboard::grpc::CONNECTION_WINDOW)
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
}

pub(crate) async fn run_raw(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let client = SwitchboardClient::connect(format!("http://{}", raw_addr(url)))
        .await
        .expect("connect");
    let metadata = std::env::var_os(METADATA_ENV).is_some();
    let envelope = move |pattern: &str, i: u64| {
        Some(pb::Envelope {
            pattern: pattern.to_owned(),
            payload: encode(i).into(),
            content_type: "application/json".into(),
            id: if metadata {
                uuid::Uuid::now_v7().to_string()
            } else {
                String::new()
            },
            ..Default::default()
        })
    };
    let call = move |mut client: SwitchboardClient<tonic::transport::Channel>, i: u64| async move {
        let mut req = Request::new(pb::SendRequest {
            envelope: envelope("bench.echo", i),
        });
        if metadata {
            req.set_timeout(std::time::Duration::from_secs(30));
        }
        let r = client.send(req).await.expect("send");
        check_reply(&r.into_inner().reply.expect("reply").payload, i);
    };
    let mut figs = if std::env::var_os(STREAM_ENV).is_some() {
        let mut opener = client.clone();
        let lane = RawStream::open(&mut opener).await;
        let call = move |lane: Arc<RawStream>, i: u64| async move {
            let reply = lane
                .call(envelope("bench.echo", i).expect("an envelope"))
                .await;
            check_reply(&reply.payload, i);
        };
        let l = lane.clone();
        let mut figs = workload::request_reply(c, move |i| call(l.clone(), i)).await;
        let l = lane.clone();
        figs.extend(workload::async_calls(c, |i| call(l.clone(), i)).await);
        figs
    } else {
        let cl = client.clone();
        let mut figs = workload::request_reply(c, move |i| call(cl.clone(), i)).await;
        let cl = client.clone();
        figs.extend(workload::async_calls(c, |i| call(cl.clone(), i)).await);
        figs
    };
    figs.extend(
        workload::events(
            c,
            |i| {
                let mut client = client.clone();
                async move {
                    client
                        .emit(pb::EmitRequest {
                            envelope: envelope("bench.events", i),
                        })
                        .await
                        .expect("emit");
                }
            },
            counter,
        )
        .await,
    );
    figs
}
