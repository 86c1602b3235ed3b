//! An idempotency store in Redis (feature `redis`): every member of a consumer group, in any
//! process, sees the same keys, so a duplicate is dropped whichever member it reaches.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use switchboard_core::{Error, ErrorKind, IdempotencyStore, Result};

const ADAPTER: &str = "redis";

/// Deletes a key only while it is an unfinished claim: a handled key stays handled.
const RELEASE: &str = r"if redis.call('GET', KEYS[1]) == 'claimed' then return redis.call('DEL', KEYS[1]) else return 0 end";

/// Keys in Redis: a claim is `SET key claimed NX PX ttl`, a handled message
/// `SET key handled PX window`; a failed handler's claim is deleted. Reconnects on its own.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    conn: ConnectionManager,
    prefix: String,
    release: redis::Script,
}

impl fmt::Debug for RedisIdempotencyStore {
    // The URL is not kept: it may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisIdempotencyStore {
    /// Connects to `url` (`redis://[:password@]host:port[/db]`, `rediss://` for TLS is not
    /// compiled in), within five seconds. Keys are prefixed `sb:idem:`.
    ///
    /// # Errors
    /// `InvalidConfig` for a malformed URL, `Unauthenticated` for refused credentials,
    /// `Connection` if the server does not answer in time.
    pub async fn connect(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid_config(ADAPTER, format!("malformed Redis URL: {e}")).with_source(e)
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Connection,
                ADAPTER,
                "Redis did not answer within 5 s",
            )
        })?
        .map_err(redis_error)?;
        Ok(RedisIdempotencyStore {
            conn,
            prefix: "sb:idem:".to_owned(),
            release: redis::Script::new(RELEASE),
        })
    }

    /// Sets the key prefix (to keep several applications apart on one server).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn redis_error(e: redis::RedisError) -> Error {
    let kind = if e.kind() == redis::ErrorKind::AuthenticationFailed {
        ErrorKind::Unauthenticated
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() {
        ErrorKind::Connection
    } else {
        ErrorKind::Other
    };
    Error::new(kind, ADAPTER, format!("Redis: {e}")).with_source(e)
}

#[async_trait]
impl IdempotencyStore for RedisIdempotencyStore {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<bool> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(key))
            .arg("claimed")
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(set.is_some())
    }

    async fn complete(&self, key: &str, window: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(key))
            .arg("handled")
            .arg("PX")
            .arg(millis(window))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    async fn release(&self, key: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        self.release
            .key(self.key(key))
            .invoke_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(redis_error)
    }
}
