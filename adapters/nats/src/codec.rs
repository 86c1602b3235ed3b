//! Envelope ⇄ NATS headers. The header names are the project's wire names (docs/wire.md);
//! NATS carries them as message headers, the payload as the message body.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use switchboard_core::transport::{Acker, Delivery};
use switchboard_core::{CorrelationId, Envelope, Error, MessageId, Result, content_type, header};

use crate::NAME;

/// NATS headers from string pairs. A name or value NATS cannot carry (control characters,
/// `:` in a name, a line break in a value) is a typed error, not a panic.
pub(crate) fn header_map<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.insert(checked_name(k)?, checked_value(k, v)?);
    }
    Ok(map)
}

/// Envelope fields the receiver knows without a header, left out of the NATS headers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Implied {
    /// The message id is not sent: the reader derives it from the broker's own identity of
    /// the message (JetStream events) or gives the message a fresh one (replies and `send`
    /// requests, which are never redelivered and whose ids the sender never shows).
    pub(crate) id: bool,
    /// The pattern is the subject after `<prefix>.evt.` / `<prefix>.req.`.
    pub(crate) pattern: bool,
    /// The reply address is the NATS reply subject.
    pub(crate) reply_to: bool,
    /// The correlation id is known to the receiver: a token of the (reply) subject, or the
    /// requester's own (a reply to a NATS request inbox, matched by its subject).
    pub(crate) correlation_id: bool,
    /// On a request: a correlation id equal to the message id is implied (the receiver takes
    /// `ce-id` when `sb-correlation-id` is absent).
    pub(crate) correlation_is_id: bool,
    /// On a reply: a causation id equal to the correlation id (the request's id, for the
    /// SDK's requests) is implied.
    pub(crate) causation_is_correlation: bool,
    /// The deadline is the last token of the reply subject (a `send`'s
    /// `_SB_SEND.<connection>.<seq>.<ms>`).
    pub(crate) deadline: bool,
}

/// NATS headers for `env`. Reserved names are static (no allocation, no validation); user
/// headers and the content type, which come from callers, are validated.
pub(crate) fn envelope_headers(env: &Envelope, implied: Implied) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut buf = [0u8; 36];
    if !implied.id {
        map.insert(
            HeaderName::from_static(header::ID),
            HeaderValue::from(env.id.encode(&mut buf)),
        );
    }
    // `ce-specversion` is always 1.0 and JSON is the default content type: on NATS, where
    // every header is written and parsed per message by client and server, neither is sent.
    if !implied.pattern {
        map.insert(
            HeaderName::from_static(header::PATTERN),
            HeaderValue::from(env.pattern.as_str()),
        );
    }
    if let Some(ct) = env
        .content_type
        .as_deref()
        .filter(|ct| *ct != content_type::JSON)
    {
        map.insert(
            HeaderName::from_static(header::CONTENT_TYPE),
            checked_value(header::CONTENT_TYPE, ct)?,
        );
    }
    let same_as_id = |c: &CorrelationId| c.as_uuid() == env.id.as_uuid();
    let correlation = env
        .correlation_id
        .filter(|c| !(implied.correlation_id || implied.correlation_is_id && same_as_id(c)));
    if let Some(c) = correlation {
        map.insert(
            HeaderName::from_static(header::CORRELATION_ID),
            HeaderValue::from(c.encode(&mut buf)),
        );
    }
    let causation = env
        .causation_id
        .filter(|_| !(implied.causation_is_correlation && env.causation_implied()));
    if let Some(c) = causation {
        map.insert(
            HeaderName::from_static(header::CAUSATION_ID),
            HeaderValue::from(c.encode(&mut buf)),
        );
    }
    if let (Some(r), false) = (&env.reply_to, implied.reply_to) {
        map.insert(
            HeaderName::from_static(header::REPLY_TO),
            checked_value(header::REPLY_TO, r)?,
        );
    }
    if let (Some(d), false) = (env.deadline, implied.deadline) {
        let ms = switchboard_core::envelope::system_time_to_millis(d);
        map.insert(
            HeaderName::from_static(header::DEADLINE),
            HeaderValue::from(ms),
        );
    }
    if let Some(k) = &env.key {
        map.insert(
            HeaderName::from_static(header::KEY),
            checked_value(header::KEY, k)?,
        );
    }
    if let Some(e) = &env.error {
        map.insert(
            HeaderName::from_static(header::ERROR_CODE),
            checked_value(header::ERROR_CODE, &e.code)?,
        );
        // A message may hold anything: line breaks become spaces rather than fail the reply.
        map.insert(
            HeaderName::from_static(header::ERROR_MESSAGE),
            HeaderValue::from(e.message.replace(['\r', '\n'], " ")),
        );
    }
    for (k, v) in &env.headers {
        map.insert(checked_name(k)?, checked_value(k, v)?);
    }
    Ok(map)
}

fn checked_name(k: &str) -> Result<HeaderName> {
    HeaderName::from_str(k).map_err(|_| {
        Error::invalid_config(
            NAME,
            format!(
                "header name `{}` cannot be carried by NATS",
                k.escape_default()
            ),
        )
    })
}

fn checked_value(name: &str, v: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(v).map_err(|_| {
        Error::invalid_config(
            NAME,
            format!("the value of header `{name}` cannot be carried by NATS (line break)"),
        )
    })
}

/// A NATS message's headers and payload read as an envelope ([`Envelope::read`]): the
/// envelope, and the reason it could not be read, if it could not.
pub(crate) fn read_message(
    headers: &Option<HeaderMap>,
    payload: Bytes,
    pattern: &str,
    implied_id: Option<MessageId>,
) -> (Envelope, Option<String>) {
    Envelope::read(pairs(headers), payload, pattern, implied_id)
}

/// A NATS message read as a delivery ([`Delivery::read`]), `adjust` setting what the message
/// carries besides its headers.
pub(crate) fn delivery_from(
    headers: &Option<HeaderMap>,
    payload: Bytes,
    pattern: &str,
    implied_id: Option<MessageId>,
    attempt: u32,
    acker: Box<dyn Acker>,
    adjust: impl FnOnce(&mut Envelope, &mut Option<String>),
) -> Delivery {
    Delivery::read(
        pairs(headers),
        payload,
        pattern,
        implied_id,
        attempt,
        acker,
        adjust,
    )
}

/// A header map's names and first values.
fn pairs(headers: &Option<HeaderMap>) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().flat_map(|h| {
        h.iter()
            .filter_map(|(k, vs)| vs.first().map(|v| (k.as_ref(), v.as_str())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_through_nats_headers() {
        let mut env = Envelope::new("users.get", Bytes::from_static(b"{}"))
            .with_content_type("application/json")
            .with_header("x-tenant", "acme");
        env.correlation_id = Some(CorrelationId::new());
        env.key = Some("k1".into());
        let map = envelope_headers(&env, Implied::default()).expect("maps");
        let (back, malformed) = read_message(&Some(map), env.payload.clone(), "x", None);
        assert!(malformed.is_none());
        assert_eq!(back.id, env.id);
        assert_eq!(back.pattern, "users.get");
        assert_eq!(back.correlation_id, env.correlation_id);
        assert_eq!(back.key, env.key);
        assert_eq!(
            back.headers.get("x-tenant").map(String::as_str),
            Some("acme")
        );
    }

    #[test]
    fn fields_the_subject_carries_are_left_out() {
        let mut env = Envelope::new("users.get", Bytes::new());
        env.correlation_id = Some(CorrelationId::new());
        env.reply_to = Some("_SB_INBOX.x".into());
        let all = Implied {
            pattern: true,
            reply_to: true,
            correlation_id: true,
            ..Implied::default()
        };
        let map = envelope_headers(&env, all).expect("maps");
        for name in [header::PATTERN, header::REPLY_TO, header::CORRELATION_ID] {
            assert!(map.get(name).is_none(), "{name}");
        }
        assert!(map.get(header::ID).is_some());
        let bad = Envelope::new("p", Bytes::new()).with_header("x-evil", "a\r\nb");
        assert!(envelope_headers(&bad, all).is_err());
    }

    #[test]
    fn implied_ids_are_left_out_and_filled_in_again() {
        // A request whose correlation id is its own id sends neither twice.
        let mut req = Envelope::new("users.get", Bytes::new());
        req.correlation_id = Some(CorrelationId::from(req.id));
        let request = Implied {
            correlation_is_id: true,
            ..Implied::default()
        };
        let map = envelope_headers(&req, request).expect("maps");
        assert!(map.get(header::CORRELATION_ID).is_none());
        // A correlation id the caller chose is sent.
        let mut custom = req.clone();
        custom.correlation_id = Some(CorrelationId::new());
        let map = envelope_headers(&custom, request).expect("maps");
        assert!(map.get(header::CORRELATION_ID).is_some());

        // The reply to it: causation (the request's id) equals the correlation id.
        let mut reply = Envelope::reply_to(&req, Bytes::new());
        assert_eq!(reply.causation_id, Some(req.id));
        let implied = Implied {
            id: true,
            pattern: true,
            reply_to: true,
            correlation_id: true,
            causation_is_correlation: true,
            ..Implied::default()
        };
        let map = envelope_headers(&reply, implied).expect("maps");
        assert!(map.is_empty(), "a plain reply needs no headers: {map:?}");
        let (mut back, _) = read_message(&Some(map), Bytes::new(), "users.get", None);
        back.complete_reply(req.correlation_id);
        assert_eq!(back.correlation_id, req.correlation_id);
        assert_eq!(back.causation_id, Some(req.id));
        // A reply caused by something else than its correlation id says so.
        reply.causation_id = Some(MessageId::new());
        let map = envelope_headers(&reply, implied).expect("maps");
        assert!(map.get(header::CAUSATION_ID).is_some());
    }

    #[test]
    fn a_plain_event_and_a_plain_send_request_carry_no_id() {
        let event = Envelope::new("orders.created", Bytes::from_static(b"{}"));
        let implied = Implied {
            id: true,
            pattern: true,
            ..Implied::default()
        };
        assert!(envelope_headers(&event, implied).expect("maps").is_empty());
        // A caused event still says what caused it.
        let mut caused = event.clone();
        caused.causation_id = Some(MessageId::new());
        let map = envelope_headers(&caused, implied).expect("maps");
        assert!(map.get(header::CAUSATION_ID).is_some());
        assert!(map.get(header::ID).is_none());
    }

    #[test]
    fn headers_nats_cannot_carry_are_typed_errors() {
        assert!(header_map([("bad:name", "v")]).is_err());
        assert!(header_map([("ok", "line\r\nbreak")]).is_err());
    }

    #[test]
    fn malformed_reserved_header_is_read_with_its_reason() {
        let map = header_map([("ce-id", "not-a-uuid")]).expect("maps");
        let (env, malformed) = read_message(&Some(map), Bytes::from_static(b"x"), "p", None);
        assert!(malformed.as_deref().is_some_and(|r| r.contains("ce-id")));
        assert_eq!(&env.payload[..], b"x");
    }
}
