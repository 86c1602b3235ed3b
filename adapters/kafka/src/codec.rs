//! Envelope → Kafka record headers. The names are the project's wire names (docs/wire.md);
//! values are UTF-8 text. Headers are copied into librdkafka, written into every produce
//! request, parsed by the broker and freed after the delivery report, so what a reader knows
//! without a header is left out:
//!
//! - `ce-specversion` (always 1.0) and `content-type` `application/json` (the default);
//! - `ce-type` on event, request and dead-letter records: the topic names the pattern, and the
//!   reader takes the pattern it subscribed to;
//! - `ce-id` on event records: the reader derives the id from the record's place in its
//!   partition ([`implied_id`]), the same for every group and every time the record is read
//!   again; a retry's copy, stored elsewhere, carries the id it was first read with;
//! - on a request, `sb-correlation-id` when it equals its `ce-id` (the reader takes the id);
//! - on a reply, `ce-id` when it equals the correlation id (a reply's id is its request's),
//!   `sb-causation-id` when it equals the correlation id (`Envelope::complete_reply`), and
//!   `sb-reply-to` (the reply is at its address).
//!
//! Ids and the deadline are formatted on the stack: no string is allocated per header.

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use switchboard_core::envelope::system_time_to_millis;
use switchboard_core::transport::Route;
use switchboard_core::{Envelope, MessageId, content_type, header};

/// The record headers of `env` published on `route`; `None` when it needs none (an event
/// without key, deadline or headers of its own): librdkafka then allocates no header list
/// per record, to be freed on another thread after the delivery report.
pub(crate) fn record_headers(env: &Envelope, route: Route<'_>) -> Option<OwnedHeaders> {
    let mut h = Builder {
        headers: None,
        capacity: 4 + env.headers.len(),
    };
    let mut put = |key: &str, value: &str| h.put(key, value);
    let mut buf = [0u8; 36];
    let reply = matches!(route, Route::Reply(_));
    let request = matches!(route, Route::Request(_));
    // The correlation id is the message's own id (a request's default; a reply to it).
    let correlation_is_id = env
        .correlation_id
        .is_some_and(|c| c.as_uuid() == env.id.as_uuid());
    if !(matches!(route, Route::Event(_)) || reply && correlation_is_id) {
        put(header::ID, env.id.encode(&mut buf));
    }
    if reply {
        put(header::PATTERN, &env.pattern);
    }
    if let Some(ct) = env
        .content_type
        .as_deref()
        .filter(|ct| *ct != content_type::JSON)
    {
        put(header::CONTENT_TYPE, ct);
    }
    if let Some(c) = env
        .correlation_id
        .filter(|_| !(request && correlation_is_id && env.reply_to.is_some()))
    {
        put(header::CORRELATION_ID, c.encode(&mut buf));
    }
    if let Some(c) = env
        .causation_id
        .filter(|_| !(reply && env.causation_implied()))
    {
        put(header::CAUSATION_ID, c.encode(&mut buf));
    }
    if let Some(r) = env.reply_to.as_ref().filter(|_| !reply) {
        put(header::REPLY_TO, r);
    }
    if let Some(d) = env.deadline {
        let mut ms = itoa::Buffer::new();
        put(header::DEADLINE, ms.format(system_time_to_millis(d)));
    }
    if let Some(k) = &env.key {
        put(header::KEY, k);
    }
    if let Some(e) = &env.error {
        put(header::ERROR_CODE, &e.code);
        put(header::ERROR_MESSAGE, &e.message);
    }
    for (k, v) in &env.headers {
        put(k, v);
    }
    h.headers
}

/// The id of a record that carries none: a UUIDv7 of the time the record was stored
/// (`timestamp_ms`, its Kafka timestamp), a hash of its topic, and its partition (low 14
/// bits) and offset (low 48 bits) side by side, so records of different partitions never
/// share an id through a hash collision.
pub(crate) fn implied_id(
    topic: &str,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
) -> MessageId {
    let place = ((partition as u64 & 0x3FFF) << 48) | (offset as u64 & 0xFFFF_FFFF_FFFF);
    let ms = timestamp_ms
        .and_then(|t| u64::try_from(t).ok())
        .unwrap_or(0);
    MessageId::from_sequence(ms, topic, place)
}

/// `OwnedHeaders` made at the first header and grown in place (its `insert` takes and
/// returns it).
struct Builder {
    headers: Option<OwnedHeaders>,
    capacity: usize,
}

impl Builder {
    fn put(&mut self, key: &str, value: &str) {
        let h = self
            .headers
            .take()
            .unwrap_or_else(|| OwnedHeaders::new_with_capacity(self.capacity));
        self.headers = Some(h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        }));
    }
}

/// A record's headers copied out of the record in one buffer: for each, the key's and the
/// value's lengths (`u32`, little-endian), then their bytes. Every key and value is UTF-8
/// (checked when packed). One allocation, however many headers; a clone shares it.
#[derive(Clone, Default)]
pub(crate) struct PackedHeaders(Bytes);

impl PackedHeaders {
    /// Packs the `(key, value)` pairs `headers()` yields (a missing value is empty); `Err`
    /// names a value that is not UTF-8.
    pub(crate) fn pack<'a, I>(headers: impl Fn() -> I) -> Result<Self, String>
    where
        I: Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    {
        let mut size = 0;
        for (k, v) in headers() {
            let v = v.unwrap_or_default();
            if std::str::from_utf8(v).is_err() {
                return Err(format!("header `{k}` is not UTF-8"));
            }
            size += 8 + k.len() + v.len();
        }
        let mut buf = Vec::with_capacity(size);
        for (k, v) in headers() {
            let v = v.unwrap_or_default();
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
            buf.extend_from_slice(v);
        }
        Ok(PackedHeaders(Bytes::from(buf)))
    }

    /// The headers in record order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut rest = &self.0[..];
        std::iter::from_fn(move || {
            let (k_len, rest_after) = take_len(rest)?;
            let (v_len, rest_after) = take_len(rest_after)?;
            let k = rest_after.get(..k_len)?;
            let v = rest_after.get(k_len..k_len + v_len)?;
            rest = &rest_after[k_len + v_len..];
            // Checked when packed; a failure here would be a bug, and ends the iteration.
            Some((std::str::from_utf8(k).ok()?, std::str::from_utf8(v).ok()?))
        })
    }

    /// The value of the last header named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .filter(|(k, _)| *k == name)
            .last()
            .map(|(_, v)| v)
    }

    /// How many headers there are.
    pub(crate) fn len(&self) -> usize {
        self.iter().count()
    }
}

fn take_len(b: &[u8]) -> Option<(usize, &[u8])> {
    let (n, rest) = b.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*n) as usize, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_record_s_place_implies_one_id_of_its_own() {
        let id = implied_id("sb.evt.orders", 3, 41, Some(1_732_000_000_123));
        assert_eq!(
            id,
            implied_id("sb.evt.orders", 3, 41, Some(1_732_000_000_123)),
            "the same record, read again or by another group"
        );
        // Neighbours in every direction differ, whatever the topic's hash: partitions and
        // offsets sit side by side in the id, not hashed together.
        let mut seen = std::collections::HashSet::new();
        for partition in 0..64 {
            for offset in 0..64 {
                assert!(
                    seen.insert(implied_id("sb.evt.orders", partition, offset, Some(5))),
                    "partition {partition} offset {offset} repeats an id"
                );
            }
        }
        assert_ne!(
            id,
            implied_id("sb.evt.orders", 3, 41, Some(1_732_000_000_124))
        );
        assert_ne!(
            id,
            implied_id("sb.evt.other", 3, 41, Some(1_732_000_000_123))
        );
        // A UUIDv7 whose time is the record's.
        assert_eq!(id.as_uuid().get_version_num(), 7);
        // No timestamp (or a negative one) is not a panic.
        let _ = implied_id("t", 0, -1, None);
        let _ = implied_id("t", -1, 0, Some(-5));
    }

    fn pairs(h: &OwnedHeaders) -> Vec<(String, String)> {
        h.iter()
            .map(|x| {
                (
                    x.key.to_owned(),
                    String::from_utf8(x.value.unwrap_or_default().to_vec()).expect("utf-8"),
                )
            })
            .collect()
    }

    /// What the headers leave out the reader restores: the round trip through
    /// `Envelope::read` with the subscribed pattern gives the envelope back.
    #[test]
    fn an_event_record_carries_what_its_reader_cannot_infer_and_reads_back_whole() {
        let mut env = Envelope::new("orders.placed", &b"{}"[..])
            .with_content_type(content_type::JSON)
            .with_header("tenant", "acme");
        env.key = Some("order-7".into());
        env.deadline = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert!(
            record_headers(
                &Envelope::new("orders.placed", &b"{}"[..]),
                Route::Event("p")
            )
            .is_none(),
            "a plain event needs no header list"
        );
        let h = record_headers(&env, Route::Event("orders.placed")).expect("headers");
        let got = pairs(&h);
        let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [header::DEADLINE, header::KEY, "tenant"],
            "no ce-id, ce-type, ce-specversion or JSON content-type on an event"
        );
        let implied = implied_id("sb.evt.orders.placed", 0, 7, Some(1_700_000_000_000));
        let (back, malformed) = Envelope::read(
            got.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            env.payload.clone(),
            "orders.placed",
            Some(implied),
        );
        assert_eq!(malformed, None);
        assert_eq!(back.id, implied, "the id comes from the record's place");
        assert_eq!(back.pattern, "orders.placed");
        assert_eq!(back.deadline, env.deadline);
        assert_eq!(back.key, env.key);
        assert_eq!(back.headers.get("tenant").map(String::as_str), Some("acme"));
    }

    #[test]
    fn packed_headers_give_back_every_pair_in_order_and_refuse_what_is_not_utf8() {
        let pairs: [(&str, Option<&[u8]>); 4] = [
            ("ce-id", Some(b"0192-ab")),
            ("empty", None),
            ("tenant", Some("acmé".as_bytes())),
            ("ce-id", Some(b"second")),
        ];
        let p = PackedHeaders::pack(|| pairs.iter().copied()).expect("packs");
        let got: Vec<_> = p.iter().collect();
        assert_eq!(
            got,
            [
                ("ce-id", "0192-ab"),
                ("empty", ""),
                ("tenant", "acmé"),
                ("ce-id", "second")
            ]
        );
        assert_eq!(p.get("ce-id"), Some("second"), "the last of a name wins");
        assert_eq!(p.get("missing"), None);
        assert_eq!(p.len(), 4);
        assert_eq!(PackedHeaders::default().iter().count(), 0);
        let bad: [(&str, Option<&[u8]>); 1] = [("bin", Some(&[0xff, 0xfe]))];
        assert_eq!(
            PackedHeaders::pack(|| bad.iter().copied()).err().as_deref(),
            Some("header `bin` is not UTF-8")
        );
    }

    #[test]
    fn a_reply_names_its_pattern_and_other_content_types_are_named() {
        let env = Envelope::new("users.get", &b"\x01"[..]).with_content_type(content_type::BYTES);
        let got = pairs(&record_headers(&env, Route::Reply("sb.reply.c1")).expect("headers"));
        assert!(got.contains(&(header::PATTERN.into(), "users.get".into())));
        assert!(got.contains(&(header::CONTENT_TYPE.into(), content_type::BYTES.into())));
    }

    /// A request correlated by its own id sends the id once; its reply sends neither the id
    /// nor the causation nor the address, and reads back whole.
    #[test]
    fn request_and_reply_leave_out_what_their_correlation_implies() {
        use switchboard_core::CorrelationId;
        let mut req = Envelope::new("users.get", &b"{}"[..]);
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.reply_to = Some("sb.reply.c1".into());
        let names =
            |h: &OwnedHeaders| -> Vec<String> { pairs(h).into_iter().map(|(k, _)| k).collect() };
        let sent = names(&record_headers(&req, Route::Request("users.get")).expect("headers"));
        assert!(sent.contains(&header::ID.to_owned()), "{sent:?}");
        assert!(
            !sent.contains(&header::CORRELATION_ID.to_owned()),
            "{sent:?}"
        );
        // A correlation id carried from elsewhere is sent.
        let mut carried = req.clone();
        carried.correlation_id = Some(CorrelationId::new());
        let sent = names(&record_headers(&carried, Route::Request("users.get")).expect("headers"));
        assert!(
            sent.contains(&header::CORRELATION_ID.to_owned()),
            "{sent:?}"
        );

        let reply = Envelope::reply_to(&req, &b"{}"[..]);
        let h = record_headers(&reply, Route::Reply("sb.reply.c1")).expect("headers");
        let sent = names(&h);
        for left_out in [header::ID, header::CAUSATION_ID, header::REPLY_TO] {
            assert!(
                !sent.contains(&left_out.to_owned()),
                "{left_out} in {sent:?}"
            );
        }
        let got = pairs(&h);
        let (mut back, malformed) = Envelope::read(
            got.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            reply.payload.clone(),
            "",
            req.correlation_id.map(MessageId::from),
        );
        assert_eq!(malformed, None);
        back.complete_reply(None);
        assert_eq!(back.id, reply.id);
        assert_eq!(back.correlation_id, reply.correlation_id);
        assert_eq!(back.causation_id, Some(req.id));
        assert_eq!(back.pattern, "users.get");
    }
}
