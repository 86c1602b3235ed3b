//! The RabbitMQ transport: direct reply-to for `send`, a durable reply queue per client for
//! `request`, a topic exchange with one durable queue per group for events, publisher
//! confirms, a dead-letter exchange; reconnection with resubscription.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::{FutureExt, Stream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use switchboard_core::envelope::IdHash;
use switchboard_core::transport::{
    Acker, Capabilities, CloseSignal, Confirmation as Enqueued, Delivery, Inbox, NoAck, Publisher,
    Requester, Route, SubscribeOptions, Subscriber, Subscription, Transport, UntilClosed, prepared,
};
use switchboard_core::{CorrelationId, Envelope, Error, ErrorKind, ReplyError, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::NAME;
use crate::codec::{Kind, delivery_count, delivery_from, properties, read_message};
use crate::config::{QueueType, RabbitConfig};

/// RabbitMQ's pseudo-queue for direct reply-to.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// How often requests returned by the broker (no handler) are collected while `send`s wait.
const RETURN_POLL: Duration = Duration::from_millis(20);
/// Longest queue name AMQP allows.
const MAX_NAME: usize = 255;
/// How long closing spends deleting the client's reply queues (one broker round trip each).
const DELETE_INBOXES_WITHIN: Duration = Duration::from_secs(1);
/// How long closing waits for the connection's close handshake. A client's shutdown once
/// outlasted 5 s in CI under load (not reproduced; a consumer cancelled as the transport
/// closes can leave its channel half-closed, see `close`); past this the connection is
/// dropped without the handshake, and the broker sees the socket close.
const CLOSE_HANDSHAKE_WITHIN: Duration = Duration::from_secs(2);

/// A connection to RabbitMQ, shared by everything a [`switchboard_core::Client`] does. It
/// reconnects by itself (trying the configured nodes in order) and resubscribes.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RabbitConfig,
    tls: lapin::tcp::OwnedTLSConfig,
    session: RwLock<Option<Arc<Session>>>,
    connecting: tokio::sync::Mutex<()>,
    /// Bumped each time a connection is lost: waiting requests fail at once.
    lost: Arc<watch::Sender<u64>>,
    closed: CloseSignal,
    /// Direct reply-to waiters, by correlation id.
    calls: Arc<Calls>,
    /// `send`s between their start and their end, answered or not.
    sends: AtomicUsize,
    late: Arc<AtomicU64>,
    /// Reply queues this client declared (deleted on close), each with a way to put a
    /// reply into its subscription: the broker's "no route" for a request becomes a reply.
    inboxes: Mutex<Vec<(String, mpsc::WeakSender<Delivery>)>>,
}

/// `send`s waiting for their direct reply, by correlation id (hashed by [`IdHash`]: a reply's
/// `correlation_id` property is parsed, not kept as a string).
type Calls = DashMap<CorrelationId, oneshot::Sender<Envelope>, IdHash>;

/// The waiting call a direct reply or a returned request belongs to, if any: its
/// `correlation_id` property read as an id (a foreign or garbled one belongs to none).
fn waiter_of(calls: &Calls, props: &BasicProperties) -> Option<oneshot::Sender<Envelope>> {
    // A foreign responder may echo the request's property whole, deadline and all.
    let id = crate::codec::correlation_of(props)?;
    calls.remove(&id).map(|(_, tx)| tx)
}

/// Hands a direct reply to the call waiting for it, or counts it as late.
fn deliver_reply(calls: &Calls, late: &AtomicU64, d: lapin::message::Delivery) {
    match waiter_of(calls, &d.properties) {
        Some(tx) => {
            let (mut env, malformed) = read_message(&d.properties, d.data, "");
            if let Some(why) = malformed {
                tracing::debug!(reason = %why, "reply with malformed headers");
            }
            env.complete_reply(None);
            let _ = tx.send(env);
        }
        None => {
            late.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who reads a session's direct replies.
///
/// The session's reader task reads them and hands each to its call. A `send` that waits
/// alone reads them itself instead: the AMQP client's thread then wakes the caller directly,
/// not the reader task first (a thread hand-off fewer per round trip; see
/// docs/benchmarks.md, "RabbitMQ: a lone `send` reads its own reply"). While it does, the
/// reader task is paused, so the two do not race for the reply. It stays paused from one lone
/// call to the next, and resumes when a call starts while another waits, when a lone caller
/// finds the replies ended (a lost connection, which the reader task then handles), and when
/// the session's return collector (every `RETURN_POLL`) finds no call waiting (a late reply
/// is then counted), the channel gone or the transport closed.
struct DirectReplies {
    /// A clone of the session's reply consumer, never polled itself: each lone call reads
    /// through a clone of it (lapin's clones share one queue, each wakes its own reader).
    consumer: lapin::Consumer,
    /// The reader task leaves the replies to a lone call.
    paused: AtomicBool,
    /// The reader task, to wake when it resumes.
    reader: AtomicWaker,
}

impl DirectReplies {
    fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    fn resume(&self) {
        if self.paused.swap(false, Ordering::AcqRel) {
            self.reader.wake();
        }
    }
}

/// The reader task's view of the replies: nothing while a lone call reads them.
struct ReaderReplies {
    consumer: lapin::Consumer,
    hub: Arc<DirectReplies>,
}

impl Stream for ReaderReplies {
    type Item = lapin::Result<lapin::message::Delivery>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.hub.reader.register(cx.waker());
        if self.hub.paused.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        self.consumer.poll_next_unpin(cx)
    }
}

/// One live connection and its shared channels.
struct Session {
    conn: Connection,
    /// Publisher confirms on: events, dead letters, requests via `request`.
    confirm: Channel,
    /// No confirms: replies.
    fast: Channel,
    /// No confirms, consuming direct reply-to: requests via `send` (published mandatory).
    rpc: Channel,
    /// Who reads the direct replies.
    replies: Arc<DirectReplies>,
}

impl Session {
    fn alive(&self) -> bool {
        self.conn.status().connected()
    }
}

impl std::fmt::Debug for RabbitTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitTransport")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn amqp_error(what: &str, e: lapin::Error) -> Error {
    Error::new(
        ErrorKind::Connection,
        NAME,
        format!("RabbitMQ: cannot {what}: {e}"),
    )
    .with_source(e)
}

fn short(s: impl Into<String>) -> Result<ShortString> {
    let s: String = s.into();
    if s.len() > 255 {
        return Err(Error::invalid_config(
            NAME,
            format!("`{s}` is longer than AMQP's 255-byte limit"),
        ));
    }
    // An owned string is moved in, not copied.
    Ok(ShortString::from(s))
}

/// `args` with `x-expires`: the broker deletes the queue once it is unused for `after`.
fn expiring(mut args: FieldTable, after: Option<Duration>) -> FieldTable {
    if let Some(after) = after {
        let ms = u32::try_from(after.as_millis()).unwrap_or(u32::MAX);
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    args
}

/// A queue name from parts, kept under AMQP's limit (a long one ends in a hash of the whole).
fn queue_name(parts: &[&str]) -> String {
    let full = parts.join(".");
    if full.len() <= MAX_NAME {
        return full;
    }
    let h = switchboard_core::config::stable_hash(&[&full]);
    let mut cut = MAX_NAME - 17;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}.{h:016x}", &full[..cut])
}

impl RabbitTransport {
    /// Connects to the first node of `cfg` that answers.
    ///
    /// # Errors
    /// `Connection` if no node answers within the connect timeout; `InvalidConfig` for an
    /// unreadable CA file.
    pub async fn connect(cfg: RabbitConfig) -> Result<Self> {
        // One process-wide TLS provider (ring), whichever other crates enable: without it
        // rustls cannot choose and panics at the first TLS connection.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut tls = lapin::tcp::OwnedTLSConfig::default();
        if let Some(ca) = &cfg.tls_ca {
            tls.cert_chain = Some(std::fs::read_to_string(ca).map_err(|e| {
                Error::invalid_config(NAME, format!("cannot read `tls_ca` {}: {e}", ca.display()))
            })?);
        }
        let inner = Arc::new(Inner {
            cfg,
            tls,
            session: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            lost: Arc::new(watch::channel(0).0),
            closed: CloseSignal::new(),
            calls: Arc::new(Calls::default()),
            sends: AtomicUsize::new(0),
            late: Arc::new(AtomicU64::new(0)),
            inboxes: Mutex::new(Vec::new()),
        });
        inner.session().await?;
        Ok(RabbitTransport { inner })
    }

    /// The settings this transport was made with.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.cfg
    }

    /// Publishes an event the way a producer without the SDK would: the AMQP client, string
    /// headers of the caller's choosing in the headers table, raw bytes, to the event
    /// exchange with the pattern as routing key; returns after the publisher confirm.
    ///
    /// # Errors
    /// `Connection`, `Rejected`.
    pub async fn publish_foreign(
        &self,
        pattern: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Result<()> {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(short(*k)?, AMQPValue::LongString((*v).into()));
        }
        let props = BasicProperties::default()
            .with_headers(table)
            .with_delivery_mode(2);
        let s = self.inner.session().await?;
        let ex = self.inner.cfg.exchange.clone();
        confirmed(&s.confirm, &ex, pattern, false, &payload, props).await
    }
}

/// Publishes on a confirm channel and waits for the broker's confirm.
async fn confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    payload: &[u8],
    props: BasicProperties,
) -> Result<()> {
    let confirm = ch
        .basic_publish(
            short(exchange)?,
            short(routing_key)?,
            BasicPublishOptions {
                mandatory,
                ..Default::default()
            },
            payload,
            props,
        )
        .await
        .map_err(|e| amqp_error("publish", e))?
        .await
        .map_err(|e| amqp_error("confirm a publish", e))?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(Error::new(
            ErrorKind::NoResponder,
            NAME,
            format!("no queue is bound for `{routing_key}`: no handler is serving it"),
        )),
        Confirmation::Nack(_) => Err(Error::new(
            ErrorKind::Rejected,
            NAME,
            format!("the broker refused the message for `{routing_key}` (nack)"),
        )),
    }
}

impl Inner {
    /// The live session, connecting (once, whoever asks first) if there is none.
    async fn session(self: &Arc<Self>) -> Result<Arc<Session>> {
        if self.closed.is_closed() {
            return Err(Error::closed(NAME));
        }
        if let Some(s) = self.current() {
            return Ok(s);
        }
        // Boxed: connecting is a large future, and every publish and call awaits this one.
        Box::pin(self.reconnect()).await
    }

    /// Opens a session unless another caller just did.
    async fn reconnect(self: &Arc<Self>) -> Result<Arc<Session>> {
        let _one = self.connecting.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let s = Arc::new(self.open().await?);
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
        Ok(s)
    }

    fn current(&self) -> Option<Arc<Session>> {
        self.session
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|s| s.alive())
            .cloned()
    }

    /// Waits for a live session, retrying with backoff, until closed.
    async fn session_wait(self: &Arc<Self>) -> Option<Arc<Session>> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.session().await {
                Ok(s) => return Some(s),
                Err(e) if e.kind() == ErrorKind::Closed => return None,
                Err(e) => tracing::warn!(error = %e, "RabbitMQ unavailable; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.closed.closed() => return None,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn open(self: &Arc<Self>) -> Result<Session> {
        let mut last = None;
        for node in &self.cfg.nodes {
            let uri = self.cfg.uri(node);
            let props =
                ConnectionProperties::default().with_connection_name(self.cfg.name.clone().into());
            let runtime = lapin::runtime::default_runtime()
                .map_err(|e| amqp_error("start the AMQP runtime", e))?;
            let attempt = Connection::connect_with_config(&uri, props, self.tls.clone(), runtime);
            match tokio::time::timeout(self.cfg.connect_timeout, attempt).await {
                Ok(Ok(conn)) => return self.setup(conn).await,
                // The error never carries the URI, so no credentials reach the message.
                Ok(Err(e)) => last = Some(format!("{node}: {e}")),
                Err(_) => {
                    last = Some(format!(
                        "{node}: no answer within {:?}",
                        self.cfg.connect_timeout
                    ))
                }
            }
        }
        Err(Error::new(
            ErrorKind::Connection,
            NAME,
            format!(
                "cannot connect to RabbitMQ ({})",
                last.unwrap_or_else(|| "no nodes configured".into())
            ),
        ))
    }

    async fn setup(self: &Arc<Self>, conn: Connection) -> Result<Session> {
        let channel = |what: &'static str| {
            let conn = &conn;
            async move { conn.create_channel().await.map_err(|e| amqp_error(what, e)) }
        };
        let confirm = channel("open a channel").await?;
        confirm
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("enable publisher confirms", e))?;
        let fast = channel("open a channel").await?;
        let rpc = channel("open a channel").await?;
        // No publisher confirms on the rpc channel: they cost a broker round of work per
        // request and delay replies. Requests are published mandatory, and what the broker
        // returns (no queue: no handler) is collected below.
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        confirm
            .exchange_declare(
                short(&self.cfg.exchange)?,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("declare the event exchange", e))?;
        confirm
            .exchange_declare(
                short(&self.cfg.dead_letter_exchange)?,
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("declare the dead-letter exchange", e))?;
        // Direct reply-to: one consumer on the rpc channel, for every `send` of this client.
        let replies = rpc
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error("consume direct replies", e))?;
        let hub = Arc::new(DirectReplies {
            consumer: replies.clone(),
            paused: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        });
        // Returned requests: lapin keeps them until asked, so ask while calls are waiting.
        let (returns_ch, returns_calls) = (rpc.clone(), self.calls.clone());
        let returns_closed = self.closed.clone();
        let returns_hub = hub.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RETURN_POLL) => {}
                    _ = returns_closed.closed() => break,
                }
                if !returns_ch.status().connected() {
                    break;
                }
                if returns_calls.is_empty() {
                    // No call waits, so none reads the replies: the reader task counts what
                    // comes now (late replies).
                    returns_hub.resume();
                    continue;
                }
                let Ok(returned) = returns_ch.wait_for_confirms().await else {
                    continue;
                };
                for m in returned {
                    if let Some(tx) = waiter_of(&returns_calls, &m.delivery.properties) {
                        // The call names its pattern (a request does not carry it).
                        let mut reply = Envelope::new(String::new(), Bytes::new());
                        reply.error = Some(ReplyError {
                            code: "no_responder".into(),
                            message: String::new(),
                        });
                        let _ = tx.send(reply);
                    }
                }
            }
            // The channel is gone or the transport closed: the reader task, if paused, sees
            // its replies end.
            returns_hub.resume();
        });
        let calls = self.calls.clone();
        let late = self.late.clone();
        let lost = self.lost.clone();
        let closed = self.closed.clone();
        // Ends with the transport: the close is waited for only while no reply is ready.
        let mut replies = closed.guard(ReaderReplies {
            consumer: replies,
            hub: hub.clone(),
        });
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                deliver_reply(&calls, &late, d);
            }
            if !closed.is_closed() {
                tracing::warn!("RabbitMQ connection lost; failing waiting requests, reconnecting");
                lost.send_modify(|g| *g += 1);
            }
            // Dropping the senders fails every waiting `send` with a connection error.
            calls.clear();
        });
        Ok(Session {
            conn,
            confirm,
            fast,
            rpc,
            replies: hub,
        })
    }

    /// The queue a route reads from, declared (and bound) on `ch`.
    async fn declare(&self, ch: &Channel, what: &Source) -> Result<String> {
        let cfg = &self.cfg;
        let declare = |name: String, opts: QueueDeclareOptions, args: FieldTable| async move {
            ch.queue_declare(short(&name)?, opts, args)
                .await
                .map_err(|e| amqp_error(&format!("declare queue `{name}`"), e))?;
            Ok::<_, Error>(name)
        };
        let bind = |queue: String, exchange: String, key: String| async move {
            ch.queue_bind(
                short(&queue)?,
                short(&exchange)?,
                short(&key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| amqp_error(&format!("bind queue `{queue}`"), e))
        };
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        match what {
            Source::Event { pattern, group } => {
                // Dead letters of the pattern must have somewhere to go before any is sent.
                let dlq = declare(
                    queue_name(&[&cfg.prefix, "dlq", pattern]),
                    durable,
                    expiring(FieldTable::default(), cfg.queue_expires),
                )
                .await?;
                bind(dlq, cfg.dead_letter_exchange.clone(), pattern.clone()).await?;
                let mut args = FieldTable::default();
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(cfg.dead_letter_exchange.as_str().into()),
                );
                args.insert(
                    "x-dead-letter-routing-key".into(),
                    AMQPValue::LongString(pattern.as_str().into()),
                );
                if cfg.queue_type == QueueType::Quorum {
                    args.insert(
                        "x-queue-type".into(),
                        AMQPValue::LongString("quorum".into()),
                    );
                }
                let q = declare(
                    queue_name(&[&cfg.prefix, "evt", pattern, group]),
                    durable,
                    expiring(args, cfg.queue_expires),
                )
                .await?;
                bind(q.clone(), cfg.exchange.clone(), pattern.clone()).await?;
                Ok(q)
            }
            Source::Request { pattern } => {
                // Deleted with its last handler, so a request to a pattern nobody serves is
                // returned by the broker at once (no responder).
                declare(
                    self.request_queue(pattern),
                    QueueDeclareOptions {
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            }
            Source::DeadLetter { pattern } => {
                let q = declare(
                    queue_name(&[&cfg.prefix, "dlq", pattern]),
                    durable,
                    expiring(FieldTable::default(), cfg.queue_expires),
                )
                .await?;
                bind(q.clone(), cfg.dead_letter_exchange.clone(), pattern.clone()).await?;
                Ok(q)
            }
            Source::Inbox { queue } => {
                let args = expiring(FieldTable::default(), Some(cfg.reply_queue_expires));
                declare(queue.clone(), durable, args).await
            }
        }
    }

    /// A way into the subscription of this client's inbox at `address`, if it is one.
    fn inbox_sender(&self, address: &str) -> Option<mpsc::Sender<Delivery>> {
        self.inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(q, _)| q == address)
            .and_then(|(_, w)| w.upgrade())
    }

    /// Publishes a request to `pattern`'s queue, mandatory: with no queue (no handler) the
    /// broker returns it.
    async fn publish_request(
        &self,
        ch: &Channel,
        pattern: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        ch.basic_publish(
            "".into(),
            short(self.request_queue(pattern))?,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            props,
        )
        .await
        .map_err(|e| amqp_error("publish a request", e))
    }

    fn request_queue(&self, pattern: &str) -> String {
        queue_name(&[&self.cfg.prefix, "req", pattern])
    }
}

/// What a subscription reads.
#[derive(Debug, Clone)]
enum Source {
    Event { pattern: String, group: String },
    Request { pattern: String },
    DeadLetter { pattern: String },
    Inbox { queue: String },
}

impl Source {
    fn pattern(&self) -> &str {
        match self {
            Source::Event { pattern, .. }
            | Source::Request { pattern }
            | Source::DeadLetter { pattern } => pattern,
            Source::Inbox { .. } => "",
        }
    }

    /// Replies are settled on receipt; everything else is acknowledged after handling.
    fn no_ack(&self) -> bool {
        matches!(self, Source::Inbox { .. } | Source::Request { .. })
    }
}

/// Opens a channel, declares what `source` needs and starts consuming.
async fn start_consumer(
    inner: &Arc<Inner>,
    source: &Source,
    prefetch: usize,
) -> Result<(Channel, lapin::Consumer, String)> {
    let s = inner.session().await?;
    let ch = s
        .conn
        .create_channel()
        .await
        .map_err(|e| amqp_error("open a channel", e))?;
    ch.basic_qos(
        u16::try_from(prefetch).unwrap_or(u16::MAX).max(1),
        BasicQosOptions::default(),
    )
    .await
    .map_err(|e| amqp_error("set the prefetch", e))?;
    let queue = inner.declare(&ch, source).await?;
    let consumer = ch
        .basic_consume(
            short(&queue)?,
            "".into(),
            BasicConsumeOptions {
                no_ack: source.no_ack(),
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&format!("consume from `{queue}`"), e))?;
    Ok((ch, consumer, queue))
}

/// A subscription that survives reconnects: the first consumer is started before this
/// returns (so the queue exists and is bound), later ones after each lost connection. The
/// stream polls the AMQP consumer itself (no task in between); the returned sender puts
/// deliveries into it from elsewhere (the inbox's synthesised replies).
async fn subscription(
    inner: Arc<Inner>,
    source: Source,
    prefetch: usize,
) -> Result<(Subscription, mpsc::WeakSender<Delivery>)> {
    let (ch, consumer, queue) = start_consumer(&inner, &source, prefetch).await?;
    let first = (ch, inner.closed.guard(consumer), queue);
    let (tx, rx) = mpsc::channel::<Delivery>(64);
    let weak = tx.downgrade();
    // Requests are consumed without acknowledgements: what the broker sent this member and
    // nobody took would be lost with the channel. A graceful stop hands it back instead.
    let (back, handed) = match source {
        Source::Request { .. } => {
            let (back, handed) = oneshot::channel();
            (Some(back), Some(handed))
        }
        _ => (None, None),
    };
    let state = SubState {
        inner: inner.clone(),
        source,
        prefetch,
        current: Some(first),
        injected: rx,
        _keep: tx,
        back,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        let d = st.next().await?;
        Some((d, st))
    });
    let mut sub = Subscription::new(stream);
    if let Some(handed) = handed {
        sub = sub.with_finish(async move {
            if let Ok(current) = handed.await {
                hand_back(&inner, current).await;
            }
        });
    }
    Ok((sub, weak))
}

/// A consuming channel, its consumer and the queue it reads.
type Consuming = (Channel, UntilClosed<lapin::Consumer>, String);

/// How long a stopping member waits for the rest of what the broker sent it.
const HAND_BACK_WAIT: Duration = Duration::from_secs(2);
/// The longest a graceful stop spends handing requests back.
const HAND_BACK_LIMIT: Duration = Duration::from_secs(10);

/// Hands the requests the broker sent this member, and nobody took, back to their queue: the
/// consumer is cancelled (after `cancel-ok` the broker sends it nothing more, and everything
/// sent before has arrived), each request left is published again to the queue with its
/// properties (reply-to, correlation id, expiration) and confirmed, then the channel closes.
/// Another member answers them; a `send` waiting for its reply gets it from there.
async fn hand_back(inner: &Arc<Inner>, (ch, mut consumer, queue): Consuming) {
    let tag = consumer.get_ref().tag();
    let handing = async {
        ch.basic_cancel(tag, BasicCancelOptions::default())
            .await
            .map_err(|e| amqp_error("cancel the consumer", e))?;
        let mut handed = 0u64;
        while let Ok(Some(Ok(d))) = tokio::time::timeout(HAND_BACK_WAIT, consumer.next()).await {
            let s = inner.session().await?;
            confirmed(&s.confirm, "", &queue, false, &d.data, d.properties).await?;
            handed += 1;
        }
        Ok::<_, Error>(handed)
    };
    // Bounded as a whole: a stop during an outage does not wait for the broker.
    match tokio::time::timeout(HAND_BACK_LIMIT, handing).await {
        Ok(Ok(0)) => {}
        Ok(Ok(handed)) => {
            tracing::debug!(handed, %queue, "requests handed back to their queue at a graceful stop");
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, %queue, "requests not handed back to their queue");
        }
        Err(_) => tracing::warn!(%queue, "handing requests back to their queue took too long"),
    }
    let _ = tokio::time::timeout(HAND_BACK_WAIT, ch.close(200, "subscription closed".into())).await;
    drop(consumer);
}

struct SubState {
    inner: Arc<Inner>,
    source: Source,
    prefetch: usize,
    /// The channel, its consumer (ending when the transport closes) and the queue.
    current: Option<Consuming>,
    injected: mpsc::Receiver<Delivery>,
    /// Keeps `injected` open while the subscription lives.
    _keep: mpsc::Sender<Delivery>,
    /// Where the consuming channel goes when the subscription is dropped, for a graceful stop
    /// to hand back what it holds ([`hand_back`]; requests only).
    back: Option<oneshot::Sender<Consuming>>,
}

impl SubState {
    /// The next delivery, resubscribing after a lost connection; `None` once the transport
    /// is closed.
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.current.is_none() {
                self.inner.session_wait().await?;
                match start_consumer(&self.inner, &self.source, self.prefetch).await {
                    Ok((ch, consumer, queue)) => {
                        tracing::info!(source = ?self.source, "RabbitMQ subscription resumed");
                        self.current = Some((ch, self.inner.closed.guard(consumer), queue));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "RabbitMQ resubscribe failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                            _ = self.inner.closed.closed() => return None,
                        }
                        continue;
                    }
                }
            }
            let (_, consumer, queue) = self.current.as_mut()?;
            // The consumer ends when the transport closes (its close is only waited for while
            // nothing is ready), and a lost session is waited for above.
            let next = tokio::select! {
                biased;
                d = self.injected.recv() => return d,
                n = consumer.next() => n,
            };
            match next {
                Some(Ok(d)) => return Some(to_delivery(&self.source, d)),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, %queue, "RabbitMQ consumer failed; resubscribing");
                    self.current = None;
                }
                // Closed: the channel is closed as the subscription is dropped.
                None if self.inner.closed.is_closed() => return None,
                None => self.current = None,
            }
        }
    }
}

impl Drop for SubState {
    fn drop(&mut self) {
        // Unsettled deliveries of this channel go back to the queue at once. The consumer is
        // dropped only once its channel is closed: lapin cancels a dropped consumer in the
        // background, and a cancel that meets its channel half-closed fails the whole
        // connection (lapin 4.12).
        let mut current = self.current.take();
        if let (Some(back), Some(c)) = (self.back.take(), current.take()) {
            // A graceful stop takes it; without one, it is closed below.
            current = back.send(c).err();
        }
        if let Some((ch, consumer, _)) = current
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = ch.close(200, "subscription closed".into()).await;
                drop(consumer);
            });
        }
    }
}

fn to_delivery(source: &Source, d: lapin::message::Delivery) -> Delivery {
    let lapin::message::Delivery {
        properties,
        data,
        acker,
        redelivered,
        ..
    } = d;
    if source.no_ack() {
        let inbox = matches!(source, Source::Inbox { .. });
        return delivery_from(
            &properties,
            data,
            source.pattern(),
            1,
            Box::new(NoAck),
            |env, _| {
                if inbox {
                    env.complete_reply(None);
                }
                if let Some(r) = properties.reply_to() {
                    // The AMQP reply-to is where the answer must go, whatever a header says
                    // (read from the property already unless a header overrode it).
                    if env.reply_to.as_deref() != Some(r.as_str()) {
                        env.reply_to = Some(r.as_str().to_owned());
                    }
                }
            },
        );
    }
    let attempt = match delivery_count(&properties) {
        Some(n) => n.saturating_add(1),
        None => 1 + u32::from(redelivered),
    };
    let acker = Box::new(RabbitAcker { acker: Some(acker) });
    delivery_from(
        &properties,
        data,
        source.pattern(),
        attempt,
        acker,
        |_, _| {},
    )
}

/// Acknowledges one AMQP delivery. A rejected delivery goes back to its queue after the
/// delay (the broker counts the delivery); an unsettled one goes back at once when dropped.
struct RabbitAcker {
    acker: Option<lapin::Acker>,
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        match self.acker.take() {
            Some(a) => a
                .ack(BasicAckOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| amqp_error("acknowledge", e)),
            None => Ok(()),
        }
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        let Some(a) = self.acker.take() else {
            return Ok(());
        };
        // The delivery is held (and counts against the prefetch) during the delay, then
        // requeued; if the connection drops meanwhile the broker requeues it anyway.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = a
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        });
        Ok(())
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        if let Some(a) = self.acker.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = a
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            });
        }
    }
}

/// Written without `async_trait`'s one boxed future for the whole body, which is as large as
/// the largest route's and was allocated (past the allocator's per-thread cache) and moved for
/// every reply too. Each route boxes only its own future.
impl Publisher for RabbitTransport {
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> BoxFuture<'async_trait, Result<()>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let inner = &self.inner;
        if let Err(e) = self.check_size(&msg) {
            return Box::pin(std::future::ready(Err(e)));
        }
        match route {
            Route::Event(pattern) => {
                Box::pin(inner.publish_confirmed(&inner.cfg.exchange, pattern, msg))
            }
            Route::DeadLetter(pattern) => {
                Box::pin(inner.publish_confirmed(&inner.cfg.dead_letter_exchange, pattern, msg))
            }
            Route::Request(pattern) => Box::pin(inner.publish_request_aside(pattern, msg)),
            Route::Reply(address) => Box::pin(inner.publish_reply(address, msg)),
        }
    }

    /// A reply (every request's answer) is one boxed future, the reply's publish: the
    /// default would box a future around [`Publisher::publish`]'s own box, and move the
    /// envelope into both. Replies go out on the unconfirmed channel, so the publish is also
    /// the broker's acceptance, as with the default.
    fn enqueue<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> BoxFuture<'async_trait, Result<Enqueued>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match route {
            Route::Reply(address) => prepared(self.check_size(&msg).map(|()| async move {
                self.inner.publish_reply(address, msg).await?;
                Ok(Enqueued::accepted())
            })),
            route => Box::pin(async move {
                self.publish(route, msg).await?;
                Ok(Enqueued::accepted())
            }),
        }
    }
}

impl Inner {
    /// An event or a dead letter: persistent, returned once the broker confirmed it.
    async fn publish_confirmed(
        self: &Arc<Self>,
        exchange: &str,
        pattern: &str,
        msg: Envelope,
    ) -> Result<()> {
        let s = self.session().await?;
        let props = properties(&msg, true, Kind::Message);
        confirmed(&s.confirm, exchange, pattern, false, &msg.payload, props).await
    }

    /// A `request`: mandatory, so a request no queue takes comes back from the broker.
    /// `request` returns at once, so the confirm is awaited aside and a returned request
    /// becomes a `no_responder` reply in the caller's inbox.
    async fn publish_request_aside(self: &Arc<Self>, pattern: &str, msg: Envelope) -> Result<()> {
        let s = self.session().await?;
        let props = with_expiration(properties(&msg, false, Kind::Request), &msg);
        let confirm = self
            .publish_request(&s.confirm, pattern, &msg.payload, props)
            .await?;
        let inbox = msg.reply_to.as_deref().and_then(|r| self.inbox_sender(r));
        let (id, pattern) = (msg.correlation_id, pattern.to_owned());
        tokio::spawn(async move {
            let error = match confirm.await {
                Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => return,
                Ok(Confirmation::Ack(Some(_))) => ReplyError {
                    code: "no_responder".into(),
                    message: format!("no handler is serving `{pattern}`"),
                },
                Ok(Confirmation::Nack(_)) => ReplyError {
                    code: "rejected".into(),
                    message: format!("the broker refused the request to `{pattern}` (nack)"),
                },
                // A lost connection fails waiting requests through the inbox.
                Err(_) => return,
            };
            if let Some(tx) = inbox {
                let mut reply = Envelope::new(pattern, Bytes::new());
                reply.correlation_id = id;
                reply.error = Some(error);
                let _ = tx.send(Delivery::new(reply, 1, Box::new(NoAck))).await;
            }
        });
        Ok(())
    }

    /// A reply, on the session's unconfirmed channel.
    async fn publish_reply(self: &Arc<Self>, address: &str, mut msg: Envelope) -> Result<()> {
        let s = self.session().await?;
        let props = properties(&msg, false, Kind::Reply);
        s.fast
            .basic_publish(
                "".into(),
                short(msg.take_reply_address(address))?,
                BasicPublishOptions::default(),
                &msg.payload,
                props,
            )
            .await
            .map(|_| ())
            .map_err(|e| amqp_error("publish a reply", e))
    }
}

/// The request's remaining time as its AMQP expiration, so the broker drops it unread once
/// it is worthless.
fn with_expiration(props: BasicProperties, msg: &Envelope) -> BasicProperties {
    match msg.time_left() {
        Some(left) => {
            props.with_expiration(itoa::Buffer::new().format(left.as_millis().max(1)).into())
        }
        None => props,
    }
}

#[async_trait]
impl Subscriber for RabbitTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        let source = match route {
            Route::Event(pattern) => Source::Event {
                pattern: pattern.to_owned(),
                group: opts.group.clone().ok_or_else(|| {
                    Error::invalid_config(
                        NAME,
                        format!("subscribing to events on `{pattern}` needs a consumer group"),
                    )
                })?,
            },
            Route::Request(pattern) => Source::Request {
                pattern: pattern.to_owned(),
            },
            Route::DeadLetter(pattern) => Source::DeadLetter {
                pattern: pattern.to_owned(),
            },
            Route::Reply(address) => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("reply address `{address}` is read through open_inbox"),
                ));
            }
        };
        Ok(subscription(self.inner.clone(), source, opts.prefetch)
            .await?
            .0)
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        let queue = queue_name(&[&self.inner.cfg.prefix, "reply", name]);
        let (sub, inject) = subscription(
            self.inner.clone(),
            Source::Inbox {
                queue: queue.clone(),
            },
            1000,
        )
        .await?;
        self.inner
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((queue.clone(), inject));
        Ok(Inbox::new(queue, sub).with_connection_lost(self.inner.lost.subscribe()))
    }
}

/// Removes a `send`'s waiter when the call ends, however it ends.
struct CallGuard<'a> {
    calls: &'a Calls,
    sends: &'a AtomicUsize,
    id: CorrelationId,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.calls.remove(&self.id);
        self.sends.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `send`: a request on the session's rpc channel, answered on direct reply-to and matched
/// by its correlation id.
///
/// Written without `async_trait`'s boxed body: with a live session (the usual case) the
/// request is checked, registered and its properties built before the future is made, so the
/// one future allocated per `send` holds the publish and the wait, not the envelope, the
/// session lookup and the properties as well. Without a live session the call waits for one
/// (within its deadline) first.
impl Requester for RabbitTransport {
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
        let inner = &self.inner;
        if inner.closed.is_closed() {
            return Box::pin(std::future::ready(Err(Error::closed(NAME))));
        }
        match inner.current() {
            Some(s) => prepared(self.start_call(s, pattern, msg, deadline)),
            None => Box::pin(async move {
                let timeout = deadline.saturating_duration_since(Instant::now());
                let s = match tokio::time::timeout_at(deadline, inner.session()).await {
                    Ok(s) => s?,
                    Err(_) => return Err(Error::timeout(NAME, timeout)),
                };
                self.start_call(s, pattern, msg, deadline)?.await
            }),
        }
    }

    fn late_replies(&self) -> Option<u64> {
        Some(self.inner.late.load(Ordering::Relaxed))
    }
}

impl RabbitTransport {
    /// A message over the configured size limit is refused before anything is sent.
    fn check_size(&self, msg: &Envelope) -> Result<()> {
        let max = self.inner.cfg.max_payload;
        if msg.payload.len() > max {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!(
                    "payload of {} bytes exceeds the limit of {max} bytes",
                    msg.payload.len()
                ),
            ));
        }
        Ok(())
    }

    /// Registers a `send` and builds its request; the future publishes it and waits for the
    /// reply until `deadline`.
    fn start_call<'a>(
        &'a self,
        s: Arc<Session>,
        pattern: &'a str,
        msg: Envelope,
        deadline: Instant,
    ) -> Result<impl Future<Output = Result<Envelope>> + Send + 'a> {
        let inner = &self.inner;
        let timeout = deadline.saturating_duration_since(Instant::now());
        let id = msg
            .correlation_id
            .ok_or_else(|| Error::invalid_config(NAME, "a request needs a correlation id"))?;
        let props = with_expiration(properties(&msg, false, Kind::Request), &msg)
            .with_reply_to(DIRECT_REPLY_TO.into());
        let payload = msg.payload;
        let (tx, mut rx) = oneshot::channel();
        inner.calls.insert(id, tx);
        let alone = inner.sends.fetch_add(1, Ordering::Relaxed) == 0;
        let guard = CallGuard {
            calls: &inner.calls,
            sends: &inner.sends,
            id,
        };
        // Alone, the call reads the replies itself (`DirectReplies`); otherwise the reader
        // task must be reading.
        let mut own = if alone {
            s.replies.pause();
            Some(s.replies.consumer.clone())
        } else {
            s.replies.resume();
            None
        };
        Ok(async move {
            let _guard = guard;
            let confirm = inner
                .publish_request(&s.rpc, pattern, &payload, props)
                .await?;
            // Not in confirm mode: resolves at once; a returned request is found by the
            // session's return collector and answered as `no_responder`.
            drop(confirm);
            let reply = std::future::poll_fn(|cx| {
                loop {
                    if let Poll::Ready(r) = rx.poll_unpin(cx) {
                        return Poll::Ready(r);
                    }
                    let Some(replies) = own.as_mut() else {
                        return Poll::Pending;
                    };
                    match replies.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(d))) => deliver_reply(&inner.calls, &inner.late, d),
                        Poll::Ready(_) => {
                            // The replies ended (the connection was lost): the reader task
                            // fails the waiting calls, this one among them.
                            own = None;
                            s.replies.resume();
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            });
            tokio::select! {
                r = reply => r.map(|mut reply| {
                    if let Some(e) = reply
                        .error
                        .as_mut()
                        .filter(|e| e.code == "no_responder" && e.message.is_empty())
                    {
                        e.message = format!("no handler is serving `{pattern}`");
                    }
                    reply
                }).map_err(|_| {
                    Error::new(
                        ErrorKind::Connection,
                        NAME,
                        "connection to RabbitMQ lost while waiting for the reply; the request may or may not have been handled",
                    )
                }),
                () = tokio::time::sleep_until(deadline) => Err(Error::timeout(NAME, timeout)),
            }
        })
    }
}

#[async_trait]
impl Transport for RabbitTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(self.inner.cfg.max_payload)
            .native_request(true)
            .detects_no_responder(true)
            .redelivery_on_nack(true)
            .durable(true)
    }

    fn requester(&self) -> Option<&dyn Requester> {
        Some(self)
    }

    async fn close(&self) -> Result<()> {
        let session = self.inner.current();
        self.inner.closed.close();
        let Some(s) = session else { return Ok(()) };
        let queues =
            std::mem::take(&mut *self.inner.inboxes.lock().unwrap_or_else(|p| p.into_inner()));
        let delete = async {
            for (q, _) in queues {
                if let Ok(name) = short(&q) {
                    let _ = s
                        .fast
                        .queue_delete(name, QueueDeleteOptions::default())
                        .await;
                }
            }
        };
        if tokio::time::timeout(DELETE_INBOXES_WITHIN, delete)
            .await
            .is_err()
        {
            // They expire on their own (`x-expires`) once nobody uses them.
            tracing::debug!("RabbitMQ reply queues not deleted within {DELETE_INBOXES_WITHIN:?}");
        }
        match tokio::time::timeout(
            CLOSE_HANDSHAKE_WITHIN,
            s.conn.close(200, "client shutdown".into()),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Err(_) => {
                tracing::debug!(
                    "RabbitMQ close handshake not finished within {CLOSE_HANDSHAKE_WITHIN:?}; connection dropped"
                );
                Ok(())
            }
            // A consumer cancelled in the background as the transport closed (the reply reader
            // ends with it) can meet its channel half-closed; lapin then ends the connection
            // with that error instead of the close handshake. The connection is gone all the same.
            Ok(Err(e)) if matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..)) => {
                tracing::debug!(error = %e, "RabbitMQ connection ended during its close");
                Ok(())
            }
            Ok(Err(e)) => Err(amqp_error("close the connection", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_finds_its_call_by_the_correlation_id_it_echoes() {
        let calls = Calls::default();
        let id = CorrelationId::new();
        let (tx, mut rx) = oneshot::channel();
        calls.insert(id, tx);
        // Garbled or foreign ids belong to no call, and leave the call waiting.
        for other in ["", "42", "not-a-uuid", &CorrelationId::new().to_string()] {
            let props = BasicProperties::default().with_correlation_id(other.into());
            assert!(waiter_of(&calls, &props).is_none(), "{other:?}");
        }
        assert!(waiter_of(&calls, &BasicProperties::default()).is_none());
        assert_eq!(calls.len(), 1);
        // The echoed id, whatever its case, finds the call once.
        let props =
            BasicProperties::default().with_correlation_id(id.to_string().to_uppercase().into());
        let tx = waiter_of(&calls, &props).expect("the waiting call");
        assert!(calls.is_empty());
        assert!(waiter_of(&calls, &props).is_none(), "answered once");
        tx.send(Envelope::new("p", Bytes::new())).expect("sent");
        assert!(rx.try_recv().is_ok());
    }
}
