//! The `grpc://` transport: the SDK's primitives as calls of `switchboard.v1.Switchboard` on
//! a switchboard server (one HTTP/2 connection, multiplexed).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use switchboard_core::transport::{
    Acker, CloseSignal, Inbox, NoAck, Publisher, Requester, Subscriber, Transport,
};
use switchboard_core::{
    Capabilities, Delivery, Envelope, Error, ErrorKind, ReplyError, Result, Route,
    SubscribeOptions, Subscription,
};
use switchboard_proto::pb::switchboard_client::SwitchboardClient;
use switchboard_proto::pb::{self, RouteKind};
use switchboard_proto::{from_proto, into_proto, send_call_envelope, to_proto};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::NAME;
use crate::config::GrpcConfig;
use crate::lane::{Lanes, Outcome};
use crate::status::{ERROR_KIND, to_error};

pub(crate) type Rpc = SwitchboardClient<Channel>;

/// How many `request`s may wait for the server to accept them at once.
const REQUESTS_IN_FLIGHT: usize = 256;

/// The gRPC transport. Cheap to share: calls are multiplexed on one HTTP/2 connection, which
/// tonic re-establishes when it drops.
#[derive(Clone)]
pub struct GrpcTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: GrpcConfig,
    rpc: Rpc,
    /// `Bearer <token>`, added to every call.
    token: Option<MetadataValue<Ascii>>,
    caps: Capabilities,
    backend: String,
    closed: CloseSignal,
    /// This transport's reply channels, by address: where a request that the server refused
    /// after `publish` returned is answered with an error reply.
    /// Sharded, as the correlator's waiters: read by every `request`, never locked whole.
    inboxes: dashmap::DashMap<String, mpsc::UnboundedSender<Delivery>>,
    /// Bounds the requests still waiting for the server's answer (see `publish`).
    requesting: Arc<tokio::sync::Semaphore>,
    /// The stream `send`s travel on.
    lanes: Lanes,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("config", &self.inner.cfg)
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

fn conn_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Connection, NAME, format!("{what}: {e}"))
}

impl GrpcTransport {
    /// Connects to the switchboard server `cfg` names and asks what its backend can do.
    ///
    /// # Errors
    /// `InvalidConfig` for unreadable TLS files or a bad token; `Connection` if the server
    /// does not answer within the connect timeout; `Unauthenticated` for a refused token.
    pub async fn connect(cfg: GrpcConfig) -> Result<Self> {
        let mut endpoint = Endpoint::from_shared(cfg.endpoint.clone())
            .map_err(|e| {
                Error::invalid_config(NAME, format!("bad endpoint `{}`: {e}", cfg.endpoint))
            })?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if cfg.tls {
            let mut tls = ClientTlsConfig::new()
                .domain_name(cfg.tls_domain.clone().unwrap_or_else(|| cfg.host.clone()))
                .with_enabled_roots();
            if let Some(ca) = &cfg.tls_ca {
                let pem = std::fs::read(ca).map_err(|e| {
                    Error::invalid_config(
                        NAME,
                        format!("cannot read `tls_ca` {}: {e}", ca.display()),
                    )
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &cfg.tls_client {
                let read = |p: &std::path::PathBuf, what: &str| {
                    std::fs::read(p).map_err(|e| {
                        Error::invalid_config(
                            NAME,
                            format!("cannot read `{what}` {}: {e}", p.display()),
                        )
                    })
                };
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read(cert, "tls_cert")?,
                    read(key, "tls_key")?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::invalid_config(NAME, format!("TLS settings: {e}")))?;
        }
        let channel = tokio::time::timeout(cfg.connect_timeout, endpoint.connect())
            .await
            .map_err(|_| {
                conn_error(
                    &format!("connect to {}", cfg.endpoint),
                    format!("no answer within {:?}", cfg.connect_timeout),
                )
            })?
            .map_err(|e| conn_error(&format!("connect to {}", cfg.endpoint), source_chain(&e)))?;
        let token = match &cfg.token {
            Some(t) => Some(
                format!("Bearer {}", t.expose())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        Error::invalid_config(NAME, "the token must be printable ASCII")
                    })?,
            ),
            None => None,
        };
        let mut rpc = SwitchboardClient::new(channel)
            .max_decoding_message_size(cfg.max_message_bytes)
            .max_encoding_message_size(cfg.max_message_bytes);
        let mut info = tonic::Request::new(pb::InfoRequest {});
        if let Some(t) = &token {
            info.metadata_mut().insert("authorization", t.clone());
        }
        let info = tokio::time::timeout(cfg.connect_timeout, rpc.info(info))
            .await
            .map_err(|_| conn_error("ask the server what it serves", "no answer"))?
            .map_err(|s| to_error(&s))?
            .into_inner();
        let max_payload = usize::try_from(info.max_payload).unwrap_or(usize::MAX);
        let caps =
            Capabilities::new(max_payload.min(cfg.max_message_bytes.saturating_sub(64 * 1024)))
                .native_request(true)
                .detects_no_responder(info.detects_no_responder)
                .redelivery_on_nack(info.redelivery_on_nack)
                .ordered(info.ordered)
                .durable(info.durable);
        tracing::debug!(endpoint = %cfg.endpoint, backend = %info.backend, "connected to a switchboard server");
        Ok(GrpcTransport {
            inner: Arc::new(Inner {
                cfg,
                rpc,
                token,
                caps,
                backend: info.backend,
                closed: CloseSignal::new(),
                inboxes: dashmap::DashMap::new(),
                requesting: Arc::new(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT)),
                lanes: Lanes::default(),
            }),
        })
    }

    /// A call's request, with the token.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.inner.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }

    /// The local side of inbox `address`, if it is one of this transport's and still read.
    fn inbox(&self, address: &str) -> Option<mpsc::UnboundedSender<Delivery>> {
        let tx = self.inner.inboxes.get(address)?.clone();
        if tx.is_closed() {
            self.inner.inboxes.remove(address);
            return None;
        }
        Some(tx)
    }

    /// The transport the server bridges onto (`memory`, `nats`, ...).
    pub fn backend(&self) -> &str {
        &self.inner.backend
    }

    fn check(&self, msg: &Envelope) -> Result<()> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        if msg.payload.len() > self.inner.caps.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    msg.payload.len(),
                    self.inner.caps.max_payload
                ),
            ));
        }
        Ok(())
    }

    /// Opens a bidirectional stream: sends `first`, then whatever goes into the returned
    /// sender; waits for the server's first answer (bounded by the connect timeout).
    async fn open<Req, Resp, F, Fut>(
        &self,
        first: Req,
        call: F,
    ) -> Result<(mpsc::UnboundedSender<Req>, tonic::Streaming<Resp>, Resp)>
    where
        Req: Send + 'static,
        F: FnOnce(Rpc, tonic::Request<UnboundedReceiverStream<Req>>) -> Fut,
        Fut: std::future::Future<
                Output = std::result::Result<
                    tonic::Response<tonic::Streaming<Resp>>,
                    tonic::Status,
                >,
            >,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(first);
        let bound = self.inner.cfg.connect_timeout;
        let opened = tokio::time::timeout(bound, async {
            let mut stream = call(
                self.inner.rpc.clone(),
                self.req(UnboundedReceiverStream::new(rx)),
            )
            .await
            .map_err(|s| to_error(&s))?
            .into_inner();
            match stream.message().await {
                Ok(Some(m)) => Ok((stream, m)),
                Ok(None) => Err(conn_error("open a stream", "the server ended it at once")),
                Err(s) => Err(to_error(&s)),
            }
        })
        .await
        .map_err(|_| conn_error("open a stream", format!("no answer within {bound:?}")))??;
        Ok((tx, opened.0, opened.1))
    }
}

/// The error and its sources in one line (tonic's transport errors hide the cause).
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn route_kind(route: &Route<'_>) -> RouteKind {
    match route {
        Route::Event(_) => RouteKind::Event,
        Route::Request(_) => RouteKind::Request,
        Route::Reply(_) => RouteKind::Reply,
        Route::DeadLetter(_) => RouteKind::DeadLetter,
    }
}

#[async_trait]
impl Publisher for GrpcTransport {
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()> {
        self.check(&msg)?;
        let mut rpc = self.inner.rpc.clone();
        // A request whose reply comes to one of this transport's inboxes returns at once: the
        // server's answer is awaited in a task, and a refusal reaches the caller as an error
        // reply on that inbox (matched by correlation id, like any reply).
        if let Route::Request(_) = route
            && let Some(inbox) = msg.reply_to.as_deref().and_then(|a| self.inbox(a))
        {
            // At most `REQUESTS_IN_FLIGHT` wait for the server; more wait here.
            let permit = self
                .inner
                .requesting
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Error::closed(NAME))?;
            let correlation = msg.correlation_id;
            let req = self.req(pb::RequestRequest {
                envelope: Some(to_proto(&msg)),
                timeout_ms: 0,
            });
            tokio::spawn(async move {
                let answer = rpc.request(req).await;
                drop(permit);
                if let Err(s) = answer {
                    let e = to_error(&s);
                    let mut reply = Envelope::new(msg.pattern, bytes::Bytes::new());
                    reply.correlation_id = correlation;
                    reply.error = Some(ReplyError {
                        code: e.kind().as_str().to_owned(),
                        message: e.message().to_owned(),
                    });
                    let _ = inbox.send(Delivery::new(reply, 1, Box::new(NoAck)));
                }
            });
            return Ok(());
        }
        let envelope = Some(into_proto(msg));
        let r = match route {
            Route::Event(_) => rpc
                .emit(self.req(pb::EmitRequest { envelope }))
                .await
                .map(|_| ()),
            Route::Request(_) => rpc
                .request(self.req(pb::RequestRequest {
                    envelope,
                    timeout_ms: 0,
                }))
                .await
                .map(|_| ()),
            Route::Reply(_) | Route::DeadLetter(_) => rpc
                .publish(self.req(pb::PublishRequest {
                    kind: route_kind(&route) as i32,
                    name: route.name().to_owned(),
                    envelope,
                }))
                .await
                .map(|_| ()),
        };
        r.map_err(|s| to_error(&s))
    }
}

/// Settles one delivery of a `Subscribe` stream; a delivery dropped unsettled is nacked, so
/// it comes back.
struct StreamAcker {
    id: u64,
    out: Option<mpsc::UnboundedSender<pb::SubscribeRequest>>,
}

impl StreamAcker {
    fn settle(&mut self, ack: bool, delay: Duration) -> Result<()> {
        let Some(out) = self.out.take() else {
            return Ok(());
        };
        let settle = pb::Settle {
            delivery_id: self.id,
            ack,
            redeliver_after_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            reason: String::new(),
        };
        out.send(pb::SubscribeRequest {
            msg: Some(pb::subscribe_request::Msg::Settle(settle)),
        })
        .map_err(|_| {
            conn_error(
                "settle a delivery",
                "the subscription's stream is gone; the server gives the message back",
            )
        })
    }
}

#[async_trait]
impl Acker for StreamAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle(true, Duration::ZERO)
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.settle(false, delay)
    }
}

impl Drop for StreamAcker {
    fn drop(&mut self) {
        let _ = self.settle(false, Duration::ZERO);
    }
}

fn delivery_from(d: pb::Delivery, out: &mpsc::UnboundedSender<pb::SubscribeRequest>) -> Delivery {
    let acker = Box::new(StreamAcker {
        id: d.delivery_id,
        out: Some(out.clone()),
    });
    let malformed = (!d.malformed.is_empty()).then_some(d.malformed);
    match d.envelope.map(from_proto) {
        Some(Ok(env)) => Delivery::from_parts(env, d.attempt.max(1), malformed, acker),
        Some(Err(e)) => Delivery::malformed(
            Envelope::new("", bytes::Bytes::new()),
            d.attempt.max(1),
            format!("the server sent an unreadable envelope: {e}"),
            acker,
        ),
        None => Delivery::malformed(
            Envelope::new("", bytes::Bytes::new()),
            d.attempt.max(1),
            "the server sent a delivery without an envelope",
            acker,
        ),
    }
}

/// How long a dropped subscription waits for the server to take its last settlements.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// The server's side of a `Subscribe` stream, closed gracefully when dropped: the client's
/// side ends once every delivery still held is settled (their ackers hold it open), and the
/// server's side is read until the server ends it, so no settlement is cut off by a reset
/// (an ack lost that way would be a duplicate delivery; deliveries that arrive meanwhile are
/// left unsettled and go back to the backend).
struct Closing {
    stream: Option<tonic::Streaming<pb::SubscribeResponse>>,
    out: Option<mpsc::UnboundedSender<pb::SubscribeRequest>>,
}

impl futures::Stream for Closing {
    type Item = std::result::Result<pb::SubscribeResponse, tonic::Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.stream.as_mut() {
            Some(s) => s.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        drop(self.out.take());
        let Some(mut stream) = self.stream.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let drained = tokio::time::timeout(CLOSE_WITHIN, async {
                    while let Ok(Some(_)) = stream.message().await {}
                })
                .await;
                if drained.is_err() {
                    tracing::debug!("subscription stream not closed by the server in time; reset");
                }
            });
        }
    }
}

#[async_trait]
impl Subscriber for GrpcTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        if matches!(route, Route::Reply(_)) {
            return Err(Error::invalid_config(
                NAME,
                "replies are read through an inbox",
            ));
        }
        if matches!(route, Route::Event(_)) && opts.group.is_none() {
            return Err(Error::invalid_config(
                NAME,
                "an event subscription needs a group",
            ));
        }
        let first = pb::SubscribeRequest {
            msg: Some(pb::subscribe_request::Msg::Subscription(pb::Subscription {
                kind: route_kind(&route) as i32,
                pattern: route.name().to_owned(),
                group: opts.group.unwrap_or_default(),
                prefetch: u32::try_from(opts.prefetch).unwrap_or(u32::MAX),
                max_attempts: 0,
            })),
        };
        let (out, stream, answer) = self
            .open(first, |mut rpc, rx| async move { rpc.subscribe(rx).await })
            .await?;
        if !matches!(answer.msg, Some(pb::subscribe_response::Msg::Subscribed(_))) {
            return Err(conn_error(
                "subscribe",
                "the server did not confirm the subscription",
            ));
        }
        let pattern = route.name().to_owned();
        let stream = Closing {
            stream: Some(stream),
            out: Some(out.clone()),
        };
        let deliveries = stream.filter_map(move |m| {
            let d = match m {
                Ok(pb::SubscribeResponse {
                    msg: Some(pb::subscribe_response::Msg::Delivery(d)),
                }) => Some(delivery_from(d, &out)),
                Ok(_) => None,
                Err(s) => {
                    tracing::warn!(pattern = %pattern, error = %to_error(&s), "subscription stream ended by the server");
                    None
                }
            };
            std::future::ready(d)
        });
        Ok(Subscription::new(self.inner.closed.guard(deliveries)))
    }

    async fn open_inbox(&self, _name: &str) -> Result<Inbox> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        let mut rpc = self.inner.rpc.clone();
        let bound = self.inner.cfg.connect_timeout;
        let (address, stream) = tokio::time::timeout(bound, async {
            let mut stream = rpc
                .replies(self.req(pb::RepliesRequest {}))
                .await
                .map_err(|s| to_error(&s))?
                .into_inner();
            match stream.message().await {
                Ok(Some(pb::RepliesResponse {
                    msg: Some(pb::replies_response::Msg::Address(a)),
                })) => Ok((a, stream)),
                Ok(_) => Err(conn_error(
                    "open a reply channel",
                    "the server sent no address",
                )),
                Err(s) => Err(to_error(&s)),
            }
        })
        .await
        .map_err(|_| {
            conn_error(
                "open a reply channel",
                format!("no answer within {bound:?}"),
            )
        })??;
        let replies = stream.filter_map(|m| {
            std::future::ready(match m {
                Ok(pb::RepliesResponse {
                    msg: Some(pb::replies_response::Msg::Reply(r)),
                }) => match from_proto(r) {
                    Ok(env) => Some(Delivery::new(env, 1, Box::new(NoAck))),
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable reply dropped");
                        None
                    }
                },
                Ok(_) => None,
                Err(s) => {
                    tracing::warn!(error = %to_error(&s), "reply stream ended by the server");
                    None
                }
            })
        });
        let (local, refused) = mpsc::unbounded_channel();
        self.inner.inboxes.insert(address.clone(), local);
        // The inbox ends when the server's stream ends (the marker `None`), though the local
        // side stays open.
        let replies = futures::stream::select(
            replies
                .map(Some)
                .chain(futures::stream::once(std::future::ready(None))),
            tokio_stream::wrappers::UnboundedReceiverStream::new(refused).map(Some),
        )
        .take_while(|d| std::future::ready(d.is_some()))
        .filter_map(std::future::ready);
        Ok(Inbox::new(
            address,
            Subscription::new(self.inner.closed.guard(replies)),
        ))
    }
}

#[async_trait]
impl Requester for GrpcTransport {
    async fn call(&self, pattern: &str, msg: Envelope, deadline: Instant) -> Result<Envelope> {
        self.check(&msg)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::timeout(NAME, left));
        }
        let correlation = msg.correlation_id;
        let inner = &self.inner;
        let lane = inner
            .lanes
            .lane(&inner.rpc, |calls| self.req(calls), &inner.closed)
            .await;
        let outcome = match lane {
            Ok(Some(lane)) => {
                lane.call(send_call_envelope(msg), correlation, deadline, left)
                    .await
            }
            // Boxed: a rare path, whose (large) future would otherwise make every call's so.
            Ok(None) => Box::pin(self.unary_call(msg, deadline, left)).await,
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Err(_) if inner.closed.is_closed() => return Err(Error::closed(NAME)),
            other => other?,
        };
        match outcome {
            Ok(reply) => Ok(reply),
            Err(s) => {
                // A failed handler's reply is returned as a reply with its error, as every
                // transport returns it: core turns it into the caller's `Handler` error.
                let handler = s
                    .metadata()
                    .get(ERROR_KIND)
                    .is_some_and(|k| k == ErrorKind::Handler.as_str());
                if handler {
                    let e = to_error(&s);
                    let mut env = Envelope::new(pattern, bytes::Bytes::new());
                    env.correlation_id = correlation;
                    env.error = Some(ReplyError {
                        code: e.code().to_owned(),
                        message: s.message().to_owned(),
                    });
                    return Ok(env);
                }
                // No `grpc-timeout` is sent, so no tonic timer ends the call with a bare
                // CANCELLED: the server's own timeout comes with its trailers.
                Err(to_error(&s))
            }
        }
    }
}

impl GrpcTransport {
    /// A `send` as a unary `Send`, for a server without `SendStream`. The deadline travels in
    /// the envelope (`deadline_unix_ms`), which the server honours as it honours a
    /// `grpc-timeout`; that header is not sent as well, since tonic's server would arm a
    /// second timer for it on every call. Here the call ends at the deadline: dropping it
    /// resets its stream, which ends the server's side too.
    async fn unary_call(
        &self,
        msg: Envelope,
        deadline: Instant,
        left: Duration,
    ) -> Result<Outcome> {
        let correlation = msg.correlation_id;
        // What the stream's calls leave out, the server draws for a unary `Send` as well.
        let req = self.req(pb::SendRequest {
            envelope: Some(send_call_envelope(msg)),
        });
        let mut rpc = self.inner.rpc.clone();
        match tokio::time::timeout_at(deadline, rpc.send(req)).await {
            Ok(Ok(r)) => match r.into_inner().reply {
                Some(reply) => {
                    let mut env = from_proto(reply)?;
                    env.complete_reply(correlation);
                    Ok(Ok(env))
                }
                None => Err(Error::codec(NAME, "the server's reply has no envelope")),
            },
            Ok(Err(s)) => Ok(Err(s)),
            Err(_) => Err(Error::timeout(NAME, left)),
        }
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.caps
    }

    fn requester(&self) -> Option<&dyn Requester> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.close();
        self.inner.lanes.close();
        Ok(())
    }
}
