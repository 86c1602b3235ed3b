//! The raw lapin side: direct reply-to RPC on one channel (replies matched by correlation id)
//! against a responder on an auto-delete queue; confirmed persistent publishes to a topic
//! exchange routed to a durable queue of the same type as switchboard's (quorum), consumed
//! with prefetch 64 and an ack per message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Notify, oneshot};

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

const ECHO: &str = "rawbench.echo";
/// Set (to anything) to make the raw side's requests carry what switchboard's `send` does: a
/// UUID correlation id, an `expiration`, the `mandatory` flag and a headers table with the
/// deadline, so what that metadata costs is measured apart.
const METADATA_ENV: &str = "SB_BENCH_RAW_METADATA";
const EXCHANGE: &str = "rawbench.events";
const QUEUE: &str = "rawbench.events.q";

/// The AMQP URI of an `amqp://` URL (our query options dropped).
fn uri(url: &str) -> String {
    let mut u = url::Url::parse(url).expect("amqp URL");
    u.set_query(None);
    u.to_string()
}

async fn connect(url: &str) -> Connection {
    Connection::connect(&uri(url), ConnectionProperties::default())
        .await
        .expect("connect")
}

/// A consumer that settles on receipt (requests and replies).
async fn consume_no_ack(ch: &Channel, queue: &str) -> lapin::Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("consume")
}

pub(crate) async fn serve(url: &str, counted: Arc<AtomicU64>, all: Arc<Notify>, total: u64) {
    let conn = connect(url).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(128, BasicQosOptions::default())
        .await
        .expect("qos");
    ch.queue_declare(
        ECHO.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let mut requests = consume_no_ack(&ch, ECHO).await;
    let reply_ch = ch.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = requests.next().await {
            let Some(to) = d.properties.reply_to().clone() else {
                continue;
            };
            let mut props = BasicProperties::default();
            if let Some(c) = d.properties.correlation_id() {
                props = props.with_correlation_id(c.clone());
            }
            let _ = reply_ch
                .basic_publish(
                    "".into(),
                    to,
                    BasicPublishOptions::default(),
                    &echo_bytes(&d.data),
                    props,
                )
                .await;
        }
    });

    let ev = conn.create_channel().await.expect("channel");
    ev.basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    ev.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ev.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    ev.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        "rawbench.events".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let mut events = ev
        .basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    tokio::spawn(async move {
        while let Some(Ok(d)) = events.next().await {
            let _p: workload::Person = serde_json::from_slice(&d.data).expect("decode");
            let _ = d.acker.ack(BasicAckOptions::default()).await;
            workload::count(&counted, &all, total);
        }
    });
    // The connection lives as long as the process.
    std::mem::forget(conn);
}

/// Direct reply-to calls on one channel.
#[derive(Clone)]
struct Rpc {
    ch: Channel,
    waiting: Arc<DashMap<String, oneshot::Sender<Vec<u8>>>>,
    next: Arc<AtomicU64>,
}

impl Rpc {
    async fn new(conn: &Connection) -> Self {
        let ch = conn.create_channel().await.expect("channel");
        let mut replies = consume_no_ack(&ch, "amq.rabbitmq.reply-to").await;
        let waiting: Arc<DashMap<String, oneshot::Sender<Vec<u8>>>> = Arc::default();
        let w = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                let Some(c) = d.properties.correlation_id() else {
                    continue;
                };
                if let Some((_, tx)) = w.remove(c.as_str()) {
                    let _ = tx.send(d.data);
                }
            }
        });
        Rpc {
            ch,
            waiting,
            next: Arc::default(),
        }
    }

    async fn call(&self, i: u64) {
        let metadata = std::env::var_os(METADATA_ENV).is_some();
        let id = if metadata {
            uuid::Uuid::now_v7().to_string()
        } else {
            self.next.fetch_add(1, Ordering::Relaxed).to_string()
        };
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(id.clone(), tx);
        let mut props = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(id.into());
        if metadata {
            let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(30);
            let ms = deadline
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            let mut table = FieldTable::default();
            table.insert(
                "sb-deadline".into(),
                AMQPValue::LongString(ms.to_string().into()),
            );
            props = props.with_expiration("30000".into()).with_headers(table);
        }
        self.ch
            .basic_publish(
                "".into(),
                ECHO.into(),
                BasicPublishOptions {
                    mandatory: metadata,
                    ..Default::default()
                },
                &encode(i),
                props,
            )
            .await
            .expect("publish");
        check_reply(&rx.await.expect("reply"), i);
    }
}

pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let conn = connect(url).await;
    let rpc = Rpc::new(&conn).await;
    let r = rpc.clone();
    let mut figs = workload::request_reply(c, move |i| {
        let r = r.clone();
        async move { r.call(i).await }
    })
    .await;
    figs.extend(
        workload::async_calls(c, |i| {
            let r = rpc.clone();
            async move { r.call(i).await }
        })
        .await,
    );
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    figs.extend(
        workload::events(
            c,
            |i| {
                let ch = ch.clone();
                async move {
                    let confirm = ch
                        .basic_publish(
                            EXCHANGE.into(),
                            "rawbench.events".into(),
                            BasicPublishOptions::default(),
                            &encode(i),
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await
                        .expect("publish")
                        .await
                        .expect("confirm");
                    assert!(confirm.is_ack());
                }
            },
            counter,
        )
        .await,
    );
    let _ = conn.close(200, "done".into()).await;
    figs
}
