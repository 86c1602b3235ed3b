//! `send`'s replies: one wildcard subscription per connection (`_SB_SEND.<id>.*`), a reply
//! subject per call ending in a sequence number, and a sharded map from sequence to waiter.
//!
//! async-nats has such a multiplexer too (`Client::request`), but its call future is over a
//! kilobyte (it also holds the one-subscription-per-request variant), which made every `send`
//! take the allocator's slow path, and it drops replies that come too late unseen. This one
//! needs a small future, counts late replies, and its reply subjects are cheap to make (no
//! random token per call).

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use futures::StreamExt;
use switchboard_core::Result;
use switchboard_core::transport::CloseSignal;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// First part of every `send` reply subject.
pub(crate) const SEND_INBOX_PREFIX: &str = "_SB_SEND.";

/// Hashes a sequence number by one multiplication (Fibonacci hashing): the map's shard and
/// bucket bits come out well spread, without a general-purpose hasher's per-call cost.
#[derive(Default)]
pub(crate) struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; other input is folded in all the same.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// What a call receives: its reply, or `None` when the connection was lost while it waited
/// (the reply may never come).
pub(crate) type Answer = Option<async_nats::Message>;

type Waiters = DashMap<u64, oneshot::Sender<Answer>, BuildHasherDefault<SeqHasher>>;

/// The multiplexer of one connection.
pub(crate) struct SendMux {
    /// `_SB_SEND.<id>.`: a reply subject is this and a sequence number.
    prefix: String,
    next: AtomicU64,
    waiters: Waiters,
    late: AtomicU64,
}

/// Removes a call's waiter if the call ends without its reply (timeout, lost connection,
/// dropped): the map only holds calls still waiting. It borrows the multiplexer, as the call
/// borrows its transport: no reference count touched per call.
pub(crate) struct Waiting<'a> {
    mux: &'a SendMux,
    seq: u64,
    armed: bool,
}

impl Waiting<'_> {
    /// The reply came: the reader already removed the waiter.
    pub(crate) fn answered(mut self) {
        self.armed = false;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.mux.waiters.remove(&self.seq);
        }
    }
}

/// The reader of a connection's replies; stops with the connection.
pub(crate) struct MuxReader(JoinHandle<()>);

impl Drop for MuxReader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SendMux {
    /// Subscribes to the replies of this connection (`id` makes its subjects its own) and
    /// starts reading them. No round trip is needed before the first call: the server handles
    /// one connection's commands in order, so it has the subscription before any request the
    /// connection publishes after it. When `lost` changes (the connection dropped), every
    /// call waiting is answered `None` at once rather than left to its deadline.
    pub(crate) async fn start(
        client: &async_nats::Client,
        id: &str,
        closed: &CloseSignal,
        mut lost: watch::Receiver<u64>,
    ) -> Result<(Arc<SendMux>, MuxReader)> {
        let prefix = format!("{SEND_INBOX_PREFIX}{id}.");
        let sub = client
            .subscribe(format!("{prefix}*"))
            .await
            .map_err(|e| crate::transport::conn_error("subscribe", e))?;
        let mux = Arc::new(SendMux {
            prefix,
            next: AtomicU64::new(0),
            waiters: Waiters::default(),
            late: AtomicU64::new(0),
        });
        let reader = mux.clone();
        let mut replies = closed.guard(sub);
        let task = tokio::spawn(async move {
            // Watches for a lost connection while the replies keep coming; made anew only
            // after it fired, and polled only when no reply is ready.
            loop {
                let changed = lost.changed();
                tokio::pin!(changed);
                let watching = loop {
                    tokio::select! {
                        biased;
                        m = replies.next() => match m {
                            Some(m) => reader.deliver(m),
                            None => return,
                        },
                        r = &mut changed => break r.is_ok(),
                    }
                };
                if !watching {
                    // The transport is gone; read what still comes until the stream ends.
                    while let Some(m) = replies.next().await {
                        reader.deliver(m);
                    }
                    return;
                }
                reader.fail_all();
            }
        });
        Ok((mux, MuxReader(task)))
    }

    /// Answers every waiting call `None`: the connection was lost.
    fn fail_all(&self) {
        let seqs: Vec<u64> = self.waiters.iter().map(|e| *e.key()).collect();
        for seq in seqs {
            if let Some((_, tx)) = self.waiters.remove(&seq) {
                let _ = tx.send(None);
            }
        }
    }

    /// Hands a reply to its call; counts it as late if nobody waits for it any more.
    fn deliver(&self, m: async_nats::Message) {
        let seq = m
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|s| s.parse::<u64>().ok());
        match seq.and_then(|s| self.waiters.remove(&s)) {
            Some((_, tx)) => {
                if tx.send(Some(m)).is_err() {
                    // The call gave up between its last check and now.
                    self.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                self.late.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(subject = %m.subject, "late or unknown send reply dropped");
            }
        }
    }

    /// Registers a call: its reply subject, the receiver of its reply, and the guard that
    /// unregisters it if it ends unanswered.
    pub(crate) fn register(&self) -> (String, oneshot::Receiver<Answer>, Waiting<'_>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut digits = itoa::Buffer::new();
        let n = digits.format(seq);
        let mut subject = String::with_capacity(self.prefix.len() + n.len());
        subject.push_str(&self.prefix);
        subject.push_str(n);
        let (tx, rx) = oneshot::channel();
        self.waiters.insert(seq, tx);
        let waiting = Waiting {
            mux: self,
            seq,
            armed: true,
        };
        (subject, rx, waiting)
    }

    /// Replies that arrived for no waiting call.
    pub(crate) fn late_replies(&self) -> u64 {
        self.late.load(Ordering::Relaxed)
    }
}
