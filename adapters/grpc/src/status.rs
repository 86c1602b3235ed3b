//! Errors as gRPC statuses and back (the table is in `proto/switchboard/v1/switchboard.proto`
//! and docs/grpc.md): every non-OK status carries the SDK's error kind and code as the ASCII
//! trailers `sb-error-kind` and `sb-error-code`, so any client can tell a handler's
//! `not_found` from a missing handler without parsing messages.

use std::time::Duration;

use switchboard_core::{Error, ErrorKind, ReplyError};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::NAME;

/// Trailer naming the error kind (`timeout`, `handler`, ...).
pub const ERROR_KIND: &str = "sb-error-kind";
/// Trailer carrying the error code (a handler's own code, or the kind).
pub const ERROR_CODE: &str = "sb-error-code";

/// The gRPC status code of an error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::NoResponder
        | ErrorKind::Connection
        | ErrorKind::Closed
        | ErrorKind::CircuitOpen => Code::Unavailable,
        ErrorKind::Handler => Code::Unknown,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::InvalidConfig | ErrorKind::Codec => Code::InvalidArgument,
        ErrorKind::PayloadTooLarge | ErrorKind::Overloaded => Code::ResourceExhausted,
        ErrorKind::Rejected => Code::Aborted,
        _ => Code::Internal,
    }
}

/// A status with the kind and code trailers. A code that is not printable ASCII is left out
/// of the trailers (the status message still has the text).
pub fn status(kind: ErrorKind, code: &str, message: impl Into<String>) -> Status {
    let mut trailers = MetadataMap::new();
    trailers.insert(ERROR_KIND, MetadataValue::from_static(kind.as_str()));
    if let Ok(v) = MetadataValue::try_from(code)
        && !code.is_empty()
    {
        trailers.insert(ERROR_CODE, v);
    }
    Status::with_metadata(code_of(kind), message, trailers)
}

/// The status of an SDK error.
pub fn from_error(e: &Error) -> Status {
    status(e.kind(), e.code(), e.to_string())
}

/// The status of a reply that carries an error: its code decides the kind
/// ([`ReplyError::kind`], as `Client::send` decides it).
pub fn from_reply_error(e: &ReplyError) -> Status {
    status(e.kind(), &e.code, e.message.clone())
}

/// A status as a `SendStream` outcome carries it: code, message and the two trailers.
pub fn to_call_status(s: &Status) -> switchboard_proto::pb::CallStatus {
    let trailer = |key: &str| {
        s.metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    switchboard_proto::pb::CallStatus {
        code: s.code() as i32,
        message: s.message().to_owned(),
        kind: trailer(ERROR_KIND),
        error_code: trailer(ERROR_CODE),
    }
}

/// A `SendStream` outcome's failure as the status a unary call would have ended with.
pub fn from_call_status(c: switchboard_proto::pb::CallStatus) -> Status {
    let mut trailers = MetadataMap::new();
    for (key, value) in [(ERROR_KIND, &c.kind), (ERROR_CODE, &c.error_code)] {
        if let Ok(v) = MetadataValue::try_from(value.as_str())
            && !value.is_empty()
        {
            trailers.insert(key, v);
        }
    }
    Status::with_metadata(Code::from(c.code), c.message, trailers)
}

/// A status read back into an SDK error: the trailers if the server sent them, else the
/// status code (for statuses from the gRPC layer itself: connection refused, limits).
pub fn to_error(s: &Status) -> Error {
    let meta = s.metadata();
    let trailer = |key: &str| meta.get(key).and_then(|v| v.to_str().ok());
    let kind = trailer(ERROR_KIND)
        .and_then(ErrorKind::from_name)
        .unwrap_or(match s.code() {
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Unavailable | Code::Cancelled => ErrorKind::Connection,
            Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Unauthenticated,
            Code::InvalidArgument => ErrorKind::InvalidConfig,
            Code::ResourceExhausted | Code::OutOfRange => ErrorKind::PayloadTooLarge,
            Code::Unimplemented => ErrorKind::Unsupported,
            Code::Aborted => ErrorKind::Rejected,
            _ => ErrorKind::Other,
        });
    let mut message = if s.message().is_empty() {
        format!("gRPC status {:?}", s.code())
    } else {
        s.message().to_owned()
    };
    // A failure of the connection itself (refused, reset, not TLS, a bad certificate) comes
    // as a status with the transport error as its source: say what it was.
    let transport = std::error::Error::source(s).is_some_and(|e| {
        e.downcast_ref::<tonic::transport::Error>().is_some()
            || e.downcast_ref::<tonic::ConnectError>().is_some()
    });
    let mut kind = kind;
    if transport && trailer(ERROR_KIND).is_none() {
        if matches!(s.code(), Code::Unknown | Code::Internal) {
            kind = ErrorKind::Connection;
        }
        let mut cur = std::error::Error::source(s);
        while let Some(c) = cur {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cur = c.source();
        }
    }
    let e = Error::new(kind, NAME, message);
    match trailer(ERROR_CODE) {
        Some(code) => e.with_code(code),
        None => e,
    }
}

/// Rewrites the two statuses the gRPC layer (tonic) produces on its own before the service
/// sees a call, to the codes this service promises: a message over the size limit
/// (`OUT_OF_RANGE` there) becomes `RESOURCE_EXHAUSTED`, and a call past its deadline
/// (`CANCELLED`, "Timeout expired") becomes `DEADLINE_EXCEEDED`, each with the error-kind
/// trailers the service's own statuses carry. Used as a response layer of the server.
pub fn normalize(mut resp: http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> {
    let headers = resp.headers_mut();
    let message = |h: &http::HeaderMap| {
        h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(|m| m.replace("%20", " "))
            .unwrap_or_default()
    };
    let (code, kind) = match headers.get("grpc-status").map(http::HeaderValue::as_bytes) {
        Some(b"11") if message(headers).contains("message length too large") => {
            ("8", ErrorKind::PayloadTooLarge)
        }
        Some(b"1") if message(headers).contains("Timeout expired") => ("4", ErrorKind::Timeout),
        _ => return resp,
    };
    headers.insert("grpc-status", http::HeaderValue::from_static(code));
    headers.insert(ERROR_KIND, http::HeaderValue::from_static(kind.as_str()));
    headers.insert(ERROR_CODE, http::HeaderValue::from_static(kind.as_str()));
    resp
}

/// The `grpc-timeout` of a request (`100m`, `5S`, ...): how long its caller waits.
pub fn grpc_timeout(meta: &MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_survives_the_round_trip_through_a_status() {
        let e = Error::new(ErrorKind::Handler, "memory", "no user 7").with_code("not_found");
        let s = from_error(&e);
        assert_eq!(s.code(), Code::Unknown);
        let back = to_error(&s);
        assert_eq!(
            (back.kind(), back.code()),
            (ErrorKind::Handler, "not_found")
        );
        let t = from_error(&Error::timeout("memory", Duration::from_millis(5)));
        assert_eq!(t.code(), Code::DeadlineExceeded);
        assert_eq!(to_error(&t).kind(), ErrorKind::Timeout);
        // A status from the gRPC layer itself, without trailers.
        let raw = Status::unavailable("connection refused");
        assert_eq!(to_error(&raw).kind(), ErrorKind::Connection);
        // A code that cannot be a header value is left out, not a panic.
        let odd = status(ErrorKind::Handler, "bad\ncode", "m");
        assert!(odd.metadata().get(ERROR_CODE).is_none());
    }

    #[test]
    fn the_grpc_layers_own_statuses_are_normalized() {
        let response = |code: &'static str, message: &'static str| {
            let mut r = http::Response::new(tonic::body::Body::empty());
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
            r.headers_mut()
                .insert("grpc-message", http::HeaderValue::from_static(message));
            r
        };
        let status = |r: &http::Response<tonic::body::Body>| {
            (
                r.headers()["grpc-status"]
                    .to_str()
                    .expect("ascii")
                    .to_owned(),
                r.headers()
                    .get(ERROR_KIND)
                    .map(|v| v.to_str().expect("ascii").to_owned()),
            )
        };
        let big = normalize(response(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%209%20bytes",
        ));
        assert_eq!(status(&big), ("8".into(), Some("payload_too_large".into())));
        let late = normalize(response("1", "Timeout%20expired"));
        assert_eq!(status(&late), ("4".into(), Some("timeout".into())));
        // Any other status is left as it is.
        let other = normalize(response("1", "client%20went%20away"));
        assert_eq!(status(&other), ("1".into(), None));
    }

    #[test]
    fn grpc_timeouts_are_read() {
        let mut m = MetadataMap::new();
        for (v, d) in [
            ("250m", Some(Duration::from_millis(250))),
            ("3S", Some(Duration::from_secs(3))),
            ("1H", Some(Duration::from_secs(3600))),
            ("999999999m", None),
            ("m", None),
            ("10x", None),
        ] {
            m.insert("grpc-timeout", v.parse().expect("ascii"));
            assert_eq!(grpc_timeout(&m), d, "{v}");
        }
    }
}
