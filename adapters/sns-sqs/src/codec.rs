//! Envelope ⇄ an SQS (or SNS) message: a text body and String message attributes.
//!
//! - **Body.** The payload as it is when it is text SQS can carry (UTF-8 without the control
//!   characters SQS refuses); otherwise base64, with the attribute `sb-body` = `base64`.
//! - **Attributes.** The envelope's headers under their wire names (docs/wire.md), as String
//!   attributes. Left out, because the reader knows them: `ce-specversion`, `content-type`
//!   for JSON, and `ce-type` where the queue names the pattern. SQS carries at most ten
//!   attributes, names of letters, digits, `-`, `_` and `.`, and no empty values: what does not
//!   fit (the less used headers past the ninth, a header whose name SQS refuses, an empty
//!   value) travels packed as a JSON object in the attribute `sb-headers`.
//!
//! Binary attributes are never used (moto, the local emulator, loses messages that have them).

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use switchboard_core::{Envelope, content_type, header};

/// The attribute naming the body's encoding.
pub const BODY_ENCODING: &str = "sb-body";
/// The attribute packing the headers that do not fit one attribute each.
pub const PACKED: &str = "sb-headers";
/// SQS's limit on attributes per message.
const MAX_ATTRIBUTES: usize = 10;

/// A message as SQS and SNS carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// The message body.
    pub body: String,
    /// String attributes, at most ten.
    pub attributes: Vec<(String, String)>,
}

/// Whether the reader knows the pattern (the queue or topic names it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Left out.
    Implied,
    /// Sent as `ce-type`.
    Sent,
}

/// Encodes `env` for SQS or SNS.
pub fn encode(env: &Envelope, pattern: Pattern) -> Wire {
    let (body, base64) = match std::str::from_utf8(&env.payload) {
        Ok(text) if text.chars().all(sqs_char) => (text.to_owned(), false),
        _ => (STANDARD.encode(&env.payload), true),
    };
    // In order of use: the first ones get attributes of their own.
    let mut headers: Vec<(&str, String)> = Vec::with_capacity(8 + env.headers.len());
    headers.push((header::ID, env.id.to_string()));
    if let Some(c) = &env.correlation_id {
        headers.push((header::CORRELATION_ID, c.to_string()));
    }
    if let Some(r) = &env.reply_to {
        headers.push((header::REPLY_TO, r.clone()));
    }
    if let Some(d) = env.deadline {
        headers.push((
            header::DEADLINE,
            switchboard_core::envelope::system_time_to_millis(d).to_string(),
        ));
    }
    if pattern == Pattern::Sent {
        headers.push((header::PATTERN, env.pattern.clone()));
    }
    if let Some(ct) = env
        .content_type
        .as_deref()
        .filter(|ct| *ct != content_type::JSON)
    {
        headers.push((header::CONTENT_TYPE, ct.to_owned()));
    }
    if let Some(k) = &env.key {
        headers.push((header::KEY, k.clone()));
    }
    if let Some(c) = &env.causation_id {
        headers.push((header::CAUSATION_ID, c.to_string()));
    }
    if let Some(e) = &env.error {
        headers.push((header::ERROR_CODE, e.code.clone()));
        headers.push((header::ERROR_MESSAGE, e.message.clone()));
    }
    for (k, v) in &env.headers {
        headers.push((k.as_str(), v.clone()));
    }
    // Room for one attribute each: ten, less the body's encoding if named, less the packed
    // attribute if anything is left over.
    let mut room = MAX_ATTRIBUTES - usize::from(base64);
    let fits = |k: &str, v: &str| attribute_name(k) && !v.is_empty() && v.chars().all(sqs_char);
    let own = headers.iter().filter(|(k, v)| fits(k, v)).count();
    if own < headers.len() || own > room {
        room -= 1;
    }
    let mut attributes = Vec::with_capacity(MAX_ATTRIBUTES);
    let mut packed = BTreeMap::new();
    for (k, v) in headers {
        if attributes.len() < room && fits(k, &v) {
            attributes.push((k.to_owned(), v));
        } else {
            packed.insert(k.to_owned(), v);
        }
    }
    if base64 {
        attributes.push((BODY_ENCODING.to_owned(), "base64".to_owned()));
    }
    if !packed.is_empty() {
        // A map of strings always serializes.
        let json = serde_json::to_string(&packed).unwrap_or_default();
        attributes.push((PACKED.to_owned(), json));
    }
    Wire { body, attributes }
}

/// The header pairs and payload of a received message, for `Delivery::read`: its attributes
/// (the packed ones unpacked, the body's encoding undone). `Err` says why the message cannot
/// be read (its payload is then the body as received).
pub fn decode(
    body: &str,
    attributes: impl IntoIterator<Item = (String, String)>,
) -> (Vec<(String, String)>, Bytes, Option<String>) {
    let mut headers = Vec::new();
    let mut packed = None;
    let mut base64 = false;
    let mut malformed = None;
    for (k, v) in attributes {
        match k.as_str() {
            BODY_ENCODING if v == "base64" => base64 = true,
            BODY_ENCODING => malformed = Some(format!("attribute `{BODY_ENCODING}` is `{v}`")),
            PACKED => packed = Some(v),
            _ => headers.push((k, v)),
        }
    }
    if let Some(json) = packed {
        match serde_json::from_str::<BTreeMap<String, String>>(&json) {
            Ok(map) => headers.extend(map),
            Err(e) => {
                malformed.get_or_insert(format!(
                    "attribute `{PACKED}` is not a JSON object of strings: {e}"
                ));
            }
        }
    }
    let payload = if base64 {
        match STANDARD.decode(body) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                malformed.get_or_insert(format!("the body is not base64: {e}"));
                Bytes::copy_from_slice(body.as_bytes())
            }
        }
    } else {
        Bytes::copy_from_slice(body.as_bytes())
    };
    (headers, payload, malformed)
}

/// A character an SQS body or attribute value may hold.
fn sqs_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A name SQS takes for an attribute: letters, digits, `-`, `_`, `.`; at most 256; not
/// starting with `AWS.` or `Amazon.`, nor with or ending in `.`, nor holding `..`.
fn attribute_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 256
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !k.starts_with('.')
        && !k.ends_with('.')
        && !k.contains("..")
        && !k.to_ascii_lowercase().starts_with("aws.")
        && !k.to_ascii_lowercase().starts_with("amazon.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn read_back(w: &Wire, pattern: &str) -> (Envelope, Option<String>) {
        let (headers, payload, bad) = decode(&w.body, w.attributes.clone());
        assert_eq!(bad, None);
        Envelope::read(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            payload,
            pattern,
            None,
        )
    }

    #[test]
    fn a_json_event_is_its_body_and_reads_back_whole() {
        let mut env = Envelope::new("orders.placed", &br#"{"order":42}"#[..])
            .with_content_type(content_type::JSON)
            .with_header("tenant", "acme");
        env.key = Some("order-42".into());
        env.deadline = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        let w = encode(&env, Pattern::Implied);
        assert_eq!(w.body, r#"{"order":42}"#);
        let names: Vec<&str> = w.attributes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, [header::ID, header::DEADLINE, header::KEY, "tenant"]);
        let (back, bad) = read_back(&w, "orders.placed");
        assert_eq!(bad, None);
        assert_eq!(back.id, env.id);
        assert_eq!(back.pattern, "orders.placed");
        assert_eq!(back.deadline, env.deadline);
        assert_eq!(back.key, env.key);
        assert_eq!(back.headers.get("tenant").map(String::as_str), Some("acme"));
        assert_eq!(back.payload, env.payload);
    }

    #[test]
    fn binary_payloads_travel_as_base64() {
        let env = Envelope::new("blobs.put", &[0u8, 159, 146, 150, 1][..])
            .with_content_type(content_type::BYTES);
        let w = encode(&env, Pattern::Sent);
        assert!(
            w.attributes
                .contains(&(BODY_ENCODING.into(), "base64".into()))
        );
        let (back, _) = read_back(&w, "ignored");
        assert_eq!(back.payload, env.payload);
        assert_eq!(back.pattern, "blobs.put");
        assert_eq!(back.content_type.as_deref(), Some(content_type::BYTES));
    }

    #[test]
    fn more_than_ten_headers_and_odd_names_are_packed_and_read_back() {
        let mut env = Envelope::new("p", &b"{}"[..]);
        for i in 0..12 {
            env = env.with_header(format!("h{i}"), format!("v{i}"));
        }
        env = env
            .with_header("has space", "x")
            .with_header("empty", "")
            .with_header("AWS.reserved", "y");
        let w = encode(&env, Pattern::Implied);
        assert!(w.attributes.len() <= MAX_ATTRIBUTES, "{:?}", w.attributes);
        assert!(w.attributes.iter().any(|(k, _)| k == PACKED));
        let (back, _) = read_back(&w, "p");
        for i in 0..12 {
            assert_eq!(
                back.headers.get(&format!("h{i}")).map(String::as_str),
                Some(format!("v{i}").as_str())
            );
        }
        assert_eq!(back.headers.get("has space").map(String::as_str), Some("x"));
        assert_eq!(back.headers.get("empty").map(String::as_str), Some(""));
        assert_eq!(
            back.headers.get("AWS.reserved").map(String::as_str),
            Some("y")
        );
        assert_eq!(back.id, env.id);
    }

    #[test]
    fn bad_encodings_are_reasons_not_panics() {
        let (_, payload, bad) = decode(
            "not base64!",
            [(BODY_ENCODING.to_owned(), "base64".to_owned())],
        );
        assert!(bad.is_some_and(|r| r.contains("base64")));
        assert_eq!(&payload[..], b"not base64!");
        let (_, _, bad) = decode("{}", [(PACKED.to_owned(), "[1,2]".to_owned())]);
        assert!(bad.is_some_and(|r| r.contains(PACKED)));
        let (_, _, bad) = decode("{}", [(BODY_ENCODING.to_owned(), "rot13".to_owned())]);
        assert!(bad.is_some_and(|r| r.contains("rot13")));
    }
}
