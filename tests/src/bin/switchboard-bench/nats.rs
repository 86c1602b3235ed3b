//! The raw async-nats side: core request/reply on the client's multiplexed inbox against a
//! queue-group responder; JetStream publish with acks into a stream read by a durable pull
//! consumer that acks each message.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::Notify;

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

const ECHO: &str = "rawbench.echo";
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

pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let client = async_nats::connect(addr(url)).await.expect("connect");
    let call = |client: async_nats::Client, i: u64| async move {
        let r = client
            .request(ECHO, encode(i).into())
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
