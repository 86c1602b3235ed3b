//! Per-client counters: what was sent, handled, retried, dropped.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) emitted: AtomicU64,
    pub(crate) requested: AtomicU64,
    pub(crate) late_replies: AtomicU64,
    pub(crate) expired_dropped: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) duplicates_dropped: AtomicU64,
}

/// A snapshot of one client's counters.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `send` calls made.
    pub sent: u64,
    /// `emit` calls accepted by the transport.
    pub emitted: u64,
    /// `request` calls made.
    pub requested: u64,
    /// Replies dropped because they arrived after their deadline or for no waiting request.
    /// Replies to `request` are always counted; replies to `send` where the transport can see
    /// them (on NATS, `send` uses async-nats's own request/reply, which drops them unseen).
    pub late_replies: u64,
    /// Messages dropped unhandled because their deadline had passed.
    pub expired_dropped: u64,
    /// Messages whose handler succeeded.
    pub handled: u64,
    /// Handler failures (errors and panics), each attempt counted.
    pub failed: u64,
    /// Deliveries handed back for another attempt.
    pub retried: u64,
    /// Messages sent to a dead-letter destination.
    pub dead_lettered: u64,
    /// Duplicates an idempotent consumer acknowledged without handling them.
    pub duplicates_dropped: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            sent: g(&self.sent),
            emitted: g(&self.emitted),
            requested: g(&self.requested),
            late_replies: g(&self.late_replies),
            expired_dropped: g(&self.expired_dropped),
            handled: g(&self.handled),
            failed: g(&self.failed),
            retried: g(&self.retried),
            dead_lettered: g(&self.dead_lettered),
            duplicates_dropped: g(&self.duplicates_dropped),
        }
    }

    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}
