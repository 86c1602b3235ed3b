//! Envelope ⇄ AMQP properties and headers.
//!
//! Where AMQP has a property for a field it is used (`message_id` = `ce-id`, `type` =
//! `ce-type`, `content_type`, `correlation_id`, `reply_to`); everything else travels in the
//! headers table as strings, under the names in docs/wire.md.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use switchboard_core::transport::{Acker, Delivery};
use switchboard_core::{CorrelationId, Envelope, MessageId, header};

/// Headers the broker adds that are not part of the envelope.
const BROKER_HEADERS: &[&str] = &["x-delivery-count", "x-death", "x-first-death-exchange"];

/// What kind of message the properties are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An event or dead letter: everything is sent.
    Message,
    /// A request (`send` or `request`): it arrives on its pattern's own queue, which names
    /// its pattern, and its id, when it equals its correlation id (the SDK's default), is read
    /// from `correlation_id`; neither is sent again.
    Request,
    /// A reply: its id (nothing reads a reply's id), pattern (the caller knows what it
    /// asked), reply address (it is where the reply goes) and a causation id equal to its
    /// correlation id (the request's id) are left out, as on NATS (docs/wire.md).
    Reply,
}

/// AMQP properties for `env`. Persistent messages survive a broker restart. Built from the
/// envelope's fields directly: each value is written once, not formatted and copied again.
/// `ce-specversion` (always 1.0) is not sent.
pub(crate) fn properties(env: &Envelope, persistent: bool, kind: Kind) -> BasicProperties {
    let reply = kind == Kind::Reply;
    let mut props = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut buf = [0u8; 36];
    // A property where AMQP has one (a short string: at most 255 bytes); a longer value goes
    // to the headers table under its header name instead.
    let short = |table: &mut FieldTable, name: &str, value: &str| {
        if value.len() <= 255 {
            Some(ShortString::from(value))
        } else {
            table.insert(name.into(), AMQPValue::LongString(value.into()));
            None
        }
    };
    let request = kind == Kind::Request;
    let id_implied = request
        && env
            .correlation_id
            .is_some_and(|c| c.as_uuid() == env.id.as_uuid());
    if !reply {
        if !id_implied && let Some(s) = short(&mut table, header::ID, env.id.encode(&mut buf)) {
            props = props.with_message_id(s);
        }
        if !request && let Some(s) = short(&mut table, header::PATTERN, &env.pattern) {
            props = props.with_type(s);
        }
        if let Some(s) = env
            .reply_to
            .as_deref()
            .and_then(|r| short(&mut table, header::REPLY_TO, r))
        {
            props = props.with_reply_to(s);
        }
    }
    // JSON, the default, is not named (no `content_type` means JSON).
    if let Some(s) = env
        .content_type
        .as_deref()
        .filter(|ct| *ct != switchboard_core::content_type::JSON)
        .and_then(|ct| short(&mut table, header::CONTENT_TYPE, ct))
    {
        props = props.with_content_type(s);
    }
    // A request's deadline rides in its correlation id (`<uuid>.<unix ms>`), not in a headers
    // table: a request then has no table at all, which the client, the broker and the
    // responder each skip writing and reading (a table measured about 4 % of a `send`'s
    // round trip).
    let mut deadline_sent = false;
    if let Some(c) = env.correlation_id {
        let id = c.encode(&mut buf);
        match env.deadline.filter(|_| request) {
            Some(d) => {
                let ms = switchboard_core::envelope::system_time_to_millis(d);
                let mut s = String::with_capacity(id.len() + 21);
                s.push_str(id);
                s.push('.');
                s.push_str(itoa::Buffer::new().format(ms));
                props = props.with_correlation_id(ShortString::from(s));
                deadline_sent = true;
            }
            None => props = props.with_correlation_id(ShortString::from(id)),
        }
    }
    if let Some(c) = env
        .causation_id
        .filter(|_| !(reply && env.causation_implied()))
    {
        put(&mut table, header::CAUSATION_ID, c.encode(&mut buf));
    }
    if let Some(d) = env.deadline.filter(|_| !deadline_sent) {
        let ms = switchboard_core::envelope::system_time_to_millis(d);
        put(&mut table, header::DEADLINE, itoa::Buffer::new().format(ms));
    }
    if let Some(k) = &env.key {
        put(&mut table, header::KEY, k.as_str());
    }
    if let Some(e) = &env.error {
        put(&mut table, header::ERROR_CODE, e.code.as_str());
        put(&mut table, header::ERROR_MESSAGE, e.message.as_str());
    }
    for (k, v) in &env.headers {
        put(&mut table, k, v.as_str());
    }
    if !table.inner().is_empty() {
        props = props.with_headers(table);
    }
    if persistent {
        props = props.with_delivery_mode(2);
    }
    props
}

/// One headers-table entry, a long string (an owned value is moved in, not copied).
fn put(table: &mut FieldTable, name: &str, value: impl Into<LongString>) {
    table.insert(name.into(), AMQPValue::LongString(value.into()));
}

/// AMQP properties, headers and body read as an envelope ([`Envelope::read`]): the envelope,
/// and the reason it could not be read, if it could not.
pub(crate) fn read_message(
    props: &BasicProperties,
    payload: Vec<u8>,
    pattern: &str,
) -> (Envelope, Option<String>) {
    let pairs = pairs(props);
    Envelope::read(
        pairs.iter().map(|(k, v)| (*k, v.as_ref())),
        payload.into(),
        pattern,
        implied_id(props),
    )
}

/// A request's id when it carries no `message_id`: its correlation id.
fn implied_id(props: &BasicProperties) -> Option<MessageId> {
    if props.message_id().is_some() {
        return None;
    }
    correlation_of(props).map(MessageId::from)
}

/// A `correlation_id` property read as the SDK's correlation id and, for a request, the
/// deadline it carries (`<uuid>.<unix ms>`, see [`properties`]). Any other value is the
/// correlation id as it is, with no deadline.
fn split_correlation(property: &str) -> (&str, Option<&str>) {
    match property.split_once('.') {
        Some((id, ms))
            if id.len() == 36 && !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (id, Some(ms))
        }
        _ => (property, None),
    }
}

/// The correlation id a message's `correlation_id` property names, if it is one of the SDK's.
pub(crate) fn correlation_of(props: &BasicProperties) -> Option<CorrelationId> {
    let property = props.correlation_id().as_ref()?;
    split_correlation(property.as_str()).0.parse().ok()
}

/// An AMQP message read as a delivery ([`Delivery::read`]), `adjust` setting what the
/// message carries besides its headers.
pub(crate) fn delivery_from(
    props: &BasicProperties,
    payload: Vec<u8>,
    pattern: &str,
    attempt: u32,
    acker: Box<dyn Acker>,
    adjust: impl FnOnce(&mut Envelope, &mut Option<String>),
) -> Delivery {
    let pairs = pairs(props);
    Delivery::read(
        pairs.iter().map(|(k, v)| (*k, v.as_ref())),
        payload.into(),
        pattern,
        implied_id(props),
        attempt,
        acker,
        adjust,
    )
}

/// The envelope's fields among the AMQP properties and headers, as name and text. Header
/// values that are not strings (numbers, booleans from foreign producers) are read as their
/// text.
fn pairs(props: &BasicProperties) -> Vec<(&str, std::borrow::Cow<'_, str>)> {
    let mut pairs: Vec<(&str, std::borrow::Cow<'_, str>)> = Vec::with_capacity(12);
    for (k, v) in [
        (header::ID, props.message_id()),
        (header::PATTERN, props.kind()),
        (header::CONTENT_TYPE, props.content_type()),
        (header::REPLY_TO, props.reply_to()),
    ] {
        if let Some(v) = v {
            pairs.push((k, std::borrow::Cow::Borrowed(v.as_str())));
        }
    }
    if let Some(c) = props.correlation_id() {
        let (id, deadline) = split_correlation(c.as_str());
        pairs.push((header::CORRELATION_ID, std::borrow::Cow::Borrowed(id)));
        if let Some(ms) = deadline {
            pairs.push((header::DEADLINE, std::borrow::Cow::Borrowed(ms)));
        }
    }
    if let Some(table) = props.headers() {
        for (k, v) in table.inner() {
            if BROKER_HEADERS.contains(&k.as_str()) {
                continue;
            }
            if let Some(text) = value_text(v) {
                pairs.push((k.as_str(), text));
            }
        }
    }
    pairs
}

fn value_text(v: &AMQPValue) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    Some(Cow::Owned(match v {
        AMQPValue::LongString(s) => return Some(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => return Some(Cow::Borrowed(s.as_str())),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    }))
}

/// The broker's delivery count (quorum queues), if present.
pub(crate) fn delivery_count(props: &BasicProperties) -> Option<u32> {
    let v = props.headers().as_ref()?.inner().get("x-delivery-count")?;
    value_text(v)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_amqp_properties() {
        let mut env = Envelope::new("orders.created", &b"{}"[..])
            .with_content_type("application/cloudevents+json")
            .with_header("x-tenant", "acme");
        env.correlation_id = Some(CorrelationId::new());
        env.key = Some("k".into());
        let props = properties(&env, true, Kind::Message);
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str().to_owned()),
            Some(env.id.to_string())
        );
        let (back, malformed) = read_message(&props, b"{}".to_vec(), "x");
        assert!(malformed.is_none());
        assert_eq!(back.id, env.id);
        assert_eq!(back.pattern, "orders.created");
        assert_eq!(back.correlation_id, env.correlation_id);
        assert_eq!(back.key, env.key);
        assert_eq!(back.content_type, env.content_type);
        assert_eq!(
            back.headers.get("x-tenant").map(String::as_str),
            Some("acme")
        );
    }

    #[test]
    fn a_request_deadline_rides_in_its_correlation_id() {
        let mut req = Envelope::new("users.get", &b"{}"[..]);
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.deadline =
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_732_000_000_001));
        let props = properties(&req, false, Kind::Request);
        assert_eq!(
            props
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            Some(format!("{}.1732000000001", req.id)),
        );
        assert!(
            props.headers().is_none(),
            "no headers table for a plain request"
        );
        let (back, malformed) = read_message(&props, b"{}".to_vec(), "users.get");
        assert!(malformed.is_none());
        assert_eq!(back.id, req.id);
        assert_eq!(back.correlation_id, req.correlation_id);
        assert_eq!(back.deadline, req.deadline);
        // A reply (or an event) keeps the plain id; its deadline, if any, is a header.
        let props = properties(&req, false, Kind::Message);
        assert_eq!(
            props
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            req.correlation_id.map(|c| c.to_string()),
        );
        // A foreign correlation id with a dot is read as it is, with no deadline.
        assert_eq!(split_correlation("order.17"), ("order.17", None));
        assert_eq!(split_correlation(&format!("{}.x1", req.id)).1, None);
    }

    #[test]
    fn requests_leave_out_what_their_queue_and_correlation_id_say() {
        // A request correlated by its own id, in JSON: no `message_id`, `type` nor
        // `content_type`; the reader takes the id from `correlation_id` and the pattern from
        // the queue it read from.
        let mut req = Envelope::new("users.get", &b"{}"[..]).with_content_type("application/json");
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.reply_to = Some("amq.rabbitmq.reply-to".into());
        let props = properties(&req, false, Kind::Request);
        assert!(props.message_id().is_none());
        assert!(props.kind().is_none());
        assert!(props.content_type().is_none());
        let (back, malformed) = read_message(&props, b"{}".to_vec(), "users.get");
        assert!(malformed.is_none());
        assert_eq!(back.id, req.id);
        assert_eq!(back.correlation_id, req.correlation_id);
        assert_eq!(back.pattern, "users.get");
        assert_eq!(back.reply_to, req.reply_to);
        assert_eq!(back.content_type, None, "no content type reads as JSON");
        // A correlation id carried from another message: the id travels too.
        let mut caused = req.clone();
        caused.correlation_id = Some(CorrelationId::new());
        let props = properties(&caused, false, Kind::Request);
        let (back, _) = read_message(&props, b"{}".to_vec(), "users.get");
        assert_eq!(back.id, caused.id);
        assert_eq!(back.correlation_id, caused.correlation_id);
    }

    #[test]
    fn replies_leave_out_what_the_requester_knows() {
        let mut req = Envelope::new("users.get", &b"{}"[..]);
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.reply_to = Some("amq.rabbitmq.reply-to.x".into());
        req.headers.insert("x-long".into(), "v".repeat(300));
        let reply = Envelope::reply_to(&req, &b"{}"[..]).with_content_type("application/json");
        let props = properties(&reply, false, Kind::Reply);
        assert!(props.message_id().is_none());
        assert!(props.kind().is_none());
        assert!(props.reply_to().is_none());
        assert!(props.headers().is_none(), "no table: {:?}", props.headers());
        let (mut back, _) = read_message(&props, b"{}".to_vec(), "");
        back.complete_reply(None);
        assert_eq!(back.correlation_id, req.correlation_id);
        assert_eq!(back.causation_id, Some(req.id));
        // A value too long for a property travels in the headers table.
        let mut long = req.clone();
        long.reply_to = Some("q".repeat(300));
        let props = properties(&long, false, Kind::Message);
        assert!(props.reply_to().is_none());
        let (back, _) = read_message(&props, Vec::new(), "");
        assert_eq!(back.reply_to, long.reply_to);
    }

    #[test]
    fn foreign_headers_of_other_types_are_read_as_text() {
        let mut table = FieldTable::default();
        table.insert("x-retries".into(), AMQPValue::LongInt(3));
        table.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(delivery_count(&props), Some(2));
        let (env, _) = read_message(&props, b"raw".to_vec(), "p");
        assert_eq!(env.headers.get("x-retries").map(String::as_str), Some("3"));
        assert!(!env.headers.contains_key("x-delivery-count"));
        assert_eq!(env.pattern, "p");
    }

    #[test]
    fn malformed_message_id_is_read_with_its_reason() {
        let props = BasicProperties::default().with_message_id("not-a-uuid".into());
        let (env, malformed) = read_message(&props, b"x".to_vec(), "p");
        assert!(malformed.as_deref().is_some_and(|r| r.contains("ce-id")));
        assert_eq!(&env.payload[..], b"x");
    }
}
