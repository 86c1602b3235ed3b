//! The raw aws-sdk side (same endpoint, credentials, region and HTTPS client as the transport):
//! request-reply the way one writes it by hand on SQS (a request queue read by the responder
//! with long polls, each request carrying its reply queue's URL and a correlation id as String
//! attributes, the reply sent to that queue and matched there, messages deleted once handled);
//! events published to an SNS topic that delivers raw to an SQS queue, read, decoded, counted
//! and deleted.
//!
//! Each run gets queues and a topic of its own (the URL's `prefix`, made unique per run by the
//! bench), like the switchboard side.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageAttributeValue};
use dashmap::DashMap;
use switchboard_sns_sqs::SnsSqsConfig;
use tokio::sync::{Notify, oneshot};

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

const CID: &str = "cid";
const REPLY_TO: &str = "reply-to";

struct Setup {
    cfg: SnsSqsConfig,
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
}

impl Setup {
    async fn of(url: &str) -> Self {
        let cfg = SnsSqsConfig::from_url(&url::Url::parse(url).expect("URL")).expect("config");
        let sdk = cfg.sdk_config().await;
        Setup {
            sqs: aws_sdk_sqs::Client::new(&sdk),
            sns: aws_sdk_sns::Client::new(&sdk),
            cfg,
        }
    }

    fn name(&self, what: &str) -> String {
        format!("{}-raw-{what}", self.cfg.prefix)
    }

    async fn queue(&self, what: &str) -> String {
        self.sqs
            .create_queue()
            .queue_name(self.name(what))
            .send()
            .await
            .expect("create queue")
            .queue_url
            .expect("queue URL")
    }

    /// The event queue, subscribed raw to the event topic; the topic's ARN.
    async fn events(&self) -> (String, String) {
        let topic = self
            .sns
            .create_topic()
            .name(self.name("evt"))
            .send()
            .await
            .expect("create topic")
            .topic_arn
            .expect("topic ARN");
        let url = self.queue("evtq").await;
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("queue ARN")
            .attributes
            .and_then(|mut a| a.remove(&aws_sdk_sqs::types::QueueAttributeName::QueueArn))
            .expect("queue ARN");
        self.sns
            .subscribe()
            .topic_arn(&topic)
            .protocol("sqs")
            .endpoint(arn)
            .attributes("RawMessageDelivery", "true")
            .send()
            .await
            .expect("subscribe");
        (url, topic)
    }

    /// Receives from `url` until the process ends, handing each message to `each`, deleting
    /// them in batches afterwards.
    fn read(
        self: &Arc<Self>,
        url: String,
        each: impl Fn(aws_sdk_sqs::types::Message) + Send + Sync + 'static,
    ) {
        let s = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok(out) = s
                    .sqs
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(s.cfg.wait.as_secs() as i32)
                    .message_attribute_names("All")
                    .send()
                    .await
                else {
                    continue;
                };
                let mut entries = Vec::new();
                for (i, m) in out.messages.unwrap_or_default().into_iter().enumerate() {
                    if let Some(r) = m.receipt_handle.clone() {
                        entries.push(
                            DeleteMessageBatchRequestEntry::builder()
                                .id(i.to_string())
                                .receipt_handle(r)
                                .build()
                                .expect("entry"),
                        );
                    }
                    each(m);
                }
                if !entries.is_empty() {
                    let _ = s
                        .sqs
                        .delete_message_batch()
                        .queue_url(&url)
                        .set_entries(Some(entries))
                        .send()
                        .await;
                }
            }
        });
    }
}

fn string(v: impl Into<String>) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("attribute")
}

fn attribute<'a>(m: &'a aws_sdk_sqs::types::Message, name: &str) -> Option<&'a str> {
    m.message_attributes.as_ref()?.get(name)?.string_value()
}

pub(crate) async fn serve(url: &str, counted: Arc<AtomicU64>, all: Arc<Notify>, total: u64) {
    let s = Arc::new(Setup::of(url).await);
    let requests = s.queue("req").await;
    let responder = s.clone();
    s.read(requests, move |m| {
        let (Some(to), Some(cid)) = (attribute(&m, REPLY_TO), attribute(&m, CID)) else {
            return;
        };
        let body = echo_bytes(m.body().unwrap_or_default().as_bytes());
        let req = responder
            .sqs
            .send_message()
            .queue_url(to)
            .message_body(String::from_utf8(body).expect("JSON"))
            .message_attributes(CID, string(cid));
        // Replies concurrently, as switchboard's handler does.
        tokio::spawn(async move {
            let _ = req.send().await;
        });
    });
    let (events, _topic) = s.events().await;
    s.read(events, move |m| {
        let _p: workload::Person =
            serde_json::from_str(m.body().unwrap_or_default()).expect("decode");
        workload::count(&counted, &all, total);
    });
}

pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let s = Arc::new(Setup::of(url).await);
    let requests = s.queue("req").await;
    let replies = s.queue("reply").await;
    let (_events, topic) = s.events().await;
    let waiting: Arc<DashMap<u64, oneshot::Sender<String>>> = Arc::default();
    let w = waiting.clone();
    s.read(replies.clone(), move |m| {
        let cid = attribute(&m, CID).and_then(|v| v.parse::<u64>().ok());
        if let Some((_, tx)) = cid.and_then(|cid| w.remove(&cid)) {
            let _ = tx.send(m.body.unwrap_or_default());
        }
    });
    let next_cid = Arc::new(AtomicU64::new(0));
    let call = {
        let s = s.clone();
        move |i: u64| {
            let (s, waiting, requests, replies) = (
                s.clone(),
                waiting.clone(),
                requests.clone(),
                replies.clone(),
            );
            let cid = next_cid.fetch_add(1, Ordering::Relaxed);
            async move {
                let (tx, rx) = oneshot::channel();
                waiting.insert(cid, tx);
                s.sqs
                    .send_message()
                    .queue_url(&requests)
                    .message_body(String::from_utf8(encode(i)).expect("JSON"))
                    .message_attributes(CID, string(cid.to_string()))
                    .message_attributes(REPLY_TO, string(replies))
                    .send()
                    .await
                    .expect("request sent");
                let reply = tokio::time::timeout(Duration::from_secs(60), rx)
                    .await
                    .expect("a reply within 60 s")
                    .expect("reply");
                check_reply(reply.as_bytes(), i);
            }
        }
    };
    let mut figs = workload::request_reply(c, call.clone()).await;
    figs.extend(workload::async_calls(c, call).await);
    figs.extend(
        workload::events(
            c,
            |i| {
                let (s, topic) = (s.clone(), topic.clone());
                async move {
                    s.sns
                        .publish()
                        .topic_arn(topic)
                        .message(String::from_utf8(encode(i)).expect("JSON"))
                        .send()
                        .await
                        .expect("event published");
                }
            },
            counter,
        )
        .await,
    );
    figs
}
