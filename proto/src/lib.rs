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
use switchboard_core::{Envelope, Error, MessageId, ReplyError, Result};

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
    let Envelope {
        id,
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
        id: id.to_string(),
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
}
