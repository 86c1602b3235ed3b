//! One error type for every transport, classified by what the caller can do about it.

use std::fmt;
use std::time::Duration;

/// A boxed error from a library underneath (kept as [`std::error::Error::source`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms of what the caller can do about it.
///
/// Callers match on [`Error::kind`]; the native error of the library underneath stays in
/// [`std::error::Error::source`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The deadline passed before a reply arrived.
    Timeout,
    /// Nobody handles this pattern (detected at once where the transport can tell).
    NoResponder,
    /// The responder's handler failed; [`Error::code`] carries its error code.
    Handler,
    /// Credentials are missing or wrong.
    Unauthenticated,
    /// The transport cannot do what was asked (see its `Capabilities`).
    Unsupported,
    /// A URL, option or argument is malformed or names something not compiled in.
    InvalidConfig,
    /// The connection to the transport failed or was lost.
    Connection,
    /// The transport refused the message (for example a negative publisher confirm).
    Rejected,
    /// A payload or envelope could not be encoded or decoded.
    Codec,
    /// The encoded payload is larger than the transport or client allows.
    PayloadTooLarge,
    /// The client or subscription has been shut down.
    Closed,
    /// The caller is being shed: too much is in flight.
    Overloaded,
    /// A circuit breaker is open: calls to this target fail at once until it probes again.
    CircuitOpen,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// The kind named `name` ([`ErrorKind::as_str`] read back), for errors that crossed a
    /// process boundary as text.
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        use ErrorKind as K;
        [
            K::Timeout,
            K::NoResponder,
            K::Handler,
            K::Unauthenticated,
            K::Unsupported,
            K::InvalidConfig,
            K::Connection,
            K::Rejected,
            K::Codec,
            K::PayloadTooLarge,
            K::Closed,
            K::Overloaded,
            K::CircuitOpen,
            K::Other,
        ]
        .into_iter()
        .find(|k| k.as_str() == name)
    }

    /// The stable, machine-readable name of this kind, as used in the wire's error code header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoResponder => "no_responder",
            ErrorKind::Handler => "handler",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::Connection => "connection",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Codec => "codec",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Closed => "closed",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error every switchboard call returns.
///
/// Display reads like `request timed out after 500ms (memory)`: the message, then the
/// transport that produced it.
///
/// One pointer wide (the details are boxed): a `Result<T>` is hardly larger than `T`, and
/// every future that holds one stays small on the paths that do not fail.
pub struct Error(Box<Repr>);

struct Repr {
    kind: ErrorKind,
    adapter: &'static str,
    message: String,
    code: Option<String>,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind`, raised by `adapter` (the transport's name, or `"core"`).
    pub fn new(kind: ErrorKind, adapter: &'static str, message: impl Into<String>) -> Self {
        Error(Box::new(Repr {
            kind,
            adapter,
            message: message.into(),
            code: None,
            source: None,
        }))
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }

    /// Attaches a machine-readable code (used by [`ErrorKind::Handler`] errors).
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.0.code = Some(code.into());
        self
    }

    /// A timeout after `after`.
    pub fn timeout(adapter: &'static str, after: Duration) -> Self {
        Error::new(
            ErrorKind::Timeout,
            adapter,
            format!("request timed out after {}ms", after.as_millis()),
        )
    }

    /// An [`ErrorKind::InvalidConfig`] error.
    pub fn invalid_config(adapter: &'static str, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, adapter, message)
    }

    /// An [`ErrorKind::Codec`] error.
    pub fn codec(adapter: &'static str, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Codec, adapter, message)
    }

    /// An [`ErrorKind::Closed`] error.
    pub fn closed(adapter: &'static str) -> Self {
        Error::new(
            ErrorKind::Closed,
            adapter,
            "the client or subscription is closed",
        )
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The transport (or `"core"`) that raised it.
    pub fn adapter(&self) -> &'static str {
        self.0.adapter
    }

    /// The human-readable message, without the adapter suffix.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The machine-readable code: for [`ErrorKind::Handler`] the code the handler gave,
    /// otherwise the kind's own name.
    pub fn code(&self) -> &str {
        self.0.code.as_deref().unwrap_or(self.0.kind.as_str())
    }

    /// Whether trying the same call again may succeed.
    ///
    /// True for timeouts, lost connections, missing responders (a service may be starting),
    /// a closed transport that reconnects, and overload. False for bad input, codec and
    /// handler errors, which fail the same way again, and for an open circuit, which fails
    /// at once until the breaker probes again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.0.kind,
            ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::NoResponder
                | ErrorKind::Overloaded
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.0.kind)
            .field("adapter", &self.0.adapter)
            .field("message", &self.0.message);
        if let Some(code) = &self.0.code {
            d.field("code", code);
        }
        if let Some(source) = &self.0.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.0.code, self.0.kind) {
            (Some(code), ErrorKind::Handler) => {
                write!(
                    f,
                    "handler error `{code}`: {} ({})",
                    self.0.message, self.0.adapter
                )
            }
            _ => write!(f, "{} ({})", self.0.message, self.0.adapter),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|e| e.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// The error a handler returns: a machine-readable code and a message, sent back to the caller
/// of `send`/`request` as an [`ErrorKind::Handler`] error (never as a timeout).
///
/// Any `std::error::Error` converts into it (code `internal`), so `?` works inside handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    /// Machine-readable code, e.g. `not_found`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl HandlerError {
    /// A handler error with the given code and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        HandlerError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(e: E) -> Self {
        HandlerError::new("internal", e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_message_and_adapter() {
        let e = Error::timeout("nats", Duration::from_millis(500));
        assert_eq!(e.to_string(), "request timed out after 500ms (nats)");
        assert!(e.is_retryable());
        assert_eq!(e.code(), "timeout");
    }

    #[test]
    fn handler_errors_carry_their_code() {
        let e = Error::new(ErrorKind::Handler, "memory", "no such user").with_code("not_found");
        assert_eq!(e.code(), "not_found");
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "handler error `not_found`: no such user (memory)"
        );
    }

    #[test]
    fn std_errors_convert_into_handler_errors() {
        let parse: std::result::Result<u32, _> = "x".parse::<u32>();
        let he: HandlerError = parse.expect_err("not a number").into();
        assert_eq!(he.code, "internal");
    }
}
