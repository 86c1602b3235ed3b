//! The raw rdkafka side, with the producer settings switchboard's Kafka transport uses
//! (`acks=all`, the URL's `linger_ms` and `batch_records`) and its consumer fetch wait:
//! request-reply the way one writes it by hand on Kafka (a request topic read by a consumer
//! group, one reply topic per client read by assignment, replies matched by a correlation id
//! header, each produce awaited until the broker acknowledged it); events produced and awaited
//! the same way, read by a consumer group that decodes and counts each.
//!
//! With `SB_BENCH_RAW_ID_HEADER=1` the raw events carry a `ce-id` header like switchboard's.
//!
//! Each run gets topics and groups of its own (the URL's `prefix`, made unique per run by the bench):
//! tansu slows as a topic fills, and a fresh topic keeps both sides equal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use switchboard_kafka::KafkaConfig;
use tokio::sync::{Notify, oneshot};

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

const CID: &str = "cid";
const REPLY_TO: &str = "reply-to";
const WITHIN: Duration = Duration::from_secs(30);
/// Set (to anything) to make the raw side's events carry a `ce-id` header of the size
/// switchboard's do: what the one header switchboard adds to an event costs, measured apart.
const ID_HEADER_ENV: &str = "SB_BENCH_RAW_ID_HEADER";
const SAMPLE_ID: &str = "0193d1a2-7b3c-7def-8a12-3456789abcde";

/// The transport's settings from the URL, and the raw side's topic names under its prefix.
struct Setup {
    cfg: KafkaConfig,
    requests: String,
    events: String,
    replies: String,
    /// Consumer groups of the responder and the event consumer.
    request_group: String,
    event_group: String,
}

impl Setup {
    fn of(url: &str) -> Self {
        let cfg = KafkaConfig::from_url(&url::Url::parse(url).expect("kafka URL")).expect("config");
        let name = |kind: &str| format!("{}.raw.{kind}", cfg.prefix);
        Setup {
            requests: name("req"),
            events: name("evt"),
            replies: name("reply"),
            request_group: name("grp.req"),
            event_group: name("grp.evt"),
            cfg,
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.cfg.brokers.join(","));
        c
    }

    fn producer(&self) -> FutureProducer {
        self.client()
            .set("acks", "all")
            .set("linger.ms", self.cfg.linger.as_millis().to_string())
            .set("batch.num.messages", self.cfg.batch_records.to_string())
            .create()
            .expect("producer")
    }

    fn consumer(&self, group: &str) -> StreamConsumer {
        self.client()
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set(
                "fetch.wait.max.ms",
                self.cfg.fetch_wait.as_millis().to_string(),
            )
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer")
    }

    /// Creates the raw side's topics (the partitions switchboard gives its own).
    async fn topics(&self) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().expect("admin");
        let topics = [
            NewTopic::new(
                &self.requests,
                self.cfg.partitions,
                TopicReplication::Fixed(1),
            ),
            NewTopic::new(
                &self.events,
                self.cfg.partitions,
                TopicReplication::Fixed(1),
            ),
            NewTopic::new(&self.replies, 1, TopicReplication::Fixed(1)),
        ];
        for r in admin
            .create_topics(&topics, &AdminOptions::new())
            .await
            .expect("create topics")
        {
            if let Err((t, code)) = r
                && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
            {
                panic!("creating {t}: {code}");
            }
        }
    }
}

fn header<'a>(m: &'a impl Message, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

pub(crate) async fn serve(url: &str, counted: Arc<AtomicU64>, all: Arc<Notify>, total: u64) {
    let s = Setup::of(url);
    s.topics().await;
    let producer = s.producer();
    let requests = s.consumer(&s.request_group);
    requests.subscribe(&[&s.requests]).expect("subscribe");
    tokio::spawn(async move {
        loop {
            let Ok(m) = requests.recv().await else {
                continue;
            };
            let (Some(to), Some(cid)) = (header(&m, REPLY_TO), header(&m, CID)) else {
                continue;
            };
            let to = String::from_utf8_lossy(to).into_owned();
            let cid = cid.to_vec();
            let body = echo_bytes(m.payload().unwrap_or_default());
            let producer = producer.clone();
            // Replies concurrently, as switchboard's handler does.
            tokio::spawn(async move {
                let h = OwnedHeaders::new().insert(Header {
                    key: CID,
                    value: Some(&cid[..]),
                });
                let r = FutureRecord::<str, [u8]>::to(&to).payload(&body).headers(h);
                let _ = producer.send(r, WITHIN).await;
            });
        }
    });
    let events = s.consumer(&s.event_group);
    events.subscribe(&[&s.events]).expect("subscribe");
    tokio::spawn(async move {
        loop {
            let Ok(m) = events.recv().await else {
                continue;
            };
            let _p: workload::Person =
                serde_json::from_slice(m.payload().unwrap_or_default()).expect("decode");
            workload::count(&counted, &all, total);
        }
    });
}

pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let s = Arc::new(Setup::of(url));
    s.topics().await;
    let producer = s.producer();
    let waiting: Arc<DashMap<u64, oneshot::Sender<Vec<u8>>>> = Arc::default();
    let replies = s.consumer(&s.replies);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&s.replies, 0, Offset::Beginning)
        .expect("partition");
    replies.assign(&tpl).expect("assign");
    let w = waiting.clone();
    let reader = tokio::spawn(async move {
        loop {
            let Ok(m) = replies.recv().await else {
                continue;
            };
            let cid = header(&m, CID)
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let Some((_, tx)) = cid.and_then(|cid| w.remove(&cid)) {
                let _ = tx.send(m.payload().unwrap_or_default().to_vec());
            }
        }
    });
    let next_cid = Arc::new(AtomicU64::new(0));
    let call = {
        let (producer, s) = (producer.clone(), s.clone());
        move |i: u64| {
            let (producer, s, waiting) = (producer.clone(), s.clone(), waiting.clone());
            let cid = next_cid.fetch_add(1, Ordering::Relaxed);
            async move {
                let (tx, rx) = oneshot::channel();
                waiting.insert(cid, tx);
                let cid = cid.to_string();
                let h = OwnedHeaders::new()
                    .insert(Header {
                        key: CID,
                        value: Some(cid.as_bytes()),
                    })
                    .insert(Header {
                        key: REPLY_TO,
                        value: Some(s.replies.as_bytes()),
                    });
                let body = encode(i);
                let r = FutureRecord::<str, [u8]>::to(&s.requests)
                    .payload(&body)
                    .headers(h);
                producer.send(r, WITHIN).await.expect("request produced");
                let reply = tokio::time::timeout(WITHIN, rx)
                    .await
                    .expect("a reply within 30 s")
                    .expect("reply");
                check_reply(&reply, i);
            }
        }
    };
    let mut figs = workload::request_reply(c, call.clone()).await;
    figs.extend(workload::async_calls(c, call).await);
    let id_header = std::env::var_os(ID_HEADER_ENV).is_some();
    figs.extend(
        workload::events(
            c,
            |i| {
                let (producer, topic) = (producer.clone(), s.events.clone());
                async move {
                    let body = encode(i);
                    let mut r = FutureRecord::<str, [u8]>::to(&topic).payload(&body);
                    if id_header {
                        r = r.headers(OwnedHeaders::new().insert(Header {
                            key: "ce-id",
                            value: Some(SAMPLE_ID),
                        }));
                    }
                    producer.send(r, WITHIN).await.expect("event produced");
                }
            },
            counter,
        )
        .await,
    );
    reader.abort();
    figs
}
