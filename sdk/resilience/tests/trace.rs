//! Trace continuity: one trace id across a call A → B, B's own call to C, the replies, and
//! the retry of A's call, exported as OpenTelemetry spans; and the reply carries the trace
//! context back in its headers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use opentelemetry::trace::{TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::{
    Backoff, Client, ClientConfig, Envelope, HandlerError, content_type, header,
};
use switchboard_resilience::{Policies, Policy, Resilient, Retry};
use tokio::time::timeout;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

const STEP: Duration = Duration::from_secs(5);

fn client(bus: &MemoryConfig) -> Client {
    Client::new(
        MemoryTransport::connect(bus.clone()),
        ClientConfig::default(),
    )
}

/// The trace id in a `traceparent` header (`00-<trace id>-<span id>-<flags>`).
fn trace_of(env: &Envelope) -> Option<TraceId> {
    let tp = env.headers.get(header::TRACEPARENT)?;
    TraceId::from_hex(tp.split('-').nth(1)?).ok()
}

fn named<'a>(spans: &'a [SpanData], name: &str, pattern: &str) -> Vec<&'a SpanData> {
    spans
        .iter()
        .filter(|s| {
            s.name == name
                && s.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "pattern" && kv.value.as_str() == pattern)
        })
        .collect()
}

#[tokio::test]
async fn one_trace_follows_a_call_through_b_to_c_and_back_retries_included() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("trace-test")));
    // This test's runtime is one thread: every task of it sees this subscriber.
    let _default = tracing::subscriber::set_default(subscriber);

    let bus = MemoryConfig::default().bus("trace-continuity");
    let (a, b, c) = (client(&bus), client(&bus), client(&bus));
    c.handle("c.price", |n: u32, _ctx| async move {
        Ok::<_, HandlerError>(n * 2)
    })
    .await
    .expect("registers");
    let b_calls = Arc::new(AtomicU32::new(0));
    let seen = b_calls.clone();
    b.handle("b.quote", move |n: u32, ctx| {
        let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                return Err(HandlerError::new("unavailable", "warming up"));
            }
            // B's own call, on behalf of the message it handles.
            let price: u32 = ctx
                .send("c.price", &n)
                .await
                .map_err(|e| HandlerError::new("upstream", e.to_string()))?;
            Ok(price + 1)
        }
    })
    .await
    .expect("registers");

    let policies = Policies::new().pattern(
        "b.quote",
        Policy::new().retry(Retry::attempts(3).backoff(Backoff::exponential(
            Duration::from_millis(5),
            Duration::from_millis(10),
        ))),
    );
    let a = Resilient::new(a, policies).expect("valid");
    let root = tracing::info_span!("checkout");
    let (quote, reply) = async {
        let quote: u32 = timeout(STEP, a.send("b.quote", &20u32))
            .await
            .expect("bounded")
            .expect("second attempt answers");
        // The reply's own headers, through the same policies.
        let env = Envelope::new("b.quote", "1").with_content_type(content_type::JSON);
        let reply = timeout(STEP, a.send_envelope(env))
            .await
            .expect("bounded")
            .expect("answers");
        (quote, reply)
    }
    .instrument(root)
    .await;
    assert_eq!(quote, 41);
    assert_eq!(
        b_calls.load(Ordering::SeqCst),
        3,
        "a retry, then two answered calls"
    );

    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let trace = spans
        .iter()
        .find(|s| s.name == "checkout")
        .expect("the root span")
        .span_context
        .trace_id();
    let mut checked = 0;
    for (name, pattern, at_least) in [
        ("call", "b.quote", 2),
        ("send", "b.quote", 3), // two attempts of the first call, one of the second
        ("handle", "b.quote", 3), // the failed attempt included
        ("reply", "b.quote", 3),
        ("send", "c.price", 2),
        ("handle", "c.price", 2),
        ("reply", "c.price", 2),
    ] {
        let found = named(&spans, name, pattern);
        assert!(
            found.len() >= at_least,
            "{name} {pattern}: {} spans, expected {at_least}: {:?}",
            found.len(),
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        for s in found {
            assert_eq!(
                s.span_context.trace_id(),
                trace,
                "{name} {pattern} left the trace"
            );
            checked += 1;
        }
    }
    assert!(checked >= 17);
    assert_eq!(
        trace_of(&reply),
        Some(trace),
        "the reply carries the trace back"
    );
    // Its context is that of the handler's `reply` span (not the request's, copied back).
    let parent = reply
        .headers
        .get(header::TRACEPARENT)
        .and_then(|tp| tp.split('-').nth(2))
        .expect("a span id");
    assert!(
        named(&spans, "reply", "b.quote")
            .iter()
            .any(|s| s.span_context.span_id().to_string() == parent),
        "the reply's traceparent names no `reply` span: {parent}"
    );
}
