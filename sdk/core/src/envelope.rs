//! The envelope every message travels in, and its language-neutral header form.
//!
//! Transports with native fields (AMQP `correlation_id`, a NATS reply subject) use them; the
//! rest carry [`Envelope::to_headers`] as string headers or message attributes. The names are
//! documented in `docs/wire.md`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Reserved header names (see `docs/wire.md`). CloudEvents names where one fits.
pub mod header {
    /// Message id, unique per message (UUIDv7 text). CloudEvents `id`.
    pub const ID: &str = "ce-id";
    /// The logical pattern (`users.get`). CloudEvents `type`.
    pub const PATTERN: &str = "ce-type";
    /// CloudEvents spec version, always `1.0`.
    pub const SPEC_VERSION: &str = "ce-specversion";
    /// Content type of the payload. CloudEvents `datacontenttype`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Ties a reply to its request; carried across hops.
    pub const CORRELATION_ID: &str = "sb-correlation-id";
    /// Id of the message that caused this one.
    pub const CAUSATION_ID: &str = "sb-causation-id";
    /// Where a reply goes (a transport-specific address).
    pub const REPLY_TO: &str = "sb-reply-to";
    /// Absolute deadline, milliseconds since the Unix epoch (UTC), decimal.
    pub const DEADLINE: &str = "sb-deadline";
    /// Ordering key: messages with the same key are handled in order where the transport can.
    pub const KEY: &str = "sb-key";
    /// On error replies: the machine-readable error code.
    pub const ERROR_CODE: &str = "sb-error-code";
    /// On error replies: the human-readable error message.
    pub const ERROR_MESSAGE: &str = "sb-error-message";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// On dead letters: why the message was dead-lettered.
    pub const DEAD_LETTER_REASON: &str = "sb-dead-letter-reason";
    /// On dead letters: how many times delivery was attempted.
    pub const DEAD_LETTER_ATTEMPTS: &str = "sb-dead-letter-attempts";
    /// On dead letters: the consumer group whose handler gave up.
    pub const DEAD_LETTER_GROUP: &str = "sb-dead-letter-group";
    /// On dead letters: the pattern the message was sent on.
    pub const ORIGINAL_PATTERN: &str = "sb-original-pattern";
}

/// The content types the SDK's codecs speak.
pub mod content_type {
    /// JSON (serde), the default.
    pub const JSON: &str = "application/json";
    /// Protocol Buffers (prost).
    pub const PROTOBUF: &str = "application/x-protobuf";
    /// Raw bytes, passed through untouched.
    pub const BYTES: &str = "application/octet-stream";

    /// A content type read off the wire: the SDK's own ones without an allocation.
    pub fn intern(ct: &str) -> std::borrow::Cow<'static, str> {
        match ct {
            JSON => JSON.into(),
            PROTOBUF => PROTOBUF.into(),
            BYTES => BYTES.into(),
            other => other.to_owned().into(),
        }
    }
}

/// Per-thread state of [`new_v7`]: the millisecond of the last id, a sequence within it, and
/// the thread's random 48-bit node (0 until drawn).
#[derive(Clone, Copy)]
struct V7State {
    last_ms: u64,
    seq: u32,
    node: u64,
}

impl V7State {
    /// The state for the next id at clock reading `now_ms`: a later millisecond starts a new
    /// sequence; the same or an earlier one (a clock stepped back) counts on, and a full
    /// sequence moves on to the next millisecond.
    fn advance(mut self, now_ms: u64) -> Self {
        if now_ms > self.last_ms {
            self.last_ms = now_ms;
            self.seq = 0;
        } else {
            self.seq += 1;
            if self.seq >> V7_SEQ_BITS != 0 {
                self.last_ms += 1;
                self.seq = 0;
            }
        }
        self
    }
}

thread_local! {
    static V7: std::cell::Cell<V7State> =
        const { std::cell::Cell::new(V7State { last_ms: 0, seq: 0, node: 0 }) };
}

/// Bits of the sequence within a millisecond (the uuid's 12-bit `rand_a` and the top 14 bits of
/// its 62-bit `rand_b`; the other 48 are the thread's node).
const V7_SEQ_BITS: u32 = 26;

/// A UUIDv7 (RFC 9562): the Unix time in milliseconds, then a per-thread sequence within the
/// millisecond (the RFC's "fixed-length dedicated counter" method), then 48 random bits drawn
/// once per thread. Ids from one thread are strictly increasing (a clock that steps back
/// keeps counting from the last millisecond), ids from different threads or processes differ by
/// their random node; no lock, and no random draw per id (drawing 74 random bits per id cost
/// more than the rest of a request's envelope). Ids are unique, not secret.
fn new_v7() -> Uuid {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() * 1000 + u64::from(d.subsec_millis()));
    let s = V7.with(|cell| {
        let mut s = cell.get();
        if s.node == 0 {
            // Nonzero marks it drawn; 48 bits are used.
            s.node = (Uuid::new_v4().as_u64_pair().1 & 0xFFFF_FFFF_FFFF) | 1;
        }
        s = s.advance(now_ms);
        cell.set(s);
        s
    });
    // rand_a: the sequence's top 12 bits (in the low 12 bits of the first two bytes: the builder
    // writes the version over the top nibble); rand_b: the sequence's low 14 bits, then the node
    // (the builder writes the variant over the top two bits).
    let mut rest = [0u8; 10];
    let rand_a = (s.seq >> 14) as u16;
    let rand_b = (u64::from(s.seq & 0x3FFF) << 48) | s.node;
    rest[..2].copy_from_slice(&rand_a.to_be_bytes());
    rest[2..].copy_from_slice(&rand_b.to_be_bytes());
    uuid::Builder::from_unix_timestamp_millis(s.last_ms, &rest).into_uuid()
}

/// Hashes the SDK's ids (UUIDv7: a millisecond, a sequence, a random node) by folding their
/// 16 bytes and one multiplication, for maps keyed by ids the SDK made itself (waiting
/// requests). A general-purpose keyed hasher costs more per lookup than the rest of a map
/// operation; flooding is not a concern here: entries are inserted only for ids this process
/// drew, a foreign id only looks one up. Transports use it for their own maps of waiting
/// calls too.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // A multiplication carries bits only upwards; the final shifts bring the high bits
        // (which depend on every input bit) down to the low ones tables index by.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h.rotate_left(29) ^ u64::from_le_bytes(word)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
        self.0 = h;
    }

    fn write_usize(&mut self, n: usize) {
        // The length a byte slice's hash starts with: the same for every id.
        self.0 ^= n as u64;
    }
}

/// A `BuildHasher` of [`IdHasher`], for `HashMap`s and `DashMap`s keyed by ids.
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) id.
            pub fn new() -> Self {
                $name(new_v7())
            }

            /// The id as a UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// The id as hyphenated lower-case text, written into `buf` (no allocation).
            pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
                self.0.hyphenated().encode_lower(buf)
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                $name(u)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self> {
                Uuid::parse_str(s).map($name).map_err(|e| {
                    Error::codec("core", format!("invalid {} `{s}`: {e}", stringify!($name)))
                })
            }
        }
    };
}

id_type!(
    /// Unique id of one message (UUIDv7, so ids sort by creation time).
    MessageId
);
id_type!(
    /// Ties a reply to its request.
    CorrelationId
);

impl MessageId {
    /// The id a broker's own identity of a stored message implies, for transports whose
    /// broker numbers what it stores (a JetStream stream, a Kafka partition): a UUIDv7 made of
    /// the time the broker stored the message (`unix_ms`), a 12-bit hash of `source` (the
    /// stream or partition the sequence counts in) and `sequence` (its low 62 bits). Every
    /// reader and every redelivery of that message gets the same id, and the sender need not
    /// carry one.
    pub fn from_sequence(unix_ms: u64, source: &str, sequence: u64) -> Self {
        let h = crate::config::stable_hash(&[source]).to_be_bytes();
        let mut rest = [0u8; 10];
        // rand_a (12 bits: the builder overwrites the version nibble), then rand_b (62 bits:
        // it overwrites the two variant bits, which are above the sequence's 62 bits).
        rest[..2].copy_from_slice(&h[..2]);
        rest[2..].copy_from_slice(&(sequence & (u64::MAX >> 2)).to_be_bytes());
        MessageId(uuid::Builder::from_unix_timestamp_millis(unix_ms, &rest).into_uuid())
    }
}

/// A request's correlation id is, unless the caller set one, the request's own message id:
/// one id fewer to draw and, on transports that carry headers, one header fewer to send.
impl From<MessageId> for CorrelationId {
    fn from(id: MessageId) -> Self {
        CorrelationId(id.0)
    }
}

impl From<CorrelationId> for MessageId {
    fn from(id: CorrelationId) -> Self {
        MessageId(id.0)
    }
}

/// An error carried by a reply: the responder's code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    /// Machine-readable code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl ReplyError {
    /// The caller's error kind for this reply error: `Handler` for a handler's own code; the
    /// SDK's kind for the codes reserved to it, which the responder's side or a transport
    /// sets when the request failed outside the handler (`codec`: the request did not decode;
    /// `payload_too_large`; `timeout`: the handler did not answer in time; `no_responder`,
    /// `connection`, `closed`, `unauthenticated`: the request never reached a handler).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind as K;
        match self.code.as_str() {
            "codec" => K::Codec,
            "payload_too_large" => K::PayloadTooLarge,
            "timeout" => K::Timeout,
            "no_responder" => K::NoResponder,
            "connection" => K::Connection,
            "closed" => K::Closed,
            "unauthenticated" => K::Unauthenticated,
            _ => K::Handler,
        }
    }
}

/// A message: payload bytes plus the metadata every transport carries.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Unique per message.
    pub id: MessageId,
    /// The logical name the message was sent on (`users.get`).
    pub pattern: String,
    /// Ties a reply to its request.
    pub correlation_id: Option<CorrelationId>,
    /// The message that caused this one.
    pub causation_id: Option<MessageId>,
    /// Where a reply goes (transport-specific address).
    pub reply_to: Option<String>,
    /// Absolute time after which the message is worthless.
    pub deadline: Option<SystemTime>,
    /// Ordering key.
    pub key: Option<String>,
    /// On replies: the responder's error, if its handler failed.
    pub error: Option<ReplyError>,
    /// Content type of `payload`; `None` means unknown (treated as JSON by typed handlers).
    /// The SDK's own content types are static strings, not allocated per message.
    pub content_type: Option<Cow<'static, str>>,
    /// Other headers: `traceparent`, `tracestate` and user headers.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Bytes,
}

impl Envelope {
    /// A new envelope with a fresh id.
    pub fn new(pattern: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self::with_id(MessageId::new(), pattern.into(), payload.into())
    }

    /// An envelope with the given id and nothing else set: for bridges that read messages
    /// carrying their own id (drawing a fresh one to overwrite costs a clock read).
    pub fn with_id(id: MessageId, pattern: String, payload: Bytes) -> Self {
        Envelope {
            id,
            pattern,
            correlation_id: None,
            causation_id: None,
            reply_to: None,
            deadline: None,
            key: None,
            error: None,
            content_type: None,
            headers: BTreeMap::new(),
            payload,
        }
    }

    /// Sets the content type.
    pub fn with_content_type(mut self, ct: impl Into<Cow<'static, str>>) -> Self {
        self.content_type = Some(ct.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// A reply to `request`: same pattern and correlation id, caused by the request, carrying
    /// its trace context, addressed to its `reply_to`. Its id is the request's: a reply's id is
    /// never sent nor shown (docs/wire.md), so none is drawn for it.
    pub fn reply_to(request: &Envelope, payload: impl Into<Bytes>) -> Self {
        let mut reply = Envelope::with_id(request.id, request.pattern.clone(), payload.into());
        reply.correlation_id = request.correlation_id;
        reply.causation_id = Some(request.id);
        reply.reply_to = request.reply_to.clone();
        for name in [header::TRACEPARENT, header::TRACESTATE] {
            if let Some(v) = request.headers.get(name) {
                reply.headers.insert(name.to_owned(), v.clone());
            }
        }
        reply
    }

    /// [`Envelope::reply_to`] for a request that is no longer needed: its pattern, reply
    /// address and trace headers move into the reply instead of being copied.
    pub fn into_reply(mut self, payload: impl Into<Bytes>) -> Self {
        // Changed in place: the request's allocation-holding fields stay where they are.
        self.causation_id = Some(self.id);
        self.deadline = None;
        self.key = None;
        self.error = None;
        self.content_type = None;
        self.headers
            .retain(|name, _| name == header::TRACEPARENT || name == header::TRACESTATE);
        self.payload = payload.into();
        self
    }

    /// Whether a reply may leave out its causation id: it equals the correlation id (the
    /// request's id, for the SDK's requests), which [`Envelope::complete_reply`] takes for it.
    pub fn causation_implied(&self) -> bool {
        matches!((self.causation_id, self.correlation_id), (Some(c), Some(k)) if c.as_uuid() == k.as_uuid())
    }

    /// The address of a reply as an owned string for the transport: the envelope's own
    /// `reply_to` moved out when it is `address` (the usual case: no copy), else a copy.
    pub fn take_reply_address(&mut self, address: &str) -> String {
        match self.reply_to.take() {
            Some(r) if r == address => r,
            _ => address.to_owned(),
        }
    }

    /// Fills in what a reply may leave out because its requester knows it (docs/wire.md): the
    /// correlation id (`correlation`, the request's) and the causation id (then the request's
    /// id, which is its correlation id unless the caller chose one). Ids already present stay.
    pub fn complete_reply(&mut self, correlation: Option<CorrelationId>) {
        if self.correlation_id.is_none() {
            self.correlation_id = correlation;
        }
        if self.causation_id.is_none() {
            self.causation_id = self.correlation_id.map(MessageId::from);
        }
    }

    /// Adds the headers a dead letter carries (docs/wire.md): why, after how many attempts,
    /// the pattern it was sent on, and the group that gave up on it (events).
    pub fn mark_dead_letter(
        &mut self,
        pattern: &str,
        group: Option<&str>,
        attempt: u32,
        reason: &str,
    ) {
        self.headers
            .insert(header::DEAD_LETTER_REASON.to_owned(), reason.to_owned());
        self.headers
            .insert(header::DEAD_LETTER_ATTEMPTS.to_owned(), attempt.to_string());
        self.headers
            .insert(header::ORIGINAL_PATTERN.to_owned(), pattern.to_owned());
        if let Some(g) = group {
            self.headers
                .insert(header::DEAD_LETTER_GROUP.to_owned(), g.to_owned());
        }
    }

    /// Whether the deadline, if any, has passed.
    pub fn is_expired(&self) -> bool {
        self.deadline.is_some_and(|d| d <= SystemTime::now())
    }

    /// Time left until the deadline (`None` without one; zero once passed).
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline.map(|d| {
            d.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    /// The envelope as string headers (everything but the payload: reserved headers, then
    /// user headers), for transports whose metadata is a string map. Inverse of
    /// [`Envelope::from_headers`].
    pub fn to_headers(&self) -> Vec<(&str, String)> {
        let mut h: Vec<(&str, String)> = Vec::with_capacity(8 + self.headers.len());
        h.push((header::ID, self.id.to_string()));
        h.push((header::PATTERN, self.pattern.clone()));
        h.push((header::SPEC_VERSION, "1.0".to_owned()));
        if let Some(ct) = &self.content_type {
            h.push((header::CONTENT_TYPE, ct.to_string()));
        }
        if let Some(c) = &self.correlation_id {
            h.push((header::CORRELATION_ID, c.to_string()));
        }
        if let Some(c) = &self.causation_id {
            h.push((header::CAUSATION_ID, c.to_string()));
        }
        if let Some(r) = &self.reply_to {
            h.push((header::REPLY_TO, r.clone()));
        }
        if let Some(d) = self.deadline {
            h.push((header::DEADLINE, system_time_to_millis(d).to_string()));
        }
        if let Some(k) = &self.key {
            h.push((header::KEY, k.clone()));
        }
        if let Some(e) = &self.error {
            h.push((header::ERROR_CODE, e.code.clone()));
            h.push((header::ERROR_MESSAGE, e.message.clone()));
        }
        for (k, v) in &self.headers {
            h.push((k.as_str(), v.clone()));
        }
        h
    }

    /// Builds an envelope from string headers and a payload, as a foreign producer (or a
    /// broker CLI) would send it.
    ///
    /// Missing SDK headers are fine: a message with none still decodes (fresh id, the given
    /// `fallback_pattern`, unknown content type). A present but malformed reserved header
    /// (an id that is not a UUID, a deadline that is not a number) is a codec error, so the
    /// consumer can dead-letter the message with the reason.
    ///
    /// # Errors
    /// [`crate::ErrorKind::Codec`] naming the header that could not be parsed.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: Bytes,
        fallback_pattern: &str,
    ) -> Result<Envelope> {
        Self::from_headers_or_id(headers, payload, fallback_pattern, None)
    }

    /// [`Envelope::from_headers`] for a message whose id is implied by the broker (see
    /// [`MessageId::from_sequence`]) when it carries no `ce-id` header: `implied` when given,
    /// else a fresh one.
    pub fn from_headers_or_id<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: Bytes,
        fallback_pattern: &str,
        implied: Option<MessageId>,
    ) -> Result<Envelope> {
        let mut env = Envelope::unfilled(payload);
        env.fill_from_headers(headers, fallback_pattern, implied)?;
        Ok(env)
    }

    /// Reads a message the way a broker adapter receives it, as [`Envelope::from_headers_or_id`]
    /// does, but never fails: a message whose headers do not parse comes back as a fresh
    /// envelope holding the payload as received (and the implied id, if any) with the reason,
    /// so that the consumer can dead-letter it. Nothing half-read stays.
    pub fn read<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        payload: Bytes,
        fallback_pattern: &str,
        implied: Option<MessageId>,
    ) -> (Envelope, Option<String>) {
        let mut env = Envelope::unfilled(payload);
        let malformed = env.read_headers(headers, fallback_pattern, implied);
        (env, malformed)
    }

    /// [`Envelope::read`] in place, into an envelope that holds only its payload
    /// ([`Envelope::unfilled`]): the reason the headers could not be read, if they could not
    /// (the envelope is then a fresh one holding the payload).
    pub(crate) fn read_headers<'a>(
        &mut self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        fallback_pattern: &str,
        implied: Option<MessageId>,
    ) -> Option<String> {
        let e = self
            .fill_from_headers(headers, fallback_pattern, implied)
            .err()?;
        let payload = std::mem::take(&mut self.payload);
        *self = Envelope::new(fallback_pattern, payload);
        if let Some(id) = implied {
            self.id = id;
        }
        Some(e.message().to_owned())
    }

    /// An envelope holding only `payload`, for [`Envelope::fill_from_headers`] (no id drawn).
    pub(crate) fn unfilled(payload: Bytes) -> Self {
        Envelope::with_id(MessageId(Uuid::nil()), String::new(), payload)
    }

    /// Sets this envelope's fields from string headers (see [`Envelope::from_headers_or_id`]).
    /// On an error the envelope is left part-filled, its payload untouched, for the caller to
    /// keep the payload of a malformed message without a copy.
    pub(crate) fn fill_from_headers<'a>(
        &mut self,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        fallback_pattern: &str,
        implied: Option<MessageId>,
    ) -> Result<()> {
        // A fresh id only when the message has none (drawing one costs a clock read).
        let mut id = None;
        let mut pattern = None;
        let env = self;
        for (name, value) in headers {
            match name {
                header::ID => id = Some(parse_id(name, value)?),
                header::PATTERN => pattern = Some(value),
                header::SPEC_VERSION => {}
                header::CONTENT_TYPE => env.content_type = Some(content_type::intern(value)),
                header::CORRELATION_ID => env.correlation_id = Some(parse_id(name, value)?),
                header::CAUSATION_ID => env.causation_id = Some(parse_id(name, value)?),
                header::REPLY_TO => env.reply_to = Some(value.to_owned()),
                header::DEADLINE => {
                    let ms: u64 = value.parse().map_err(|_| {
                        Error::codec(
                            "core",
                            format!(
                                "header `{}` is not a number of milliseconds: `{value}`",
                                header::DEADLINE
                            ),
                        )
                    })?;
                    env.deadline = Some(UNIX_EPOCH + Duration::from_millis(ms));
                }
                header::KEY => env.key = Some(value.to_owned()),
                header::ERROR_CODE => {
                    env.error.get_or_insert_with(empty_reply_error).code = value.to_owned()
                }
                header::ERROR_MESSAGE => {
                    env.error.get_or_insert_with(empty_reply_error).message = value.to_owned()
                }
                other => {
                    env.headers.insert(other.to_owned(), value.to_owned());
                }
            }
        }
        env.id = id.or(implied).unwrap_or_default();
        env.pattern = pattern.unwrap_or(fallback_pattern).to_owned();
        Ok(())
    }
}

fn parse_id<T: FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::codec("core", format!("header `{name}` is not a UUID: `{value}`")))
}

fn empty_reply_error() -> ReplyError {
    ReplyError {
        code: String::new(),
        message: String::new(),
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn system_time_to_millis(t: SystemTime) -> u64 {
    // Seconds and milliseconds apart: no 128-bit division.
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(d.subsec_millis()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_envelope() -> Envelope {
        let mut env =
            Envelope::new("users.get", &b"{\"id\":1}"[..]).with_content_type(content_type::JSON);
        env.correlation_id = Some(CorrelationId::new());
        env.causation_id = Some(MessageId::new());
        env.reply_to = Some("_replies.abc".into());
        env.deadline = Some(UNIX_EPOCH + Duration::from_millis(1_732_000_000_123));
        env.key = Some("user-1".into());
        env.error = Some(ReplyError {
            code: "not_found".into(),
            message: "no such user".into(),
        });
        env.headers.insert(
            header::TRACEPARENT.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        env.headers.insert("x-tenant".into(), "acme".into());
        env
    }

    #[test]
    fn ids_from_a_broker_sequence_are_stable_time_ordered_v7() {
        let ms = 1_732_000_000_123;
        let a = MessageId::from_sequence(ms, "SB_EVENTS", 41);
        assert_eq!(a, MessageId::from_sequence(ms, "SB_EVENTS", 41), "stable");
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert_eq!(a.as_uuid().get_variant(), uuid::Variant::RFC4122);
        let ts = a
            .as_uuid()
            .get_timestamp()
            .expect("v7 has a time")
            .to_unix();
        assert_eq!((ts.0 * 1000 + u64::from(ts.1) / 1_000_000), ms);
        assert_ne!(
            a,
            MessageId::from_sequence(ms, "SB_EVENTS", 42),
            "per sequence"
        );
        assert_ne!(a, MessageId::from_sequence(ms, "OTHER", 41), "per source");
        assert!(
            a < MessageId::from_sequence(ms + 1, "SB_EVENTS", 0),
            "ordered by time"
        );
        // The sequence's low 62 bits are kept whole.
        let big = MessageId::from_sequence(ms, "s", (1 << 62) - 1);
        assert_ne!(big, MessageId::from_sequence(ms, "s", (1 << 62) - 2));
    }

    #[test]
    fn an_implied_id_is_used_only_without_a_ce_id_header() {
        let implied = MessageId::from_sequence(1, "s", 7);
        let none: [(&str, &str); 0] = [];
        let env =
            Envelope::from_headers_or_id(none, Bytes::new(), "p", Some(implied)).expect("decodes");
        assert_eq!(env.id, implied);
        let own = MessageId::new().to_string();
        let env = Envelope::from_headers_or_id(
            [(header::ID, own.as_str())],
            Bytes::new(),
            "p",
            Some(implied),
        )
        .expect("decodes");
        assert_eq!(env.id.to_string(), own, "the header wins");
    }

    #[test]
    fn headers_round_trip() {
        let env = full_envelope();
        let pairs = env.to_headers();
        let back = Envelope::from_headers(
            pairs.iter().map(|(k, v)| (*k, v.as_str())),
            env.payload.clone(),
            "ignored",
        )
        .expect("decodes");
        assert_eq!(back, env);
    }

    #[test]
    fn foreign_message_without_headers_decodes() {
        let env = Envelope::from_headers([], Bytes::from_static(b"hello"), "orders.created")
            .expect("decodes");
        assert_eq!(env.pattern, "orders.created");
        assert_eq!(env.content_type, None);
        assert_eq!(&env.payload[..], b"hello");
    }

    #[test]
    fn malformed_reserved_header_is_a_codec_error() {
        let err = Envelope::from_headers([(header::DEADLINE, "soon")], Bytes::new(), "p")
            .expect_err("bad deadline");
        assert_eq!(err.kind(), crate::ErrorKind::Codec);
        assert!(err.to_string().contains("sb-deadline"), "{err}");
        let err =
            Envelope::from_headers([(header::ID, "42")], Bytes::new(), "p").expect_err("bad id");
        assert_eq!(err.kind(), crate::ErrorKind::Codec);
    }

    #[test]
    fn reply_copies_correlation_and_trace() {
        let req = full_envelope();
        let reply = Envelope::reply_to(&req, Bytes::new());
        assert_eq!(reply.correlation_id, req.correlation_id);
        assert_eq!(reply.causation_id, Some(req.id));
        assert_eq!(reply.reply_to, req.reply_to);
        assert_eq!(
            reply.headers.get(header::TRACEPARENT),
            req.headers.get(header::TRACEPARENT)
        );
        assert!(!reply.headers.contains_key("x-tenant"));
        // Built from the request by value, the reply is the same.
        assert_eq!(req.clone().into_reply(Bytes::new()), reply);
    }

    #[test]
    fn ids_hash_apart() {
        use std::hash::BuildHasher;
        // Consecutive ids of one thread differ only in their sequence bits; their hashes must
        // still spread over a table's low (index) bits and high (shard) bits.
        let ids: Vec<MessageId> = (0..4096).map(|_| MessageId::new()).collect();
        let hashes: Vec<u64> = ids
            .iter()
            .map(|id| IdHash::default().hash_one(id))
            .collect();
        for (bits, shift) in [(0x3FF_u64, 0), (0x3FF_u64, 54)] {
            let buckets: std::collections::HashSet<u64> =
                hashes.iter().map(|h| (h >> shift) & bits).collect();
            assert!(
                buckets.len() > 900,
                "{} of 1024 buckets used",
                buckets.len()
            );
        }
    }

    #[test]
    fn reply_helpers_follow_the_wire_rules() {
        let mut req = Envelope::new("users.get", Bytes::new());
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.reply_to = Some("inbox.1".into());
        let mut reply = Envelope::reply_to(&req, Bytes::new());
        assert!(reply.causation_implied());
        assert_eq!(reply.take_reply_address("inbox.1"), "inbox.1");
        assert_eq!(reply.reply_to, None, "moved out, not copied");
        reply.reply_to = Some("inbox.1".into());
        assert_eq!(reply.take_reply_address("elsewhere"), "elsewhere");
        reply.causation_id = Some(MessageId::new());
        assert!(!reply.causation_implied());
    }

    #[test]
    fn the_id_sequence_survives_a_clock_stepping_back_and_a_full_millisecond() {
        let s = V7State {
            last_ms: 1_000,
            seq: 5,
            node: 1,
        };
        // Later: a new sequence. Earlier (clock stepped back): counts on from the last one.
        let later = s.advance(1_001);
        assert_eq!((later.last_ms, later.seq), (1_001, 0));
        let back = s.advance(900);
        assert_eq!((back.last_ms, back.seq), (1_000, 6));
        // A full sequence moves to the next millisecond rather than wrapping.
        let full = V7State {
            seq: (1 << V7_SEQ_BITS) - 1,
            ..s
        };
        let next = full.advance(1_000);
        assert_eq!((next.last_ms, next.seq), (1_001, 0));
    }

    #[test]
    fn message_ids_sort_by_creation() {
        // Many in the same millisecond, from one thread: strictly increasing, all version 7.
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::new()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.iter().all(|id| id.as_uuid().get_version_num() == 7));
        assert!(
            ids.iter()
                .all(|id| id.as_uuid().get_variant() == uuid::Variant::RFC4122)
        );
        // Another thread's ids are unique too.
        let other =
            std::thread::spawn(|| (0..10_000).map(|_| MessageId::new()).collect::<Vec<_>>())
                .join()
                .expect("thread");
        let all: std::collections::HashSet<_> = ids.iter().chain(&other).collect();
        assert_eq!(all.len(), 20_000);
    }
}
