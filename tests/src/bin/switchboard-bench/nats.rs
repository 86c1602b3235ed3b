//! The raw async-nats side: core request/reply on the client's multiplexed inbox against a
//! queue-group responder; JetStream publish with acks into a stream read by a durable pull
//! consumer that acks each message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::Notify;

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

const ECHO: &str = "rawbench.echo";
const TIMED_ECHO_PREFIX: &str = "rawbench.rqd.";
const TIMED_ECHO_FILTER: &str = "rawbench.rqd.*.echo";
const EVENTS: &str = "rawbench.evt";
const STREAM: &str = "RAWBENCH";

/// The server address of a `nats://` URL (options dropped: the raw client has none of ours).
fn addr(url: &str) -> String {
    let u = url::Url::parse(url).expect("nats URL");
    format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(4222)
    )
}

async fn events_stream(js: &jetstream::Context) -> jetstream::stream::Stream {
    js.get_or_create_stream(jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![EVENTS.into()],
        max_age: Duration::from_secs(600),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("raw stream")
}

pub(crate) async fn serve(url: &str, counted: Arc<AtomicU64>, all: Arc<Notify>, total: u64) {
    let client = async_nats::connect(addr(url)).await.expect("connect");
    let mut sub = client
        .queue_subscribe(ECHO, "raw".into())
        .await
        .expect("subscribe");
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                let _ = c.publish(reply, echo_bytes(&m.payload).into()).await;
            }
        }
    });
    // `--raw-metadata`: requests with their deadline in the subject, as switchboard sends
    // them, read and checked here as its handlers do. A loop of its own, so the plain
    // requests' loop stays as lean as a raw client's would be.
    let mut timed = client
        .queue_subscribe(TIMED_ECHO_FILTER, "raw".into())
        .await
        .expect("subscribe");
    let c = client.clone();
    tokio::spawn(async move {
        while let Some(m) = timed.next().await {
            let deadline = m
                .subject
                .strip_prefix(TIMED_ECHO_PREFIX)
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(ms, _)| ms.parse::<u64>().ok())
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
            if deadline.is_some_and(|d| d <= std::time::SystemTime::now()) {
                continue;
            }
            if let Some(reply) = m.reply {
                let _ = c.publish(reply, echo_bytes(&m.payload).into()).await;
            }
        }
    });
    let js = jetstream::new(client);
    let stream = events_stream(&js).await;
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            "raw",
            jetstream::consumer::pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            let Ok(m) = m else { continue };
            let _p: workload::Person = serde_json::from_slice(&m.payload).expect("decode");
            let _ = m.ack().await;
            workload::count(&counted, &all, total);
        }
    });
}

/// With `--raw-metadata`: the subject a `send` goes to with the metadata switchboard puts on
/// the wire for it (docs/wire.md): its deadline, as a subject token. Events carry none (their
/// id is the stream's identity of them).
fn request_subject(deadline: Duration) -> String {
    if !workload::RAW_METADATA.load(Ordering::Relaxed) {
        return ECHO.to_owned();
    }
    let ms = (std::time::SystemTime::now() + deadline)
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() * 1000 + u64::from(d.subsec_millis()));
    // Built as switchboard builds it: one exact allocation, no formatting machinery.
    let mut digits = itoa::Buffer::new();
    let ms = digits.format(ms);
    let mut subject = String::with_capacity(TIMED_ECHO_PREFIX.len() + ms.len() + ".echo".len());
    subject.push_str(TIMED_ECHO_PREFIX);
    subject.push_str(ms);
    subject.push_str(".echo");
    subject
}

pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let client = async_nats::connect(addr(url)).await.expect("connect");
    let call = |client: async_nats::Client, i: u64| async move {
        let subject = request_subject(Duration::from_secs(10));
        let r = client
            .request(subject, encode(i).into())
            .await
            .expect("request");
        check_reply(&r.payload, i);
    };
    let cl = client.clone();
    let mut figs = workload::request_reply(c, move |i| call(cl.clone(), i)).await;
    figs.extend(workload::async_calls(c, |i| call(client.clone(), i)).await);
    let js = jetstream::new(client);
    figs.extend(
        workload::events(
            c,
            |i| {
                let js = js.clone();
                async move {
                    let ack = js.publish(EVENTS, encode(i).into()).await;
                    ack.expect("publish").await.expect("ack");
                }
            },
            counter,
        )
        .await,
    );
    figs
}
