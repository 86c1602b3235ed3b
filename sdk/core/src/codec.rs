//! Payload codecs, chosen by content type: JSON (serde, the default), protobuf (prost) and raw
//! bytes.
//!
//! Any `serde` type is encoded as JSON ([`Encode`], [`Decode`]). Wrap a prost message in [`Proto`] to send it
//! as protobuf, or bytes in [`Raw`] to pass them through untouched. On receipt, the envelope's
//! content type picks the codec: a body whose codec does not match the content type is a
//! [`crate::ErrorKind::Codec`] error naming both.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::content_type;
use crate::error::{Error, Result};

/// A value that can be sent as a message payload.
pub trait Encode {
    /// Encodes the value; returns the payload and its content type (a constant for every
    /// codec here; only a [`Payload`] relayed from elsewhere carries one chosen at run time).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Codec`] if the value cannot be encoded.
    fn encode(&self) -> Result<(Bytes, Cow<'static, str>)>;
}

/// A value that can be read from a message payload.
pub trait Decode: Sized + Send + 'static {
    /// Decodes a payload whose content type is `content_type` (`None`: unknown).
    ///
    /// # Errors
    /// [`crate::ErrorKind::Codec`] if the content type is not this codec's or the bytes do
    /// not decode.
    fn decode(content_type: Option<&str>, payload: Bytes) -> Result<Self>;
}

/// A value that travels both ways (both [`Encode`] and [`Decode`]).
pub trait Body: Encode + Decode {}

impl<T: Encode + Decode> Body for T {}

/// The media type without parameters (`Application/JSON; charset=utf-8` →
/// `Application/JSON`), to compare ignoring ASCII case. No allocation: it runs per message.
fn essence(ct: &str) -> &str {
    ct.split_once(';').map_or(ct, |(media, _)| media).trim()
}

fn is_json(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(content_type::JSON) => true,
        Some(ct) => {
            let e = essence(ct);
            e.eq_ignore_ascii_case(content_type::JSON)
                || e.eq_ignore_ascii_case("text/json")
                || ends_with_ignore_ascii_case(e.as_bytes(), b"+json")
        }
    }
}

/// Whether `s` ends with `tail`, ignoring ASCII case (bytes: no char boundary to mind).
fn ends_with_ignore_ascii_case(s: &[u8], tail: &[u8]) -> bool {
    s.len() >= tail.len() && s[s.len() - tail.len()..].eq_ignore_ascii_case(tail)
}

fn is_protobuf(ct: Option<&str>) -> bool {
    match ct {
        None => true,
        Some(ct) => {
            let e = essence(ct);
            [
                content_type::PROTOBUF,
                "application/protobuf",
                "application/vnd.google.protobuf",
            ]
            .iter()
            .any(|p| e.eq_ignore_ascii_case(p))
        }
    }
}

fn mismatch(expected: &str, got: Option<&str>) -> Error {
    Error::codec(
        "core",
        format!(
            "payload has content type `{}`, expected `{expected}`",
            got.unwrap_or("")
        ),
    )
}

impl<T: Serialize + ?Sized> Encode for T {
    fn encode(&self) -> Result<(Bytes, Cow<'static, str>)> {
        let v = serde_json::to_vec(self)
            .map_err(|e| Error::codec("core", format!("cannot encode JSON: {e}")).with_source(e))?;
        Ok((Bytes::from(v), Cow::Borrowed(content_type::JSON)))
    }
}

impl<T: DeserializeOwned + Send + 'static> Decode for T {
    fn decode(ct: Option<&str>, payload: Bytes) -> Result<Self> {
        if !is_json(ct) {
            return Err(mismatch(content_type::JSON, ct));
        }
        serde_json::from_slice(&payload).map_err(|e| {
            Error::codec(
                "core",
                format!(
                    "payload is not a valid JSON {}: {e}",
                    std::any::type_name::<T>()
                ),
            )
            .with_source(e)
        })
    }
}

/// A protobuf message (prost), sent with content type `application/x-protobuf`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proto<M>(pub M);

impl<M: prost::Message> Encode for Proto<M> {
    fn encode(&self) -> Result<(Bytes, Cow<'static, str>)> {
        Ok((
            Bytes::from(self.0.encode_to_vec()),
            Cow::Borrowed(content_type::PROTOBUF),
        ))
    }
}

impl<M: prost::Message + Default + 'static> Decode for Proto<M> {
    fn decode(ct: Option<&str>, payload: Bytes) -> Result<Self> {
        if !is_protobuf(ct) {
            return Err(mismatch(content_type::PROTOBUF, ct));
        }
        M::decode(payload).map(Proto).map_err(|e| {
            Error::codec(
                "core",
                format!(
                    "payload is not a valid protobuf {}: {e}",
                    std::any::type_name::<M>()
                ),
            )
            .with_source(e)
        })
    }
}

/// Raw bytes, passed through untouched whatever their content type
/// (sent as `application/octet-stream`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Raw(pub Bytes);

impl Encode for Raw {
    fn encode(&self) -> Result<(Bytes, Cow<'static, str>)> {
        Ok((self.0.clone(), Cow::Borrowed(content_type::BYTES)))
    }
}

impl Decode for Raw {
    fn decode(_ct: Option<&str>, payload: Bytes) -> Result<Self> {
        Ok(Raw(payload))
    }
}

/// Bytes with the content type they came with: a payload relayed as it is, by a bridge such
/// as the gRPC gateway, whose clients choose the content type at run time. Decoding takes any
/// payload (a message without a content type reads as JSON, the wire's default); encoding sends
/// the bytes with `content_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The payload.
    pub bytes: Bytes,
    /// Its content type (`application/json`, `application/x-protobuf`, ...).
    pub content_type: Cow<'static, str>,
}

impl Payload {
    /// `bytes` with `content_type`; an empty content type means JSON, the wire's default.
    pub fn new(bytes: impl Into<Bytes>, content_type: &str) -> Self {
        let content_type = if content_type.is_empty() {
            Cow::Borrowed(content_type::JSON)
        } else {
            content_type::intern(content_type)
        };
        Payload {
            bytes: bytes.into(),
            content_type,
        }
    }
}

impl Encode for Payload {
    fn encode(&self) -> Result<(Bytes, Cow<'static, str>)> {
        Ok((self.bytes.clone(), self.content_type.clone()))
    }
}

impl Decode for Payload {
    fn decode(ct: Option<&str>, payload: Bytes) -> Result<Self> {
        Ok(Payload::new(payload, ct.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct User {
        id: u64,
        name: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct ProtoUser {
        #[prost(uint64, tag = "1")]
        id: u64,
        #[prost(string, tag = "2")]
        name: String,
    }

    #[test]
    fn json_round_trip() {
        let u = User {
            id: 7,
            name: "Ada".into(),
        };
        let (bytes, ct) = u.encode().expect("encodes");
        assert_eq!(ct, "application/json");
        let back = User::decode(Some("application/json; charset=utf-8"), bytes).expect("decodes");
        assert_eq!(back, u);
    }

    #[test]
    fn content_types_are_matched_without_case_or_parameters() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            " text/json ",
            "application/cloudevents+JSON",
        ] {
            assert!(is_json(Some(ct)), "{ct}");
        }
        for ct in [
            "application/x-protobuf",
            "text/plain",
            "json",
            "é+jsoné",
            "ü",
        ] {
            assert!(!is_json(Some(ct)), "{ct}");
        }
        assert!(is_protobuf(Some("Application/Protobuf; proto=x")));
        assert!(!is_protobuf(Some("application/json")));
    }

    #[test]
    fn protobuf_round_trip() {
        let u = Proto(ProtoUser {
            id: 7,
            name: "Ada".into(),
        });
        let (bytes, ct) = u.encode().expect("encodes");
        assert_eq!(ct, content_type::PROTOBUF);
        let back = Proto::<ProtoUser>::decode(Some(&ct), bytes).expect("decodes");
        assert_eq!(back, u);
    }

    #[test]
    fn raw_round_trip() {
        let r = Raw(Bytes::from_static(&[0, 159, 146, 150]));
        let (bytes, ct) = r.encode().expect("encodes");
        assert_eq!(ct, content_type::BYTES);
        assert_eq!(Raw::decode(Some("image/png"), bytes).expect("decodes"), r);
    }

    #[test]
    fn undecodable_payloads_are_codec_errors() {
        let err = User::decode(None, Bytes::from_static(b"\xff not json")).expect_err("bad");
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("not a valid JSON"), "{err}");
        let err =
            Proto::<ProtoUser>::decode(None, Bytes::from_static(b"\xff\xff\xff")).expect_err("bad");
        assert_eq!(err.kind(), ErrorKind::Codec);
    }

    #[test]
    fn content_type_mismatch_is_named() {
        let (bytes, ct) = Proto(ProtoUser::default()).encode().expect("encodes");
        let err = User::decode(Some(&ct), bytes).expect_err("mismatch");
        assert_eq!(err.kind(), ErrorKind::Codec);
        assert!(err.to_string().contains("application/x-protobuf"), "{err}");
    }

    #[test]
    fn a_payload_keeps_its_content_type_both_ways() {
        let p = Payload::new(&b"<a/>"[..], "application/xml");
        let (bytes, ct) = p.encode().expect("encodes");
        assert_eq!((&bytes[..], &*ct), (&b"<a/>"[..], "application/xml"));
        let back = Payload::decode(Some("application/xml"), bytes).expect("any payload decodes");
        assert_eq!(back, p);
        // No content type: the wire's default, JSON (a known type is not copied).
        let json = Payload::decode(None, Bytes::from_static(b"1")).expect("decodes");
        assert!(matches!(
            json.content_type,
            Cow::Borrowed(content_type::JSON)
        ));
    }
}
