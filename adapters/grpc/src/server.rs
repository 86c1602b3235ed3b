//! The server side of `switchboard.v1.Switchboard`: the service bridged onto a backend
//! [`Client`] (an in-memory bus for the direct `grpc://` transport, any broker for the
//! gateway). Stateless beyond its open streams: every call maps onto the backend's own
//! send, emit, request, subscribe and handlers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::{FutureExt, Stream, StreamExt};
use switchboard_core::config::Secret;
use switchboard_core::envelope::system_time_to_millis;
use switchboard_core::transport::CloseSignal;
use switchboard_core::{
    Client, CorrelationId, Delivery, Envelope, ErrorKind, HandlerError, HandlerOptions, Payload,
    Route, SubscribeOptions, validate_pattern,
};
use switchboard_proto::pb::switchboard_server::{Switchboard, SwitchboardServer};
use switchboard_proto::pb::{self, RouteKind};
use switchboard_proto::{from_proto, into_proto, stream_reply, to_proto};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::status::{self, grpc_timeout};

/// The HTTP/2 connection window of the servers here (16 MiB). It also sets h2's budget of
/// small DATA frames a connection may have buffered (half the window): with the default
/// window, thousands of small calls in flight on one connection (10,000 `request`s) exhaust
/// it, and the server ends the connection with `ENHANCE_YOUR_CALM`.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// How long a stream's first message (its subscription or registration) may take.
const FIRST_MESSAGE_WITHIN: Duration = Duration::from_secs(10);

/// Settings of the service.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// Require `authorization: Bearer <token>` on every call.
    pub token: Option<Secret>,
    /// Largest payload accepted in a message, in bytes (larger: `RESOURCE_EXHAUSTED`).
    pub max_payload: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            token: None,
            max_payload: crate::config::DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024,
        }
    }
}

impl ServiceOptions {
    /// Requires the bearer token `token` on every call.
    pub fn token(mut self, token: Secret) -> Self {
        self.token = Some(token);
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

/// The `Switchboard` service over a backend client.
#[derive(Debug, Clone)]
pub struct SwitchboardService {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    backend: Client,
    options: ServiceOptions,
    streams: AtomicU64,
    /// Closed by [`SwitchboardService::close_streams`]: every open stream ends.
    closing: CloseSignal,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl SwitchboardService {
    /// The service over `backend`: its calls become the backend's.
    pub fn new(backend: Client, options: ServiceOptions) -> Self {
        SwitchboardService {
            shared: Arc::new(Shared {
                backend,
                options,
                streams: AtomicU64::new(0),
                closing: CloseSignal::new(),
            }),
        }
    }

    /// Ends every open stream (`Replies`, `Subscribe`, `Serve`) as a server that stops must:
    /// their clients see the stream end, unsettled deliveries go back to the backend, and the
    /// streams' handlers stop. A `SendStream` takes no more calls and ends once the calls in
    /// hand are answered; unary calls in progress are not affected.
    pub fn close_streams(&self) {
        self.shared.closing.close();
    }

    /// The backend client.
    pub fn backend(&self) -> &Client {
        &self.shared.backend
    }

    /// The tonic server of this service, with message limits a little above the payload
    /// limit (the envelope's metadata travels beside the payload): a payload over the limit
    /// is refused by the service with `RESOURCE_EXHAUSTED` and a message naming the limit.
    pub fn into_server(self) -> SwitchboardServer<Self> {
        let limit = self.shared.options.max_payload.saturating_add(64 * 1024);
        SwitchboardServer::new(self)
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.shared.options.token else {
            return Ok(());
        };
        let Some(given) = req.metadata().get("authorization") else {
            return Err(status::status(
                ErrorKind::Unauthenticated,
                "unauthenticated",
                "missing bearer token: send `authorization: Bearer <token>`",
            ));
        };
        let expected = format!("Bearer {}", token.expose());
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(status::status(
                ErrorKind::Unauthenticated,
                "unauthenticated",
                "invalid bearer token",
            ))
        }
    }

    /// A message from a client as an SDK envelope: present, well-formed, within the size
    /// limit; an empty content type is JSON.
    fn envelope_in(&self, env: Option<pb::Envelope>) -> Result<Envelope, Status> {
        let env = env.ok_or_else(|| invalid("the request has no `envelope`"))?;
        let size = env.payload.len();
        if size > self.shared.options.max_payload {
            return Err(status::status(
                ErrorKind::PayloadTooLarge,
                "payload_too_large",
                format!(
                    "payload of {size} bytes exceeds the limit of {} bytes",
                    self.shared.options.max_payload
                ),
            ));
        }
        let empty_ct = env.content_type.is_empty();
        // The pattern is checked by the backend client's call it goes to (`send_envelope`,
        // `publish_envelope`), whose `InvalidConfig` is `INVALID_ARGUMENT` here too.
        let mut env = from_proto(env).map_err(|e| invalid(e.message()))?;
        if empty_ct {
            env.content_type = Some(switchboard_core::content_type::JSON.into());
        }
        Ok(env)
    }

    /// One `Send`: the request handed to the backend, the reply (or the failure) as the
    /// client gets it.
    ///
    /// The request is read before the future is made, and goes straight into the backend's
    /// call: the future holds no copy of it, and stays small as a stream's calls are moved
    /// into the set that runs them.
    fn send_one(
        &self,
        env: Option<pb::Envelope>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Envelope, Status>> + Send + '_ {
        let mut env = match self.envelope_in(env) {
            Ok(env) => env,
            Err(s) => return futures::future::Either::Left(std::future::ready(Err(s))),
        };
        env.reply_to = None;
        let call = self.shared.backend.send_envelope(env, timeout);
        futures::future::Either::Right(async move {
            let reply = call.await.map_err(|e| status::from_error(&e))?;
            if let Some(e) = &reply.error {
                return Err(status::from_reply_error(e));
            }
            Ok(reply)
        })
    }

    /// Serves one `SendStream`: its calls run concurrently in this one task (at most
    /// [`SEND_STREAM_IN_FLIGHT`]; while that many are in hand, the next is not read, and
    /// HTTP/2 flow control holds the client back), each outcome sent as it comes. Ends when
    /// the client has closed its side (or the server stops) and the calls in hand are
    /// answered, or at once when the client is gone.
    async fn run_send_stream(
        self,
        mut inbound: Streaming<pb::SendCall>,
        out: mpsc::Sender<Result<pb::SendOutcome, Status>>,
    ) {
        let mut running = futures::stream::FuturesUnordered::new();
        let mut taking = true;
        let closing = self.shared.closing.clone();
        loop {
            tokio::select! {
                biased;
                Some(outcome) = running.next(), if !running.is_empty() => {
                    if out.send(Ok(outcome)).await.is_err() {
                        break;
                    }
                }
                m = inbound.message(), if taking && running.len() < SEND_STREAM_IN_FLIGHT => match m {
                    Ok(Some(pb::SendCall { call, envelope })) => {
                        running.push(self.send_one(envelope, None).map(move |r| outcome(call, r)));
                    }
                    Ok(None) => taking = false,
                    Err(s) => {
                        tracing::debug!(status = %s, "send stream broken by the client");
                        taking = false;
                    }
                },
                () = closing.closed(), if taking => taking = false,
                () = out.closed() => break,
            }
            if !taking && running.is_empty() {
                break;
            }
        }
    }

    fn next_stream(&self) -> u64 {
        self.shared.streams.fetch_add(1, Ordering::Relaxed)
    }
}

/// How many calls of one `SendStream` the server handles at once.
const SEND_STREAM_IN_FLIGHT: usize = 1024;

/// A `SendStream` call's outcome: its reply, without what the caller knows
/// ([`stream_reply`]), or the status a unary `Send` would have ended with.
fn outcome(call: u64, result: Result<Envelope, Status>) -> pb::SendOutcome {
    match result {
        Ok(reply) => pb::SendOutcome {
            call,
            reply: Some(stream_reply(reply)),
            error: None,
        },
        Err(s) => pb::SendOutcome {
            call,
            reply: None,
            error: Some(status::to_call_status(&s)),
        },
    }
}

fn invalid(message: impl Into<String>) -> Status {
    status::status(ErrorKind::InvalidConfig, "invalid_argument", message)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn route_of<'a>(kind: i32, name: &'a str) -> Result<Route<'a>, Status> {
    match RouteKind::try_from(kind) {
        Ok(RouteKind::Event) => Ok(Route::Event(name)),
        Ok(RouteKind::Request) => Ok(Route::Request(name)),
        Ok(RouteKind::Reply) => Ok(Route::Reply(name)),
        Ok(RouteKind::DeadLetter) => Ok(Route::DeadLetter(name)),
        _ => Err(invalid(format!(
            "route kind {kind} is not one of EVENT, REQUEST, REPLY, DEAD_LETTER"
        ))),
    }
}

/// Reads a stream's first message within [`FIRST_MESSAGE_WITHIN`].
async fn first_message<T>(inbound: &mut Streaming<T>, what: &str) -> Result<T, Status> {
    match tokio::time::timeout(FIRST_MESSAGE_WITHIN, inbound.message()).await {
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(invalid(format!("the stream ended before its {what}"))),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(status::status(
            ErrorKind::Timeout,
            "timeout",
            format!("no {what} within {FIRST_MESSAGE_WITHIN:?} of opening the stream"),
        )),
    }
}

fn ms(d: Option<SystemTime>) -> u64 {
    d.map(system_time_to_millis).unwrap_or(0)
}

#[tonic::async_trait]
impl Switchboard for SwitchboardService {
    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        self.authorize(&req)?;
        let timeout = grpc_timeout(req.metadata());
        let reply = self.send_one(req.into_inner().envelope, timeout).await?;
        Ok(Response::new(pb::SendResponse {
            reply: Some(into_proto(reply)),
        }))
    }

    type SendStreamStream = BoxStream<pb::SendOutcome>;

    async fn send_stream(
        &self,
        req: Request<Streaming<pb::SendCall>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        self.authorize(&req)?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(SEND_STREAM_IN_FLIGHT);
        tokio::spawn(self.clone().run_send_stream(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn emit(
        &self,
        req: Request<pb::EmitRequest>,
    ) -> Result<Response<pb::EmitResponse>, Status> {
        self.authorize(&req)?;
        let env = self.envelope_in(req.into_inner().envelope)?;
        let id = env.id.to_string();
        let pattern = env.pattern.clone();
        self.shared
            .backend
            .publish_envelope(Route::Event(&pattern), env)
            .await
            .map_err(|e| status::from_error(&e))?;
        Ok(Response::new(pb::EmitResponse { id }))
    }

    async fn request(
        &self,
        req: Request<pb::RequestRequest>,
    ) -> Result<Response<pb::RequestResponse>, Status> {
        self.authorize(&req)?;
        let pb::RequestRequest {
            envelope,
            timeout_ms,
        } = req.into_inner();
        let mut env = self.envelope_in(envelope)?;
        if env.reply_to.is_none() {
            return Err(invalid(
                "a request needs `reply_to`: open a `Replies` stream and use its address",
            ));
        }
        let correlation = *env
            .correlation_id
            .get_or_insert(CorrelationId::from(env.id));
        let timeout = if timeout_ms > 0 {
            Duration::from_millis(timeout_ms)
        } else {
            self.shared.backend.config().timeout
        };
        let by_timeout = SystemTime::now() + timeout;
        let deadline = match env.deadline {
            Some(own) if timeout_ms == 0 || own < by_timeout => own,
            _ => by_timeout,
        };
        env.deadline = Some(deadline);
        let id = env.id.to_string();
        let pattern = env.pattern.clone();
        self.shared
            .backend
            .publish_envelope(Route::Request(&pattern), env)
            .await
            .map_err(|e| status::from_error(&e))?;
        Ok(Response::new(pb::RequestResponse {
            correlation_id: correlation.to_string(),
            id,
            deadline_unix_ms: ms(Some(deadline)),
        }))
    }

    type RepliesStream = BoxStream<pb::RepliesResponse>;

    async fn replies(
        &self,
        req: Request<pb::RepliesRequest>,
    ) -> Result<Response<Self::RepliesStream>, Status> {
        self.authorize(&req)?;
        let name = format!("grpc-{}", uuid::Uuid::new_v4().simple());
        let inbox = self
            .shared
            .backend
            .transport()
            .open_inbox(&name)
            .await
            .map_err(|e| status::from_error(&e))?;
        let (tx, rx) = mpsc::channel(256);
        let first = pb::RepliesResponse {
            msg: Some(pb::replies_response::Msg::Address(inbox.address.clone())),
        };
        let _ = tx.send(Ok(first)).await;
        let mut replies = inbox.subscription;
        let closing = self.shared.closing.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = closing.closed() => break,
                    d = replies.next() => {
                        let Some(d) = d else { break };
                        let reply = pb::RepliesResponse {
                            msg: Some(pb::replies_response::Msg::Reply(to_proto(d.envelope()))),
                        };
                        let sent = tx.send(Ok(reply)).await;
                        if let Err(e) = d.ack().await {
                            tracing::debug!(error = %e, "could not acknowledge a reply");
                        }
                        if sent.is_err() {
                            break;
                        }
                    }
                    () = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        self.authorize(&req)?;
        let mut inbound = req.into_inner();
        let sub = match first_message(&mut inbound, "subscription").await?.msg {
            Some(pb::subscribe_request::Msg::Subscription(s)) => s,
            _ => return Err(invalid("a Subscribe stream starts with a `subscription`")),
        };
        let route = route_of(sub.kind, &sub.pattern)?;
        validate_pattern(&sub.pattern).map_err(|e| invalid(e.message()))?;
        let prefetch = if sub.prefetch == 0 {
            64
        } else {
            sub.prefetch as usize
        };
        let mut opts = SubscribeOptions::default().prefetch(prefetch);
        match route {
            Route::Event(_) => {
                validate_pattern(&sub.group).map_err(|_| {
                    invalid(format!(
                        "an event subscription needs a `group` of letters, digits, `-`, `_` and `.`, got `{}`",
                        sub.group
                    ))
                })?;
                opts.group = Some(sub.group.clone());
            }
            Route::Request(_) | Route::DeadLetter(_) => {}
            Route::Reply(_) => {
                return Err(invalid(
                    "replies are read with a `Replies` stream, not `Subscribe`",
                ));
            }
        }
        let deliveries = self
            .shared
            .backend
            .transport()
            .subscribe(route, opts)
            .await
            .map_err(|e| status::from_error(&e))?;
        let (tx, rx) = mpsc::channel(prefetch + 2);
        let subscribed = pb::SubscribeResponse {
            msg: Some(pb::subscribe_response::Msg::Subscribed(pb::Subscribed {})),
        };
        let _ = tx.send(Ok(subscribed)).await;
        let pump = SubscribePump {
            backend: self.shared.backend.clone(),
            pattern: sub.pattern,
            group: (!sub.group.is_empty()).then_some(sub.group),
            max_attempts: sub.max_attempts,
            prefetch,
            closing: self.shared.closing.clone(),
        };
        tokio::spawn(pump.run(deliveries, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ServeStream = BoxStream<pb::ServeResponse>;

    async fn serve(
        &self,
        req: Request<Streaming<pb::ServeRequest>>,
    ) -> Result<Response<Self::ServeStream>, Status> {
        self.authorize(&req)?;
        let mut inbound = req.into_inner();
        let reg = match first_message(&mut inbound, "registration").await?.msg {
            Some(pb::serve_request::Msg::Register(r)) => r,
            _ => return Err(invalid("a Serve stream starts with a `register`")),
        };
        if reg.request_patterns.is_empty() && reg.events.is_empty() {
            return Err(invalid(
                "a registration needs at least one request pattern or event subscription",
            ));
        }
        let stream_no = self.next_stream();
        let concurrency = if reg.concurrency == 0 {
            64
        } else {
            reg.concurrency as usize
        };
        let (tx, rx) = mpsc::channel(concurrency.saturating_mul(2).max(16));
        let serving = Arc::new(Serving {
            out: tx.clone(),
            waiting: dashmap::DashMap::new(),
            next: AtomicU64::new(1),
            ack_timeout: Duration::from_millis(if reg.ack_timeout_ms == 0 {
                30_000
            } else {
                reg.ack_timeout_ms
            }),
        });
        let mut opts = HandlerOptions::new().concurrency(concurrency);
        if reg.max_attempts > 0 {
            opts = opts.max_attempts(reg.max_attempts);
        }
        let mut services = Vec::new();
        let backend = &self.shared.backend;
        let registered = async {
            for pattern in &reg.request_patterns {
                let s = serving.clone();
                services.push(
                    backend
                        .handle_with(pattern, opts.clone(), move |p: Payload, ctx| {
                            let s = s.clone();
                            async move { s.request(p, ctx).await }
                        })
                        .await?,
                );
            }
            for ev in &reg.events {
                let s = serving.clone();
                services.push(
                    backend
                        .on_event_with(
                            &ev.pattern,
                            &ev.group,
                            opts.clone(),
                            move |p: Payload, ctx| {
                                let s = s.clone();
                                async move { s.event(p, ctx).await }
                            },
                        )
                        .await?,
                );
            }
            Ok::<_, switchboard_core::Error>(())
        }
        .await;
        if let Err(e) = registered {
            for s in services {
                s.shutdown().await;
            }
            return Err(status::from_error(&e));
        }
        let _ = tx
            .send(Ok(pb::ServeResponse {
                msg: Some(pb::serve_response::Msg::Registered(pb::Registered {})),
            }))
            .await;
        tracing::debug!(stream = stream_no, patterns = ?reg.request_patterns, events = reg.events.len(), "serve stream registered");
        let closing = self.shared.closing.clone();
        tokio::spawn(async move {
            // Answers come in until the client closes its side or goes away (or the server
            // stops); then the handlers stop and every item still waiting fails at once.
            loop {
                tokio::select! {
                    () = closing.closed() => break,
                    m = inbound.message() => match m {
                        Ok(Some(pb::ServeRequest { msg: Some(pb::serve_request::Msg::Result(r)) })) => {
                            serving.answer(r);
                        }
                        Ok(Some(_)) => {
                            let _ = tx.send(Err(invalid("after `register`, a Serve stream takes only `result` messages"))).await;
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    () = tx.closed() => break,
                }
            }
            for s in services {
                s.shutdown().await;
            }
            serving.fail_all();
            tracing::debug!(stream = stream_no, "serve stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn publish(
        &self,
        req: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        self.authorize(&req)?;
        let pb::PublishRequest {
            kind,
            name,
            envelope,
        } = req.into_inner();
        let route = route_of(kind, &name)?;
        let env = self.envelope_in(envelope)?;
        self.shared
            .backend
            .publish_envelope(route, env)
            .await
            .map_err(|e| status::from_error(&e))?;
        Ok(Response::new(pb::PublishResponse {}))
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.authorize(&req)?;
        let transport = self.shared.backend.transport();
        let caps = transport.capabilities();
        let timeout = self.shared.backend.config().timeout;
        Ok(Response::new(pb::InfoResponse {
            backend: transport.name().to_owned(),
            native_request: caps.native_request,
            detects_no_responder: caps.detects_no_responder,
            redelivery_on_nack: caps.redelivery_on_nack,
            ordered: caps.ordered,
            durable: caps.durable,
            max_payload: caps.max_payload.min(self.shared.options.max_payload) as u64,
            default_timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

/// Streams one backend subscription to a `Subscribe` client and settles each delivery as the
/// client says. At most `prefetch` deliveries are unsettled at once; those still unsettled
/// when the stream ends are dropped, which gives them back to the backend.
struct SubscribePump {
    backend: Client,
    pattern: String,
    group: Option<String>,
    max_attempts: u32,
    prefetch: usize,
    closing: CloseSignal,
}

impl SubscribePump {
    async fn run(
        self,
        mut deliveries: switchboard_core::Subscription,
        mut inbound: Streaming<pb::SubscribeRequest>,
        tx: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    ) {
        let mut pending: HashMap<u64, Delivery> = HashMap::new();
        let mut next_id = 0u64;
        let closing = self.closing.clone();
        loop {
            tokio::select! {
                () = closing.closed() => break,
                d = deliveries.next(), if pending.len() < self.prefetch => {
                    let Some(d) = d else { break };
                    next_id += 1;
                    let msg = pb::Delivery {
                        delivery_id: next_id,
                        envelope: Some(to_proto(d.envelope())),
                        attempt: d.attempt,
                        malformed: d.malformed.clone().unwrap_or_default(),
                    };
                    pending.insert(next_id, d);
                    let out = pb::SubscribeResponse {
                        msg: Some(pb::subscribe_response::Msg::Delivery(msg)),
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        break;
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::SubscribeRequest { msg: Some(pb::subscribe_request::Msg::Settle(s)) })) => {
                        match pending.remove(&s.delivery_id) {
                            Some(d) => self.settle(d, s).await,
                            None => tracing::debug!(id = s.delivery_id, "settle of an unknown or settled delivery ignored"),
                        }
                    }
                    Ok(Some(_)) => {
                        let _ = tx.send(Err(invalid("after `subscription`, a Subscribe stream takes only `settle` messages"))).await;
                        break;
                    }
                    Ok(None) | Err(_) => break,
                },
                () = tx.closed() => break,
            }
        }
        if !pending.is_empty() {
            tracing::debug!(
                pattern = %self.pattern,
                unsettled = pending.len(),
                "subscribe stream ended; unsettled deliveries go back to the backend"
            );
        }
    }

    async fn settle(&self, d: Delivery, s: pb::Settle) {
        let result = if s.ack {
            d.ack().await
        } else if self.max_attempts > 0 && d.attempt >= self.max_attempts {
            let attempt = d.attempt;
            let reason = if s.reason.is_empty() {
                "rejected by the subscriber".to_owned()
            } else {
                s.reason
            };
            let (env, _, _, acker) = d.into_parts();
            let mut env = Arc::unwrap_or_clone(env);
            env.mark_dead_letter(&self.pattern, self.group.as_deref(), attempt, &reason);
            match self
                .backend
                .transport()
                .publish(Route::DeadLetter(&self.pattern), env)
                .await
            {
                Ok(()) => acker.ack().await,
                Err(e) => {
                    tracing::warn!(pattern = %self.pattern, error = %e, "dead letter not accepted; handing the message back");
                    acker.nack(Duration::from_secs(1)).await
                }
            }
        } else {
            d.nack(Duration::from_millis(s.redeliver_after_ms)).await
        };
        if let Err(e) = result {
            tracing::warn!(pattern = %self.pattern, error = %e, "could not settle a delivery; the backend will deliver it again");
        }
    }
}

/// The work items of one `Serve` stream waiting for their answers.
struct Serving {
    out: mpsc::Sender<Result<pb::ServeResponse, Status>>,
    /// Sharded: each item is added and removed once, from different tasks, never locked whole.
    waiting: dashmap::DashMap<u64, oneshot::Sender<pb::WorkResult>>,
    next: AtomicU64,
    ack_timeout: Duration,
}

/// An error a `Serve` handler gives back when its client does not answer.
fn no_answer(why: &str) -> HandlerError {
    HandlerError::new("timeout", why)
}

impl Serving {
    /// Pushes an item to the client and waits for its answer, at most `within`.
    async fn push(
        &self,
        kind: RouteKind,
        ctx: &switchboard_core::Context,
        within: Duration,
    ) -> Result<pb::WorkResult, HandlerError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(id, tx);
        let forget = Forget { serving: self, id };
        let work = pb::Work {
            work_id: id,
            kind: kind as i32,
            envelope: Some(to_proto(ctx.envelope())),
            attempt: ctx.attempt(),
        };
        let msg = pb::ServeResponse {
            msg: Some(pb::serve_response::Msg::Work(work)),
        };
        let answered = tokio::time::timeout(within, async {
            self.out
                .send(Ok(msg))
                .await
                .map_err(|_| no_answer("the serving client went away"))?;
            rx.await
                .map_err(|_| no_answer("the serving client went away before answering"))
        })
        .await;
        drop(forget);
        match answered {
            Ok(r) => r,
            Err(_) => Err(no_answer(&format!(
                "the serving client did not answer within {within:?}"
            ))),
        }
    }

    async fn request(
        &self,
        _p: Payload,
        ctx: switchboard_core::Context,
    ) -> Result<Payload, HandlerError> {
        let within = ctx
            .envelope()
            .time_left()
            .unwrap_or(ctx.client().config().timeout);
        let r = self.push(RouteKind::Request, &ctx, within).await?;
        match r.outcome {
            Some(pb::work_result::Outcome::Reply(reply)) => {
                Ok(Payload::new(reply.payload, &reply.content_type))
            }
            Some(pb::work_result::Outcome::Error(e)) => Err(HandlerError::new(e.code, e.message)),
            None => Err(HandlerError::new(
                "invalid_result",
                "the serving client answered with neither a reply nor an error",
            )),
        }
    }

    async fn event(&self, _p: Payload, ctx: switchboard_core::Context) -> Result<(), HandlerError> {
        let r = self.push(RouteKind::Event, &ctx, self.ack_timeout).await?;
        match r.outcome {
            Some(pb::work_result::Outcome::Error(e)) => Err(HandlerError::new(e.code, e.message)),
            _ => Ok(()),
        }
    }

    fn answer(&self, r: pb::WorkResult) {
        match self.waiting.remove(&r.work_id) {
            Some((_, tx)) => {
                let _ = tx.send(r);
            }
            None => tracing::debug!(
                id = r.work_id,
                "answer to an unknown, answered or expired work item ignored"
            ),
        }
    }

    /// Fails every item still waiting: the client is gone.
    fn fail_all(&self) {
        self.waiting.clear();
    }
}

/// Forgets a work item however its wait ends (answered, timed out, dropped).
struct Forget<'a> {
    serving: &'a Serving,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.serving.waiting.remove(&self.id);
    }
}

/// How long [`RunningServer::shutdown`] waits for calls in progress.
pub const SHUTDOWN_WITHIN: Duration = Duration::from_secs(10);

/// A running server: where it listens, and how to stop it.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    service: SwitchboardService,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// The address it listens on (the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `grpc://` URL of this server.
    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }

    /// Ends the open streams, stops accepting calls, lets the unary calls in progress
    /// finish (at most [`SHUTDOWN_WITHIN`]), and returns.
    ///
    /// # Errors
    /// `Connection` if the server failed while running.
    pub async fn shutdown(mut self) -> switchboard_core::Result<()> {
        self.service.close_streams();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Ok(done) = tokio::time::timeout(SHUTDOWN_WITHIN, &mut self.task).await else {
            tracing::warn!(addr = %self.addr, "calls still open after {SHUTDOWN_WITHIN:?}; closing them");
            self.task.abort();
            return Ok(());
        };
        match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(switchboard_core::Error::new(
                ErrorKind::Connection,
                crate::NAME,
                format!("the gRPC server failed: {e}"),
            )),
            Err(e) => Err(switchboard_core::Error::new(
                ErrorKind::Other,
                crate::NAME,
                format!("the gRPC server task failed: {e}"),
            )),
        }
    }
}

/// Serves `service` on `addr` (port 0 picks a free one) until [`RunningServer::shutdown`]:
/// the direct `grpc://` transport's server. The gateway adds health, reflection, TLS and
/// signals on top.
///
/// # Errors
/// `Connection` if the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    service: SwitchboardService,
) -> switchboard_core::Result<RunningServer> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        switchboard_core::Error::new(
            ErrorKind::Connection,
            crate::NAME,
            format!("cannot listen on {addr}: {e}"),
        )
    })?;
    let addr = listener.local_addr().map_err(|e| {
        switchboard_core::Error::new(ErrorKind::Connection, crate::NAME, e.to_string())
    })?;
    let (stop, stopped) = oneshot::channel::<()>();
    // Without `TCP_NODELAY` on the accepted sockets, small responses wait for the peer's
    // delayed ACK (40 ms on Linux) whenever two are written back to back.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .initial_connection_window_size(CONNECTION_WINDOW)
            .layer(tower::util::MapResponseLayer::new(crate::status::normalize))
            .add_service(service.clone().into_server())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );
    Ok(RunningServer {
        addr,
        service,
        stop: Some(stop),
        task,
    })
}
