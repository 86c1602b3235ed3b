//! The `grpc://` transport's `send`s travel on one `SendStream` per client: these cases check
//! what that stream must keep beyond the conformance suite: many calls in flight past the
//! server's and the client's buffers, the calls in hand when the server stops, a stream that
//! ends and is opened again, and a server without `SendStream`, which gets unary `Send`s.

#![cfg(feature = "grpc")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchboard::grpc::{RunningServer, ServiceOptions, SwitchboardService};
use switchboard::memory::{MemoryConfig, MemoryTransport};
use switchboard::{Client, ClientConfig, ErrorKind, HandlerError};
use switchboard_conformance::{within, within_for};
use switchboard_proto::pb;
use switchboard_proto::pb::switchboard_server::{Switchboard, SwitchboardServer};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

/// A fresh in-memory bus and a client of it: the server's backend, where handlers live.
fn bus() -> Client {
    let bus = format!("grpc-stream-{}", uuid::Uuid::new_v4().simple());
    Client::new(
        MemoryTransport::connect(MemoryConfig::default().bus(bus)),
        ClientConfig::default(),
    )
}

async fn serve_on(addr: &str, backend: &Client) -> RunningServer {
    switchboard::grpc::serve(
        addr.parse().expect("address"),
        SwitchboardService::new(backend.clone(), ServiceOptions::default()),
    )
    .await
    .expect("the server listens")
}

#[tokio::test]
async fn thousands_of_sends_in_flight_on_one_stream_are_all_answered() {
    let backend = bus();
    let _echo = backend
        .handle("stream.echo", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n * 2)
        })
        .await
        .expect("handler");
    let server = serve_on("127.0.0.1:0", &backend).await;
    let client = switchboard::connect(&server.url()).await.expect("connect");
    // More than the server handles at once on a stream (1,024) and than the client queues
    // for writing (1,024): the rest wait for room, and every call still gets its own reply.
    let calls = (0..3_000u64).map(|n| {
        let client = client.clone();
        async move { (n, client.send::<u64, u64>("stream.echo", &n).await) }
    });
    let answers = within_for(
        Duration::from_secs(30),
        "3,000 concurrent sends",
        futures::future::join_all(calls),
    )
    .await;
    for (n, answer) in answers {
        assert_eq!(
            answer.expect("reply"),
            n * 2,
            "call {n} got another's reply"
        );
    }
    client.shutdown().await.expect("shutdown");
    server.shutdown().await.expect("server stops");
}

#[tokio::test]
async fn sends_in_hand_when_the_server_stops_are_answered_and_later_ones_fail_retryably() {
    let backend = bus();
    let gate = Arc::new(Semaphore::new(0));
    let entered = Arc::new(tokio::sync::Notify::new());
    let (g, e) = (gate.clone(), entered.clone());
    let _slow = backend
        .handle("stream.slow", move |n: u64, _ctx| {
            let (g, e) = (g.clone(), e.clone());
            async move {
                e.notify_one();
                let _permit = g.acquire().await.expect("gate");
                Ok::<_, HandlerError>(n + 1)
            }
        })
        .await
        .expect("handler");
    let server = serve_on("127.0.0.1:0", &backend).await;
    let addr = server.local_addr();
    let client = switchboard::connect(&server.url()).await.expect("connect");
    let c = client.clone();
    let in_hand = tokio::spawn(async move { c.send::<u64, u64>("stream.slow", &41).await });
    within("the handler takes the call", entered.notified()).await;
    // The server stops while the handler holds the call: it takes no more calls, but the one
    // in hand is answered before its stream ends. The handler is let go only once the
    // server is stopping (it no longer accepts connections; its streams were told to close
    // before that).
    let stopping = tokio::spawn(server.shutdown());
    within("the server stops accepting connections", async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    gate.add_permits(1);
    let reply = within("the call in hand", in_hand)
        .await
        .expect("task")
        .expect("the call in hand is answered");
    assert_eq!(reply, 42);
    within("the server stops", stopping)
        .await
        .expect("task")
        .expect("server stops");
    // With no server, a send fails at once with an error a caller may retry, not at its
    // deadline.
    let err = within_for(
        Duration::from_secs(5),
        "a send to the stopped server",
        client.send::<u64, u64>("stream.slow", &1),
    )
    .await
    .expect_err("no server");
    assert!(
        err.is_retryable(),
        "a send to a stopped server failed with {err:?}, which is not retryable"
    );
}

#[tokio::test]
async fn the_stream_is_opened_again_after_the_server_comes_back() {
    let backend = bus();
    let _echo = backend
        .handle("stream.again", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n)
        })
        .await
        .expect("handler");
    let server = serve_on("127.0.0.1:0", &backend).await;
    let addr = server.local_addr().to_string();
    let client = switchboard::connect(&server.url()).await.expect("connect");
    assert_eq!(
        within("first send", client.send::<u64, u64>("stream.again", &1))
            .await
            .expect("reply"),
        1
    );
    within("the server stops", server.shutdown())
        .await
        .expect("server stops");
    let server = serve_on(&addr, &backend).await;
    // The old stream ended with the old server; the client opens a new one. Until the new
    // server is reached, sends fail with retryable errors, never a hang.
    let mut failures = Vec::new();
    let reply = within_for(Duration::from_secs(15), "a send to the new server", async {
        loop {
            match client.send::<u64, u64>("stream.again", &2).await {
                Ok(v) => break v,
                Err(e) => {
                    assert!(e.is_retryable(), "not retryable: {e:?}");
                    failures.push(e.kind());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(reply, 2);
    assert!(
        failures.iter().all(|k| *k != ErrorKind::Timeout),
        "sends waited for their deadline instead of failing at once: {failures:?}"
    );
    client.shutdown().await.expect("shutdown");
    server.shutdown().await.expect("server stops");
}

/// A server as one without `SendStream` would be (an older switchboard server): every call
/// but that one goes to the real service; it counts the calls of each kind.
#[derive(Clone)]
struct WithoutSendStream {
    inner: SwitchboardService,
    unary_sends: Arc<AtomicU64>,
    stream_opens: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Switchboard for WithoutSendStream {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        self.unary_sends.fetch_add(1, Ordering::Relaxed);
        self.inner.send(req).await
    }

    async fn emit(
        &self,
        req: Request<pb::EmitRequest>,
    ) -> Result<Response<pb::EmitResponse>, Status> {
        self.inner.emit(req).await
    }

    async fn request(
        &self,
        req: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        self.inner.request(req).await
    }

    type RepliesStream = <SwitchboardService as Switchboard>::RepliesStream;
    async fn replies(
        &self,
        req: Request<pb::RepliesRequest>,
    ) -> Result<Response<Self::RepliesStream>, Status> {
        self.inner.replies(req).await
    }

    type SubscribeStream = <SwitchboardService as Switchboard>::SubscribeStream;
    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.inner.subscribe(req).await
    }

    type ServeStream = <SwitchboardService as Switchboard>::ServeStream;
    async fn serve(
        &self,
        req: Request<Streaming<pb::ServeRequest>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        self.inner.serve(req).await
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.inner.publish(req).await
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.inner.info(req).await
    }

    type SendStreamStream = <SwitchboardService as Switchboard>::SendStreamStream;
    async fn send_stream(
        &self,
        _: Request<Streaming<pb::SendCall>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        self.stream_opens.fetch_add(1, Ordering::Relaxed);
        Err(Status::unimplemented("this server has no SendStream"))
    }
}

#[tokio::test]
async fn a_server_without_send_stream_gets_unary_sends() {
    let backend = bus();
    let _echo = backend
        .handle("stream.old", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n + 100)
        })
        .await
        .expect("handler");
    let service = WithoutSendStream {
        inner: SwitchboardService::new(backend.clone(), ServiceOptions::default()),
        unary_sends: Arc::new(AtomicU64::new(0)),
        stream_opens: Arc::new(AtomicU64::new(0)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SwitchboardServer::new(service.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let client = switchboard::connect(&format!("grpc://{addr}"))
        .await
        .expect("connect");
    for n in 0..3u64 {
        let reply = within("send", client.send::<u64, u64>("stream.old", &n))
            .await
            .expect("reply");
        assert_eq!(reply, n + 100);
    }
    assert_eq!(
        service.stream_opens.load(Ordering::Relaxed),
        1,
        "the client asked for the stream once and then kept to unary calls"
    );
    assert_eq!(service.unary_sends.load(Ordering::Relaxed), 3);
    client.shutdown().await.expect("shutdown");
    server.abort();
}
