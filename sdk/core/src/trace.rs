//! Tracing: a span for each send, emit, request, handle and reply, and the W3C trace context
//! (`traceparent`, `tracestate`) carried in the envelope headers, injected and extracted with
//! OpenTelemetry's `TraceContextPropagator`. So one trace follows a message from service to
//! service and back, on every transport (the headers travel as every other header does).
//!
//! The spans are `tracing` spans, target `switchboard`, level INFO:
//!
//! | span | where | fields |
//! | --- | --- | --- |
//! | `send`, `request`, `emit` | the caller | `pattern`, `message_id`, `otel.kind` |
//! | `handle` | the handler, child of the trace context in the message | `pattern`, `group`, `message_id`, `attempt` |
//! | `reply` | the handler, sending the reply | `pattern` |
//!
//! With `tracing-opentelemetry`'s layer installed they are exported as OpenTelemetry spans
//! and their context travels in the headers. Without it they cost what a `tracing` span costs
//! (nothing when no subscriber wants them), and a handler's calls made with
//! [`crate::Context::options`] still carry its message's trace headers on.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::envelope::header;

struct Writer<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Reader<'a>(&'a BTreeMap<String, String>);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Writes `span`'s trace context into `headers`, when OpenTelemetry records the span (else
/// the headers keep what they carry, such as the trace context of the message being handled).
pub(crate) fn inject(span: &Span, headers: &mut BTreeMap<String, String>) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Writer(headers));
    }
}

/// Makes the trace context carried in `headers` the parent of `span`.
pub(crate) fn continue_from(span: &Span, headers: &BTreeMap<String, String>) {
    if span.is_disabled() || !headers.contains_key(header::TRACEPARENT) {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Reader(headers));
    // Fails only when the span is not an OpenTelemetry one: then there is nothing to link.
    let _ = span.set_parent(cx);
}

/// The span of a call made by a client.
macro_rules! call_span {
    ($name:literal, $pattern:expr, $env:expr) => {
        tracing::info_span!(
            target: "switchboard",
            $name,
            pattern = %$pattern,
            message_id = %$env.id,
            otel.kind = if $name == "emit" { "producer" } else { "client" },
        )
    };
}
pub(crate) use call_span;
