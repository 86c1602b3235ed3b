//! Request-reply over any publisher + subscriber, written once.
//!
//! One private inbox per client instance; a `CorrelationId → waiter` map whose entry goes on
//! reply, on timeout, or when the waiter drops. The map is sharded (`DashMap`), never locked
//! across an await, so tens of thousands of requests can be in flight without contention, and
//! no request opens a subscription of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::envelope::{CorrelationId, Envelope, IdHash};
use crate::error::{Error, ErrorKind, Result};
use crate::stats::Counters;
use crate::transport::{Route, Transport};

/// Where a matched reply goes.
#[derive(Debug)]
pub(crate) enum Sink {
    Once(oneshot::Sender<Result<Envelope>>),
    Stream(mpsc::UnboundedSender<(CorrelationId, Result<Envelope>)>),
}

impl Sink {
    fn deliver(self, id: CorrelationId, r: Result<Envelope>) {
        // A waiter that is gone no longer wants the reply; nothing to do.
        match self {
            Sink::Once(tx) => {
                let _ = tx.send(r);
            }
            Sink::Stream(tx) => {
                let _ = tx.send((id, r));
            }
        }
    }
}

/// When [`Correlator::submit`] returns.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Accept {
    /// Once the transport accepted the request (a `send`: its caller waits for the reply
    /// anyway).
    Published,
    /// Once the transport has the request in order; a later refusal is the request's reply
    /// (`request`: returns at once).
    Enqueued,
}

#[derive(Debug)]
struct Waiter {
    deadline: Instant,
    timeout: Duration,
    sink: Sink,
}

#[derive(Debug)]
pub(crate) struct Correlator {
    address: String,
    adapter: &'static str,
    pending: Arc<DashMap<CorrelationId, Waiter, IdHash>>,
    pump: JoinHandle<()>,
}

impl Drop for Correlator {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Removes a waiter's entry when the request is answered, times out or is abandoned.
#[derive(Debug)]
pub(crate) struct WaiterGuard {
    correlator: Arc<Correlator>,
    id: CorrelationId,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        self.correlator.pending.remove(&self.id);
    }
}

impl Correlator {
    /// Opens the client's inbox and starts matching replies.
    pub(crate) async fn start(
        transport: &Arc<dyn Transport>,
        client_id: &str,
        counters: Arc<Counters>,
    ) -> Result<Arc<Self>> {
        let inbox = transport.open_inbox(client_id).await?;
        let pending: Arc<DashMap<CorrelationId, Waiter, IdHash>> = Arc::new(DashMap::default());
        let map = pending.clone();
        let mut sub = inbox.subscription;
        let mut lost = inbox.connection_lost;
        let adapter = transport.name();
        let pump = tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    d = sub.next() => match d {
                        Some(d) => d,
                        None => break,
                    },
                    () = connection_lost(&mut lost) => {
                        // Replies to what is in flight may never come: say so now.
                        let ids: Vec<CorrelationId> = map.iter().map(|e| *e.key()).collect();
                        for id in ids {
                            if let Some((_, w)) = map.remove(&id) {
                                w.sink.deliver(id, Err(Error::new(
                                    ErrorKind::Connection,
                                    adapter,
                                    "connection lost while waiting for the reply; the request may or may not have been handled",
                                )));
                            }
                        }
                        continue;
                    }
                };
                let (env, _, _, acker) = delivery.into_parts();
                let env = crate::transport::owned(env);
                // Replies are settled as soon as they are read: a reply cannot be handled twice.
                if let Err(e) = acker.ack().await {
                    tracing::warn!(error = %e, "could not acknowledge a reply");
                }
                let Some(id) = env.correlation_id else {
                    counters.late_replies.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pattern = %env.pattern, "reply without correlation id dropped");
                    continue;
                };
                match map.remove(&id) {
                    Some((_, w)) if Instant::now() <= w.deadline => w.sink.deliver(id, Ok(env)),
                    Some((_, w)) => {
                        counters.late_replies.fetch_add(1, Ordering::Relaxed);
                        // The reply came too late: the request timed out.
                        let err = Error::timeout(adapter, w.timeout);
                        w.sink.deliver(id, Err(err));
                    }
                    None => {
                        counters.late_replies.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%id, "late or unknown reply dropped");
                    }
                }
            }
            // The inbox is gone (the transport closed): no reply can come any more, so every
            // waiter learns it now instead of at its deadline.
            let ids: Vec<CorrelationId> = map.iter().map(|e| *e.key()).collect();
            for id in ids {
                if let Some((_, w)) = map.remove(&id) {
                    w.sink.deliver(id, Err(Error::closed(adapter)));
                }
            }
        });
        Ok(Arc::new(Correlator {
            address: inbox.address,
            adapter: transport.name(),
            pending,
            pump,
        }))
    }

    /// Registers a waiter for `msg`, then publishes it as a request with this client's inbox
    /// as `reply_to`. If publishing fails (or this future is dropped first) the waiter is
    /// removed again; otherwise the caller owns it and must see it removed (a
    /// [`WaiterGuard`], or [`Correlator::cancel`]).
    ///
    /// With [`Accept::Enqueued`] this returns once the transport has the message in order
    /// ([`crate::transport::Publisher::enqueue`]); a refusal that comes after that is
    /// delivered to the waiter as its reply.
    #[allow(
        clippy::too_many_arguments,
        reason = "one internal call site per kind of caller"
    )]
    pub(crate) async fn submit(
        &self,
        transport: &dyn Transport,
        pattern: &str,
        mut msg: Envelope,
        deadline: Instant,
        timeout: Duration,
        sink: Sink,
        accept: Accept,
    ) -> Result<CorrelationId> {
        let id = CorrelationId::from(msg.id);
        msg.correlation_id = Some(id);
        msg.reply_to = Some(self.address.clone());
        self.pending.insert(
            id,
            Waiter {
                deadline,
                timeout,
                sink,
            },
        );
        let unregister = OnDrop(Some(|| {
            self.pending.remove(&id);
        }));
        let route = Route::Request(pattern);
        match accept {
            Accept::Published => transport.publish(route, msg).await?,
            Accept::Enqueued => {
                let confirmation = transport.enqueue(route, msg).await?;
                if let Some(outcome) = confirmation.into_pending() {
                    let pending = self.pending.clone();
                    tokio::spawn(async move {
                        if let Err(e) = outcome.await
                            && let Some((_, w)) = pending.remove(&id)
                        {
                            w.sink.deliver(id, Err(e));
                        }
                    });
                }
            }
        }
        unregister.disarm();
        Ok(id)
    }

    /// A guard that removes the waiter `id` when dropped.
    pub(crate) fn guard(self: &Arc<Self>, id: CorrelationId) -> WaiterGuard {
        WaiterGuard {
            correlator: self.clone(),
            id,
        }
    }

    /// Sends a request and waits for its reply until `deadline`.
    pub(crate) async fn call(
        self: &Arc<Self>,
        transport: &dyn Transport,
        pattern: &str,
        msg: Envelope,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Envelope> {
        let (tx, rx) = oneshot::channel();
        let id = self
            .submit(
                transport,
                pattern,
                msg,
                deadline,
                timeout,
                Sink::Once(tx),
                Accept::Published,
            )
            .await?;
        let _guard = self.guard(id);
        await_reply(rx, deadline, timeout, self.adapter).await
    }

    /// Removes the waiter for `id`, if it is still waiting; true if it was.
    pub(crate) fn cancel(&self, id: &CorrelationId) -> bool {
        self.pending.remove(id).is_some()
    }

    /// Requests still waiting for a reply.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn adapter(&self) -> &'static str {
        self.adapter
    }
}

/// Resolves when the transport reports a lost connection; never, if it cannot report one.
async fn connection_lost(lost: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    if let Some(rx) = lost
        && rx.changed().await.is_ok()
    {
        return;
    }
    futures::future::pending().await
}

/// Runs its closure when dropped, unless disarmed.
struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Waits on a reply channel until `deadline`. A reply that already arrived is returned even if
/// the deadline has passed since.
pub(crate) async fn await_reply(
    mut rx: oneshot::Receiver<Result<Envelope>>,
    deadline: Instant,
    timeout: Duration,
    adapter: &'static str,
) -> Result<Envelope> {
    if let Ok(r) = rx.try_recv() {
        return r;
    }
    match tokio::time::timeout_at(deadline, &mut rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::closed(adapter)),
        Err(_) => Err(Error::timeout(adapter, timeout)),
    }
}
