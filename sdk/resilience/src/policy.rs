//! What each policy does, per pattern: set in code with builders, or read from a TOML file
//! (the file's keys are documented on [`Policies::from_toml`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use switchboard_core::{Backoff, Encode, Error, ErrorKind, Result};

use crate::events::PolicyEvent;

/// The handler error code treated as transient by default (retried, counted by the breaker,
/// replaced by a fallback), as gRPC's `UNAVAILABLE` is.
pub const UNAVAILABLE: &str = "unavailable";

/// The policies of one pattern. Every part is optional; a pattern's policy takes each part it
/// sets and inherits the others from the default policy ([`Policies::default_policy`]).
#[non_exhaustive]
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Time the whole call may take (all attempts and waits), from the moment it is made;
    /// becomes the message's deadline. Bounded by the deadline of the message being handled,
    /// when the call is made on its behalf. `None`: the call's own or the client's timeout.
    pub timeout: Option<Duration>,
    /// Time one attempt may take; each attempt's message carries the earlier of this and the
    /// call's deadline, so a slow attempt can be retried while time is left.
    pub attempt_timeout: Option<Duration>,
    /// Retries of transient failures.
    pub retry: Option<Retry>,
    /// A circuit breaker per pattern.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// A concurrency limit per pattern with a bounded queue.
    pub bulkhead: Option<Bulkhead>,
    /// A limit on calls in flight per pattern beyond which calls fail at once.
    pub load_shed: Option<LoadShed>,
    /// What a failed call returns instead of its error.
    pub fallback: Option<Fallback>,
    /// Handler error codes that count as transient, besides the transient kinds (timeout,
    /// connection, no responder, overloaded). `None`: [`UNAVAILABLE`] alone.
    pub transient_codes: Option<Vec<String>>,
}

impl Policy {
    /// A policy with nothing set.
    pub fn new() -> Self {
        Policy::default()
    }

    /// Sets the whole call's timeout.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Sets the timeout of each attempt.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.attempt_timeout = Some(d);
        self
    }

    /// Sets the retries.
    pub fn retry(mut self, r: Retry) -> Self {
        self.retry = Some(r);
        self
    }

    /// Sets the circuit breaker.
    pub fn circuit_breaker(mut self, b: CircuitBreaker) -> Self {
        self.circuit_breaker = Some(b);
        self
    }

    /// Sets the bulkhead.
    pub fn bulkhead(mut self, b: Bulkhead) -> Self {
        self.bulkhead = Some(b);
        self
    }

    /// Sets load shedding.
    pub fn load_shed(mut self, l: LoadShed) -> Self {
        self.load_shed = Some(l);
        self
    }

    /// Sets the fallback.
    pub fn fallback(mut self, f: Fallback) -> Self {
        self.fallback = Some(f);
        self
    }

    /// Sets the handler error codes that count as transient (replacing [`UNAVAILABLE`]).
    pub fn transient_codes<I, S>(mut self, codes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.transient_codes = Some(codes.into_iter().map(Into::into).collect());
        self
    }

    /// Whether no part is set (calls then go straight to the client).
    pub fn is_empty(&self) -> bool {
        self.timeout.is_none()
            && self.attempt_timeout.is_none()
            && self.retry.is_none()
            && self.circuit_breaker.is_none()
            && self.bulkhead.is_none()
            && self.load_shed.is_none()
            && self.fallback.is_none()
    }

    /// This policy with the parts it leaves unset taken from `base`.
    pub(crate) fn over(&self, base: &Policy) -> Policy {
        Policy {
            timeout: self.timeout.or(base.timeout),
            attempt_timeout: self.attempt_timeout.or(base.attempt_timeout),
            retry: self.retry.clone().or_else(|| base.retry.clone()),
            circuit_breaker: self
                .circuit_breaker
                .clone()
                .or_else(|| base.circuit_breaker.clone()),
            bulkhead: self.bulkhead.clone().or_else(|| base.bulkhead.clone()),
            load_shed: self.load_shed.clone().or_else(|| base.load_shed.clone()),
            fallback: self.fallback.clone().or_else(|| base.fallback.clone()),
            transient_codes: self
                .transient_codes
                .clone()
                .or_else(|| base.transient_codes.clone()),
        }
    }

    fn validate(&self, name: &str) -> Result<()> {
        let bad = |what: String| {
            Err(Error::invalid_config(
                crate::NAME,
                format!("{name}: {what}"),
            ))
        };
        for (key, d) in [
            ("timeout", self.timeout),
            ("attempt_timeout", self.attempt_timeout),
        ] {
            if d == Some(Duration::ZERO) {
                return bad(format!("`{key}` must be positive"));
            }
        }
        if let Some(r) = &self.retry {
            if r.max_attempts == 0 {
                return bad("`retry.max_attempts` must be at least 1".into());
            }
            if r.backoff.initial.is_zero() || r.backoff.max < r.backoff.initial {
                return bad(
                    "`retry` backoff needs a positive initial delay no larger than its maximum"
                        .into(),
                );
            }
            if !(r.backoff.multiplier >= 1.0 && r.backoff.multiplier.is_finite()) {
                return bad("`retry.multiplier` must be a finite number of at least 1".into());
            }
        }
        if let Some(b) = &self.circuit_breaker {
            if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
                return bad(format!(
                    "`circuit_breaker.failure_rate` must be in (0, 1], got {}",
                    b.failure_rate
                ));
            }
            if b.minimum_calls == 0 || b.half_open_calls == 0 || b.open_for.is_zero() {
                return bad(
                    "`circuit_breaker` needs positive `minimum_calls`, `half_open_calls` and `open_ms`"
                        .into(),
                );
            }
            match b.window {
                Window::Calls(0) => {
                    return bad("`circuit_breaker.window_calls` must be positive".into());
                }
                Window::Time(d) if d.is_zero() => {
                    return bad("`circuit_breaker.window_ms` must be positive".into());
                }
                _ => {}
            }
        }
        if self
            .bulkhead
            .as_ref()
            .is_some_and(|b| b.max_concurrent == 0)
        {
            return bad("`bulkhead.max_concurrent` must be positive".into());
        }
        if self
            .load_shed
            .as_ref()
            .is_some_and(|l| l.max_in_flight == 0)
        {
            return bad("`load_shed.max_in_flight` must be positive".into());
        }
        Ok(())
    }
}

/// Retries of transient failures with exponential backoff and jitter (the backoff of the
/// consumer side, [`Backoff`]). An attempt is made only if it can start before the call's
/// deadline; retries never outlive the call.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Delay between attempts. Default 100 ms doubling to 10 s at most, each drawn from the
    /// upper half of its range.
    pub backoff: Backoff,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 3,
            backoff: Backoff::default(),
        }
    }
}

impl Retry {
    /// Up to `max_attempts` attempts in all, with the default backoff.
    pub fn attempts(max_attempts: u32) -> Self {
        Retry {
            max_attempts,
            ..Retry::default()
        }
    }

    /// Sets the backoff.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }
}

/// Which calls a circuit breaker's failure rate is computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Calls(usize),
    /// The calls of the last period.
    Time(Duration),
}

/// A circuit breaker: closed, it lets calls through and records their outcome; once at least
/// `minimum_calls` are in its window and the share of failures reaches `failure_rate`, it
/// opens and fails calls at once (`ErrorKind::CircuitOpen`); after `open_for` it lets
/// `half_open_calls` probes through, closing if they succeed and opening again if not.
/// A failure is a transient error (see [`Policy::transient_codes`]).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub struct CircuitBreaker {
    /// Share of failed calls (0 to 1] that opens the circuit. Default 0.5.
    pub failure_rate: f64,
    /// The rolling window. Default the last 20 calls.
    pub window: Window,
    /// Calls the window must hold before the rate counts. Default 10.
    pub minimum_calls: usize,
    /// How long the circuit stays open before probing. Default 5 s.
    pub open_for: Duration,
    /// Probes let through while half-open. Default 2.
    pub half_open_calls: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker {
            failure_rate: 0.5,
            window: Window::Calls(20),
            minimum_calls: 10,
            open_for: Duration::from_secs(5),
            half_open_calls: 2,
        }
    }
}

impl CircuitBreaker {
    /// The default breaker.
    pub fn new() -> Self {
        CircuitBreaker::default()
    }

    /// Sets the failure rate that opens the circuit.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Sets the window.
    pub fn window(mut self, w: Window) -> Self {
        self.window = w;
        self
    }

    /// Sets the minimum number of calls.
    pub fn minimum_calls(mut self, n: usize) -> Self {
        self.minimum_calls = n;
        self
    }

    /// Sets how long the circuit stays open.
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Sets the number of probes while half-open.
    pub fn half_open_calls(mut self, n: usize) -> Self {
        self.half_open_calls = n;
        self
    }
}

/// A concurrency limit per pattern: at most `max_concurrent` calls run, at most `max_queue`
/// more wait (until their deadline) for a place; beyond that calls fail at once with
/// `ErrorKind::Overloaded`. Other patterns are not affected.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bulkhead {
    /// Calls running at once.
    pub max_concurrent: usize,
    /// Calls waiting for a place.
    pub max_queue: usize,
}

impl Bulkhead {
    /// `max_concurrent` calls at once, `max_queue` waiting.
    pub fn new(max_concurrent: usize, max_queue: usize) -> Self {
        Bulkhead {
            max_concurrent,
            max_queue,
        }
    }
}

/// Load shedding: with `max_in_flight` calls of the pattern in flight, the next fails at once
/// with `ErrorKind::Overloaded`, without waiting.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadShed {
    /// Calls in flight before shedding.
    pub max_in_flight: usize,
}

impl LoadShed {
    /// Shed beyond `max_in_flight` calls in flight.
    pub fn new(max_in_flight: usize) -> Self {
        LoadShed { max_in_flight }
    }
}

type FallbackFn = dyn Fn(&Error) -> Option<Result<(Bytes, Cow<'static, str>)>> + Send + Sync;

/// What a call returns instead of failing, when it fails with a transient error, is shed, or
/// finds its circuit open. Other errors (bad input, a handler's own non-transient error)
/// pass through.
#[derive(Clone)]
pub enum Fallback {
    /// An encoded value.
    Value {
        /// The payload.
        payload: Bytes,
        /// Its content type.
        content_type: Cow<'static, str>,
    },
    /// A function of the error; `None` lets the error through.
    Function(Arc<FallbackFn>),
}

impl fmt::Debug for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Value { content_type, .. } => f
                .debug_struct("Fallback::Value")
                .field("content_type", content_type)
                .finish_non_exhaustive(),
            Fallback::Function(_) => f.write_str("Fallback::Function"),
        }
    }
}

impl Fallback {
    /// A fixed value.
    ///
    /// # Errors
    /// `Codec` if it does not encode.
    pub fn value<T: Encode + ?Sized>(value: &T) -> Result<Self> {
        let (payload, content_type) = value.encode()?;
        Ok(Fallback::Value {
            payload,
            content_type,
        })
    }

    /// A function of the error: `Some(value)` is returned instead, `None` lets the error
    /// through.
    pub fn function<T, F>(f: F) -> Self
    where
        T: Encode,
        F: Fn(&Error) -> Option<T> + Send + Sync + 'static,
    {
        Fallback::Function(Arc::new(move |e| f(e).map(|v| v.encode())))
    }
}

/// A listener of policy events.
pub type Listener = Arc<dyn Fn(&PolicyEvent) + Send + Sync>;

/// The policies of a client: a default for every pattern and overrides per pattern, and
/// who hears what they do.
#[derive(Clone, Default)]
pub struct Policies {
    pub(crate) default: Policy,
    pub(crate) patterns: BTreeMap<String, Policy>,
    pub(crate) listeners: Vec<Listener>,
}

impl fmt::Debug for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policies")
            .field("default", &self.default)
            .field("patterns", &self.patterns)
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl Policies {
    /// No policies: calls go straight to the client.
    pub fn new() -> Self {
        Policies::default()
    }

    /// Sets the policy of every pattern without one of its own (each pattern gets its own
    /// breaker, bulkhead and limits built from it).
    pub fn default_policy(mut self, p: Policy) -> Self {
        self.default = p;
        self
    }

    /// Sets the policy of `pattern` (exact name); parts it leaves unset come from the default.
    pub fn pattern(mut self, pattern: impl Into<String>, p: Policy) -> Self {
        self.patterns.insert(pattern.into(), p);
        self
    }

    /// Adds a listener of what the policies do (retries, breaker states, rejections,
    /// fallbacks). Every event is also logged through `tracing`.
    pub fn on_event(mut self, f: impl Fn(&PolicyEvent) + Send + Sync + 'static) -> Self {
        self.listeners.push(Arc::new(f));
        self
    }

    /// The policy in force for `pattern`.
    pub fn policy_for(&self, pattern: &str) -> Policy {
        match self.patterns.get(pattern) {
            Some(p) => p.over(&self.default),
            None => self.default.clone(),
        }
    }

    /// Checks every policy.
    ///
    /// # Errors
    /// `InvalidConfig` naming the pattern and the value.
    pub fn validate(&self) -> Result<()> {
        self.default.validate("default policy")?;
        for (pattern, p) in &self.patterns {
            switchboard_core::validate_pattern(pattern)?;
            p.over(&self.default)
                .validate(&format!("policy of `{pattern}`"))?;
        }
        Ok(())
    }

    /// Reads policies from TOML:
    ///
    /// ```toml
    /// [default]                       # every pattern without its own section
    /// timeout_ms = 2000               # the whole call, all attempts included
    /// attempt_timeout_ms = 500        # one attempt
    /// transient_codes = ["unavailable"]
    ///
    /// [default.retry]
    /// max_attempts = 3
    /// initial_backoff_ms = 50         # then doubled (multiplier) up to max_backoff_ms
    /// max_backoff_ms = 1000
    /// multiplier = 2.0
    ///
    /// [patterns."users.get".circuit_breaker]
    /// failure_rate = 0.5              # share of failures that opens it
    /// window_calls = 20               # or window_ms = 10000 for a time window
    /// minimum_calls = 10
    /// open_ms = 5000                  # open this long, then probe
    /// half_open_calls = 2
    ///
    /// [patterns."users.get".bulkhead]
    /// max_concurrent = 16
    /// max_queue = 32
    ///
    /// [patterns."users.get".load_shed]
    /// max_in_flight = 100
    ///
    /// [patterns."users.get".fallback]
    /// json = { id = 0, name = "unknown" }   # returned as the reply, encoded as JSON
    /// ```
    ///
    /// Omitted keys take the defaults of the builders ([`Retry`], [`CircuitBreaker`]).
    ///
    /// # Errors
    /// `InvalidConfig` for TOML that does not parse, an unknown key, or a bad value.
    pub fn from_toml(text: &str) -> Result<Self> {
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            Error::invalid_config(crate::NAME, format!("policy file: {e}")).with_source(e)
        })?;
        let mut policies = Policies::new().default_policy(file.default.into_policy()?);
        for (pattern, p) in file.patterns {
            policies = policies.pattern(pattern, p.into_policy()?);
        }
        policies.validate()?;
        Ok(policies)
    }

    /// Reads policies from a TOML file (see [`Policies::from_toml`]).
    ///
    /// # Errors
    /// `InvalidConfig` if the file cannot be read, as well as those of `from_toml`.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid_config(
                crate::NAME,
                format!("cannot read policy file {}: {e}", path.display()),
            )
            .with_source(e)
        })?;
        Policies::from_toml(&text)
    }
}

/// Whether an error is transient under `codes`: retried, counted by the breaker, replaced by
/// a fallback.
pub(crate) fn is_transient(e: &Error, codes: &[String]) -> bool {
    e.is_retryable() || (e.kind() == ErrorKind::Handler && codes.iter().any(|c| c == e.code()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    default: FilePolicy,
    #[serde(default)]
    patterns: BTreeMap<String, FilePolicy>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    timeout_ms: Option<u64>,
    attempt_timeout_ms: Option<u64>,
    transient_codes: Option<Vec<String>>,
    retry: Option<FileRetry>,
    circuit_breaker: Option<FileBreaker>,
    bulkhead: Option<FileBulkhead>,
    load_shed: Option<FileLoadShed>,
    fallback: Option<FileFallback>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    multiplier: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBreaker {
    failure_rate: Option<f64>,
    window_calls: Option<usize>,
    window_ms: Option<u64>,
    minimum_calls: Option<usize>,
    open_ms: Option<u64>,
    half_open_calls: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBulkhead {
    max_concurrent: usize,
    #[serde(default)]
    max_queue: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLoadShed {
    max_in_flight: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFallback {
    json: serde_json::Value,
}

impl FilePolicy {
    fn into_policy(self) -> Result<Policy> {
        let ms = Duration::from_millis;
        let retry = self.retry.map(|r| {
            let d = Retry::default();
            let mut backoff = Backoff::exponential(
                r.initial_backoff_ms.map_or(d.backoff.initial, ms),
                r.max_backoff_ms.map_or(d.backoff.max, ms),
            );
            backoff.multiplier = r.multiplier.unwrap_or(d.backoff.multiplier);
            Retry {
                max_attempts: r.max_attempts.unwrap_or(d.max_attempts),
                backoff,
            }
        });
        let circuit_breaker = match self.circuit_breaker {
            None => None,
            Some(b) => {
                let d = CircuitBreaker::default();
                let window = match (b.window_calls, b.window_ms) {
                    (Some(_), Some(_)) => {
                        return Err(Error::invalid_config(
                            crate::NAME,
                            "policy file: a circuit breaker has `window_calls` or `window_ms`, not both",
                        ));
                    }
                    (Some(n), None) => Window::Calls(n),
                    (None, Some(t)) => Window::Time(ms(t)),
                    (None, None) => d.window,
                };
                Some(CircuitBreaker {
                    failure_rate: b.failure_rate.unwrap_or(d.failure_rate),
                    window,
                    minimum_calls: b.minimum_calls.unwrap_or(d.minimum_calls),
                    open_for: b.open_ms.map_or(d.open_for, ms),
                    half_open_calls: b.half_open_calls.unwrap_or(d.half_open_calls),
                })
            }
        };
        let fallback = match self.fallback {
            None => None,
            Some(f) => Some(Fallback::value(&f.json)?),
        };
        Ok(Policy {
            timeout: self.timeout_ms.map(ms),
            attempt_timeout: self.attempt_timeout_ms.map(ms),
            retry,
            circuit_breaker,
            bulkhead: self
                .bulkhead
                .map(|b| Bulkhead::new(b.max_concurrent, b.max_queue)),
            load_shed: self.load_shed.map(|l| LoadShed::new(l.max_in_flight)),
            fallback,
            transient_codes: self.transient_codes,
        })
    }
}
