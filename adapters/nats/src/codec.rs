//! Envelope ⇄ NATS headers. The header names are the project's wire names (docs/wire.md);
//! NATS carries them as message headers, the payload as the message body.

use std::str::FromStr;

use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use switchboard_core::transport::{Acker, Delivery};
use switchboard_core::{Error, Result};

use crate::NAME;

/// NATS headers from string pairs. A name or value NATS cannot carry (control characters,
/// `:` in a name, a line break in a value) is a typed error, not a panic.
pub(crate) fn header_map<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        let name = HeaderName::from_str(k).map_err(|_| {
            Error::invalid_config(
                NAME,
                format!(
                    "header name `{}` cannot be carried by NATS",
                    k.escape_default()
                ),
            )
        })?;
        let value = HeaderValue::from_str(v).map_err(|_| {
            Error::invalid_config(
                NAME,
                format!("the value of header `{k}` cannot be carried by NATS (line break)"),
            )
        })?;
        map.insert(name, value);
    }
    Ok(map)
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
        let headers = env.to_headers();
        let map = header_map(headers.iter().map(|(k, v)| (*k, v.as_str()))).expect("maps");
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
