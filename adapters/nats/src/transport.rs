//! The NATS transport: core request/reply for `send`, JetStream durable consumers (or core
//! queue groups, opt-in) for events, a wildcard inbox per client for `request` replies.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use async_nats::{ConnectOptions, Event, ServerAddr, StatusCode, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryFutureExt};
use switchboard_core::transport::{
    Acker, Capabilities, CloseSignal, Confirmation, Delivery, Inbox, NoAck, Publisher, Requester,
    Route, SubscribeOptions, Subscriber, Subscription, Transport, prepared,
};
use switchboard_core::{CorrelationId, Envelope, Error, ErrorKind, MessageId, ReplyError, Result};
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::NAME;
use crate::codec::{Implied, delivery_from, envelope_headers, header_map, read_message};
use crate::config::{EventMode, NatsConfig};
use crate::inbox::{INBOX_PREFIX, read_reply_subject, reply_parts, reply_subject};
use crate::mux::{Answer, MuxTasks, Outgoing, SEND_INBOX_PREFIX, SendMux, deadline_in_reply};

/// First part of every client inbox subject.
/// Queue group every request handler of a pattern joins, so they compete.
const REQUEST_GROUP: &str = "sb-handlers";
/// Bound on one JetStream pull; also the delay a draining member puts on the messages it
/// gives back, so they do not come back to the pull that is ending.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// Bytes kept free under the server's limit for the envelope headers.
const HEADER_ROOM: usize = 8 * 1024;

/// A connection to NATS, shared by everything a [`switchboard_core::Client`] does.
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: NatsConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Bumped on every lost connection: in-flight `send`s fail when it changes.
    disconnects: Arc<watch::Sender<u64>>,
    closed: CloseSignal,
    streams: OnceCell<()>,
    max_payload: usize,
    /// Event and request subjects of the patterns published to, built once each.
    subjects: SubjectCache,
    /// `send`'s replies.
    mux: Arc<SendMux>,
    _mux_tasks: MuxTasks,
}

/// Subjects by pattern, so a publish neither formats its subject nor copies it again into
/// the client's `Subject` (both allocations, per message): a lookup and a reference count.
/// Bounded: beyond [`SubjectCache::MAX`] patterns of a kind, subjects are built per message.
#[derive(Default)]
struct SubjectCache {
    events: DashMap<String, Subject>,
    requests: DashMap<String, Subject>,
}

impl SubjectCache {
    const MAX: usize = 10_000;

    fn get(
        map: &DashMap<String, Subject>,
        pattern: &str,
        build: impl FnOnce(&str) -> String,
    ) -> Subject {
        if let Some(s) = map.get(pattern) {
            return s.clone();
        }
        let subject = Subject::from(build(pattern));
        if map.len() < Self::MAX {
            map.insert(pattern.to_owned(), subject.clone());
        }
        subject
    }
}

impl Inner {
    fn event_subject(&self, pattern: &str) -> Subject {
        SubjectCache::get(&self.subjects.events, pattern, |p| {
            self.cfg.event_subject(p)
        })
    }

    fn request_subject(&self, pattern: &str) -> Subject {
        SubjectCache::get(&self.subjects.requests, pattern, |p| {
            self.cfg.request_subject(p)
        })
    }
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("config", &self.inner.cfg)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl NatsTransport {
    /// Connects to the servers in `cfg`, bounded by its connect timeout. Reconnection after
    /// that is automatic and unbounded; while the connection is down, `send` fails at once
    /// with a retryable `Connection` error.
    ///
    /// # Errors
    /// `Connection` if no server answers in time; `InvalidConfig` for unreadable TLS or
    /// credentials files.
    pub async fn connect(cfg: NatsConfig) -> Result<Self> {
        let disconnects = Arc::new(watch::channel(0u64).0);
        let events = disconnects.clone();
        let mut opts = ConnectOptions::new()
            .name(cfg.name.clone())
            .connection_timeout(cfg.connect_timeout)
            .max_reconnects(None)
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        Event::Disconnected => {
                            tracing::warn!(
                                "NATS connection lost; failing in-flight requests, reconnecting"
                            );
                            events.send_modify(|g| *g += 1);
                        }
                        Event::Connected => tracing::info!("NATS connection (re)established"),
                        other => tracing::debug!(event = %other, "NATS connection event"),
                    }
                }
            });
        if let Some(user) = &cfg.user {
            let pass = cfg
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            opts = opts.user_and_password(user.clone(), pass);
        }
        if let Some(token) = &cfg.token {
            opts = opts.token(token.expose().to_owned());
        }
        if let Some(path) = &cfg.creds {
            opts = opts.credentials_file(path).await.map_err(|e| {
                Error::invalid_config(
                    NAME,
                    format!("cannot read credentials file `{}`: {e}", path.display()),
                )
            })?;
        }
        if cfg.tls {
            opts = opts.require_tls(true);
        }
        // One process-wide TLS provider (ring), whichever other crates enable: without it
        // rustls cannot choose and panics at the first TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if let Some(ca) = &cfg.tls_ca {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &cfg.tls_client {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        let scheme = if cfg.tls { "tls" } else { "nats" };
        let addrs = cfg
            .servers
            .iter()
            .map(|s| {
                format!("{scheme}://{s}")
                    .parse::<ServerAddr>()
                    .map_err(|e| {
                        Error::invalid_config(NAME, format!("bad server address `{s}`: {e}"))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let servers = cfg.servers.join(",");
        let client = match tokio::time::timeout(cfg.connect_timeout, opts.connect(addrs)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                use async_nats::ConnectErrorKind as K;
                let kind = match e.kind() {
                    K::Authentication | K::AuthorizationViolation => ErrorKind::Unauthenticated,
                    K::Tls => ErrorKind::InvalidConfig,
                    _ => ErrorKind::Connection,
                };
                return Err(Error::new(
                    kind,
                    NAME,
                    format!("cannot connect to NATS at {servers}: {e}"),
                )
                .with_source(e));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    NAME,
                    format!(
                        "cannot connect to NATS at {servers}: no answer within {:?}",
                        cfg.connect_timeout
                    ),
                ));
            }
        };
        let max_payload = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        let js = jetstream::new(client.clone());
        let closed = CloseSignal::new();
        let (mux, mux_tasks) = SendMux::start(
            &client,
            &connection_token(),
            &closed,
            disconnects.subscribe(),
        )
        .await?;
        Ok(NatsTransport {
            inner: Arc::new(Inner {
                cfg,
                client,
                js,
                disconnects,
                closed,
                streams: OnceCell::new(),
                max_payload,
                subjects: SubjectCache::default(),
                mux,
                _mux_tasks: mux_tasks,
            }),
        })
    }

    /// The settings this transport was made with.
    pub fn config(&self) -> &NatsConfig {
        &self.inner.cfg
    }

    /// Publishes an event the way a producer without the SDK would: the NATS client, string
    /// headers of the caller's choosing, raw bytes, onto the event subject of `pattern`
    /// (JetStream-acknowledged in JetStream mode).
    ///
    /// # Errors
    /// `InvalidConfig` for a header NATS cannot carry; `Connection` if the server did not
    /// accept it.
    pub async fn publish_foreign(
        &self,
        pattern: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Result<()> {
        let map = header_map(headers.iter().copied())?;
        let subject = self.inner.cfg.event_subject(pattern);
        match self.inner.cfg.events {
            EventMode::JetStream => self.inner.js_publish(subject.into(), map, payload).await,
            EventMode::Core => {
                self.inner
                    .client
                    .publish_with_headers(subject, map, payload)
                    .await
                    .map_err(|e| conn_error("publish", e))?;
                self.inner
                    .client
                    .flush()
                    .await
                    .map_err(|e| conn_error("flush", e))
            }
        }
    }

    /// What every publish checks first: the transport is open and the payload fits.
    fn check_publish(&self, msg: &Envelope) -> Result<()> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        self.check_size(msg.payload.len())
    }

    fn check_size(&self, payload: usize) -> Result<()> {
        if payload > self.inner.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!(
                    "payload of {payload} bytes exceeds the limit of {} bytes (server max_payload less room for headers)",
                    self.inner.max_payload
                ),
            ));
        }
        Ok(())
    }
}

impl Inner {
    /// Creates the event and dead-letter streams if they do not exist yet (once per
    /// transport).
    async fn ensure_streams(&self) -> Result<()> {
        if self.streams.initialized() {
            return Ok(());
        }
        // Boxed: stream configurations are large, and every publish future would carry them.
        self.streams
            .get_or_try_init(|| Box::pin(self.create_streams()))
            .await
            .map(|_| ())
    }

    async fn create_streams(&self) -> Result<()> {
        {
            {
                let prefix = &self.cfg.prefix;
                self.js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: self.cfg.stream.clone(),
                        subjects: vec![format!("{prefix}.evt.>")],
                        // Kept for `retention`, whoever has read it: each group's durable
                        // consumer keeps its own position. (Interest retention would drop a
                        // message stored while consumers are still being recovered after a
                        // server restart, acknowledged to its publisher but never delivered.)
                        retention: jetstream::stream::RetentionPolicy::Limits,
                        max_age: self.cfg.retention,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| js_error("create the event stream", e))?;
                self.js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: self.cfg.dlq_stream.clone(),
                        subjects: vec![format!("{prefix}.dlq.>")],
                        // Kept until read.
                        retention: jetstream::stream::RetentionPolicy::WorkQueue,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| js_error("create the dead-letter stream", e))?;
                Ok(())
            }
        }
    }

    /// Publishes to JetStream and waits for the stream's ack, creating the streams first if
    /// this transport has not yet. The headers and payload are cloned for the first attempt
    /// (the payload's bytes are shared, not copied) and kept for the rare second one.
    async fn js_publish(
        &self,
        subject: Subject,
        headers: async_nats::HeaderMap,
        payload: Bytes,
    ) -> Result<()> {
        if !self.streams.initialized() {
            Box::pin(self.ensure_streams()).await?;
        }
        // The client's publish future (near a kilobyte) in a box of its own: inline, it made
        // this future too large for the allocator's per-thread cache.
        let first = async {
            Box::pin(self.js.publish_with_headers(
                subject.clone(),
                headers.clone(),
                payload.clone(),
            ))
            .await
            .map_err(publish_error_raw)?
            .await
            .map_err(publish_error_raw)
        };
        match first.await {
            Ok(_) => Ok(()),
            Err(Failed::Publish(e))
                if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound =>
            {
                // JetStream still starting after a server restart, or the stream was
                // deleted: (re)create it and try once more. Boxed: a rare path.
                Box::pin(async {
                    self.create_streams().await?;
                    self.js
                        .publish_with_headers(subject, headers, payload)
                        .await
                        .map_err(publish_error)?
                        .await
                        .map_err(publish_error)?;
                    Ok(())
                })
                .await
            }
            Err(Failed::Publish(e)) => Err(publish_error(e)),
            Err(Failed::Other(e)) => Err(e),
        }
    }
}

/// A durable JetStream consumer to subscribe with.
struct Durable<'a> {
    stream: &'a str,
    name: String,
    subject: String,
    /// Delete the consumer after it had no member this long.
    idle: Option<Duration>,
    deliver: jetstream::consumer::DeliverPolicy,
}

/// Creates (or finds) the durable consumer and subscribes through it.
async fn durable_subscription(
    inner: &Arc<Inner>,
    durable: Durable<'_>,
    pattern: &str,
    prefetch: usize,
) -> Result<Subscription> {
    inner.ensure_streams().await?;
    let stream = inner
        .js
        .get_stream(durable.stream)
        .await
        .map_err(|e| js_error("look up the stream", e))?;
    let consumer = stream
        .get_or_create_consumer(
            &durable.name,
            pull::Config {
                durable_name: Some(durable.name.clone()),
                filter_subject: durable.subject,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: inner.cfg.ack_wait,
                deliver_policy: durable.deliver,
                max_ack_pending: 20_000,
                inactive_threshold: durable.idle.unwrap_or_default(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| js_error("create the durable consumer", e))?;
    Ok(pull_subscription(
        inner.clone(),
        consumer,
        pattern.to_owned(),
        prefetch,
    ))
}

/// A durable consumer name for `(kind, group, pattern)`: readable, and unique even where
/// sanitising makes two names alike (`a.b` and `a_b`).
fn durable_name(kind: &str, group: &str, pattern: &str) -> String {
    let h = switchboard_core::config::stable_hash(&[kind, group, pattern]);
    let clean = |s: &str| s.replace('.', "_");
    format!("{kind}-{}-{}-{h:016x}", clean(group), clean(pattern))
}

pub(crate) fn conn_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Connection,
        NAME,
        format!("NATS {what} failed: {e}"),
    )
    .with_source(e)
}

fn js_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Connection,
        NAME,
        format!("JetStream: cannot {what}: {e}"),
    )
    .with_source(e)
}

/// A first publish attempt's failure: JetStream's own error (to look at its kind) or ours.
enum Failed {
    Publish(jetstream::context::PublishError),
    Other(Error),
}

impl From<Error> for Failed {
    fn from(e: Error) -> Self {
        Failed::Other(e)
    }
}

fn publish_error_raw(e: jetstream::context::PublishError) -> Failed {
    Failed::Publish(e)
}

fn publish_error(e: jetstream::context::PublishError) -> Error {
    use jetstream::context::PublishErrorKind as K;
    let kind = match e.kind() {
        K::MaxPayloadExceeded => ErrorKind::PayloadTooLarge,
        _ => ErrorKind::Connection,
    };
    let msg = match e.kind() {
        K::TimedOut => format!(
            "JetStream did not confirm the publish in time ({e}); it may or may not be stored"
        ),
        K::MaxPayloadExceeded => format!("message exceeds the limit of the server: {e}"),
        K::StreamNotFound => format!(
            "no JetStream stream answered for the subject ({e}); JetStream may still be starting"
        ),
        _ => format!("JetStream publish failed: {e}"),
    };
    Error::new(kind, NAME, msg).with_source(e)
}

/// A publish in progress, boxed once.
type Publishing<'a> = BoxFuture<'a, Result<()>>;

/// Written without `async_trait`'s one boxed future for the whole body, which would be as
/// large as the largest route's (the JetStream ones, about 2 KB) and be allocated and moved
/// for every reply too. Each route boxes only its own future: a reply's or a request's is
/// the client's publish and nothing else.
impl Publisher for NatsTransport {
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> Publishing<'async_trait>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        fn failed<'a>(e: Error) -> Publishing<'a> {
            Box::pin(std::future::ready(Err(e)))
        }
        if let Err(e) = self.check_publish(&msg) {
            return failed(e);
        }
        let inner = &self.inner;
        match route {
            Route::Event(pattern) => inner.publish_event(pattern, msg).unwrap_or_else(failed),
            Route::Request(pattern) => prepared(inner.publish_request(pattern, msg)),
            Route::Reply(address) => prepared(inner.publish_reply(address, msg)),
            Route::DeadLetter(pattern) => inner
                .publish_dead_letter(pattern, msg)
                .unwrap_or_else(failed),
        }
    }

    /// A reply (every request's answer) boxes only the client's publish: the default would
    /// box a future around [`Publisher::publish`]'s own box, and move the envelope into it.
    /// The client's publish is enqueued on the connection in call order, as the default's.
    fn enqueue<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> BoxFuture<'async_trait, Result<Confirmation>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let accepted = |()| Confirmation::accepted();
        match route {
            Route::Reply(address) => prepared(
                self.check_publish(&msg)
                    .and_then(|()| self.inner.publish_reply(address, msg))
                    .map(|f| f.map_ok(accepted)),
            ),
            route => Box::pin(self.publish(route, msg).map_ok(accepted)),
        }
    }
}

/// What the NATS message of a `request` carries itself: the pattern (its subject), the reply
/// address (its reply subject), and, in that reply subject (`inbox`), its correlation id and
/// deadline. Its id is a header only when it differs from its correlation id (a correlation
/// carried from a parent message); the SDK's default request thus travels without headers.
const REQUEST_CARRIES: Implied = Implied {
    id: false,
    pattern: true,
    reply_to: true,
    correlation_id: true,
    correlation_is_id: false,
    causation_is_correlation: false,
    deadline: true,
};

/// What the NATS message of a `send` carries itself: the pattern (its subject), the reply
/// address and the deadline (its reply subject, see `mux`). The caller never sees a `send`'s
/// id or (default) correlation id, and the reply is matched by its reply subject, so the
/// handler takes a fresh id, which is also its correlation id (as if the caller had drawn
/// it). A correlation id carried from a parent message still travels, as a header.
const SEND_CARRIES: Implied = Implied {
    id: true,
    pattern: true,
    reply_to: true,
    correlation_id: false,
    correlation_is_id: true,
    causation_is_correlation: false,
    deadline: true,
};

/// The prefix NATS clients give their request inboxes by default (async-nats's `send` uses
/// it): a reply there is matched by its subject, so it needs no correlation header.
const NATS_INBOX_PREFIX: &str = "_INBOX.";

impl Inner {
    /// Returns once the server has processed every command this connection sent before the
    /// call, such as a new subscription: a message published from another connection after
    /// this returns finds it. (`Client::flush` only writes the client's buffer to the socket;
    /// the server may not have read it yet.) The round trip is a request to a fresh subject
    /// nobody listens on, which the server answers with "no responders" in order, after what
    /// came before it on this connection.
    async fn sync_with_server(&self) -> Result<()> {
        let request = async_nats::Request::new().timeout(Some(self.cfg.connect_timeout));
        match self
            .client
            .send_request(self.client.new_inbox(), request)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(()),
            Err(e) => Err(conn_error("sync with the server", e)),
        }
    }

    /// A request is not sent while the connection is down: it could only wait for its
    /// deadline, so it fails at once with a retryable error.
    fn ensure_connected(&self) -> Result<()> {
        if self.client.connection_state() == State::Connected {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Connection,
                NAME,
                "not connected to NATS (reconnecting); the request was not sent",
            ))
        }
    }

    /// Encodes an event synchronously; the future returned holds no envelope.
    fn publish_event(&self, pattern: &str, msg: Envelope) -> Result<Publishing<'_>> {
        let subject = self.event_subject(pattern);
        // The event's id is not sent: on JetStream the reader derives it from the stream
        // sequence and the time the stream stored the event (the same for every group and
        // every redelivery); core-mode events are never redelivered, and the reader draws one.
        let carried = Implied {
            id: true,
            pattern: true,
            ..Implied::default()
        };
        let headers = envelope_headers(&msg, carried)?;
        Ok(match self.cfg.events {
            EventMode::JetStream => Box::pin(self.js_publish(subject, headers, msg.payload)),
            EventMode::Core => Box::pin(
                self.client
                    .publish_with_headers(subject, headers, msg.payload)
                    .map_err(|e| conn_error("publish", e)),
            ),
        })
    }

    /// Checks and encodes a request synchronously; the future returned holds only the
    /// client's publish (the envelope is gone by then).
    fn publish_request(
        &self,
        pattern: &str,
        msg: Envelope,
    ) -> Result<impl Future<Output = Result<()>> + Send + '_> {
        self.ensure_connected()?;
        let Some(reply_to) = msg.reply_to.as_deref() else {
            return Err(Error::invalid_config(
                NAME,
                "a request needs a reply address",
            ));
        };
        // The reply subject is the caller's inbox followed by the correlation id, the
        // deadline and the pattern (see `inbox`).
        let (reply, carries) = match msg.correlation_id {
            Some(correlation) => (
                reply_subject(reply_to, correlation, msg.deadline, pattern),
                Implied {
                    id: correlation.as_uuid() == msg.id.as_uuid(),
                    ..REQUEST_CARRIES
                },
            ),
            None => (
                reply_to.to_owned(),
                Implied {
                    correlation_id: false,
                    deadline: false,
                    ..REQUEST_CARRIES
                },
            ),
        };
        let headers = envelope_headers(&msg, carries)?;
        Ok(self
            .client
            .publish_with_reply_and_headers(
                self.request_subject(pattern),
                reply,
                headers,
                msg.payload,
            )
            .map_err(|e| conn_error("publish", e)))
    }

    /// A reply, encoded synchronously as [`Inner::publish_request`].
    fn publish_reply(
        &self,
        address: &str,
        mut msg: Envelope,
    ) -> Result<impl Future<Output = Result<()>> + Send + '_> {
        // Replies to this SDK's inboxes are matched by their subject (`_SB_INBOX.`: it holds
        // the correlation id; `_SB_SEND.`: the call's sequence), as are replies to a NATS
        // request inbox; replies to anywhere else keep the correlation id as a header. The causation id (the request's id) is left out when it equals the
        // correlation id: the reader takes one for the other. Nothing reads a reply's own id.
        // A successful JSON reply thus travels without headers, as a plain NATS message.
        let headers = envelope_headers(
            &msg,
            Implied {
                id: true,
                pattern: true,
                reply_to: true,
                correlation_id: address.starts_with(INBOX_PREFIX)
                    || address.starts_with(SEND_INBOX_PREFIX)
                    || address.starts_with(NATS_INBOX_PREFIX),
                correlation_is_id: false,
                causation_is_correlation: true,
                deadline: false,
            },
        )?;
        let subject = msg.take_reply_address(address);
        Ok(self
            .client
            .publish_with_headers(subject, headers, msg.payload)
            .map_err(|e| conn_error("publish", e)))
    }

    fn publish_dead_letter(&self, pattern: &str, msg: Envelope) -> Result<Publishing<'_>> {
        let headers = envelope_headers(&msg, Implied::default())?;
        Ok(Box::pin(self.js_publish(
            self.cfg.dead_letter_subject(pattern).into(),
            headers,
            msg.payload,
        )))
    }
}

#[async_trait]
impl Subscriber for NatsTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        let inner = &self.inner;
        match route {
            Route::Event(pattern) => {
                let group = opts.group.as_deref().ok_or_else(|| {
                    Error::invalid_config(
                        NAME,
                        format!("subscribing to events on `{pattern}` needs a consumer group"),
                    )
                })?;
                let subject = inner.cfg.event_subject(pattern);
                match inner.cfg.events {
                    EventMode::JetStream => {
                        let durable = Durable {
                            stream: &inner.cfg.stream,
                            name: durable_name("evt", group, pattern),
                            subject,
                            idle: inner.cfg.group_idle,
                            // A new group starts with the events emitted from now on.
                            deliver: jetstream::consumer::DeliverPolicy::New,
                        };
                        durable_subscription(&self.inner, durable, pattern, opts.prefetch).await
                    }
                    EventMode::Core => {
                        let sub = queue_subscribe(inner, subject, group).await?;
                        inner.sync_with_server().await?;
                        Ok(core_subscription(inner.clone(), sub, pattern.to_owned()))
                    }
                }
            }
            Route::Request(pattern) => {
                let sub = queue_subscribe(inner, inner.cfg.request_subject(pattern), REQUEST_GROUP)
                    .await?;
                inner.sync_with_server().await?;
                Ok(core_subscription(inner.clone(), sub, pattern.to_owned()))
            }
            Route::DeadLetter(pattern) => {
                // One durable per pattern, shared by every reader: a work queue allows one
                // consumer per subject, and each dead letter is read once.
                let durable = Durable {
                    stream: &inner.cfg.dlq_stream,
                    name: durable_name("dlq", "readers", pattern),
                    subject: inner.cfg.dead_letter_subject(pattern),
                    idle: None,
                    // Every dead letter kept, however old.
                    deliver: jetstream::consumer::DeliverPolicy::All,
                };
                durable_subscription(&self.inner, durable, pattern, opts.prefetch).await
            }
            Route::Reply(address) => Err(Error::invalid_config(
                NAME,
                format!("reply address `{address}` is read through open_inbox"),
            )),
        }
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        if self.inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        // One subject token: anything but letters, digits, `-` and `_` becomes `_`.
        let token: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let address = format!("{INBOX_PREFIX}{token}");
        let sub = self
            .inner
            .client
            .subscribe(format!("{address}.>"))
            .await
            .map_err(|e| conn_error("subscribe", e))?;
        self.inner.sync_with_server().await?;
        let skip = address.len() + 1;
        let stream =
            self.inner.closed.guard(sub).map(move |m| {
                Delivery::new(reply_envelope_from_inbox(m, skip), 1, Box::new(NoAck))
            });
        Ok(Inbox::new(address, Subscription::new(stream))
            .with_connection_lost(self.inner.disconnects.subscribe()))
    }
}

/// A message on a client's inbox (subject `<inbox>.<correlation id>.<deadline>.<pattern>`,
/// the inbox part `skip` bytes long with its dot): a reply, or the server's notice that a
/// request found no responder, turned into a reply carrying the `no_responder` error.
fn reply_envelope_from_inbox(m: async_nats::Message, skip: usize) -> Envelope {
    let async_nats::Message {
        subject,
        status,
        headers,
        payload,
        ..
    } = m;
    let (id, pattern) = reply_parts(subject.get(skip..).unwrap_or_default());
    let mut env = reply_envelope(status, &headers, payload, pattern, id.parse().ok());
    if env.pattern.is_empty() {
        env.pattern = pattern.to_owned();
    }
    if let Some(e) = env.error.as_ref().filter(|e| e.code == "codec") {
        tracing::debug!(reason = %e.message, "reply with malformed headers");
    }
    env
}

/// A reply read off a reply subject (a `send`'s or a `request`'s), as the envelope core turns
/// into the caller's value or error: the server's no-responders notice (status 503, nothing
/// else) becomes a `no_responder` reply error, a reply whose headers do not parse a `codec`
/// one. Its id is its request's (a reply's id is never sent), `correlation` for the SDK's
/// requests. `pattern` names the request in errors; a reply that carries none (the usual
/// case) is read without one, as on RabbitMQ: a `send`'s caller knows it, and nothing reads a
/// reply's pattern (no allocation for it per call).
fn reply_envelope(
    status: Option<StatusCode>,
    headers: &Option<async_nats::HeaderMap>,
    payload: Bytes,
    pattern: &str,
    correlation: Option<CorrelationId>,
) -> Envelope {
    let failed = |code: &str, message: String| {
        let mut env = Envelope::new(pattern, Bytes::new());
        env.correlation_id = correlation;
        env.error = Some(ReplyError {
            code: code.to_owned(),
            message,
        });
        env
    };
    if status == Some(StatusCode::NO_RESPONDERS) {
        return failed(
            "no_responder",
            format!("no handler is subscribed to `{pattern}`"),
        );
    }
    let implied_id = correlation.map(MessageId::from);
    match read_message(headers, payload, "", implied_id) {
        (mut env, None) => {
            env.complete_reply(correlation);
            env
        }
        (_, Some(why)) => failed("codec", format!("reply has malformed headers: {why}")),
    }
}

/// A core NATS queue subscription. The caller returns it only after
/// [`Inner::sync_with_server`], so that a request sent right after `handle` returns finds its
/// handler.
async fn queue_subscribe(
    inner: &Inner,
    subject: String,
    group: &str,
) -> Result<async_nats::Subscriber> {
    inner
        .client
        .queue_subscribe(subject, group.to_owned())
        .await
        .map_err(|e| conn_error("subscribe", e))
}

/// Requests and core-mode events: at most once, nothing to acknowledge. A graceful stop hands
/// what this member was sent and did not take back to the queue group ([`hand_back`]).
fn core_subscription(
    inner: Arc<Inner>,
    messages: async_nats::Subscriber,
    pattern: String,
) -> Subscription {
    let (back, handed) = tokio::sync::oneshot::channel();
    let keeper = Keeper {
        sub: Some(messages),
        back: Some(back),
    };
    let client = inner.client.clone();
    let finish = async move {
        if let Ok(sub) = handed.await {
            // Bounded as a whole: a stop during an outage does not wait for the server.
            if tokio::time::timeout(HAND_BACK_LIMIT, hand_back(&client, sub))
                .await
                .is_err()
            {
                tracing::warn!("handing messages back to the queue group took too long; stopped");
            }
        }
    };
    let stream = inner.closed.guard(keeper).map(move |m| {
        let reply = m.reply;
        // A `request`'s id and deadline travel in its reply subject, a `send`'s deadline in
        // its own (a header, if present, wins).
        let (correlation, deadline) = match reply.as_deref() {
            Some(r) if r.starts_with(INBOX_PREFIX) => read_reply_subject(r).unwrap_or_default(),
            Some(r) => (None, deadline_in_reply(r)),
            None => (None, None),
        };
        delivery_from(
            &m.headers,
            m.payload,
            &pattern,
            correlation.map(MessageId::from),
            1,
            Box::new(NoAck),
            |env, malformed| {
                // The NATS reply subject is where the answer must go, whatever a header says;
                // a request without a correlation header is correlated by its own id.
                let Some(r) = reply else { return };
                match deadline {
                    Some(Ok(deadline)) => {
                        env.deadline.get_or_insert(deadline);
                    }
                    Some(Err(why)) if malformed.is_none() => *malformed = Some(why),
                    _ => {}
                }
                env.reply_to = Some(r.into_string());
                let implied = correlation.unwrap_or(CorrelationId::from(env.id));
                env.correlation_id.get_or_insert(implied);
            },
        )
    });
    Subscription::new(stream).with_finish(finish)
}

/// A core subscription's messages; when the consumer lets go of them, the subscriber goes to
/// the subscription's finishing work ([`hand_back`]), which a graceful stop runs.
struct Keeper {
    sub: Option<async_nats::Subscriber>,
    back: Option<tokio::sync::oneshot::Sender<async_nats::Subscriber>>,
}

impl Stream for Keeper {
    type Item = async_nats::Message;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.sub.as_mut() {
            Some(sub) => sub.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let (Some(sub), Some(back)) = (self.sub.take(), self.back.take()) {
            // Held by the finishing work; when none runs (the transport closed), it is
            // dropped with it and unsubscribes.
            let _ = back.send(sub);
        }
    }
}

/// How long a stopping member waits for the rest of what the server sent it.
const HAND_BACK_WAIT: Duration = Duration::from_secs(2);
/// The longest a graceful stop spends handing messages back.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(10);

/// Hands what the server sent this member, and nobody took, back to the queue group: the
/// server is told to stop sending (`drain`: unsubscribe, then read what is already on its way),
/// and each message left is published again to its subject, with its reply subject and
/// headers, so another member answers it (a `send` waiting for its reply gets it from there).
/// Messages the server still sends in the moment between the unsubscribe leaving and its
/// arrival can be dropped by the client library; everything already received is handed back.
async fn hand_back(client: &async_nats::Client, mut sub: async_nats::Subscriber) {
    if sub.drain().await.is_err() {
        // The connection is gone: there is nobody to hand anything to.
        return;
    }
    let mut handed = 0u64;
    while let Ok(Some(m)) = tokio::time::timeout(HAND_BACK_WAIT, sub.next()).await {
        let async_nats::Message {
            subject,
            reply,
            headers,
            payload,
            ..
        } = m;
        let sent = match (reply, headers) {
            (Some(r), Some(h)) => {
                client
                    .publish_with_reply_and_headers(subject, r, h, payload)
                    .await
            }
            (Some(r), None) => client.publish_with_reply(subject, r, payload).await,
            (None, Some(h)) => client.publish_with_headers(subject, h, payload).await,
            (None, None) => client.publish(subject, payload).await,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "a message handed back to the queue group was not published");
            return;
        }
        handed += 1;
    }
    if handed > 0 {
        tracing::debug!(
            handed,
            "messages handed back to the queue group at a graceful stop"
        );
        let _ = tokio::time::timeout(HAND_BACK_WAIT, client.flush()).await;
    }
}

/// Events and dead letters from a JetStream durable consumer, polled directly by the
/// subscriber (no task in between). It pulls only as many messages as it has credits: twice
/// the handler concurrency, one batch in the handlers and one arriving, and a pull waits until
/// half are free, so pulls come in batches rather than one per message. Each delivery keeps
/// its credit until acknowledged, rejected or dropped (a dropped delivery is given back to the
/// server at once). Messages of a pull still arriving when the subscription is dropped are
/// given back with a delay that outlasts the pull, so they go to another member.
fn pull_subscription(
    inner: Arc<Inner>,
    consumer: jetstream::consumer::PullConsumer,
    pattern: String,
    prefetch: usize,
) -> Subscription {
    let prefetch = u32::try_from(prefetch.max(1)).unwrap_or(u32::MAX / 2);
    let state = JsSub {
        inner,
        consumer,
        pattern,
        half: prefetch,
        credits: Arc::new(Semaphore::new((prefetch as usize) * 2)),
        batch: None,
        backoff: Duration::from_millis(100),
    };
    Subscription::new(futures::stream::unfold(state, |mut st| async move {
        let d = st.next().await?;
        Some((d, st))
    }))
}

struct JsSub {
    inner: Arc<Inner>,
    consumer: jetstream::consumer::PullConsumer,
    pattern: String,
    half: u32,
    credits: Arc<Semaphore>,
    /// The pull in progress and the credits it may still use.
    batch: Option<(jetstream::consumer::pull::Batch, OwnedSemaphorePermit)>,
    backoff: Duration,
}

impl JsSub {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.inner.closed.is_closed() {
                return None;
            }
            if self.batch.is_none() {
                let closed = self.inner.closed.clone();
                let mut permits = tokio::select! {
                    p = self.credits.clone().acquire_many_owned(self.half) => p.ok()?,
                    _ = closed.closed() => return None,
                };
                let free = u32::try_from(self.credits.available_permits()).unwrap_or(0);
                if free > 0
                    && let Ok(more) = self.credits.clone().try_acquire_many_owned(free)
                {
                    permits.merge(more);
                }
                let pull = self
                    .consumer
                    .batch()
                    .max_messages(permits.num_permits())
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await;
                match pull {
                    Ok(b) => {
                        self.backoff = Duration::from_millis(100);
                        self.batch = Some((b, permits));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pattern = %self.pattern, "JetStream pull failed; retrying");
                        drop(permits);
                        tokio::select! {
                            _ = tokio::time::sleep(self.backoff) => {}
                            _ = closed.closed() => return None,
                        }
                        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let (batch, permits) = self.batch.as_mut()?;
            // The server ends a pull at its expiry; the client-side bound covers a pull lost
            // with the connection.
            let next =
                tokio::time::timeout(PULL_EXPIRES + Duration::from_secs(2), batch.next()).await;
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, pattern = %self.pattern, "JetStream pull ended");
                    self.batch = None;
                    continue;
                }
                Ok(None) | Err(_) => {
                    self.batch = None;
                    continue;
                }
            };
            // The delivery count and the message's identity in the stream (its id when it
            // carries none: see `publish_event`) come from the ack subject.
            let (attempt, implied) = match msg.info() {
                Ok(i) => (
                    u32::try_from(i.delivered).unwrap_or(u32::MAX),
                    Some(MessageId::from_sequence(
                        u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000)
                            .unwrap_or_default(),
                        i.stream,
                        i.stream_sequence,
                    )),
                ),
                Err(_) => (1, None),
            };
            let credit = permits.split(1);
            let message = msg.message;
            let acker = Box::new(JsAcker {
                ack: message
                    .reply
                    .clone()
                    .map(|r| (self.inner.client.clone(), r)),
                _credit: credit,
            });
            return Some(delivery_from(
                &message.headers,
                message.payload,
                &self.pattern,
                implied,
                attempt,
                acker,
                |_, _| {},
            ));
        }
    }
}

impl Drop for JsSub {
    fn drop(&mut self) {
        // Give back what the pull in progress still brings, delayed past its end so it goes
        // to another member rather than to a new pull of this one.
        if let Some((mut batch, _credits)) = self.batch.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                while let Ok(Some(Ok(msg))) =
                    tokio::time::timeout(PULL_EXPIRES + Duration::from_secs(2), batch.next()).await
                {
                    let _ = msg.ack_with(AckKind::Nak(Some(PULL_EXPIRES))).await;
                }
            });
        }
    }
}

/// Acknowledges a JetStream message; gives it back to the server if dropped unsettled.
struct JsAcker {
    /// The client and the message's ack subject; `None` once settled.
    ack: Option<(async_nats::Client, async_nats::Subject)>,
    _credit: Option<OwnedSemaphorePermit>,
}

impl JsAcker {
    /// Sends `kind` to the message's ack subject (what `jetstream::Message::ack_with` does,
    /// without keeping the whole message for it).
    async fn settle(&mut self, kind: AckKind, what: &str) -> Result<()> {
        let Some((client, subject)) = self.ack.take() else {
            return Ok(());
        };
        client
            .publish(subject, Bytes::from(kind))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    NAME,
                    format!("JetStream {what} failed: {e}"),
                )
            })
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settle(AckKind::Ack, "ack").await
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.settle(AckKind::Nak((!delay.is_zero()).then_some(delay)), "nak")
            .await
    }
}

impl Drop for JsAcker {
    fn drop(&mut self) {
        if let Some((client, subject)) = self.ack.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = client
                    .publish(subject, Bytes::from(AckKind::Nak(None)))
                    .await;
            });
        }
    }
}

/// A token naming this connection in its `send` reply subjects: 16 random hex digits (64
/// bits, unique among the connections of a NATS system). Short, since every request and
/// every reply carries it, and the server reads it in both.
fn connection_token() -> String {
    // A v4 UUID's halves each have a few fixed bits (version, variant); their xor has none.
    let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
    format!("{:016x}", high ^ low)
}

/// `send`: a core NATS request whose reply subject is `_SB_SEND.<connection>.<sequence>`,
/// read by the connection's one wildcard subscription and matched to its call by sequence
/// (`SendMux`). Replies that come after their call gave up are counted in
/// `Stats::late_replies`.
///
/// Written without `async_trait`'s boxed body: the request is checked and encoded before
/// the future is built, so the one future allocated per `send` holds the publish and the
/// wait, not the envelope and the encoding steps as well.
impl Requester for NatsTransport {
    fn call<'life0, 'life1, 'async_trait>(
        &'life0 self,
        pattern: &'life1 str,
        msg: Envelope,
        deadline: Instant,
    ) -> BoxFuture<'async_trait, Result<Envelope>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        prepared(self.start_call(pattern, msg, deadline))
    }

    fn late_replies(&self) -> Option<u64> {
        Some(self.inner.mux.late_replies())
    }
}

impl NatsTransport {
    fn start_call<'a>(
        &'a self,
        pattern: &'a str,
        msg: Envelope,
        deadline: Instant,
    ) -> Result<impl Future<Output = Result<Envelope>> + Send + 'a> {
        let inner = &self.inner;
        if inner.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        self.check_size(msg.payload.len())?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        if timeout.is_zero() {
            return Err(Error::timeout(NAME, timeout));
        }
        inner.ensure_connected()?;
        let headers = envelope_headers(&msg, SEND_CARRIES)?;
        let correlation = msg.correlation_id;
        let subject = inner.request_subject(pattern);
        let (reply_to, reply, waiting) = inner.mux.register(msg.deadline);
        let payload = msg.payload;
        // Alone, the caller hands its request over itself; while others wait, the flusher
        // does, in a batch with theirs (`mux`).
        let own = if waiting.alone() {
            Some((subject, reply_to, headers, payload))
        } else {
            let queued = inner.mux.queue(Outgoing {
                subject,
                reply: reply_to,
                headers,
                payload,
                seq: waiting.seq(),
            });
            if !queued {
                return Err(Error::closed(NAME));
            }
            None
        };
        Ok(async move {
            if let Some((subject, reply_to, headers, payload)) = own {
                inner
                    .client
                    .publish_with_reply_and_headers(subject, reply_to, headers, payload)
                    .await
                    .map_err(|e| request_publish_error(e, pattern))?;
            }
            match tokio::time::timeout_at(deadline, reply).await {
                Ok(Ok(answer)) => {
                    waiting.answered();
                    match answer {
                        Answer::Reply(m) => Ok(reply_envelope(
                            m.status,
                            &m.headers,
                            m.payload,
                            pattern,
                            correlation,
                        )),
                        Answer::Lost => Err(Error::new(
                            ErrorKind::Connection,
                            NAME,
                            "connection to NATS lost while waiting for the reply; the request may or may not have been handled",
                        )),
                        Answer::Unsent(e) => Err(request_publish_error(e, pattern)),
                    }
                }
                // The reader stopped: the transport is closing.
                Ok(Err(_)) => Err(Error::closed(NAME)),
                Err(_) => Err(Error::timeout(NAME, timeout)),
            }
        })
    }
}

/// A `send`'s request the client would not publish.
fn request_publish_error(e: async_nats::client::PublishError, pattern: &str) -> Error {
    use async_nats::client::PublishErrorKind as K;
    match e.kind() {
        K::MaxPayloadExceeded => Error::new(
            ErrorKind::PayloadTooLarge,
            NAME,
            format!("request exceeds the limit of the server: {e}"),
        ),
        K::InvalidSubject => {
            Error::invalid_config(NAME, format!("`{pattern}` is not a valid subject: {e}"))
        }
        K::Send => conn_error("request", e),
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn requester(&self) -> Option<&dyn Requester> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let js = self.inner.cfg.events == EventMode::JetStream;
        Capabilities::new(self.inner.max_payload)
            .native_request(true)
            .detects_no_responder(true)
            .redelivery_on_nack(js)
            .durable(js)
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.close();
        // Sends what is buffered, then closes; bounded so a dead server cannot hold it.
        match tokio::time::timeout(Duration::from_secs(5), self.inner.client.drain()).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(conn_error("drain", e)),
        }
    }
}
