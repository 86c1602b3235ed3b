//! The gateway from a client's side, over loopback gRPC with the generated client: every
//! status path, and clients that misbehave. Each test starts its own gateway on
//! 127.0.0.1:0 over an in-memory bus of its own; handlers written in Rust run on the
//! gateway's backend client, as another service on the same broker would.

use std::time::Duration;

use futures::StreamExt;
use switchboard::config::Secret;
use switchboard::{HandlerError, HandlerOptions};
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::pb::switchboard_client::SwitchboardClient;
use switchboard_proto::pb::{self, RouteKind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const STEP: Duration = Duration::from_secs(5);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

async fn gateway(cfg: impl FnOnce(GatewayConfig) -> GatewayConfig) -> Gateway {
    let bus = format!("memory://gw-{}", uuid::Uuid::new_v4().simple());
    let base = GatewayConfig::new("127.0.0.1:0".parse().expect("address"), bus);
    within("start", Gateway::start(cfg(base)))
        .await
        .expect("the gateway starts")
}

async fn client(g: &Gateway) -> SwitchboardClient<Channel> {
    within(
        "connect",
        SwitchboardClient::connect(format!("http://{}", g.local_addr())),
    )
    .await
    .expect("connects")
}

fn envelope(pattern: &str, json: &str) -> Option<pb::Envelope> {
    Some(pb::Envelope {
        pattern: pattern.to_owned(),
        payload: bytes::Bytes::copy_from_slice(json.as_bytes()),
        content_type: "application/json".to_owned(),
        ..Default::default()
    })
}

fn send(pattern: &str, json: &str) -> pb::SendRequest {
    pb::SendRequest {
        envelope: envelope(pattern, json),
    }
}

/// A `Send` whose envelope carries a deadline `ms` from now. (A gRPC deadline would be cut by
/// tonic's client itself, with its own `CANCELLED`, before the server's status arrives; the
/// server maps both to `DEADLINE_EXCEEDED`, see `the_grpc_deadline_travels_with_the_request`
/// and `switchboard_grpc::status::normalize`.)
fn with_deadline(mut msg: pb::SendRequest, ms: u64) -> Request<pb::SendRequest> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    if let Some(e) = msg.envelope.as_mut() {
        e.deadline_unix_ms = now + ms;
    }
    Request::new(msg)
}

fn trailer<'a>(s: &'a Status, key: &str) -> &'a str {
    s.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn assert_status(s: &Status, code: Code, kind: &str) {
    assert_eq!(s.code(), code, "{s:?}");
    assert_eq!(trailer(s, "sb-error-kind"), kind, "{s:?}");
}

/// An echo handler on the gateway's backend: replies with the request's JSON number plus
/// one; fails `not_found` for 0; never answers for 999.
async fn echo(g: &Gateway, pattern: &str) {
    g.backend()
        .handle(pattern, |n: u64, _ctx| async move {
            match n {
                0 => Err(HandlerError::new("not_found", "no item 0")),
                999 => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(n)
                }
                n => Ok(n + 1),
            }
        })
        .await
        .expect("registers");
}

#[tokio::test]
async fn send_returns_the_reply() {
    let g = gateway(|c| c).await;
    echo(&g, "items.get").await;
    let mut c = client(&g).await;
    let reply = within("send", c.send(send("items.get", "41")))
        .await
        .expect("ok")
        .into_inner()
        .reply
        .expect("a reply");
    assert_eq!(&reply.payload[..], b"42");
    assert_eq!(reply.content_type, "application/json");
    assert!(!reply.correlation_id.is_empty(), "the reply is correlated");
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_unauthenticated() {
    let g = gateway(|c| c.token(Secret::new("s3cret"))).await;
    let mut c = client(&g).await;
    let none = within("info", c.info(pb::InfoRequest {}))
        .await
        .expect_err("refused");
    assert_status(&none, Code::Unauthenticated, "unauthenticated");
    assert!(none.message().contains("missing bearer token"), "{none:?}");
    let mut wrong = Request::new(pb::InfoRequest {});
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer guess".parse().expect("ascii"));
    let wrong = within("info", c.info(wrong)).await.expect_err("refused");
    assert_status(&wrong, Code::Unauthenticated, "unauthenticated");
    assert!(!wrong.message().contains("s3cret"), "the token never shows");
    let mut right = Request::new(pb::InfoRequest {});
    right
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
    let info = within("info", c.info(right))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(info.backend, "memory");
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded() {
    let g = gateway(|c| c).await;
    echo(&g, "items.slow").await;
    let mut c = client(&g).await;
    let req = with_deadline(send("items.slow", "999"), 300);
    let started = std::time::Instant::now();
    let err = within("send", c.send(req)).await.expect_err("expires");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at the deadline"
    );
}

#[tokio::test]
async fn the_grpc_deadline_travels_with_the_request() {
    let g = gateway(|c| c).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    g.backend()
        .handle("items.deadline", move |_: u64, ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(ctx.envelope().time_left());
                Ok(1u64)
            }
        })
        .await
        .expect("registers");
    let mut c = client(&g).await;
    let mut req = Request::new(send("items.deadline", "1"));
    req.set_timeout(Duration::from_millis(1500));
    within("send", c.send(req)).await.expect("ok");
    let left = rx
        .recv()
        .await
        .flatten()
        .expect("the request had a deadline");
    assert!(
        left <= Duration::from_millis(1500) && left > Duration::from_millis(500),
        "{left:?}"
    );
}

#[tokio::test]
async fn no_handler_is_unavailable() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    let err = within("send", c.send(send("nobody.home", "1")))
        .await
        .expect_err("no handler");
    assert_status(&err, Code::Unavailable, "no_responder");
}

#[tokio::test]
async fn a_handler_error_is_readable() {
    let g = gateway(|c| c).await;
    echo(&g, "items.get").await;
    let mut c = client(&g).await;
    let err = within("send", c.send(send("items.get", "0")))
        .await
        .expect_err("handler fails");
    assert_status(&err, Code::Unknown, "handler");
    assert_eq!(trailer(&err, "sb-error-code"), "not_found");
    assert_eq!(err.message(), "no item 0");
    // A payload the handler cannot decode is the caller's bad input.
    let err = within("send", c.send(send("items.get", "\"forty\"")))
        .await
        .expect_err("cannot decode");
    assert_status(&err, Code::InvalidArgument, "codec");
}

#[tokio::test]
async fn malformed_input_is_invalid_argument() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    for (what, req) in [
        ("no envelope", pb::SendRequest { envelope: None }),
        ("empty pattern", send("", "1")),
        ("bad pattern", send("items get!", "1")),
        (
            "bad id",
            pb::SendRequest {
                envelope: Some(pb::Envelope {
                    id: "not-a-uuid".into(),
                    ..envelope("items.get", "1").expect("envelope")
                }),
            },
        ),
    ] {
        let err = within(what, c.send(req)).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let err = within(
        "request without reply_to",
        c.request(pb::RequestRequest {
            envelope: envelope("items.get", "1"),
            timeout_ms: 0,
        }),
    )
    .await
    .expect_err("needs reply_to");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("Replies"), "{err:?}");
}

#[tokio::test]
async fn oversized_messages_are_resource_exhausted() {
    let g = gateway(|c| c.max_message_bytes(1024)).await;
    echo(&g, "items.get").await;
    let mut c = client(&g).await;
    // Over the payload limit, within the gRPC layer's.
    let big = format!("\"{}\"", "x".repeat(2048));
    let err = within("send", c.send(send("items.get", &big)))
        .await
        .expect_err("too large");
    assert_status(&err, Code::ResourceExhausted, "payload_too_large");
    // Far over both: refused by the gRPC layer before the service reads it, same status.
    let huge = format!("\"{}\"", "x".repeat(200 * 1024));
    let err = within(
        "emit",
        c.emit(pb::EmitRequest {
            envelope: envelope("items.new", &huge),
        }),
    )
    .await
    .expect_err("too large");
    assert_status(&err, Code::ResourceExhausted, "payload_too_large");
    // The gateway still serves.
    within("send", c.send(send("items.get", "1")))
        .await
        .expect("still serving");
}

/// A client that sends bytes that are not protobuf gets an error status; the gateway goes on.
#[tokio::test]
async fn malformed_protobuf_is_refused_and_the_gateway_goes_on() {
    let g = gateway(|c| c).await;
    echo(&g, "items.get").await;
    let channel = Channel::from_shared(format!("http://{}", g.local_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut raw = tonic::client::Grpc::new(channel);
    within("ready", raw.ready()).await.expect("ready");
    let garbage = bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x08]);
    let path = http::uri::PathAndQuery::from_static("/switchboard.v1.Switchboard/Send");
    let err = within(
        "garbage",
        raw.unary::<_, pb::SendResponse, _>(Request::new(garbage), path, RawCodec),
    )
    .await
    .expect_err("refused");
    assert!(
        matches!(err.code(), Code::Internal | Code::InvalidArgument),
        "{err:?}"
    );
    let mut c = client(&g).await;
    within("send", c.send(send("items.get", "1")))
        .await
        .expect("still serving");
}

/// Sends raw bytes as a message and decodes the answer as `M`.
#[derive(Debug, Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct ProstDecoder<M>(std::marker::PhantomData<M>);

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl<M: prost::Message + Default> tonic::codec::Decoder for ProstDecoder<M> {
    type Item = M;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<M>, Status> {
        M::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = pb::SendResponse;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<pb::SendResponse>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(std::marker::PhantomData)
    }
}

fn subscription(kind: RouteKind, pattern: &str, group: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        msg: Some(pb::subscribe_request::Msg::Subscription(pb::Subscription {
            kind: kind as i32,
            pattern: pattern.to_owned(),
            group: group.to_owned(),
            prefetch: 8,
            max_attempts: 0,
        })),
    }
}

/// Opens a Subscribe stream and waits for `subscribed`.
async fn subscribe(
    c: &mut SwitchboardClient<Channel>,
    first: pb::SubscribeRequest,
) -> Result<
    (
        mpsc::UnboundedSender<pb::SubscribeRequest>,
        tonic::Streaming<pb::SubscribeResponse>,
    ),
    Status,
> {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(first).expect("queued");
    let mut stream = within("subscribe", c.subscribe(UnboundedReceiverStream::new(rx)))
        .await?
        .into_inner();
    let first = within("subscribed", stream.message()).await?;
    assert!(
        matches!(
            first,
            Some(pb::SubscribeResponse {
                msg: Some(pb::subscribe_response::Msg::Subscribed(_))
            })
        ),
        "{first:?}"
    );
    Ok((tx, stream))
}

async fn next_delivery(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> pb::Delivery {
    match within("delivery", stream.message()).await {
        Ok(Some(pb::SubscribeResponse {
            msg: Some(pb::subscribe_response::Msg::Delivery(d)),
        })) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_routes_and_bad_first_messages_are_refused() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    let err = subscribe(&mut c, subscription(RouteKind::Unspecified, "a.b", "g"))
        .await
        .expect_err("no kind");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = subscribe(&mut c, subscription(RouteKind::Event, "a.b", ""))
        .await
        .expect_err("no group");
    assert_eq!(err.code(), Code::InvalidArgument);
    let settle_first = pb::SubscribeRequest {
        msg: Some(pb::subscribe_request::Msg::Settle(pb::Settle::default())),
    };
    let err = subscribe(&mut c, settle_first)
        .await
        .expect_err("must start with a subscription");
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// A subscriber that disconnects with a delivery unsettled loses nothing: the event goes to
/// the next member of its group.
#[tokio::test]
async fn a_subscriber_gone_mid_stream_loses_nothing() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    let (tx, mut first) = subscribe(
        &mut c,
        subscription(RouteKind::Event, "orders.placed", "billing"),
    )
    .await
    .expect("subscribes");
    within(
        "emit",
        c.emit(pb::EmitRequest {
            envelope: envelope("orders.placed", "7"),
        }),
    )
    .await
    .expect("accepted");
    let d = next_delivery(&mut first).await;
    assert_eq!(&d.envelope.expect("envelope").payload[..], b"7");
    // Gone without settling.
    drop(tx);
    drop(first);
    let mut c2 = client(&g).await;
    let (tx2, mut second) = subscribe(
        &mut c2,
        subscription(RouteKind::Event, "orders.placed", "billing"),
    )
    .await
    .expect("subscribes");
    let d = next_delivery(&mut second).await;
    assert_eq!(&d.envelope.expect("envelope").payload[..], b"7");
    assert_eq!(d.attempt, 2, "the same event, delivered again");
    tx2.send(pb::SubscribeRequest {
        msg: Some(pb::subscribe_request::Msg::Settle(pb::Settle {
            delivery_id: d.delivery_id,
            ack: true,
            ..Default::default()
        })),
    })
    .expect("queued");
}

/// `max_attempts` on a subscription dead-letters an event nacked that many times, with its
/// reason.
#[tokio::test]
async fn a_subscriber_nack_past_max_attempts_dead_letters() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    let mut sub = subscription(RouteKind::Event, "orders.bad", "billing");
    if let Some(pb::subscribe_request::Msg::Subscription(s)) = sub.msg.as_mut() {
        s.max_attempts = 2;
    }
    let (tx, mut stream) = subscribe(&mut c, sub).await.expect("subscribes");
    let (dtx, mut dead) = subscribe(
        &mut c,
        subscription(RouteKind::DeadLetter, "orders.bad", ""),
    )
    .await
    .expect("subscribes to dead letters");
    within(
        "emit",
        c.emit(pb::EmitRequest {
            envelope: envelope("orders.bad", "1"),
        }),
    )
    .await
    .expect("accepted");
    for attempt in 1..=2 {
        let d = next_delivery(&mut stream).await;
        assert_eq!(d.attempt, attempt);
        tx.send(pb::SubscribeRequest {
            msg: Some(pb::subscribe_request::Msg::Settle(pb::Settle {
                delivery_id: d.delivery_id,
                ack: false,
                redeliver_after_ms: 10,
                reason: "cannot bill".into(),
            })),
        })
        .expect("queued");
    }
    let d = next_delivery(&mut dead).await;
    let env = d.envelope.expect("envelope");
    assert_eq!(&env.payload[..], b"1");
    assert_eq!(
        env.headers
            .get(switchboard::header::DEAD_LETTER_REASON)
            .map(String::as_str),
        Some("cannot bill")
    );
    drop(dtx);
}

fn register(patterns: &[&str]) -> pb::ServeRequest {
    pb::ServeRequest {
        msg: Some(pb::serve_request::Msg::Register(pb::ServeRegister {
            request_patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
            ..Default::default()
        })),
    }
}

async fn serve(
    c: &mut SwitchboardClient<Channel>,
    patterns: &[&str],
) -> (
    mpsc::UnboundedSender<pb::ServeRequest>,
    tonic::Streaming<pb::ServeResponse>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(register(patterns)).expect("queued");
    let mut stream = within("serve", c.serve(UnboundedReceiverStream::new(rx)))
        .await
        .expect("serve stream")
        .into_inner();
    let first = within("registered", stream.message()).await.expect("ok");
    assert!(
        matches!(
            first,
            Some(pb::ServeResponse {
                msg: Some(pb::serve_response::Msg::Registered(_))
            })
        ),
        "{first:?}"
    );
    (tx, stream)
}

/// A Serve client answers the requests the gateway pushes to it.
#[tokio::test]
async fn a_serve_client_answers_requests() {
    let g = gateway(|c| c).await;
    let mut handler = client(&g).await;
    let (tx, mut work) = serve(&mut handler, &["math.double"]).await;
    tokio::spawn(async move {
        while let Some(Ok(pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Work(w)),
        })) = work.next().await
        {
            let n: u64 = serde_json::from_slice(&w.envelope.expect("envelope").payload).expect("n");
            let reply = pb::Envelope {
                payload: serde_json::to_vec(&(n * 2)).expect("json").into(),
                content_type: "application/json".into(),
                ..Default::default()
            };
            let _ = tx.send(pb::ServeRequest {
                msg: Some(pb::serve_request::Msg::Result(pb::WorkResult {
                    work_id: w.work_id,
                    outcome: Some(pb::work_result::Outcome::Reply(reply)),
                })),
            });
        }
    });
    let mut c = client(&g).await;
    let reply = within("send", c.send(send("math.double", "21")))
        .await
        .expect("answered")
        .into_inner()
        .reply
        .expect("reply");
    assert_eq!(&reply.payload[..], b"42");
    // A Rust service on the same broker reaches the same handler.
    let n: u64 = within("send", g.backend().send("math.double", &5u64))
        .await
        .expect("answered");
    assert_eq!(n, 10);
}

/// A Serve client that never answers: its requests fail at their deadline, and a second
/// Serve client of the same pattern gets the requests that come after.
#[tokio::test]
async fn a_serve_client_that_never_answers_fails_at_the_deadline() {
    let g = gateway(|c| c).await;
    let mut silent = client(&g).await;
    let (_keep, _work) = serve(&mut silent, &["math.slow"]).await;
    let mut c = client(&g).await;
    let req = with_deadline(send("math.slow", "1"), 400);
    let started = std::time::Instant::now();
    let err = within("send", c.send(req)).await.expect_err("no answer");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The silent client goes away: its pending work fails at once, nothing hangs, and the
    // gateway keeps serving others.
    drop(_keep);
    drop(_work);
    echo(&g, "math.other").await;
    within("send", c.send(send("math.other", "1")))
        .await
        .expect("still serving");
}

/// Streams opened and dropped leave nothing behind: the backend forgets their handlers.
#[tokio::test]
async fn streams_that_come_and_go_leave_nothing_behind() {
    let g = gateway(|c| c).await;
    for _ in 0..20 {
        let mut c = client(&g).await;
        let (tx, stream) = serve(&mut c, &["churn.work"]).await;
        drop(tx);
        drop(stream);
        let (tx, stream) = subscribe(&mut c, subscription(RouteKind::Event, "churn.events", "g"))
            .await
            .expect("subscribes");
        drop(tx);
        drop(stream);
    }
    // With every Serve stream gone, nobody serves the pattern any more.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        match g.backend().send::<_, u64>("churn.work", &1u64).await {
            Err(e) if e.kind() == switchboard::ErrorKind::NoResponder => break,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "handlers of closed Serve streams still registered: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let g = gateway(|c| c.token(Secret::new("t"))).await;
    let channel = Channel::from_shared(format!("http://{}", g.local_addr()))
        .expect("uri")
        .connect()
        .await
        .expect("connects");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = within(
        "health",
        health.check(tonic_health::pb::HealthCheckRequest {
            service: "switchboard.v1.Switchboard".into(),
        }),
    )
    .await
    .expect("health answers without a token")
    .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    within("shutdown", g.shutdown(STEP)).await.expect("stops");
}

#[tokio::test]
async fn handler_concurrency_of_a_serve_client_is_respected() {
    // Registered with concurrency 1, the backend hands one request at a time.
    let g = gateway(|c| c).await;
    let mut handler = client(&g).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(pb::ServeRequest {
        msg: Some(pb::serve_request::Msg::Register(pb::ServeRegister {
            request_patterns: vec!["one.at.a.time".into()],
            concurrency: 1,
            ..Default::default()
        })),
    })
    .expect("queued");
    let mut work = handler
        .serve(UnboundedReceiverStream::new(rx))
        .await
        .expect("serve")
        .into_inner();
    within("registered", work.message()).await.expect("ok");
    let sender = g.backend().clone();
    let a = tokio::spawn(async move { sender.send::<_, u64>("one.at.a.time", &1u64).await });
    let sender = g.backend().clone();
    let b = tokio::spawn(async move { sender.send::<_, u64>("one.at.a.time", &2u64).await });
    let first = match within("work", work.message()).await {
        Ok(Some(pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Work(w)),
        })) => w,
        other => panic!("{other:?}"),
    };
    // The second is not pushed while the first is unanswered.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), work.message())
            .await
            .is_err(),
        "a second item was pushed beyond the concurrency"
    );
    let ok = |id| pb::ServeRequest {
        msg: Some(pb::serve_request::Msg::Result(pb::WorkResult {
            work_id: id,
            outcome: Some(pb::work_result::Outcome::Reply(pb::Envelope {
                payload: bytes::Bytes::from_static(b"0"),
                ..Default::default()
            })),
        })),
    };
    tx.send(ok(first.work_id)).expect("queued");
    let second = match within("work", work.message()).await {
        Ok(Some(pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Work(w)),
        })) => w,
        other => panic!("{other:?}"),
    };
    tx.send(ok(second.work_id)).expect("queued");
    within("a", a).await.expect("join").expect("answered");
    within("b", b).await.expect("join").expect("answered");
    let _ = HandlerOptions::new();
}

/// Shutdown does not wait for clients to close their streams: it ends them (the clients see
/// the end), and returns well within the drain time.
#[tokio::test]
async fn shutdown_ends_open_streams() {
    let g = gateway(|c| c).await;
    let mut c = client(&g).await;
    let (_serve_tx, mut work) = serve(&mut c, &["closing.work"]).await;
    let (_sub_tx, mut events) = subscribe(
        &mut c,
        subscription(RouteKind::Event, "closing.events", "g"),
    )
    .await
    .expect("subscribes");
    let started = std::time::Instant::now();
    within("shutdown", g.shutdown(Duration::from_secs(30)))
        .await
        .expect("stops");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waited for the streams: {:?}",
        started.elapsed()
    );
    // Both streams have ended (cleanly or with a status), none hangs.
    assert!(!matches!(
        within("serve end", work.message()).await,
        Ok(Some(_))
    ));
    assert!(!matches!(
        within("subscribe end", events.message()).await,
        Ok(Some(_))
    ));
}
