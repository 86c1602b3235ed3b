//! # switchboard-proto
//!
//! switchboard's wire schema as protobuf, package `switchboard.v1` (`proto/switchboard/v1/`),
//! compiled at build time by protox (no system `protoc`): the envelope, and the `Switchboard`
//! gRPC service spoken by the `grpc://` transport and the gateway (its client in
//! [`pb::switchboard_client`], its server trait in [`pb::switchboard_server`]). Generated types
//! stay in [`pb`]; [`to_proto`] and [`from_proto`] convert to and from the SDK's [`Envelope`],
//! so public APIs speak SDK types. [`FILE_DESCRIPTOR_SET`] is the encoded schema, for gRPC
//! reflection.

use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

use switchboard_core::envelope::system_time_to_millis;
use switchboard_core::{CorrelationId, Envelope, Error, MessageId, ReplyError, Result};

/// Types generated from `proto/switchboard/v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
}

/// The encoded `FileDescriptorSet` of `proto/switchboard/v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchboard_v1_descriptor.bin"));

/// The full gRPC name of the service, `switchboard.v1.Switchboard`.
pub const SERVICE_NAME: &str = "switchboard.v1.Switchboard";

/// The SDK envelope as its protobuf message (a copy; see [`into_proto`]).
pub fn to_proto(env: &Envelope) -> pb::Envelope {
    into_proto(env.clone())
}

/// The SDK envelope as its protobuf message, its strings and payload moved rather than copied.
pub fn into_proto(env: Envelope) -> pb::Envelope {
    let id = env.id.to_string();
    pb::Envelope {
        id,
        ..into_proto_leaving_out_id(env)
    }
}

/// What a call on a `SendStream` carries of its request: all but what the server does not
/// need. The id is left out (the server draws one; a `send`'s id is never shown to its
/// caller), and with it a correlation id equal to it (the server takes the id it draws); the
/// reply address (the server owns a `send`'s reply path); and a JSON content type (none means
/// JSON). Each of these is a string written, sent and read per call.
pub fn send_call_envelope(mut env: Envelope) -> pb::Envelope {
    if env
        .correlation_id
        .is_some_and(|c| c.as_uuid() == env.id.as_uuid())
    {
        env.correlation_id = None;
    }
    env.reply_to = None;
    leave_out_json(&mut env);
    into_proto_leaving_out_id(env)
}

/// Drops a JSON content type (none means JSON).
fn leave_out_json(env: &mut Envelope) {
    if env
        .content_type
        .as_deref()
        .is_some_and(|ct| ct == switchboard_core::content_type::JSON)
    {
        env.content_type = None;
    }
}

/// What a `SendStream` outcome carries of a reply: all but what its caller knows. Left out:
/// the id and the pattern (nothing reads a reply's), the correlation id (the call's), a
/// causation id equal to it, the reply address, and a JSON content type. Read back with
/// [`read_stream_reply`].
pub fn stream_reply(mut env: Envelope) -> pb::Envelope {
    if env.causation_implied() {
        env.causation_id = None;
    }
    env.pattern = String::new();
    env.correlation_id = None;
    env.reply_to = None;
    leave_out_json(&mut env);
    into_proto_leaving_out_id(env)
}

/// A reply read from a `SendStream` outcome ([`stream_reply`]): what was left out filled in
/// from its call's `correlation` (its id and correlation id; its causation id, unless sent).
/// Its pattern is left empty, as a reply's is on the brokers.
///
/// # Errors
/// `Codec` if a causation id is not a UUID.
pub fn read_stream_reply(m: pb::Envelope, correlation: Option<CorrelationId>) -> Result<Envelope> {
    let id = correlation.map_or_else(MessageId::new, MessageId::from);
    let mut env = envelope_with_id(id, m)?;
    env.complete_reply(correlation);
    Ok(env)
}

/// [`into_proto`] without the id.
fn into_proto_leaving_out_id(env: Envelope) -> pb::Envelope {
    let Envelope {
        pattern,
        correlation_id,
        causation_id,
        reply_to,
        deadline,
        key,
        error,
        content_type,
        headers,
        payload,
        ..
    } = env;
    pb::Envelope {
        id: String::new(),
        pattern,
        correlation_id: correlation_id.map(|c| c.to_string()).unwrap_or_default(),
        causation_id: causation_id.map(|c| c.to_string()).unwrap_or_default(),
        reply_to: reply_to.unwrap_or_default(),
        deadline_unix_ms: deadline.map(system_time_to_millis).unwrap_or(0),
        key: key.unwrap_or_default(),
        error: error.map(|e| pb::ReplyError {
            code: e.code,
            message: e.message,
        }),
        content_type: content_type.map(Cow::into_owned).unwrap_or_default(),
        headers: headers.into_iter().collect(),
        payload,
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The protobuf message as an SDK envelope.
///
/// # Errors
/// `Codec` if an id is not a UUID or the pattern is empty.
pub fn from_proto(m: pb::Envelope) -> Result<Envelope> {
    if m.pattern.is_empty() {
        return Err(Error::codec("proto", "envelope has an empty pattern"));
    }
    // An id drawn only when none was given (drawing one costs a clock read and randomness).
    let id = if m.id.is_empty() {
        MessageId::new()
    } else {
        m.id.parse()?
    };
    envelope_with_id(id, m)
}

/// The protobuf message as an SDK envelope with the id `id` (its own `id` field not read).
fn envelope_with_id(id: MessageId, m: pb::Envelope) -> Result<Envelope> {
    let mut env = Envelope::with_id(id, m.pattern, m.payload);
    env.correlation_id = non_empty(m.correlation_id).map(|s| s.parse()).transpose()?;
    env.causation_id = non_empty(m.causation_id).map(|s| s.parse()).transpose()?;
    env.reply_to = non_empty(m.reply_to);
    env.deadline =
        (m.deadline_unix_ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(m.deadline_unix_ms));
    env.key = non_empty(m.key);
    env.error = m.error.map(|e| ReplyError {
        code: e.code,
        message: e.message,
    });
    env.content_type =
        non_empty(m.content_type).map(|ct| switchboard_core::content_type::intern(&ct));
    env.headers = m.headers.into_iter().collect();
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use switchboard_core::{CorrelationId, MessageId};

    #[test]
    fn envelope_round_trips_through_protobuf_bytes() {
        let mut env =
            Envelope::new("users.get", &b"{\"id\":1}"[..]).with_content_type("application/json");
        env.correlation_id = Some(CorrelationId::new());
        env.causation_id = Some(MessageId::new());
        env.reply_to = Some("_inbox.x".into());
        env.deadline = Some(UNIX_EPOCH + Duration::from_millis(1_732_000_000_001));
        env.key = Some("k".into());
        env.error = Some(ReplyError {
            code: "not_found".into(),
            message: "gone".into(),
        });
        env.headers
            .insert("traceparent".into(), "00-abc-def-01".into());
        let bytes = to_proto(&env).encode_to_vec();
        let back = from_proto(pb::Envelope::decode(&bytes[..]).expect("decodes")).expect("valid");
        assert_eq!(back, env);
    }

    #[test]
    fn bad_ids_are_codec_errors() {
        let m = pb::Envelope {
            pattern: "p".into(),
            id: "nope".into(),
            ..Default::default()
        };
        assert_eq!(
            from_proto(m).expect_err("bad id").kind(),
            switchboard_core::ErrorKind::Codec
        );
    }

    #[test]
    fn a_send_call_leaves_out_what_the_server_draws_or_owns() {
        let mut req = Envelope::new("orders.get", &b"7"[..]).with_content_type("application/json");
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.reply_to = Some("_inbox.1".into());
        req.deadline = Some(UNIX_EPOCH + Duration::from_millis(1_732_000_000_001));
        req.headers
            .insert("traceparent".into(), "00-abc-def-01".into());
        let m = send_call_envelope(req.clone());
        assert!(m.id.is_empty() && m.correlation_id.is_empty());
        assert!(m.reply_to.is_empty() && m.content_type.is_empty());
        assert_eq!(m.pattern, "orders.get");
        assert_eq!(m.deadline_unix_ms, 1_732_000_000_001);
        assert_eq!(
            m.headers.get("traceparent").map(String::as_str),
            Some("00-abc-def-01")
        );
        // A correlation carried from a parent travels, as does a content type other than JSON.
        let parent = CorrelationId::new();
        req.correlation_id = Some(parent);
        req.content_type = Some("application/x-protobuf".into());
        let m = send_call_envelope(req);
        assert_eq!(m.correlation_id, parent.to_string());
        assert_eq!(m.content_type, "application/x-protobuf");
    }

    #[test]
    fn a_stream_reply_is_read_back_with_what_its_caller_knows() {
        let mut req = Envelope::new("orders.get", &b"7"[..]);
        req.correlation_id = Some(CorrelationId::from(req.id));
        req.headers
            .insert("traceparent".into(), "00-abc-def-01".into());
        let correlation = req.correlation_id;
        let reply = req
            .into_reply(&b"8"[..])
            .with_content_type("application/json");
        let m = stream_reply(reply.clone());
        assert!(m.id.is_empty() && m.pattern.is_empty() && m.content_type.is_empty());
        assert!(m.correlation_id.is_empty() && m.causation_id.is_empty());
        let back = read_stream_reply(m, correlation).expect("valid");
        assert_eq!(back.payload, reply.payload);
        assert_eq!(back.correlation_id, reply.correlation_id);
        assert_eq!(back.causation_id, reply.causation_id);
        assert_eq!(back.headers, reply.headers);
        assert!(back.pattern.is_empty());
        // What the caller cannot know travels: another content type, an error, a causation
        // id other than the correlation id.
        let mut other = reply;
        other.content_type = Some("text/plain".into());
        other.causation_id = Some(MessageId::new());
        other.error = Some(ReplyError {
            code: "not_found".into(),
            message: "gone".into(),
        });
        let back = read_stream_reply(stream_reply(other.clone()), correlation).expect("valid");
        assert_eq!(back.content_type, other.content_type);
        assert_eq!(back.causation_id, other.causation_id);
        assert_eq!(back.error, other.error);
    }
}
