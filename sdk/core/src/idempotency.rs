//! Idempotent consumers: an event handler that drops duplicates of a message it has handled,
//! by message id, within a bounded window.
//!
//! At-least-once delivery means a handler can see a message twice: a redelivery after a lost
//! acknowledgement, a broker restart, a producer's retry of an `emit` whose confirm was lost.
//! With [`crate::HandlerOptions::idempotent`], each delivery first claims its key (consumer
//! group, pattern and message id) in a store:
//! - a key already handled, or being handled by another member, means a duplicate: it is
//!   acknowledged without running the handler, and counted in `Stats::duplicates_dropped`;
//! - a delivery whose handler succeeds marks its key handled, for the window;
//! - one whose handler fails gives its claim up, so its redelivery is handled.
//!
//! The claim itself expires after `claim_ttl`, so a member that dies mid-handling does not
//! keep the message from being handled by the redelivery.
//!
//! [`MemoryIdempotencyStore`] (the default) holds the keys in the process, bounded by time and
//! by count; it suits one consumer process. For keys shared by every member of a group, use a
//! store all of them reach (`switchboard::resilience::RedisIdempotencyStore`, feature `redis`).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::Result;

/// Where an idempotent consumer remembers what it handled.
#[async_trait]
pub trait IdempotencyStore: Send + Sync + fmt::Debug + 'static {
    /// Claims `key` for handling, for at most `ttl`: `true` if it is neither handled nor
    /// claimed, `false` for a duplicate.
    ///
    /// # Errors
    /// The store could not be reached; the delivery is then handed back, not handled.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Marks `key` handled: duplicates are dropped for `window`.
    ///
    /// # Errors
    /// The store could not be reached (the message stays handled; a duplicate may then run).
    async fn complete(&self, key: &str, window: Duration) -> Result<()>;

    /// Gives a claim up (the handler failed, so a redelivery must run).
    ///
    /// # Errors
    /// The store could not be reached (the claim then lapses after its ttl).
    async fn release(&self, key: &str) -> Result<()>;
}

/// How an event handler drops duplicates.
#[derive(Clone, Debug)]
pub struct Idempotency {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) window: Duration,
    pub(crate) claim_ttl: Duration,
}

impl Idempotency {
    /// Duplicates dropped for `window` after a message is handled, remembered in this process
    /// (at most `capacity` keys; the oldest are forgotten first).
    pub fn in_memory(window: Duration, capacity: usize) -> Self {
        Idempotency::with_store(Arc::new(MemoryIdempotencyStore::new(capacity)), window)
    }

    /// Duplicates dropped for `window`, remembered in `store`.
    pub fn with_store(store: Arc<dyn IdempotencyStore>, window: Duration) -> Self {
        Idempotency {
            store,
            window,
            claim_ttl: Duration::from_secs(300),
        }
    }

    /// How long a claim holds while its handler runs (default 5 minutes): a member that dies
    /// mid-handling blocks the message no longer than this.
    pub fn claim_ttl(mut self, ttl: Duration) -> Self {
        self.claim_ttl = ttl;
        self
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// The key of a delivery: its group, pattern and message id.
pub(crate) fn key(group: Option<&str>, pattern: &str, id: &crate::MessageId) -> String {
    format!("{}/{pattern}/{id}", group.unwrap_or(""))
}

#[derive(Debug)]
struct Entry {
    expires: Instant,
    handled: bool,
}

/// Keys in this process, bounded by time (each expires) and by count (the oldest go first).
#[derive(Debug)]
pub struct MemoryIdempotencyStore {
    capacity: usize,
    inner: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    entries: HashMap<String, Entry>,
    /// Keys in the order they were set, with the expiry they were set with (an entry whose
    /// expiry has changed since is not removed by its old place in the queue).
    order: VecDeque<(Instant, String)>,
}

impl MemoryIdempotencyStore {
    /// A store of at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryIdempotencyStore {
            capacity: capacity.max(1),
            inner: Mutex::new(Keys::default()),
        }
    }

    /// Keys held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, key: &str, ttl: Duration, handled: bool) {
        let now = Instant::now();
        let expires = now + ttl;
        let mut keys = self.lock();
        keys.sweep(now, self.capacity);
        keys.entries
            .insert(key.to_owned(), Entry { expires, handled });
        keys.order.push_back((expires, key.to_owned()));
    }
}

impl Keys {
    /// Drops expired keys, and the oldest while over capacity.
    fn sweep(&mut self, now: Instant, capacity: usize) {
        while let Some((expires, key)) = self.order.front() {
            let stale = self.entries.get(key).is_none_or(|e| e.expires != *expires);
            let expired = *expires <= now;
            if !(stale || expired || self.entries.len() >= capacity) {
                break;
            }
            if !stale {
                self.entries.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[async_trait]
impl IdempotencyStore for MemoryIdempotencyStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let now = Instant::now();
        {
            let keys = self.lock();
            if keys.entries.get(key).is_some_and(|e| e.expires > now) {
                return Ok(false);
            }
        }
        self.set(key, ttl, false);
        Ok(true)
    }

    async fn complete(&self, key: &str, window: Duration) -> Result<()> {
        self.set(key, window, true);
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        let mut keys = self.lock();
        if keys.entries.get(key).is_some_and(|e| !e.handled) {
            keys.entries.remove(key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn keys_are_dropped_after_their_window_and_beyond_capacity() {
        let store = MemoryIdempotencyStore::new(3);
        let w = Duration::from_secs(10);
        assert!(store.claim("a", w).await.expect("claim"));
        assert!(!store.claim("a", w).await.expect("claim"), "claimed");
        store.complete("a", w).await.expect("complete");
        assert!(!store.claim("a", w).await.expect("claim"), "handled");
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(store.claim("a", w).await.expect("claim"), "window over");

        // A released claim can be claimed again; a handled key cannot be released.
        store.release("a").await.expect("release");
        assert!(store.claim("a", w).await.expect("claim"));
        store.complete("a", w).await.expect("complete");
        store.release("a").await.expect("release");
        assert!(!store.claim("a", w).await.expect("claim"));

        // Capacity: the oldest key goes first.
        for k in ["b", "c", "d"] {
            store.complete(k, w).await.expect("complete");
        }
        assert!(store.len() <= 3, "{}", store.len());
        assert!(store.claim("a", w).await.expect("claim"), "evicted, oldest");
    }
}
