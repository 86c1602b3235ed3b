//! Envelope ⇄ NATS headers. The header names are the project's wire names (docs/wire.md);
//! NATS carries them as message headers, the payload as the message body.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use switchboard_core::transport::{Acker, Delivery};
use switchboard_core::{Envelope, Error, Result, content_type, header};

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

/// Envelope fields the NATS message itself already carries, left out of its headers.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct InSubject {
    /// The pattern is the subject after `<prefix>.evt.` / `<prefix>.req.`.
    pub(crate) pattern: bool,
    /// The reply address is the NATS reply subject.
    pub(crate) reply_to: bool,
    /// The correlation id is a token of the (reply) subject.
    pub(crate) correlation_id: bool,
}

/// NATS headers for `env`. Reserved names are static (no allocation, no validation); user
/// headers and the content type, which come from callers, are validated.
pub(crate) fn envelope_headers(env: &Envelope, carried: InSubject) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    map.insert(
        HeaderName::from_static(header::ID),
        HeaderValue::from(env.id.to_string()),
    );
    // `ce-specversion` is always 1.0 and JSON is the default content type: on NATS, where
    // every header is written and parsed per message by client and server, neither is sent.
    if !carried.pattern {
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
    if let (Some(c), false) = (&env.correlation_id, carried.correlation_id) {
        map.insert(
            HeaderName::from_static(header::CORRELATION_ID),
            HeaderValue::from(c.to_string()),
        );
    }
    if let Some(c) = &env.causation_id {
        map.insert(
            HeaderName::from_static(header::CAUSATION_ID),
            HeaderValue::from(c.to_string()),
        );
    }
    if let (Some(r), false) = (&env.reply_to, carried.reply_to) {
        map.insert(
            HeaderName::from_static(header::REPLY_TO),
            checked_value(header::REPLY_TO, r)?,
        );
    }
    if let Some(d) = env.deadline {
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

/// A delivery from a NATS message's headers and payload ([`Delivery::decode`]).
pub(crate) fn delivery_from(
    headers: &Option<HeaderMap>,
    payload: Bytes,
    pattern: &str,
    attempt: u32,
    acker: Box<dyn Acker>,
) -> Delivery {
    let pairs = headers.iter().flat_map(|h| {
        h.iter()
            .filter_map(|(k, vs)| vs.first().map(|v| (k.as_ref(), v.as_str())))
    });
    Delivery::decode(pairs, payload, pattern, attempt, acker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::transport::NoAck;
    use switchboard_core::{CorrelationId, Envelope};

    #[test]
    fn envelope_round_trips_through_nats_headers() {
        let mut env = Envelope::new("users.get", Bytes::from_static(b"{}"))
            .with_content_type("application/json")
            .with_header("x-tenant", "acme");
        env.correlation_id = Some(CorrelationId::new());
        env.key = Some("k1".into());
        let map = envelope_headers(&env, InSubject::default()).expect("maps");
        let (back, _, malformed, _) =
            delivery_from(&Some(map), env.payload.clone(), "x", 1, Box::new(NoAck)).into_parts();
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
        let all = InSubject {
            pattern: true,
            reply_to: true,
            correlation_id: true,
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
    fn headers_nats_cannot_carry_are_typed_errors() {
        assert!(header_map([("bad:name", "v")]).is_err());
        assert!(header_map([("ok", "line\r\nbreak")]).is_err());
    }

    #[test]
    fn malformed_reserved_header_makes_a_malformed_delivery() {
        let map = header_map([("ce-id", "not-a-uuid")]).expect("maps");
        let d = delivery_from(
            &Some(map),
            Bytes::from_static(b"x"),
            "p",
            1,
            Box::new(NoAck),
        );
        assert!(d.malformed.as_deref().is_some_and(|r| r.contains("ce-id")));
        assert_eq!(&d.envelope.payload[..], b"x");
    }
}
