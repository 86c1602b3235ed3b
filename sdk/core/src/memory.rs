//! The in-memory transport, `memory://`: the embedded default.
//!
//! It keeps the same semantics as the brokers, so services can run their own tests on it:
//! consumer groups (fan-out across groups, competing members within one), acknowledgements,
//! redelivery after a nack with the requested delay, a delivery count per message, order per
//! key (a keyed message is not handed out while an earlier one with the same key is
//! unacknowledged, like an SQS FIFO message group), dead-letter queues that keep what they
//! receive, and a no-responder error for requests nobody handles.
//!
//! Clients that connect to the same URL (`memory://orders`) in one process share one bus;
//! `memory://` is the bus named `default`. Groups are durable for the life of the bus: events
//! emitted while a group has no member wait for the next one. An event emitted to a pattern
//! no group has ever subscribed to is dropped, as on a broker topic with no queues bound.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::WaitForCancellationFutureOwned;
use url::Url;

use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{
    Acker, Capabilities, CloseSignal, Delivery, DirectSlot, Inbox, NoAck, Publisher, Registered,
    Requester, Route, SubscribeOptions, Subscriber, Subscription, Transport,
};

/// The URL scheme of the in-memory transport.
pub const SCHEME: &str = "memory";
const NAME: &str = "memory";

/// Configuration of the in-memory transport.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Name of the bus; clients with the same name in one process share it. Default `default`.
    pub bus: String,
    /// Largest payload accepted, in bytes. Default 1 MiB (the NATS default), so code tested on
    /// memory does not break on a broker.
    pub max_payload: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            bus: "default".to_owned(),
            max_payload: 1024 * 1024,
        }
    }
}

impl MemoryConfig {
    /// Reads `memory://[bus][?max_payload=BYTES]`. Query keys that belong to the client
    /// (see [`crate::ClientConfig::URL_KEYS`]) are left for it.
    ///
    /// # Errors
    /// `InvalidConfig` for another scheme, an unknown option or a bad value.
    pub fn from_url(url: &Url) -> Result<Self> {
        if url.scheme() != SCHEME {
            return Err(Error::invalid_config(
                NAME,
                format!("expected a `memory://` URL, got scheme `{}`", url.scheme()),
            ));
        }
        let mut cfg = MemoryConfig::default();
        if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
            cfg.bus = host.to_owned();
        }
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "max_payload" => {
                    cfg.max_payload = v.parse().map_err(|_| {
                        Error::invalid_config(
                            NAME,
                            format!("`max_payload` must be a number of bytes, got `{v}`"),
                        )
                    })?
                }
                k if crate::ClientConfig::URL_KEYS.contains(&k) => {}
                other => {
                    return Err(Error::invalid_config(
                        NAME,
                        format!(
                            "unknown option `{other}` in memory URL (known: max_payload, timeout_ms)"
                        ),
                    ));
                }
            }
        }
        Ok(cfg)
    }

    /// Sets the bus name.
    pub fn bus(mut self, name: impl Into<String>) -> Self {
        self.bus = name.into();
        self
    }

    /// Sets the largest payload accepted.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }
}

static BUSES: LazyLock<Mutex<HashMap<String, Weak<Bus>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Locks a mutex, recovering from poisoning: every critical section here leaves the data
/// consistent, so a panic elsewhere must not wedge the bus.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Bus {
    /// Event pattern → consumer group → queue.
    topics: RwLock<HashMap<String, HashMap<String, Arc<Queue>>>>,
    requests: Mutex<HashMap<String, Arc<Queue>>>,
    dead_letters: Mutex<HashMap<String, Arc<Queue>>>,
    inboxes: Mutex<HashMap<String, mpsc::UnboundedSender<Arc<Envelope>>>>,
    /// `send`s waiting for their reply, by the number in their reply address
    /// (`_call.<n>`): the responder's reply goes straight to its caller.
    calls: dashmap::DashMap<u64, oneshot::Sender<Arc<Envelope>>, crate::envelope::IdHash>,
    next_call: AtomicU64,
    /// Replies to `_call.` addresses whose caller had stopped waiting.
    late: AtomicU64,
}

#[derive(Debug)]
struct Msg {
    /// Shared with its deliveries (and with every group's copy of an event): handed out
    /// without a copy.
    env: Arc<Envelope>,
    /// Deliveries so far.
    attempt: u32,
    /// Why the message could not be read, for a malformed foreign message.
    malformed: Option<String>,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: VecDeque<Msg>,
    /// Keys with a delivery out that is neither acked nor back in `ready`.
    keys_out: HashSet<String>,
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
    consumers: AtomicUsize,
    /// Request handlers that take a `send` in the caller's own task while they have room.
    direct: Arc<DirectSlot>,
}

impl Queue {
    fn push(&self, msg: Msg) {
        lock(&self.state).ready.push_back(msg);
        self.notify.notify_one();
    }

    /// Takes the first message whose key has nothing out.
    fn pop(&self) -> Option<Msg> {
        let mut st = lock(&self.state);
        let QueueState { ready, keys_out } = &mut *st;
        let idx = ready
            .iter()
            .position(|m| m.env.key.as_ref().is_none_or(|k| !keys_out.contains(k)))?;
        let mut msg = ready.remove(idx)?;
        if let Some(k) = &msg.env.key {
            keys_out.insert(k.clone());
        }
        msg.attempt += 1;
        Some(msg)
    }

    fn settle(&self, key: Option<&String>) {
        if let Some(k) = key {
            let mut st = lock(&self.state);
            st.keys_out.remove(k);
            let more = !st.ready.is_empty();
            drop(st);
            if more {
                self.notify.notify_one();
            }
        }
    }

    /// Puts a message back: a keyed one in front, so it stays ahead of its key's successors.
    fn requeue(&self, msg: Msg) {
        let mut st = lock(&self.state);
        match &msg.env.key {
            Some(k) => {
                st.keys_out.remove(k);
                st.ready.push_front(msg);
            }
            None => st.ready.push_back(msg),
        }
        drop(st);
        self.notify.notify_one();
    }

    /// The next message, or `None` once the transport closes while none is queued (`closing`
    /// is the close's wait, made once per subscription and kept registered).
    async fn next(&self, closing: &mut Registered<WaitForCancellationFutureOwned>) -> Option<Msg> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(m) = self.pop() {
                return Some(m);
            }
            tokio::select! {
                _ = &mut *closing => return None,
                _ = &mut notified => {}
            }
        }
    }
}

struct MemAcker {
    queue: Arc<Queue>,
    msg: Option<Msg>,
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        if let Some(m) = self.msg.take() {
            self.queue.settle(m.env.key.as_ref());
        }
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        if let Some(m) = self.msg.take() {
            if delay.is_zero() {
                self.queue.requeue(m);
            } else {
                let queue = self.queue.clone();
                // The key stays locked during the delay, so later messages with the same key
                // cannot overtake this one.
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.requeue(m);
                });
            }
        }
        Ok(())
    }
}

impl Drop for MemAcker {
    fn drop(&mut self) {
        // Never lose an unsettled delivery: it goes back at once.
        if let Some(m) = self.msg.take() {
            self.queue.requeue(m);
        }
    }
}

/// Decrements a queue's consumer count when its subscription is dropped.
struct ConsumerGuard(Arc<Queue>);

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The in-memory transport.
#[derive(Debug)]
pub struct MemoryTransport {
    bus: Arc<Bus>,
    config: MemoryConfig,
    closed: CloseSignal,
}

impl MemoryTransport {
    /// Connects to the bus named in `config`, creating it if no client in this process holds it.
    pub fn connect(config: MemoryConfig) -> Self {
        let mut buses = lock(&BUSES);
        buses.retain(|_, w| w.strong_count() > 0);
        let bus = match buses.get(&config.bus).and_then(Weak::upgrade) {
            Some(b) => b,
            None => {
                let b = Arc::new(Bus::default());
                buses.insert(config.bus.clone(), Arc::downgrade(&b));
                b
            }
        };
        MemoryTransport {
            bus,
            config,
            closed: CloseSignal::new(),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.is_closed() {
            Err(Error::closed(NAME))
        } else {
            Ok(())
        }
    }

    fn queue_subscription(&self, queue: Arc<Queue>, direct: bool) -> Subscription {
        queue.consumers.fetch_add(1, Ordering::AcqRel);
        let slot = direct.then(|| queue.direct.clone());
        let guard = ConsumerGuard(queue);
        let closing = self.closed.closed_registered();
        let sub = Subscription::new(futures::stream::unfold(
            (guard, closing),
            |(guard, mut closing)| async move {
                let queue = guard.0.clone();
                let msg = queue.next(&mut closing).await?;
                let env = msg.env.clone();
                let attempt = msg.attempt;
                let malformed = msg.malformed.clone();
                let acker = Box::new(MemAcker {
                    queue,
                    msg: Some(msg),
                });
                let delivery = Delivery::from_parts(env, attempt, malformed, acker);
                Some((delivery, (guard, closing)))
            },
        ));
        match slot {
            Some(slot) => sub.with_direct(slot),
            None => sub,
        }
    }
}

fn queue_in(map: &Mutex<HashMap<String, Arc<Queue>>>, name: &str) -> Arc<Queue> {
    lock(map).entry(name.to_owned()).or_default().clone()
}

#[async_trait]
impl Publisher for MemoryTransport {
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()> {
        self.route(route, msg, None)
    }
}

impl MemoryTransport {
    /// Publishes an event as a producer without the SDK would: string headers and bytes,
    /// read the way a broker adapter reads them ([`Envelope::from_headers`]). Headers that do
    /// not parse make the message malformed: its consumers dead-letter it with the reason.
    ///
    /// # Errors
    /// `PayloadTooLarge`, `Closed`.
    pub fn publish_foreign(
        &self,
        pattern: &str,
        headers: &[(&str, &str)],
        payload: Bytes,
    ) -> Result<()> {
        match Envelope::from_headers(headers.iter().copied(), payload.clone(), pattern) {
            Ok(env) => self.route(Route::Event(pattern), env, None),
            Err(e) => self.route(
                Route::Event(pattern),
                Envelope::new(pattern, payload),
                Some(e.message().to_owned()),
            ),
        }
    }

    fn check_size(&self, env: &Envelope) -> Result<()> {
        if env.payload.len() > self.config.max_payload {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!(
                    "payload of {} bytes exceeds the limit of {} bytes",
                    env.payload.len(),
                    self.config.max_payload
                ),
            ));
        }
        Ok(())
    }

    /// The queue of request pattern `pattern`, if a handler serves it.
    fn request_queue(&self, pattern: &str) -> Result<Arc<Queue>> {
        match lock(&self.bus.requests).get(pattern) {
            Some(q) if q.consumers.load(Ordering::Acquire) > 0 => Ok(q.clone()),
            _ => Err(Error::new(
                ErrorKind::NoResponder,
                NAME,
                format!("no handler is serving `{pattern}`"),
            )),
        }
    }

    fn route(&self, route: Route<'_>, env: Envelope, malformed: Option<String>) -> Result<()> {
        self.check_open()?;
        self.check_size(&env)?;
        let env = Arc::new(env);
        let msg = |env: Arc<Envelope>| Msg {
            env,
            attempt: 0,
            malformed: malformed.clone(),
        };
        match route {
            Route::Event(topic) => {
                let topics = self.bus.topics.read().unwrap_or_else(|p| p.into_inner());
                if let Some(groups) = topics.get(topic) {
                    for q in groups.values() {
                        q.push(msg(env.clone()));
                    }
                }
            }
            Route::Request(pattern) => self.request_queue(pattern)?.push(msg(env)),
            Route::Reply(address) if address.starts_with(CALL_PREFIX) => {
                let waiter = address[CALL_PREFIX.len()..]
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| self.bus.calls.remove(&n));
                if waiter.is_none_or(|(_, tx)| tx.send(env).is_err()) {
                    self.bus.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            Route::Reply(address) => {
                // A reply to an inbox that is gone is dropped, as on a broker.
                if let Some(tx) = lock(&self.bus.inboxes).get(address) {
                    let _ = tx.send(env);
                }
            }
            Route::DeadLetter(pattern) => queue_in(&self.bus.dead_letters, pattern).push(msg(env)),
        }
        Ok(())
    }
}

#[async_trait]
impl Subscriber for MemoryTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let queue = match route {
            Route::Event(topic) => {
                let group = opts.group.as_deref().ok_or_else(|| {
                    Error::invalid_config(
                        NAME,
                        format!("subscribing to events on `{topic}` needs a consumer group"),
                    )
                })?;
                let mut topics = self.bus.topics.write().unwrap_or_else(|p| p.into_inner());
                topics
                    .entry(topic.to_owned())
                    .or_default()
                    .entry(group.to_owned())
                    .or_default()
                    .clone()
            }
            Route::Request(pattern) => queue_in(&self.bus.requests, pattern),
            Route::DeadLetter(pattern) => queue_in(&self.bus.dead_letters, pattern),
            Route::Reply(address) => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("reply address `{address}` is read through open_inbox"),
                ));
            }
        };
        let direct = matches!(route, Route::Request(_));
        Ok(self.queue_subscription(queue, direct))
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        self.check_open()?;
        let address = format!("_inbox.{name}");
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&self.bus.inboxes).insert(address.clone(), tx);
        struct InboxGuard(Arc<Bus>, String);
        impl Drop for InboxGuard {
            fn drop(&mut self) {
                lock(&self.0.inboxes).remove(&self.1);
            }
        }
        let guard = InboxGuard(self.bus.clone(), address.clone());
        let replies = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let stream = self.closed.guard(replies).map(move |env| {
            // The inbox stays registered as long as its stream lives.
            let _registered = &guard;
            Delivery::from_parts(env, 1, None, Box::new(NoAck))
        });
        Ok(Inbox::new(address, Subscription::new(stream)))
    }
}

/// Reply addresses of `send`s: `_call.<n>`.
const CALL_PREFIX: &str = "_call.";

/// Forgets a `send`'s waiter however the call ends.
struct CallGuard<'a>(&'a Bus, u64);

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.0.calls.remove(&self.1);
    }
}

/// A request handled in its caller's task. If the caller stops waiting before the handling
/// ends (its deadline, or the transport closing), the rest runs in a task of its own: a
/// handler is never cut off half-way because its caller gave up.
struct Detached(Option<futures::future::BoxFuture<'static, ()>>);

impl Detached {
    async fn finish(&mut self) {
        if let Some(handling) = self.0.as_mut() {
            handling.await;
            self.0 = None;
        }
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(handling) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(handling);
        }
        // Without a runtime the handling is dropped: its delivery, unsettled, goes back to
        // the queue for the consumer task.
    }
}

/// `send`: the request carries a reply address of its own (`_call.<n>`), and the responder's
/// reply is handed straight to the waiting call, with no reply channel or task in between.
/// While a handler of the pattern has a free place, it handles the request in the caller's own
/// task (see [`crate::serve`]); otherwise the request waits in the queue for the handler's task.
#[async_trait]
impl Requester for MemoryTransport {
    async fn call(
        &self,
        pattern: &str,
        mut msg: Envelope,
        deadline: tokio::time::Instant,
    ) -> Result<Envelope> {
        self.check_open()?;
        self.check_size(&msg)?;
        let queue = self.request_queue(pattern)?;
        let n = self.bus.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.bus.calls.insert(n, tx);
        let _forget = CallGuard(&self.bus, n);
        msg.reply_to = Some(format!("{CALL_PREFIX}{n}"));
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        let env = Arc::new(msg);
        // A keyed request keeps its place in its key's order: it goes through the queue.
        let direct = match env.key {
            None => queue.direct.offer(|| {
                let acker = Box::new(MemAcker {
                    queue: queue.clone(),
                    msg: Some(Msg {
                        env: env.clone(),
                        attempt: 1,
                        malformed: None,
                    }),
                });
                Delivery::from_parts(env.clone(), 1, None, acker)
            }),
            Some(_) => None,
        };
        let mut handling = match direct {
            Some(handling) => Detached(Some(handling)),
            None => {
                queue.push(Msg {
                    env,
                    attempt: 0,
                    malformed: None,
                });
                Detached(None)
            }
        };
        let reply = async {
            handling.finish().await;
            rx.await
        };
        tokio::select! {
            r = tokio::time::timeout_at(deadline, reply) => match r {
                Ok(Ok(reply)) => Ok(Arc::unwrap_or_clone(reply)),
                Ok(Err(_)) => Err(Error::closed(NAME)),
                Err(_) => Err(Error::timeout(NAME, timeout)),
            },
            () = self.closed.closed() => Err(Error::closed(NAME)),
        }
    }

    fn late_replies(&self) -> Option<u64> {
        Some(self.bus.late.load(Ordering::Relaxed))
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn requester(&self) -> Option<&dyn Requester> {
        Some(self)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            native_request: true,
            detects_no_responder: true,
            redelivery_on_nack: true,
            ordered: true,
            durable: false,
            max_payload: self.config.max_payload,
        }
    }

    async fn close(&self) -> Result<()> {
        self.closed.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn transport() -> MemoryTransport {
        MemoryTransport::connect(MemoryConfig::default().bus(uuid::Uuid::new_v4().to_string()))
    }

    #[test]
    fn url_parsing() {
        let u = Url::parse("memory://orders?max_payload=10&timeout_ms=5").expect("url");
        let c = MemoryConfig::from_url(&u).expect("config");
        assert_eq!(c.bus, "orders");
        assert_eq!(c.max_payload, 10);
        let u = Url::parse("memory://?colour=red").expect("url");
        let e = MemoryConfig::from_url(&u).expect_err("unknown option");
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("colour"), "{e}");
        let u = Url::parse("memory://?max_payload=lots").expect("url");
        assert_eq!(
            MemoryConfig::from_url(&u).expect_err("bad").kind(),
            ErrorKind::InvalidConfig
        );
    }

    #[tokio::test]
    async fn keyed_messages_wait_for_their_predecessor() {
        let t = transport();
        let mut sub = t
            .subscribe(Route::Event("k"), SubscribeOptions::group("g"))
            .await
            .expect("subscribe");
        for (i, key) in ["a", "a", "b"].iter().enumerate() {
            let mut env = Envelope::new("k", format!("{i}"));
            env.key = Some((*key).to_owned());
            t.publish(Route::Event("k"), env).await.expect("publish");
        }
        let first = sub.next().await.expect("a0");
        assert_eq!(&first.envelope().payload[..], b"0");
        // "a" is out, so the next one handed out is "b", not the second "a".
        let second = sub.next().await.expect("b2");
        assert_eq!(&second.envelope().payload[..], b"2");
        first.nack(Duration::ZERO).await.expect("nack");
        let again = sub.next().await.expect("a0 again");
        assert_eq!(&again.envelope().payload[..], b"0");
        assert_eq!(again.attempt, 2);
        again.ack().await.expect("ack");
        let third = sub.next().await.expect("a1");
        assert_eq!(&third.envelope().payload[..], b"1");
    }

    #[tokio::test]
    async fn dropped_delivery_is_redelivered() {
        let t = transport();
        let mut sub = t
            .subscribe(Route::Event("d"), SubscribeOptions::group("g"))
            .await
            .expect("subscribe");
        t.publish(Route::Event("d"), Envelope::new("d", "x"))
            .await
            .expect("publish");
        drop(sub.next().await.expect("first"));
        let again = sub.next().await.expect("again");
        assert_eq!(again.attempt, 2);
    }

    #[tokio::test]
    async fn request_without_handler_is_no_responder() {
        let t = transport();
        let err = t
            .publish(Route::Request("nobody"), Envelope::new("nobody", ""))
            .await
            .expect_err("no responder");
        assert_eq!(err.kind(), ErrorKind::NoResponder);
    }
}
