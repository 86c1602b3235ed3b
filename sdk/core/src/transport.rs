//! The adapter SPI: what a transport implements. Services never call this directly; they use
//! [`crate::Client`], which writes `send`, `emit` and `request` once over these primitives.
//!
//! An adapter implements [`Transport`] (publish, subscribe, capabilities) and, where the broker
//! has native request-reply, [`Requester`]. Everything else (typed API, retries, dead letters,
//! deadline checks, the reply correlator) lives in core so every transport behaves alike.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;
use tokio::time::Instant;
use tokio_util::sync::{
    CancellationToken, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

use crate::envelope::Envelope;
use crate::error::Result;

/// Where a message goes, or where a subscription reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// An event pattern: every consumer group gets the message, one member per group.
    Event(&'a str),
    /// A request pattern: one request handler gets the message.
    Request(&'a str),
    /// A reply address (a request's `reply_to`), owned by one client instance.
    Reply(&'a str),
    /// The dead-letter destination of a pattern. It keeps what it receives until read.
    DeadLetter(&'a str),
}

impl Route<'_> {
    /// The pattern or address.
    pub fn name(&self) -> &str {
        match self {
            Route::Event(s) | Route::Request(s) | Route::Reply(s) | Route::DeadLetter(s) => s,
        }
    }
}

/// How to subscribe.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// The consumer group (events): each group gets every event once, shared among its
    /// members. Ignored for requests (all handlers of a pattern compete) and replies.
    pub group: Option<String>,
    /// How many deliveries the subscriber may hold unacknowledged at once (prefetch).
    pub prefetch: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            group: None,
            prefetch: 64,
        }
    }
}

impl SubscribeOptions {
    /// Options for consumer group `group`.
    pub fn group(group: impl Into<String>) -> Self {
        SubscribeOptions {
            group: Some(group.into()),
            ..Default::default()
        }
    }

    /// Sets the prefetch.
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = n.max(1);
        self
    }
}

/// What a transport can do; the conformance suite checks what is declared and skips, visibly,
/// what is not.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The transport implements [`Requester`] natively (otherwise core's correlator does).
    pub native_request: bool,
    /// A request to a pattern nobody handles fails at once with `NoResponder`.
    pub detects_no_responder: bool,
    /// A nacked delivery comes back after the requested delay.
    pub redelivery_on_nack: bool,
    /// Messages with the same key are delivered in order within a group.
    pub ordered: bool,
    /// Events survive a restart of the broker.
    pub durable: bool,
    /// Largest encoded payload accepted, in bytes.
    pub max_payload: usize,
}

impl Capabilities {
    /// Capabilities with nothing declared beyond a payload limit; adapters switch on what
    /// they keep with the setters below.
    pub fn new(max_payload: usize) -> Self {
        Capabilities {
            native_request: false,
            detects_no_responder: false,
            redelivery_on_nack: false,
            ordered: false,
            durable: false,
            max_payload,
        }
    }

    /// Sets [`Capabilities::native_request`].
    pub fn native_request(mut self, yes: bool) -> Self {
        self.native_request = yes;
        self
    }

    /// Sets [`Capabilities::detects_no_responder`].
    pub fn detects_no_responder(mut self, yes: bool) -> Self {
        self.detects_no_responder = yes;
        self
    }

    /// Sets [`Capabilities::redelivery_on_nack`].
    pub fn redelivery_on_nack(mut self, yes: bool) -> Self {
        self.redelivery_on_nack = yes;
        self
    }

    /// Sets [`Capabilities::ordered`].
    pub fn ordered(mut self, yes: bool) -> Self {
        self.ordered = yes;
        self
    }

    /// Sets [`Capabilities::durable`].
    pub fn durable(mut self, yes: bool) -> Self {
        self.durable = yes;
        self
    }
}

/// Acknowledges or rejects one delivery. Implemented by adapters.
#[async_trait]
pub trait Acker: Send + 'static {
    /// The message was handled: do not deliver it again.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message was not handled: deliver it again after `delay`.
    async fn nack(self: Box<Self>, delay: Duration) -> Result<()>;
    /// Whether acknowledging does anything. `false` (deliveries with nothing to settle, such
    /// as [`NoAck`]) lets the consumer skip the call and its allocated future.
    fn settles(&self) -> bool {
        true
    }
}

/// One message handed to a subscriber, to be acknowledged or rejected.
///
/// Dropping a delivery without calling [`Delivery::ack`] or [`Delivery::nack`] must never
/// lose it: the transport delivers it again (at once, or after its visibility timeout).
///
/// The envelope is held behind an [`Arc`]: a delivery moves through a transport's stream
/// layers and into the consumer as a few words rather than the whole envelope, and the
/// consumer shares it with the handler's context without a copy.
pub struct Delivery {
    envelope: Arc<Envelope>,
    /// How many times this message has been delivered, this time included (1 = first).
    pub attempt: u32,
    /// Why the message could not be read as an envelope, if it could not (a poison message).
    pub malformed: Option<String>,
    acker: Box<dyn Acker>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("envelope", &self.envelope)
            .field("attempt", &self.attempt)
            .field("malformed", &self.malformed)
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// A delivery of `envelope`, acknowledged through `acker`.
    pub fn new(envelope: Envelope, attempt: u32, acker: Box<dyn Acker>) -> Self {
        Self::from_parts(envelope, attempt, None, acker)
    }

    /// A delivery of bytes that are not a valid envelope; `reason` says why.
    pub fn malformed(
        envelope: Envelope,
        attempt: u32,
        reason: impl Into<String>,
        acker: Box<dyn Acker>,
    ) -> Self {
        Self::from_parts(envelope, attempt, Some(reason.into()), acker)
    }

    /// A delivery from its parts, as [`Delivery::into_parts`] gives them (the envelope owned,
    /// or shared: a transport that keeps its messages for redelivery hands them on without a
    /// copy); `malformed` is the reason the message could not be read, if it could not.
    pub fn from_parts(
        envelope: impl Into<Arc<Envelope>>,
        attempt: u32,
        malformed: Option<String>,
        acker: Box<dyn Acker>,
    ) -> Self {
        Delivery {
            envelope: envelope.into(),
            attempt,
            malformed,
            acker,
        }
    }

    /// A delivery read from string headers and a payload, the way a broker adapter receives
    /// it ([`Envelope::read`]): an envelope if the headers parse, otherwise a malformed
    /// delivery carrying the payload as received and the reason, so the consumer dead-letters
    /// it. `implied` is the message's id when it carries none
    /// ([`Envelope::from_headers_or_id`]), and `adjust` sets what the broker's own metadata
    /// carries (a reply address, a deadline), or marks the message malformed. The envelope is
    /// read in place, inside the allocation the delivery shares with the handler: it is not
    /// copied once read.
    pub fn read<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: bytes::Bytes,
        pattern: &str,
        implied: Option<crate::MessageId>,
        attempt: u32,
        acker: Box<dyn Acker>,
        adjust: impl FnOnce(&mut Envelope, &mut Option<String>),
    ) -> Self {
        let mut shared = Arc::new(Envelope::unfilled(payload));
        // Not shared yet: no copy is made.
        let env = Arc::make_mut(&mut shared);
        let mut malformed = env.read_headers(headers, pattern, implied);
        adjust(env, &mut malformed);
        Self::from_parts(shared, attempt, malformed, acker)
    }

    /// The message. For a malformed message, the payload as received and whatever metadata
    /// could be read.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The message, to change before handing the delivery on (copied first if it is shared).
    pub fn envelope_mut(&mut self) -> &mut Envelope {
        Arc::make_mut(&mut self.envelope)
    }

    /// The message, owned (copied only if it is shared).
    pub fn into_envelope(self) -> Envelope {
        owned(self.envelope)
    }

    /// Acknowledges the delivery.
    ///
    /// # Errors
    /// A transport error if the broker could not be told.
    pub async fn ack(self) -> Result<()> {
        self.acker.ack().await
    }

    /// Rejects the delivery; it comes back after `delay`.
    ///
    /// # Errors
    /// A transport error if the broker could not be told.
    pub async fn nack(self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Splits the delivery into its message, attempt, malformed reason and acknowledger.
    pub fn into_parts(self) -> (Arc<Envelope>, u32, Option<String>, Box<dyn Acker>) {
        (self.envelope, self.attempt, self.malformed, self.acker)
    }
}

/// The envelope out of its `Arc`, copied only if it is shared.
pub(crate) fn owned(env: Arc<Envelope>) -> Envelope {
    Arc::try_unwrap(env).unwrap_or_else(|shared| (*shared).clone())
}

/// An acker for transports with nothing to acknowledge (replies, at-most-once paths).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }
    async fn nack(self: Box<Self>, _delay: Duration) -> Result<()> {
        Ok(())
    }
    fn settles(&self) -> bool {
        false
    }
}

/// A stream of deliveries. Ends when the subscription is closed by the transport; dropping it
/// unsubscribes.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Delivery> + Send>>,
    /// Where the consumer may offer to run deliveries in the sender's own task (the
    /// in-memory transport's requests).
    direct: Option<Arc<DirectSlot>>,
    /// Run once the consumer is done with the subscription (see [`Subscription::with_finish`]).
    finish: Option<futures::future::BoxFuture<'static, ()>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// Wraps a stream of deliveries.
    pub fn new(stream: impl Stream<Item = Delivery> + Send + 'static) -> Self {
        Subscription {
            inner: Box::pin(stream),
            direct: None,
            finish: None,
        }
    }

    /// Work to finish once the consumer is done with this subscription: stopped taking
    /// deliveries and every delivery it took settled. A graceful stop (`Service::shutdown`,
    /// `Client::shutdown`) awaits it before returning, so what it does (committing a
    /// consumer's positions, say) has happened by then. Not run when the subscription is
    /// dropped without a graceful stop.
    pub fn with_finish(mut self, finish: impl Future<Output = ()> + Send + 'static) -> Self {
        self.finish = Some(Box::pin(finish));
        self
    }

    /// Takes the work to finish with, if the transport gave any.
    pub(crate) fn take_finish(&mut self) -> Option<futures::future::BoxFuture<'static, ()>> {
        self.finish.take()
    }

    /// Lets the consumer register with `slot` to run deliveries in the sender's task.
    pub(crate) fn with_direct(mut self, slot: Arc<DirectSlot>) -> Self {
        self.direct = Some(slot);
        self
    }

    /// The slot a consumer of this subscription may register with, if the transport has one.
    pub(crate) fn direct(&self) -> Option<&Arc<DirectSlot>> {
        self.direct.as_ref()
    }
}

/// A consumer that can run a delivery in the task of the one who sent it, when it has room
/// for one more: no hand-over to the consumer's task and back, and no wake-up of either.
pub(crate) trait Direct: Send + Sync {
    /// Takes one of the consumer's places, if it has one free and is not stopping.
    fn try_reserve(&self) -> bool;

    /// Handles `delivery` in the place taken by [`Direct::try_reserve`] (given back at the
    /// end): the future settles the delivery and sends any reply as the consumer would.
    fn run(self: Arc<Self>, delivery: Delivery) -> futures::future::BoxFuture<'static, ()>;
}

/// The direct consumers of one queue.
#[derive(Default)]
pub(crate) struct DirectSlot {
    consumers: std::sync::RwLock<Vec<(u64, Arc<dyn Direct>)>>,
    registered: std::sync::atomic::AtomicUsize,
    next_id: std::sync::atomic::AtomicU64,
    turn: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for DirectSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectSlot")
            .field("registered", &self.registered.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl DirectSlot {
    /// Adds a consumer; it stays until the returned registration is dropped.
    pub(crate) fn register(self: &Arc<Self>, consumer: Arc<dyn Direct>) -> DirectRegistration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.consumers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, consumer));
        self.registered.fetch_add(1, Ordering::Release);
        DirectRegistration {
            slot: self.clone(),
            id,
        }
    }

    /// The handling of the delivery `make` builds, by the first consumer (taken in turn) with
    /// room for it; `None` (and `make` not called) when none has.
    pub(crate) fn offer(
        &self,
        make: impl FnOnce() -> Delivery,
    ) -> Option<futures::future::BoxFuture<'static, ()>> {
        if self.registered.load(Ordering::Acquire) == 0 {
            return None;
        }
        let consumers = self.consumers.read().unwrap_or_else(|p| p.into_inner());
        let n = consumers.len();
        let start = if n > 1 {
            self.turn.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let chosen = (0..n)
            .map(|i| &consumers[(start + i) % n].1)
            .find(|c| c.try_reserve())?
            .clone();
        drop(consumers);
        Some(chosen.run(make()))
    }
}

/// Keeps a direct consumer registered; dropping it removes the consumer.
pub(crate) struct DirectRegistration {
    slot: Arc<DirectSlot>,
    id: u64,
}

impl Drop for DirectRegistration {
    fn drop(&mut self) {
        let mut consumers = self
            .slot
            .consumers
            .write()
            .unwrap_or_else(|p| p.into_inner());
        consumers.retain(|(id, _)| *id != self.id);
        self.slot
            .registered
            .store(consumers.len(), Ordering::Release);
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A client's private reply channel: the address requests carry in `reply_to`, and the
/// subscription replies arrive on.
#[non_exhaustive]
#[derive(Debug)]
pub struct Inbox {
    /// The address to put in `reply_to`.
    pub address: String,
    /// Replies sent to `address`.
    pub subscription: Subscription,
    /// Changes each time the transport loses its connection. Requests waiting for a reply
    /// then fail at once with a retryable `Connection` error instead of at their deadline
    /// (the reply may never come). `None` for transports that cannot lose one.
    pub connection_lost: Option<tokio::sync::watch::Receiver<u64>>,
}

impl Inbox {
    /// An inbox at `address` whose replies arrive on `subscription`.
    pub fn new(address: impl Into<String>, subscription: Subscription) -> Self {
        Inbox {
            address: address.into(),
            subscription,
            connection_lost: None,
        }
    }

    /// Sets [`Inbox::connection_lost`].
    pub fn with_connection_lost(mut self, lost: tokio::sync::watch::Receiver<u64>) -> Self {
        self.connection_lost = Some(lost);
        self
    }
}

/// Sends messages.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Sends `msg` to `route`, returning once the transport accepted it (publisher confirm,
    /// broker ack, or peer ack).
    ///
    /// # Errors
    /// `NoResponder` for a request nobody handles (where detectable), `PayloadTooLarge`,
    /// `Connection`, `Rejected`, `Closed`.
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()>;

    /// Takes `msg` for `route` and returns once its place in the transport's order is taken,
    /// with a [`Confirmation`] that resolves when the transport accepted it, as
    /// [`Publisher::publish`] would have returned. Messages enqueued one after the other are
    /// published in that order. Core uses it for asynchronous requests, so that a caller with
    /// thousands in flight does not wait for each acknowledgement in turn.
    ///
    /// The default publishes and returns a confirmation that is already resolved; a transport
    /// whose acknowledgement takes long (a batching producer, an HTTP call) overrides it.
    ///
    /// # Errors
    /// Those of [`Publisher::publish`] found before the message is enqueued; the rest arrive
    /// through the confirmation.
    async fn enqueue(&self, route: Route<'_>, msg: Envelope) -> Result<Confirmation> {
        self.publish(route, msg).await?;
        Ok(Confirmation::accepted())
    }
}

/// A transport call whose work before its first wait was done synchronously (checks,
/// encoding, registering a waiter): its future boxed, or its error as a ready future. For
/// transports that write a trait method by hand rather than with `async_trait`, so that the one
/// future allocated per call holds only what is awaited.
pub fn prepared<'a, T: Send + 'a>(
    started: Result<impl Future<Output = Result<T>> + Send + 'a>,
) -> futures::future::BoxFuture<'a, Result<T>> {
    match started {
        Ok(f) => Box::pin(f),
        Err(e) => Box::pin(std::future::ready(Err(e))),
    }
}

/// The outcome, still to come or known, of a message handed to [`Publisher::enqueue`].
#[must_use = "a confirmation reports whether the transport accepted the message"]
pub struct Confirmation(Option<Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>>);

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Confirmation(pending)"
        } else {
            "Confirmation(accepted)"
        })
    }
}

impl Confirmation {
    /// The transport already accepted the message.
    pub fn accepted() -> Self {
        Confirmation(None)
    }

    /// The transport's answer is still to come: `outcome` resolves to it.
    pub fn pending(outcome: impl Future<Output = Result<()>> + Send + 'static) -> Self {
        Confirmation(Some(Box::pin(outcome)))
    }

    /// The answer still to come, if it is not known yet.
    pub fn into_pending(
        self,
    ) -> Option<Pin<Box<dyn Future<Output = Result<()>> + Send + 'static>>> {
        self.0
    }

    /// Waits for the transport's answer.
    ///
    /// # Errors
    /// Those of [`Publisher::publish`].
    pub async fn wait(self) -> Result<()> {
        match self.0 {
            Some(outcome) => outcome.await,
            None => Ok(()),
        }
    }
}

/// Receives messages.
#[async_trait]
pub trait Subscriber: Send + Sync {
    /// Subscribes to an event pattern (with `opts.group`), a request pattern, or a pattern's
    /// dead letters.
    ///
    /// # Errors
    /// `InvalidConfig` for an event subscription without a group; transport errors.
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription>;

    /// Opens a private reply channel for one client instance (`name` is unique per client).
    ///
    /// # Errors
    /// Transport errors.
    async fn open_inbox(&self, name: &str) -> Result<Inbox>;
}

/// Native request-reply, for transports that have it.
#[async_trait]
pub trait Requester: Send + Sync {
    /// Sends a request and waits for its reply until `deadline`.
    ///
    /// # Errors
    /// `Timeout` at the deadline, `NoResponder`, transport errors. A reply carrying an error
    /// is returned as `Ok`: core turns it into a `Handler` error.
    async fn call(&self, pattern: &str, msg: Envelope, deadline: Instant) -> Result<Envelope>;

    /// Replies that arrived for no waiting call (after their deadline, or unknown), dropped.
    /// Counted into [`crate::Stats::late_replies`]. `None` if the transport cannot see them
    /// (its client library drops them unseen).
    fn late_replies(&self) -> Option<u64> {
        None
    }
}

/// A transport: the adapter's one entry point.
#[async_trait]
pub trait Transport: Publisher + Subscriber + fmt::Debug + 'static {
    /// Short name used in errors and logs (`memory`, `nats`, ...).
    fn name(&self) -> &'static str;

    /// What this transport can do.
    fn capabilities(&self) -> Capabilities;

    /// The native requester, if the transport has one (see [`Capabilities::native_request`]).
    fn requester(&self) -> Option<&dyn Requester> {
        None
    }

    /// Closes connections. Subscriptions end.
    ///
    /// # Errors
    /// Transport errors while closing.
    async fn close(&self) -> Result<()>;
}

/// A one-way "closed" signal cheap enough to check on every message: an atomic flag beside
/// a [`CancellationToken`], which is kept for waking waiters only (its own check takes a
/// lock, and a transport's token is shared by every call and subscription, across threads).
#[derive(Debug, Clone, Default)]
pub struct CloseSignal {
    inner: Arc<CloseInner>,
}

#[derive(Debug, Default)]
struct CloseInner {
    closed: AtomicBool,
    token: CancellationToken,
}

impl CloseSignal {
    /// A signal not yet closed.
    pub fn new() -> Self {
        CloseSignal::default()
    }

    /// Closes: every check from now on sees it, every waiter wakes.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.token.cancel();
    }

    /// Whether [`CloseSignal::close`] was called (an atomic load, no lock).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Resolves once closed (to wait in a `select!` while idle).
    pub fn closed(&self) -> WaitForCancellationFuture<'_> {
        self.inner.token.cancelled()
    }

    /// [`CloseSignal::closed`] for a loop that makes it once and polls it on every turn:
    /// registered once per task rather than on every poll (see [`Registered`]).
    pub fn closed_registered(&self) -> Registered<WaitForCancellationFutureOwned> {
        Registered::new(self.inner.token.clone().cancelled_owned())
    }

    /// `stream`, ended once the signal closes. Between messages the flag is checked; the
    /// token's wake-up is only waited for while the stream itself has nothing ready.
    pub fn guard<S: Stream + Unpin>(&self, stream: S) -> UntilClosed<S> {
        UntilClosed {
            stream,
            signal: self.clone(),
            waiting: None,
        }
    }
}

/// A wait made once and polled in a loop (a close, a watched change) next to work that is
/// usually ready: its future is polled again only once it has woken the task, or for a waker
/// of another task. Polling a registered tokio wait takes its lock; a consumer loop that goes
/// idle after every message would take it once per message.
///
/// The future is polled with a waker of this wrapper's own that notes the wake-up before
/// passing it on to the task, so a poll can tell "woken by this future" from "woken by
/// something else" with one atomic load.
pub struct Registered<F> {
    future: Pin<Box<F>>,
    /// The wake-up note and the task's waker, shared with the waker the future holds.
    note: Arc<WakeNote>,
    /// The waker the future was polled with (made once, from `note`).
    own: Waker,
    /// The task's waker `note` passes wake-ups on to.
    task: Option<Waker>,
}

#[derive(Default)]
struct WakeNote {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for WakeNote {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Registered<F> {
    /// Wraps `future` (boxed once, here).
    pub fn new(future: F) -> Self {
        let note = Arc::new(WakeNote::default());
        Registered {
            future: Box::pin(future),
            own: Waker::from(note.clone()),
            note,
            task: None,
        }
    }
}

impl<F: Future> Future for Registered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let same_task = this.task.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if same_task && !this.note.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        if !same_task {
            this.note.task.register(cx.waker());
            this.task = Some(cx.waker().clone());
        }
        // Cleared before the poll: a wake-up during or after it is noted again.
        this.note.woken.store(false, Ordering::Release);
        this.future
            .as_mut()
            .poll(&mut Context::from_waker(&this.own))
    }
}

impl<F> fmt::Debug for Registered<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("woken", &self.note.woken.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A stream that ends when its [`CloseSignal`] closes (see [`CloseSignal::guard`]).
pub struct UntilClosed<S> {
    stream: S,
    signal: CloseSignal,
    /// The close's wake-up, made the first time the stream has nothing ready.
    waiting: Option<Registered<WaitForCancellationFutureOwned>>,
}

impl<S> fmt::Debug for UntilClosed<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UntilClosed")
            .field("closed", &self.signal.is_closed())
            .finish_non_exhaustive()
    }
}

impl<S> UntilClosed<S> {
    /// The stream inside.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: Stream + Unpin> Stream for UntilClosed<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        if this.signal.is_closed() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut this.stream).poll_next(cx) {
            return Poll::Ready(item);
        }
        // Nothing ready: wait for the close too. Made once and kept registered; a close after
        // the flag was read above wakes this task, and its next poll sees the flag.
        let token = &this.signal.inner.token;
        let waiting = this
            .waiting
            .get_or_insert_with(|| Registered::new(token.clone().cancelled_owned()));
        match Pin::new(waiting).poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn a_delivery_is_read_in_place_and_adjusted() {
        use crate::envelope::header;
        let id = crate::MessageId::new();
        let d = Delivery::read(
            [(header::PATTERN, "orders.placed")],
            bytes::Bytes::from_static(b"{}"),
            "fallback",
            Some(id),
            2,
            Box::new(NoAck),
            |env, _| env.reply_to = Some("inbox.1".into()),
        );
        assert!(d.malformed.is_none());
        assert_eq!(d.attempt, 2);
        assert_eq!(d.envelope().id, id, "no ce-id header: the implied id");
        assert_eq!(d.envelope().pattern, "orders.placed");
        assert_eq!(d.envelope().reply_to.as_deref(), Some("inbox.1"));

        // Malformed headers: the payload as received under a fresh envelope, with the reason;
        // `adjust` may add its own reason only when there is none.
        let mut d = Delivery::read(
            [(header::ID, "not-a-uuid")],
            bytes::Bytes::from_static(b"raw"),
            "p",
            None,
            1,
            Box::new(NoAck),
            |_, malformed| {
                malformed.get_or_insert_with(|| "unused".into());
            },
        );
        let reason = d.malformed.clone().expect("malformed");
        assert!(reason.contains("ce-id"), "{reason}");
        assert_eq!(&d.envelope().payload[..], b"raw");
        assert_eq!(d.envelope().pattern, "p");

        // Changed before handing on; owned afterwards without a copy of shared state.
        d.envelope_mut().key = Some("k".into());
        let env = d.into_envelope();
        assert_eq!(env.key.as_deref(), Some("k"));
    }

    #[tokio::test]
    async fn a_guarded_stream_ends_when_the_signal_closes() {
        let signal = CloseSignal::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut s = signal.guard(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        tx.send(1).unwrap();
        assert_eq!(s.next().await, Some(1));
        // Closed while the stream waits: the waiter wakes and the stream ends.
        let closer = signal.clone();
        let wait = tokio::spawn(async move { s.next().await });
        tokio::task::yield_now().await;
        assert!(!closer.is_closed());
        closer.close();
        let end = tokio::time::timeout(Duration::from_secs(5), wait).await;
        assert_eq!(end.expect("woken by the close").expect("task"), None);
        assert!(signal.is_closed());
    }

    #[tokio::test]
    async fn a_stream_waited_on_many_times_still_ends_at_the_close() {
        let signal = CloseSignal::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut s = signal.guard(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(n) = s.next().await {
                got.push(n);
            }
            got
        });
        // The reader waits before each item (the close's wake-up registered once, then kept).
        for n in 0..3 {
            tokio::task::yield_now().await;
            tx.send(n).unwrap();
        }
        tokio::task::yield_now().await;
        signal.close();
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(got.expect("woken by the close").expect("task"), [0, 1, 2]);
    }

    #[tokio::test]
    async fn a_registered_wait_completes_though_polled_again_by_the_same_task() {
        let (tx, mut rx) = tokio::sync::watch::channel(0u32);
        let (items, mut next) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let watcher = tokio::spawn(async move {
            let mut changed = Registered::new(rx.changed());
            let mut seen = 0;
            // Woken by the items many times (the wait not polled then), then by the change.
            loop {
                tokio::select! {
                    biased;
                    Some(_) = next.recv() => seen += 1,
                    r = &mut changed => return (r.is_ok(), seen),
                }
            }
        });
        for n in 0..3 {
            tokio::task::yield_now().await;
            items.send(n).unwrap();
        }
        tokio::task::yield_now().await;
        tx.send(1).unwrap();
        let done = tokio::time::timeout(Duration::from_secs(5), watcher).await;
        assert_eq!(done.expect("woken by the change").expect("task"), (true, 3));
    }

    #[tokio::test]
    async fn a_closed_signal_ends_a_busy_stream_at_the_next_item() {
        let signal = CloseSignal::new();
        let mut s = signal.guard(futures::stream::iter(0..));
        assert_eq!(s.next().await, Some(0));
        signal.close();
        assert_eq!(s.next().await, None);
        tokio::time::timeout(Duration::from_secs(5), signal.closed())
            .await
            .expect("closed() resolves once closed");
    }
}
