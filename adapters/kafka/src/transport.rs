//! The Kafka transport: a producer shared by every publish, a consumer per subscription in a
//! consumer group, and a reply topic per client instance read by manual assignment.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use switchboard_core::envelope::system_time_to_millis;
use switchboard_core::transport::{
    Acker, Capabilities, CloseSignal, Confirmation, Delivery, Inbox, NoAck, Publisher, Route,
    SubscribeOptions, Subscriber, Subscription, Transport,
};
use switchboard_core::{CorrelationId, Envelope, Error, ErrorKind, MessageId, Result, header};
use tokio::sync::mpsc;

use crate::codec::PackedHeaders;
use crate::{KafkaConfig, NAME};

/// Header with the deliveries a message had before this copy was published (a retry).
pub const ATTEMPT: &str = "sb-attempt";
/// Header with the time (ms since the Unix epoch) before which a retried message is not handed
/// to a handler.
pub const NOT_BEFORE: &str = "sb-not-before";

/// Largest record value accepted: librdkafka's default `message.max.bytes` (1 MB) less room
/// for the headers.
const MAX_PAYLOAD: usize = 1_000_000 - 16 * 1024;

/// The Kafka transport.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KafkaConfig,
    producer: FutureProducer<ProducerWatch>,
    admin: AdminClient<DefaultClientContext>,
    /// The topics of event, request and dead-letter patterns (by pattern), and reply topics
    /// (by name), once used.
    topics: [DashMap<String, Arc<Topic>>; 4],
    closed: CloseSignal,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn check_size(payload: &[u8]) -> Result<()> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            NAME,
            format!(
                "payload of {} bytes exceeds the limit of {MAX_PAYLOAD} bytes",
                payload.len()
            ),
        ));
    }
    Ok(())
}

/// One record for the producer: a record without headers gets no header list.
fn record<'a>(
    topic: &'a TopicRef,
    payload: &'a [u8],
    headers: Option<OwnedHeaders>,
    key: Option<&'a str>,
) -> FutureRecord<'a, str, [u8]> {
    let mut record = FutureRecord::to(topic.as_str()).payload(payload);
    if let Some(h) = headers {
        record = record.headers(h);
    }
    if let Some(k) = key {
        record = record.key(k);
    }
    record
}

/// The wait for the broker's acknowledgement of one record: librdkafka's delivery report,
/// and a timer only when the publish must give up sooner than librdkafka does. A named
/// future of a few words (publishes are boxed by the transport trait: every byte of the
/// future is allocated and moved per message).
struct Ack {
    topic: TopicRef,
    delivery: rdkafka::producer::DeliveryFuture,
    timer: Option<(Duration, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl Ack {
    fn new(
        topic: TopicRef,
        delivery: rdkafka::producer::DeliveryFuture,
        within: Option<Duration>,
    ) -> Self {
        Ack {
            topic,
            delivery,
            timer: within.map(|w| (w, Box::pin(tokio::time::sleep(w)))),
        }
    }
}

impl Future for Ack {
    type Output = Result<()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(outcome) = std::pin::Pin::new(&mut this.delivery).poll(cx) {
            return Poll::Ready(match outcome {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(kafka_error(&format!("publishing to `{}`", this.topic), e)),
                Err(futures::channel::oneshot::Canceled) => Err(Error::closed(NAME)),
            });
        }
        if let Some((within, timer)) = &mut this.timer
            && timer.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(Error::new(
                ErrorKind::Timeout,
                NAME,
                format!(
                    "publishing to `{}`: no acknowledgement within {within:?} (the record may still be stored)",
                    this.topic
                ),
            )));
        }
        Poll::Pending
    }
}

fn kafka_error(context: &str, e: KafkaError) -> Error {
    let kind = match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => ErrorKind::PayloadTooLarge,
        Some(RDKafkaErrorCode::MessageTimedOut) => ErrorKind::Timeout,
        Some(RDKafkaErrorCode::InvalidConfig) => ErrorKind::InvalidConfig,
        _ => ErrorKind::Connection,
    };
    Error::new(kind, NAME, format!("{context}: {e}")).with_source(e)
}

impl KafkaTransport {
    /// Connects: checks that a broker answers within the connect timeout.
    ///
    /// # Errors
    /// `InvalidConfig` for settings librdkafka refuses, `Connection` if no broker answers.
    pub async fn connect(cfg: KafkaConfig) -> Result<Self> {
        let mut pc = cfg.client_config();
        pc.set("acks", "all")
            // librdkafka gives up on a record after this and says so: a publish needs no
            // timer of its own unless its deadline comes sooner.
            .set(
                "message.timeout.ms",
                cfg.publish_timeout.as_millis().to_string(),
            )
            .set("linger.ms", cfg.linger.as_millis().to_string())
            .set("batch.num.messages", cfg.batch_records.to_string());
        let watch = ProducerWatch::default();
        let producer: FutureProducer<ProducerWatch> = pc
            .create_with_context(watch.clone())
            .map_err(|e| kafka_error("creating the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = cfg
            .client_config()
            .create()
            .map_err(|e| kafka_error("creating the admin client", e))?;
        let probe = producer.clone();
        let within = cfg.connect_timeout;
        let probed =
            tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, within))
                .await
                .map_err(|e| Error::new(ErrorKind::Connection, NAME, e.to_string()))?;
        if let Err(e) = probed {
            let brokers = cfg.brokers.join(",");
            return Err(match watch.refusal(&brokers).await {
                Some(refused) => refused.with_source(e),
                None => kafka_error(&format!("no broker of {brokers} answered"), e),
            });
        }
        Ok(KafkaTransport {
            inner: Arc::new(Inner {
                cfg,
                producer,
                admin,
                topics: Default::default(),
                closed: CloseSignal::new(),
            }),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.cfg
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.is_closed() {
            Err(Error::closed(NAME))
        } else {
            Ok(())
        }
    }

    /// The topic of `route` if it is known to exist already: no wait, no allocation.
    fn known_topic(&self, route: Route<'_>) -> Option<Arc<Topic>> {
        let (slot, key) = match route {
            Route::Event(p) => (0, p),
            Route::Request(p) => (1, p),
            Route::DeadLetter(p) => (2, p),
            Route::Reply(name) => (3, name),
        };
        self.inner.topics[slot]
            .get(key)
            .filter(|t| t.created.initialized())
            .map(|t| t.clone())
    }

    /// The topic of `route`, known to exist (created with the configured partitions, one for a
    /// reply topic, when missing). Concurrent first uses wait for one creation.
    async fn topic(&self, route: Route<'_>) -> Result<Arc<Topic>> {
        let (slot, key, partitions) = match route {
            Route::Event(p) => (0, p, self.inner.cfg.partitions),
            Route::Request(p) => (1, p, self.inner.cfg.partitions),
            Route::DeadLetter(p) => (2, p, self.inner.cfg.partitions),
            Route::Reply(name) => (3, name, 1),
        };
        let map = &self.inner.topics[slot];
        let topic = match map.get(key) {
            Some(t) => t.clone(),
            None => map
                .entry(key.to_owned())
                .or_insert_with(|| {
                    let cfg = &self.inner.cfg;
                    let name = match route {
                        Route::Event(p) => cfg.name("evt", p),
                        Route::Request(p) => cfg.name("req", p),
                        Route::DeadLetter(p) => cfg.name("dlq", p),
                        Route::Reply(name) => name.to_owned(),
                    };
                    Arc::new(Topic {
                        name,
                        created: tokio::sync::OnceCell::new(),
                    })
                })
                .clone(),
        };
        if !topic.created.initialized() {
            // A failed creation leaves the cell empty: the next use tries again.
            topic
                .created
                .get_or_try_init(|| self.create_topic(&topic.name, partitions))
                .await?;
        }
        Ok(topic)
    }

    async fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        let new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.inner.cfg.replication),
        );
        let opts = AdminOptions::new().operation_timeout(Some(self.inner.cfg.connect_timeout));
        let results = self
            .inner
            .admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| kafka_error(&format!("creating topic `{topic}`"), e))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        NAME,
                        format!("creating topic `{t}`: {code}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Produces one record and waits for the broker's acknowledgement, at most `within`
    /// (`None`: the producer's `publish_timeout`).
    async fn produce(
        &self,
        topic: TopicRef,
        key: Option<&str>,
        headers: Option<OwnedHeaders>,
        payload: &[u8],
        within: Option<Duration>,
    ) -> Result<()> {
        self.enqueue_record(topic, key, headers, payload, within)
            .await?
            .await
    }

    /// Hands one record to the producer (its place in the partition's order is taken when
    /// this returns) and gives back the wait for the broker's acknowledgement, bounded by
    /// `within` from now, and in any case by the producer's `publish_timeout` (librdkafka
    /// then fails the record itself, so no timer is set for a bound that is not sooner). A
    /// full local queue is waited out until the bound.
    async fn enqueue_record(
        &self,
        topic: TopicRef,
        key: Option<&str>,
        headers: Option<OwnedHeaders>,
        payload: &[u8],
        within: Option<Duration>,
    ) -> Result<Ack> {
        check_size(payload)?;
        let mut record = record(&topic, payload, headers, key);
        let within = self.bound(within);
        let until = tokio::time::Instant::now() + within.unwrap_or(self.inner.cfg.publish_timeout);
        let delivery = loop {
            match self.inner.producer.send_result(record) {
                Ok(d) => break d,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if tokio::time::Instant::now() >= until {
                        return Err(Error::new(
                            ErrorKind::Overloaded,
                            NAME,
                            format!(
                                "publishing to `{topic}`: the producer's queue stayed full (queue.buffering.max.messages)"
                            ),
                        ));
                    }
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(kafka_error(&format!("publishing to `{topic}`"), e)),
            }
        };
        Ok(Ack::new(topic, delivery, within))
    }

    /// The wait a publish needs a timer for: `within` when it comes before librdkafka's own
    /// bound (`publish_timeout`), else none.
    fn bound(&self, within: Option<Duration>) -> Option<Duration> {
        within.filter(|w| *w < self.inner.cfg.publish_timeout)
    }

    /// The common case without waiting: the topic is known and the producer's queue has room.
    /// `None` sends the caller down the path that can wait ([`Self::enqueue_message`]).
    fn enqueue_now(&self, route: Route<'_>, msg: &Envelope) -> Option<Result<Ack>> {
        if let Err(e) = self.check_open().and_then(|()| check_size(&msg.payload)) {
            return Some(Err(e));
        }
        let topic = match route {
            Route::Reply(address) => TopicRef::Named(address.to_owned()),
            _ => TopicRef::Known(self.known_topic(route)?),
        };
        let headers = crate::codec::record_headers(msg, route);
        let record = record(&topic, &msg.payload, headers, msg.key.as_deref());
        let sent = match self.inner.producer.send_result(record) {
            Ok(d) => Ok(d),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => return None,
            Err((e, _)) => Err(e),
        };
        Some(match sent {
            Ok(d) => {
                let within = self.bound(msg.time_left().filter(|d| !d.is_zero()));
                Ok(Ack::new(topic, d, within))
            }
            Err(e) => Err(kafka_error(&format!("publishing to `{topic}`"), e)),
        })
    }

    /// Settings of a consumer in `group` that stores offsets only when told to.
    fn consumer_config(&self, group: &str) -> rdkafka::ClientConfig {
        let cfg = &self.inner.cfg;
        let mut c = cfg.client_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.commit.interval.ms",
                cfg.commit_interval.as_millis().to_string(),
            )
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", cfg.fetch_wait.as_millis().to_string())
            .set("enable.partition.eof", "false");
        c
    }

    fn consumer(&self, group: &str) -> Result<(GroupConsumer, tokio::sync::watch::Receiver<bool>)> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let consumer = self
            .consumer_config(group)
            .create_with_context(Joined(tx))
            .map_err(|e| kafka_error(&format!("creating a consumer in group `{group}`"), e))?;
        Ok((consumer, rx))
    }
}

/// Logs librdkafka's client-wide errors through `tracing` (they are retried by librdkafka).
fn log_client_error(error: &KafkaError, reason: &str) {
    tracing::warn!(error = %error, reason, "kafka client");
}

/// The producer's context: logs librdkafka's client-wide errors and keeps the last refusal
/// (credentials or TLS), so that a connect that finds no broker says why instead of only that
/// none answered.
#[derive(Default, Clone)]
struct ProducerWatch(Arc<Refusal>);

#[derive(Default)]
struct Refusal {
    last: Mutex<Option<(RDKafkaErrorCode, String)>>,
    /// Told when a refusal is kept: librdkafka reports it from its polling thread, which may
    /// come a little after the metadata request failed.
    kept: tokio::sync::Notify,
}

impl ClientContext for ProducerWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
        if let Some(code @ (RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)) =
            error.rdkafka_error_code()
        {
            *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((code, reason.to_owned()));
            self.0.kept.notify_one();
        }
    }
}

impl ProducerWatch {
    /// Why connecting failed, if librdkafka said more than that no broker answered; waits
    /// at most `REFUSAL_WAIT` for it to say so.
    async fn refusal(&self, brokers: &str) -> Option<Error> {
        let taken = || {
            self.0
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        let last = match taken() {
            Some(l) => l,
            None => {
                let _ = tokio::time::timeout(REFUSAL_WAIT, self.0.kept.notified()).await;
                taken()?
            }
        };
        Some(match last {
            (RDKafkaErrorCode::Authentication, reason) => Error::new(
                ErrorKind::Unauthenticated,
                NAME,
                format!("{brokers} refused the credentials: {reason}"),
            ),
            (_, reason) => Error::new(
                ErrorKind::Connection,
                NAME,
                format!("TLS with {brokers} failed: {reason}"),
            ),
        })
    }
}

/// How long a failed connect waits for librdkafka to say why.
const REFUSAL_WAIT: Duration = Duration::from_millis(500);

/// The reply reader's context: counts the times every broker connection went down, so that
/// requests waiting for a reply fail at once (retryably) instead of at their deadline.
struct ReplyWatch(Arc<tokio::sync::watch::Sender<u64>>);

impl ClientContext for ReplyWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.0.send_modify(|n| *n += 1);
        }
        log_client_error(&error, reason);
    }
}

impl ConsumerContext for ReplyWatch {}

/// The topic a record goes to: one the transport knows (shared, no copy per record), or a
/// name given with the message (a reply address).
enum TopicRef {
    Known(Arc<Topic>),
    Named(String),
}

impl TopicRef {
    fn as_str(&self) -> &str {
        match self {
            TopicRef::Known(t) => &t.name,
            TopicRef::Named(n) => n,
        }
    }
}

impl std::fmt::Display for TopicRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topic the transport uses.
struct Topic {
    name: String,
    /// Set once the topic is known to exist.
    created: tokio::sync::OnceCell<()>,
}

/// Tells when the group first gave this member its partitions (none is an answer too).
struct Joined(tokio::sync::watch::Sender<bool>);

impl ClientContext for Joined {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(&error, reason);
    }
}

impl ConsumerContext for Joined {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Assign(_)) {
            self.0.send_replace(true);
        }
    }
}

type GroupConsumer = StreamConsumer<Joined>;

/// Offsets handed out and not yet settled, per partition: the committed position of a
/// partition is its lowest unsettled offset, so nothing unhandled is ever committed past.
#[derive(Default)]
struct Offsets {
    partitions: HashMap<i32, Partition>,
}

#[derive(Default)]
struct Partition {
    /// Offsets handed out, in the order read (increasing), each with whether it is settled;
    /// the settled ones at the front are let go as the position moves past them.
    pending: VecDeque<(i64, bool)>,
    /// Highest offset handed out.
    top: i64,
    /// Position last stored for commit (the next offset to read).
    stored: i64,
    /// Position reached by the settled records (stored later when ahead of `stored`).
    point: i64,
}

/// A settled position moved at least this far past the stored one is stored at once; a
/// smaller move waits up to [`STORE_DELAY`] for the ones after it (one store for many records
/// instead of one per record).
const STORE_BATCH: i64 = 256;
const STORE_DELAY: Duration = Duration::from_millis(20);

/// What a settle asks of the caller.
#[derive(Debug, PartialEq)]
enum Store {
    /// Store this position now.
    Now(i64),
    /// The position moved: have it stored within [`STORE_DELAY`].
    Later,
    /// Nothing to do (no move, or a store is already due).
    Nothing,
}

impl Offsets {
    fn taken(&mut self, partition: i32, offset: i64) {
        let p = self.partitions.entry(partition).or_default();
        // A partition is read in order; a record read again (after a rebalance) starts over.
        if p.pending.back().is_some_and(|(last, _)| *last >= offset) {
            p.pending.retain(|(o, _)| *o < offset);
        }
        p.pending.push_back((offset, false));
        p.top = p.top.max(offset);
    }

    /// Marks `offset` settled and says whether the position to store moved.
    fn settled(&mut self, partition: i32, offset: i64) -> Store {
        let Some(p) = self.partitions.get_mut(&partition) else {
            return Store::Nothing;
        };
        if let Ok(i) = p.pending.binary_search_by_key(&offset, |(o, _)| *o) {
            p.pending[i].1 = true;
        }
        while p.pending.front().is_some_and(|(_, settled)| *settled) {
            p.pending.pop_front();
        }
        let point = p.pending.front().map_or(p.top + 1, |(o, _)| *o);
        if point <= p.point.max(p.stored) {
            return Store::Nothing;
        }
        let due = p.point > p.stored;
        p.point = point;
        if point - p.stored >= STORE_BATCH {
            p.stored = point;
            Store::Now(point)
        } else if due {
            Store::Nothing
        } else {
            Store::Later
        }
    }

    /// The positions settled and not yet stored, marked stored.
    fn unstored(&mut self) -> Vec<(i32, i64)> {
        self.partitions
            .iter_mut()
            .filter(|(_, p)| p.point > p.stored)
            .map(|(id, p)| {
                p.stored = p.point;
                (*id, p.point)
            })
            .collect()
    }
}

/// What a subscription's deliveries share: the consumer (to store offsets), its offsets, and
/// the lines of keyed deliveries waiting for an earlier one with the same key.
struct Shared {
    transport: KafkaTransport,
    consumer: Arc<GroupConsumer>,
    topic: String,
    pattern: String,
    offsets: Mutex<Offsets>,
    /// Keys with a delivery out (handed to the handler or waiting for its retry), each with
    /// the deliveries of that key read since, in partition order.
    lines: Mutex<HashMap<String, VecDeque<Delivery>>>,
    /// Deliveries for the reader to hand out next: a keyed record whose turn came, or a keyed
    /// record's retry.
    again: mpsc::UnboundedSender<Delivery>,
    /// Set when the consumer let go of the subscription: deliveries dropped from then on were
    /// never handed to a handler, and are left to the group (not retried).
    stopped: Arc<AtomicBool>,
    /// Wakes the task that stores settled positions a little later ([`store_later`]).
    unstored: Arc<tokio::sync::Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // What was settled is stored before the consumer closes (and commits it); the task
        // that stores later is let go.
        self.store_unstored();
        self.unstored.notify_one();
        // Closing a consumer (leaving its group, committing) blocks, for seconds on some
        // brokers: the last reference is let go on a thread of its own, not on the runtime.
        let consumer = self.consumer.clone();
        std::thread::spawn(move || drop(consumer));
    }
}

impl Shared {
    fn settle(&self, partition: i32, offset: i64) {
        let store = self
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settled(partition, offset);
        match store {
            Store::Now(point) => self.store(&[(partition, point)]),
            Store::Later => self.unstored.notify_one(),
            Store::Nothing => {}
        }
    }

    /// Stores the positions settled and not stored yet.
    fn store_unstored(&self) {
        let positions = self
            .offsets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unstored();
        if !positions.is_empty() {
            self.store(&positions);
        }
    }

    /// Stores positions for the next commit.
    fn store(&self, positions: &[(i32, i64)]) {
        // The position to commit is the next offset to read. (`store_offset`, librdkafka's
        // older call, would commit one past the offset given.)
        let mut tpl = TopicPartitionList::with_capacity(positions.len());
        let stored = positions
            .iter()
            .try_for_each(|(partition, point)| {
                tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(*point))
            })
            .and_then(|()| self.consumer.store_offsets(&tpl));
        if let Err(e) = stored {
            // A partition went to another member (a rebalance): it reads from the last
            // committed position, so these messages may come again there. At-least-once.
            tracing::debug!(topic = %self.topic, error = %e, "positions not stored");
        }
    }

    /// Takes `d` in its key's line: `Some(d)` when the key had nothing out (hand it out now),
    /// `None` when it waits behind an earlier delivery with the same key.
    fn line_up(&self, key: &str, d: Delivery) -> Option<Delivery> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        match lines.get_mut(key) {
            Some(line) => {
                line.push_back(d);
                None
            }
            None => {
                lines.insert(key.to_owned(), VecDeque::new());
                Some(d)
            }
        }
    }

    /// The delivery out for `key` is settled: the next in its line goes out, or the key is
    /// free.
    fn release(&self, key: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let next = match lines.get_mut(key) {
            Some(line) => line.pop_front(),
            None => return,
        };
        match next {
            Some(d) => {
                // Sent while the lock is held, so lines and the reader's queue agree on order.
                let _ = self.again.send(d);
            }
            None => {
                lines.remove(key);
            }
        }
    }
}

/// Settles one record. Ack stores its offset. Nack of a record without a key publishes a copy
/// with the attempt count and a not-before time (the partition is not held up), then stores
/// the offset; a record with a key is handed out again here after the delay, its key held, so
/// its successors with that key wait for it (order per key).
struct KafkaAcker {
    shared: Arc<Shared>,
    partition: i32,
    offset: i64,
    /// This delivery's attempt (1 for the first).
    attempt: u32,
    key: Option<String>,
    record: Record,
    settled: bool,
}

impl KafkaAcker {
    /// Publishes the record again, due after `delay`, carrying the deliveries so far.
    async fn republish(&self, delay: Duration) -> Result<()> {
        let not_before = system_time_to_millis(SystemTime::now() + delay);
        let headers = &self.record.headers;
        let mut h = OwnedHeaders::new_with_capacity(headers.len() + 3);
        // The copy carries the record's headers but its own attempt count and due time, and
        // the id the record was read with (stored elsewhere, the copy would imply another).
        for (k, v) in headers.iter().filter(|(k, _)| !is_retry_header(k)) {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut id = [0u8; 36];
        if let Some(implied) = &self.record.implied {
            h = h.insert(Header {
                key: header::ID,
                value: Some(implied.encode(&mut id).as_bytes()),
            });
        }
        let attempt = self.attempt.to_string();
        let not_before = not_before.to_string();
        h = h
            .insert(Header {
                key: ATTEMPT,
                value: Some(attempt.as_bytes()),
            })
            .insert(Header {
                key: NOT_BEFORE,
                value: Some(not_before.as_bytes()),
            });
        self.shared
            .transport
            .produce(
                TopicRef::Named(self.shared.topic.clone()),
                self.key.as_deref(),
                Some(h),
                &self.record.payload,
                None,
            )
            .await
    }

    /// Hands the record out again from this member after `delay`, as the next attempt; its
    /// offset stays unsettled (and its key held) until that attempt settles.
    fn redeliver(&mut self, delay: Duration) {
        self.settled = true;
        let attempt = self.attempt + 1;
        let next = KafkaAcker {
            shared: self.shared.clone(),
            partition: self.partition,
            offset: self.offset,
            attempt,
            key: self.key.take(),
            record: self.record.clone(),
            settled: false,
        };
        let d = self
            .record
            .delivery(&self.shared.pattern, attempt, Box::new(next));
        let again = self.shared.again.clone();
        if delay.is_zero() {
            let _ = again.send(d);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = again.send(d);
            });
        }
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        self.shared.settle(self.partition, self.offset);
        if let Some(k) = &self.key {
            self.shared.release(k);
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        if self.key.is_some() {
            self.redeliver(delay);
            return Ok(());
        }
        match self.republish(delay).await {
            Ok(()) => {
                self.settled = true;
                self.shared.settle(self.partition, self.offset);
            }
            Err(e) => {
                // Not lost, not stuck: this member hands it out again itself.
                tracing::warn!(topic = %self.shared.topic, error = %e, "retry not published; redelivering here");
                self.redeliver(delay);
            }
        }
        Ok(())
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if self.settled || self.shared.stopped.load(Ordering::Acquire) {
            // Settled; or the subscription is gone: the offset stays uncommitted and the
            // group reads the record again (here after a restart, or on another member).
            return;
        }
        // Dropped unsettled while the subscription reads on.
        if self.key.is_some() {
            // Out again at once, its key still held.
            self.redeliver(Duration::ZERO);
            return;
        }
        // Published again as a retry due at once; its offset is released after that.
        let again = KafkaAcker {
            shared: self.shared.clone(),
            partition: self.partition,
            offset: self.offset,
            attempt: self.attempt,
            key: None,
            record: self.record.clone(),
            settled: true,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if again.republish(Duration::ZERO).await.is_ok() {
                    again.shared.settle(again.partition, again.offset);
                }
            });
        }
    }
}

fn is_retry_header(name: &str) -> bool {
    name == ATTEMPT || name == NOT_BEFORE
}

/// What a reader takes out of a record before letting it go.
#[derive(Clone)]
struct Record {
    headers: PackedHeaders,
    /// Why the headers could not be read (then `headers` is empty).
    bad_headers: Option<String>,
    payload: Bytes,
    /// The id of a record without `ce-id` (an event): derived from its place in its partition.
    implied: Option<MessageId>,
}

impl Record {
    /// A record of a group subscription: one without `ce-id` (an event) takes the id its
    /// place in the partition implies.
    fn of(msg: &impl Message) -> Self {
        Self::read(msg, |_| {
            Some(crate::codec::implied_id(
                msg.topic(),
                msg.partition(),
                msg.offset(),
                msg.timestamp().to_millis(),
            ))
        })
    }

    /// A reply: one without `ce-id` (the usual case) takes its request's id, which its
    /// correlation id names.
    fn reply(msg: &impl Message) -> Self {
        Self::read(msg, |headers| {
            let correlation = headers.get(header::CORRELATION_ID)?;
            correlation
                .parse::<CorrelationId>()
                .ok()
                .map(MessageId::from)
        })
    }

    /// `implied` gives the id of a record without `ce-id`.
    fn read(msg: &impl Message, implied: impl FnOnce(&PackedHeaders) -> Option<MessageId>) -> Self {
        let packed = match msg.headers() {
            None => Ok(PackedHeaders::default()),
            Some(hs) => PackedHeaders::pack(|| hs.iter().map(|h| (h.key, h.value))),
        };
        let (headers, bad_headers) = match packed {
            Ok(h) => (h, None),
            Err(reason) => (PackedHeaders::default(), Some(reason)),
        };
        let implied = if headers.get(header::ID).is_none() {
            implied(&headers)
        } else {
            None
        };
        Record {
            headers,
            bad_headers,
            payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
            implied,
        }
    }

    /// The delivery of this record (malformed if its headers do not parse), without the
    /// transport's own retry headers.
    fn delivery(&self, pattern: &str, attempt: u32, acker: Box<dyn Acker>) -> Delivery {
        let pairs = self.headers.iter().filter(|(k, _)| !is_retry_header(k));
        let bad = self.bad_headers.clone();
        Delivery::read(
            pairs,
            self.payload.clone(),
            pattern,
            self.implied,
            attempt,
            acker,
            |env, malformed| {
                if let Some(reason) = bad {
                    *malformed = Some(reason);
                }
                // A request without `sb-correlation-id` is correlated by its own id.
                if env.reply_to.is_some() && env.correlation_id.is_none() {
                    env.correlation_id = Some(CorrelationId::from(env.id));
                }
            },
        )
    }
}

// Written out rather than through `#[async_trait]`: the common publish is done before any
// future exists, and only the small wait for the acknowledgement is boxed (an async body
// would box the envelope, twice over, with every publish).
impl Publisher for KafkaTransport {
    fn publish<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match self.enqueue_now(route, &msg) {
            Some(Ok(ack)) => Box::pin(ack),
            Some(Err(e)) => Box::pin(std::future::ready(Err(e))),
            None => Box::pin(async move { self.enqueue_message(route, &msg).await?.await }),
        }
    }

    fn enqueue<'life0, 'life1, 'async_trait>(
        &'life0 self,
        route: Route<'life1>,
        msg: Envelope,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Confirmation>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        match self.enqueue_now(route, &msg) {
            Some(ack) => Box::pin(std::future::ready(ack.map(Confirmation::pending))),
            None => Box::pin(async move {
                Ok(Confirmation::pending(
                    self.enqueue_message(route, &msg).await?,
                ))
            }),
        }
    }
}

impl KafkaTransport {
    /// [`KafkaTransport::enqueue_record`] for an envelope on a route.
    async fn enqueue_message(&self, route: Route<'_>, msg: &Envelope) -> Result<Ack> {
        self.check_open()?;
        let headers = crate::codec::record_headers(msg, route);
        let within = msg.time_left().filter(|d| !d.is_zero());
        let key = msg.key.as_deref();
        match route {
            // A reply goes to the requester's own topic, made when it opened its inbox.
            Route::Reply(address) => {
                self.enqueue_record(
                    TopicRef::Named(address.to_owned()),
                    key,
                    headers,
                    &msg.payload,
                    within,
                )
                .await
            }
            _ => {
                let topic = self.topic(route).await?;
                self.enqueue_record(TopicRef::Known(topic), key, headers, &msg.payload, within)
                    .await
            }
        }
    }
}

#[async_trait]
impl Subscriber for KafkaTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let cfg = &self.inner.cfg;
        let (pattern, group) = match route {
            Route::Event(p) => {
                let group = opts.group.as_deref().ok_or_else(|| {
                    Error::invalid_config(
                        NAME,
                        format!("subscribing to events on `{p}` needs a consumer group"),
                    )
                })?;
                (p, cfg.name("grp", &format!("{group}.evt.{p}")))
            }
            Route::Request(p) => (p, cfg.name("grp", &format!("req.{p}"))),
            Route::DeadLetter(p) => (p, cfg.name("grp", &format!("dlq.{p}"))),
            Route::Reply(address) => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("reply address `{address}` is read through open_inbox"),
                ));
            }
        };
        let topic = self.topic(route).await?.name.clone();
        let (consumer, mut joined) = self.consumer(&group)?;
        let consumer = Arc::new(consumer);
        consumer
            .subscribe(&[topic.as_str()])
            .map_err(|e| kafka_error(&format!("subscribing to `{topic}`"), e))?;
        let (again_tx, again_rx) = mpsc::unbounded_channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let unstored = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            transport: self.clone(),
            consumer: consumer.clone(),
            topic,
            pattern: pattern.to_owned(),
            offsets: Mutex::new(Offsets::default()),
            lines: Mutex::new(HashMap::new()),
            again: again_tx,
            stopped: stopped.clone(),
            unstored: unstored.clone(),
        });
        tokio::spawn(store_later(Arc::downgrade(&shared), unstored));
        let positions = Arc::downgrade(&shared);
        let mut reader = Reader {
            _stop: StopGuard(stopped),
            shared,
            again: again_rx,
            closed: self.inner.closed.clone(),
            early: VecDeque::new(),
        };
        // A handler is reachable once this returns: wait for the group to hand this member
        // its partitions (reading from the group's committed position, or the start). The
        // consumer is polled meanwhile, which is what serves the group's assignment.
        let within = cfg.connect_timeout.max(Duration::from_secs(30));
        let join = async {
            loop {
                let read = tokio::select! {
                    biased;
                    j = joined.wait_for(|j| *j) => return j.is_ok(),
                    d = reader.read() => d,
                };
                match read {
                    Some(d) => reader.early.push_back(d),
                    None => return false,
                }
            }
        };
        if !tokio::time::timeout(within, join).await.unwrap_or(false) {
            return Err(Error::new(
                ErrorKind::Connection,
                NAME,
                format!("group `{group}` gave this member no partitions within {within:?}"),
            ));
        }
        // Read in the consumer's own task as it asks for deliveries: no task or channel
        // between the broker client and the handler.
        let stream = futures::stream::unfold(reader, |mut r| async move {
            let d = r.read().await?;
            Some((d, r))
        });
        // A graceful stop commits what was handled before it returns, so the member that
        // takes the partitions next starts after it (the periodic commit may not have run).
        let finish = async move {
            if let Some(shared) = positions.upgrade() {
                shared.store_unstored();
            }
            let commit = tokio::task::spawn_blocking(move || {
                consumer.commit_consumer_state(CommitMode::Sync)
            });
            match commit.await {
                Ok(Ok(())) | Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
                Ok(Err(e)) => {
                    tracing::warn!(group = %group, error = %e, "committing at shutdown; handled records may come again");
                }
                Err(e) => tracing::warn!(group = %group, error = %e, "committing at shutdown"),
            }
        };
        Ok(Subscription::new(stream).with_finish(finish))
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        self.check_open()?;
        let topic = self.inner.cfg.name("reply", name);
        self.create_topic(&topic, 1).await?;
        // Read by assignment, not by a group: no join, no rebalance, the topic is this
        // instance's alone. librdkafka still wants a group id.
        let lost = Arc::new(tokio::sync::watch::channel(0u64).0);
        let consumer: StreamConsumer<ReplyWatch> = self
            .consumer_config(&topic)
            .create_with_context(ReplyWatch(lost.clone()))
            .map_err(|e| kafka_error("creating the reply reader", e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|e| kafka_error("assigning the reply topic", e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| kafka_error(&format!("reading `{topic}`"), e))?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let closed = self.inner.closed.clone();
        let fallback = topic.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = closed.closed() => return,
                    m = consumer.recv() => m,
                };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(topic = %fallback, error = %e, "reading replies");
                        continue;
                    }
                };
                let mut d = Record::reply(&msg).delivery(&fallback, 1, Box::new(NoAck));
                // A causation left out is the correlation id (the request's id).
                d.envelope_mut().complete_reply(None);
                if tx.send(d).is_err() {
                    return;
                }
            }
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Inbox::new(topic, Subscription::new(stream)).with_connection_lost(lost.subscribe()))
    }
}

/// Stores a subscription's settled positions [`STORE_DELAY`] after a settle asked for it,
/// until the subscription is gone.
async fn store_later(shared: std::sync::Weak<Shared>, wake: Arc<tokio::sync::Notify>) {
    loop {
        wake.notified().await;
        tokio::time::sleep(STORE_DELAY).await;
        match shared.upgrade() {
            Some(s) => s.store_unstored(),
            None => return,
        }
    }
}

/// Marks a subscription stopped when its reader is dropped, before the deliveries the reader
/// still holds go: those were never handed out, so they are left to the group rather than
/// retried.
struct StopGuard(Arc<AtomicBool>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The reader of one group subscription, run as its consumer asks for deliveries: records
/// become deliveries; a retry not yet due waits in a task of its own, and a keyed record waits
/// in its key's line, so the records behind them are not held up.
struct Reader {
    /// First, so it is dropped first.
    _stop: StopGuard,
    shared: Arc<Shared>,
    /// Deliveries handed out again: a keyed record whose turn came, a retry that is due.
    again: mpsc::UnboundedReceiver<Delivery>,
    closed: CloseSignal,
    /// Read while the subscription was still being set up.
    early: VecDeque<Delivery>,
}

impl Reader {
    /// The next delivery; `None` once the transport is closed.
    async fn read(&mut self) -> Option<Delivery> {
        if let Some(d) = self.early.pop_front() {
            return Some(d);
        }
        loop {
            let msg = tokio::select! {
                biased;
                () = self.closed.closed() => return None,
                Some(d) = self.again.recv() => return Some(d),
                m = self.shared.consumer.recv() => m,
            };
            match msg {
                Ok(m) => {
                    if let Some(d) = take(&self.shared, &m) {
                        return Some(d);
                    }
                }
                Err(e) => tracing::warn!(topic = %self.shared.topic, error = %e, "consuming"),
            }
        }
    }
}

/// A record read: its delivery now, or `None` when it waits (behind an earlier record with its
/// key, or for the due time of a retry).
fn take(shared: &Arc<Shared>, msg: &impl Message) -> Option<Delivery> {
    let (partition, offset) = (msg.partition(), msg.offset());
    let record = Record::of(msg);
    let key = msg
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::to_owned);
    let before: u32 = record
        .headers
        .get(ATTEMPT)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let not_before = record
        .headers
        .get(NOT_BEFORE)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
    shared
        .offsets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .taken(partition, offset);
    let attempt = before + 1;
    let acker = Box::new(KafkaAcker {
        shared: shared.clone(),
        partition,
        offset,
        attempt,
        key: key.clone(),
        record: record.clone(),
        settled: false,
    });
    let d = record.delivery(&shared.pattern, attempt, acker);
    let d = match &key {
        Some(k) => shared.line_up(k, d)?,
        None => d,
    };
    match not_before.and_then(|t| t.duration_since(SystemTime::now()).ok()) {
        Some(wait) if !wait.is_zero() => {
            let again = shared.again.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = again.send(d);
            });
            None
        }
        _ => Some(d),
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MAX_PAYLOAD)
            .redelivery_on_nack(true)
            .ordered(true)
            .durable(true)
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.close();
        let producer = self.inner.producer.clone();
        let within = self.inner.cfg.publish_timeout;
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(within)))
            .await
            .map_err(|e| Error::new(ErrorKind::Connection, NAME, e.to_string()))?
            .map_err(|e| kafka_error("flushing the producer", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored position is the next offset to read and never passes an unsettled record,
    /// whatever order records are settled in; it is stored only when it moves.
    #[test]
    fn the_commit_position_stops_at_the_lowest_unsettled_record() {
        let mut o = Offsets::default();
        for offset in 0..3 {
            o.taken(0, offset);
        }
        o.taken(1, 7);
        assert_eq!(o.settled(0, 1), Store::Nothing, "offset 0 is still out");
        assert_eq!(o.settled(0, 0), Store::Later);
        assert_eq!(o.settled(0, 2), Store::Nothing, "a store is already due");
        assert_eq!(o.settled(1, 7), Store::Later);
        assert_eq!(
            o.settled(2, 0),
            Store::Nothing,
            "a partition never handed out"
        );
        let mut due = o.unstored();
        due.sort_unstable();
        assert_eq!(due, [(0, 3), (1, 8)], "the next offsets to read");
        assert!(o.unstored().is_empty(), "stored once");
    }

    /// Reading a partition again from an earlier offset (it came back after a rebalance)
    /// starts its bookkeeping over from there.
    #[test]
    fn a_partition_read_again_starts_over_from_the_earlier_offset() {
        let mut o = Offsets::default();
        for offset in 0..3 {
            o.taken(0, offset);
        }
        o.taken(0, 1);
        assert_eq!(
            o.settled(0, 2),
            Store::Nothing,
            "the earlier reading of 2 is forgotten"
        );
        assert_eq!(o.settled(0, 0), Store::Later);
        assert_eq!(o.unstored(), [(0, 1)], "1 is out again");
        assert_eq!(o.settled(0, 1), Store::Later);
        assert_eq!(o.unstored(), [(0, 3)]);
    }

    /// A position that moved a batch's worth is stored at once; the rest waits.
    #[test]
    fn a_long_run_of_settled_records_is_stored_at_once() {
        let mut o = Offsets::default();
        for offset in 0..STORE_BATCH + 1 {
            o.taken(0, offset);
        }
        for offset in 1..STORE_BATCH {
            assert_eq!(
                o.settled(0, offset),
                Store::Nothing,
                "offset 0 is still out"
            );
        }
        assert_eq!(o.settled(0, 0), Store::Now(STORE_BATCH));
        assert_eq!(o.settled(0, STORE_BATCH), Store::Later);
        assert_eq!(o.unstored(), [(0, STORE_BATCH + 1)]);
    }
}
