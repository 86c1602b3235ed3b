//! The SNS/SQS transport: SNS topics for events fanned out to an SQS queue per group, an SQS
//! queue per request pattern, one reply queue per client instance, dead letters in an SQS
//! queue per pattern (also the redrive target of the pattern's other queues).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_sqs::config::retry::RetryConfig;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use dashmap::DashMap;
use futures::FutureExt;
use switchboard_core::transport::{
    Acker, Capabilities, CloseSignal, Delivery, Inbox, NoAck, Publisher, Route, SubscribeOptions,
    Subscriber, Subscription, Transport,
};
use switchboard_core::{Envelope, Error, ErrorKind, Result};
use tokio::sync::{OnceCell, mpsc};

use crate::NAME;
use crate::codec::{self, Pattern, Wire};
use crate::config::{Kind, SnsSqsConfig};

/// Largest payload accepted, in bytes: SQS takes 256 KiB per message (body and attributes);
/// a binary payload grows by a third in base64, and the attributes need room.
const MAX_PAYLOAD: usize = 180 * 1024;
/// The limit SQS sets on a message, body and attributes together.
const MAX_MESSAGE: usize = 256 * 1024;
/// Tag of a reply queue: when its client last said it is alive (Unix seconds).
const SEEN_TAG: &str = "sb-seen";
/// Retention of dead letters: SQS's longest, 14 days.
const DEAD_LETTER_RETENTION_S: u32 = 14 * 24 * 3600;

/// The SNS/SQS transport.
#[derive(Clone)]
pub struct SnsSqsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SnsSqsConfig,
    sqs: aws_sdk_sqs::Client,
    sns: aws_sdk_sns::Client,
    /// Event topics by pattern: their ARNs once created.
    topics: DashMap<String, Arc<OnceCell<String>>>,
    /// Queues this transport made or found, by name: their URLs.
    queues: DashMap<String, Arc<OnceCell<String>>>,
    /// Reply queues of this instance, deleted when it closes.
    inboxes: Mutex<Vec<String>>,
    closed: CloseSignal,
}

impl std::fmt::Debug for SnsSqsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnsSqsTransport")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// An AWS SDK error as a transport error: what a retry may fix is `Connection`.
fn aws_error<E>(context: &str, e: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let kind = match e.code() {
        Some(
            "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "AccessDenied"
            | "AuthorizationError",
        ) => ErrorKind::InvalidConfig,
        _ => ErrorKind::Connection,
    };
    Error::new(
        kind,
        NAME,
        format!("{context}: {}", DisplayErrorContext(&e)),
    )
    .with_source(e)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl SnsSqsTransport {
    /// Connects: builds the SNS and SQS clients and checks that SQS answers.
    ///
    /// # Errors
    /// `Connection` if SQS does not answer within the connect timeout; `InvalidConfig` if it
    /// refuses the credentials.
    pub async fn connect(cfg: SnsSqsConfig) -> Result<Self> {
        let sdk = cfg.sdk_config().await;
        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let sns = aws_sdk_sns::Client::new(&sdk);
        let probe = sqs.list_queues().max_results(1).send();
        match tokio::time::timeout(cfg.connect_timeout.max(Duration::from_secs(1)), probe).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(aws_error("SQS did not answer", e)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Connection,
                    NAME,
                    format!("SQS did not answer within {:?}", cfg.connect_timeout),
                ));
            }
        }
        Ok(SnsSqsTransport {
            inner: Arc::new(Inner {
                cfg,
                sqs,
                sns,
                topics: DashMap::new(),
                queues: DashMap::new(),
                inboxes: Mutex::new(Vec::new()),
                closed: CloseSignal::new(),
            }),
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &SnsSqsConfig {
        &self.inner.cfg
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.is_closed() {
            Err(Error::closed(NAME))
        } else {
            Ok(())
        }
    }

    /// Attributes every queue of this transport gets.
    fn queue_attributes(&self) -> Vec<(QueueAttributeName, String)> {
        let cfg = &self.inner.cfg;
        let mut a = vec![
            (
                QueueAttributeName::VisibilityTimeout,
                cfg.visibility.as_secs().to_string(),
            ),
            (
                QueueAttributeName::ReceiveMessageWaitTimeSeconds,
                cfg.wait.as_secs().to_string(),
            ),
        ];
        if cfg.fifo {
            a.push((QueueAttributeName::FifoQueue, "true".into()));
        }
        a
    }

    /// The URL of queue `name`, created with `attributes` when missing.
    async fn queue(
        &self,
        name: String,
        attributes: Vec<(QueueAttributeName, String)>,
    ) -> Result<String> {
        let cell = self.inner.queues.entry(name.clone()).or_default().clone();
        cell.get_or_try_init(|| async {
            let made = self
                .inner
                .sqs
                .create_queue()
                .queue_name(&name)
                .set_attributes(Some(attributes.into_iter().collect()))
                .send()
                .await;
            match made {
                Ok(out) => out.queue_url.ok_or_else(|| {
                    Error::new(
                        ErrorKind::Connection,
                        NAME,
                        format!("no URL for queue `{name}`"),
                    )
                }),
                // Made before with other attributes: use it as it is.
                Err(e)
                    if e.code() == Some("QueueAlreadyExists")
                        || e.code() == Some("QueueNameExists") =>
                {
                    self.queue_url(&name).await?.ok_or_else(|| {
                        Error::new(
                            ErrorKind::Connection,
                            NAME,
                            format!("queue `{name}` vanished"),
                        )
                    })
                }
                Err(e) => Err(aws_error(&format!("creating queue `{name}`"), e)),
            }
        })
        .await
        .cloned()
    }

    /// The URL of an existing queue `name`; `None` if there is none.
    async fn queue_url(&self, name: &str) -> Result<Option<String>> {
        match self.inner.sqs.get_queue_url().queue_name(name).send().await {
            Ok(out) => Ok(out.queue_url),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                Ok(None)
            }
            Err(e) => Err(aws_error(&format!("looking up queue `{name}`"), e)),
        }
    }

    async fn queue_arn(&self, url: &str) -> Result<String> {
        let out = self
            .inner
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| aws_error("reading a queue's ARN", e))?;
        out.attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| Error::new(ErrorKind::Connection, NAME, format!("no ARN for {url}")))
    }

    /// The dead-letter queue of `pattern` (also the redrive target of its other queues).
    async fn dead_letter_queue(&self, pattern: &str) -> Result<String> {
        let mut attributes = self.queue_attributes();
        attributes.push((
            QueueAttributeName::MessageRetentionPeriod,
            DEAD_LETTER_RETENTION_S.to_string(),
        ));
        let name = self.inner.cfg.name(Kind::DeadLetters, pattern, None);
        self.queue(name, attributes).await
    }

    /// Attributes of a queue of `pattern` that SQS moves to the pattern's dead-letter queue
    /// after `max_receives` receives.
    async fn redriven_attributes(
        &self,
        pattern: &str,
    ) -> Result<Vec<(QueueAttributeName, String)>> {
        let dlq = self.dead_letter_queue(pattern).await?;
        let arn = self.queue_arn(&dlq).await?;
        let mut a = self.queue_attributes();
        a.push((
            QueueAttributeName::RedrivePolicy,
            format!(
                r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{}"}}"#,
                self.inner.cfg.max_receives
            ),
        ));
        Ok(a)
    }

    /// The ARN of the event topic of `pattern`, created when missing.
    async fn topic(&self, pattern: &str) -> Result<String> {
        let cell = match self.inner.topics.get(pattern) {
            Some(c) => c.clone(),
            None => self
                .inner
                .topics
                .entry(pattern.to_owned())
                .or_default()
                .clone(),
        };
        cell.get_or_try_init(|| async {
            let name = self.inner.cfg.name(Kind::Events, pattern, None);
            let mut req = self.inner.sns.create_topic().name(&name);
            if self.inner.cfg.fifo {
                req = req.attributes("FifoTopic", "true");
            }
            let out = req
                .send()
                .await
                .map_err(|e| aws_error(&format!("creating topic `{name}`"), e))?;
            out.topic_arn.ok_or_else(|| {
                Error::new(
                    ErrorKind::Connection,
                    NAME,
                    format!("no ARN for topic `{name}`"),
                )
            })
        })
        .await
        .cloned()
    }

    fn checked(&self, wire: &Wire) -> Result<()> {
        let size = wire.body.len()
            + wire
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len() + "String".len())
                .sum::<usize>();
        if size > MAX_MESSAGE {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!("the message is {size} bytes encoded; SQS takes at most {MAX_MESSAGE}"),
            ));
        }
        Ok(())
    }

    /// Sends `wire` to the queue at `url`.
    async fn send_to_queue(&self, url: &str, wire: Wire, env: &Envelope) -> Result<()> {
        let mut req = self
            .inner
            .sqs
            .send_message()
            .queue_url(url)
            .message_body(wire.body);
        for (k, v) in wire.attributes {
            req = req.message_attributes(k, sqs_string(v)?);
        }
        if url.ends_with(".fifo") {
            req = req
                .message_group_id(group_id(env))
                .message_deduplication_id(env.id.to_string());
        }
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| aws_error("sending to SQS", e))
    }

    /// Deletes the reply queues of this instance's clients (at close).
    async fn delete_inboxes(&self) {
        let urls =
            std::mem::take(&mut *self.inner.inboxes.lock().unwrap_or_else(|p| p.into_inner()));
        for url in urls {
            if let Err(e) = self.inner.sqs.delete_queue().queue_url(&url).send().await {
                tracing::warn!(queue = %url, error = %DisplayErrorContext(&e), "reply queue not deleted");
            }
        }
    }

    /// Deletes reply queues under this prefix whose clients have not said they are alive for
    /// `reply_ttl` (stopped without closing). Best effort.
    async fn reap_stale_inboxes(&self, own: &str) {
        let prefix = format!("{}-reply-", self.inner.cfg.prefix);
        let Ok(list) = self
            .inner
            .sqs
            .list_queues()
            .queue_name_prefix(&prefix)
            .send()
            .await
        else {
            return;
        };
        let ttl = self.inner.cfg.reply_ttl.as_secs();
        for url in list.queue_urls.unwrap_or_default() {
            if url == own {
                continue;
            }
            let Ok(tags) = self
                .inner
                .sqs
                .list_queue_tags()
                .queue_url(&url)
                .send()
                .await
            else {
                continue;
            };
            let seen = tags
                .tags
                .as_ref()
                .and_then(|t| t.get(SEEN_TAG))
                .and_then(|v| v.parse::<u64>().ok());
            if seen.is_some_and(|s| now_s().saturating_sub(s) > ttl) {
                tracing::info!(queue = %url, "deleting a stale reply queue");
                let _ = self.inner.sqs.delete_queue().queue_url(&url).send().await;
            }
        }
    }
}

fn group_id(env: &Envelope) -> String {
    // Messages with a key are in order within it; each message without one is a group of
    // its own (no order asked for, none imposed).
    env.key.clone().unwrap_or_else(|| env.id.to_string())
}

fn sqs_string(v: String) -> Result<aws_sdk_sqs::types::MessageAttributeValue> {
    aws_sdk_sqs::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(|e| Error::new(ErrorKind::Codec, NAME, e.to_string()))
}

fn sns_string(v: String) -> Result<aws_sdk_sns::types::MessageAttributeValue> {
    aws_sdk_sns::types::MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(|e| Error::new(ErrorKind::Codec, NAME, e.to_string()))
}

#[async_trait]
impl Publisher for SnsSqsTransport {
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()> {
        self.check_open()?;
        if msg.payload.len() > MAX_PAYLOAD {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                NAME,
                format!(
                    "payload of {} bytes exceeds the limit of {MAX_PAYLOAD} bytes",
                    msg.payload.len()
                ),
            ));
        }
        let pattern = if matches!(route, Route::Reply(_)) {
            Pattern::Sent
        } else {
            Pattern::Implied
        };
        let wire = codec::encode(&msg, pattern);
        self.checked(&wire)?;
        match route {
            Route::Event(p) => {
                let arn = self.topic(p).await?;
                let mut req = self.inner.sns.publish().topic_arn(arn).message(wire.body);
                for (k, v) in wire.attributes {
                    req = req.message_attributes(k, sns_string(v)?);
                }
                if self.inner.cfg.fifo {
                    req = req
                        .message_group_id(group_id(&msg))
                        .message_deduplication_id(msg.id.to_string());
                }
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| aws_error(&format!("publishing to the topic of `{p}`"), e))
            }
            Route::Request(p) => {
                // Made if no handler made it yet: the request waits there for one until its
                // deadline, as requests wait in the queue while handlers restart.
                let attributes = self.redriven_attributes(p).await?;
                let url = self
                    .queue(self.inner.cfg.name(Kind::Requests, p, None), attributes)
                    .await?;
                self.send_to_queue(&url, wire, &msg).await
            }
            Route::Reply(url) => self.send_to_queue(url, wire, &msg).await,
            Route::DeadLetter(p) => {
                let url = self.dead_letter_queue(p).await?;
                self.send_to_queue(&url, wire, &msg).await
            }
        }
    }
}

#[async_trait]
impl Subscriber for SnsSqsTransport {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        self.check_open()?;
        let cfg = &self.inner.cfg;
        let (pattern, url) = match route {
            Route::Event(p) => {
                let group = opts.group.as_deref().ok_or_else(|| {
                    Error::invalid_config(
                        NAME,
                        format!("subscribing to events on `{p}` needs a consumer group"),
                    )
                })?;
                let attributes = self.redriven_attributes(p).await?;
                let url = self
                    .queue(cfg.name(Kind::Group, p, Some(group)), attributes)
                    .await?;
                let queue_arn = self.queue_arn(&url).await?;
                let topic_arn = self.topic(p).await?;
                // SNS may send to the queue (AWS checks this policy; emulators may not).
                let policy = format!(
                    r#"{{"Version":"2012-10-17","Statement":[{{"Effect":"Allow","Principal":{{"Service":"sns.amazonaws.com"}},"Action":"sqs:SendMessage","Resource":"{queue_arn}","Condition":{{"ArnEquals":{{"aws:SourceArn":"{topic_arn}"}}}}}}]}}"#
                );
                self.inner
                    .sqs
                    .set_queue_attributes()
                    .queue_url(&url)
                    .attributes(QueueAttributeName::Policy, policy)
                    .send()
                    .await
                    .map_err(|e| aws_error("allowing the topic to send to the queue", e))?;
                self.inner
                    .sns
                    .subscribe()
                    .topic_arn(&topic_arn)
                    .protocol("sqs")
                    .endpoint(&queue_arn)
                    .attributes("RawMessageDelivery", "true")
                    .return_subscription_arn(true)
                    .send()
                    .await
                    .map_err(|e| aws_error("subscribing the group's queue to the topic", e))?;
                (p, url)
            }
            Route::Request(p) => {
                let attributes = self.redriven_attributes(p).await?;
                (
                    p,
                    self.queue(cfg.name(Kind::Requests, p, None), attributes)
                        .await?,
                )
            }
            Route::DeadLetter(p) => (p, self.dead_letter_queue(p).await?),
            Route::Reply(address) => {
                return Err(Error::invalid_config(
                    NAME,
                    format!("reply address `{address}` is read through open_inbox"),
                ));
            }
        };
        let (tx, mut rx) = mpsc::channel(opts.prefetch.max(1));
        let in_hand = Arc::new(InHand::default());
        let (delete_tx, delete_rx) = mpsc::unbounded_channel();
        tokio::spawn(delete_batches(self.clone(), url.clone(), delete_rx));
        tokio::spawn(keep_invisible(
            self.clone(),
            url.clone(),
            Arc::downgrade(&in_hand),
        ));
        tokio::spawn(read_queue(
            self.clone(),
            url,
            pattern.to_owned(),
            tx,
            Reading::Handled(in_hand, delete_tx),
        ));
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Subscription::new(stream))
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        self.check_open()?;
        let queue = self.inner.cfg.name(Kind::Replies, name, None);
        let mut attributes = self.queue_attributes();
        attributes.retain(|(k, _)| *k != QueueAttributeName::FifoQueue);
        let url = self.queue(queue, attributes).await?;
        self.inner
            .inboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(url.clone());
        // Say this client is alive now and every quarter of the reaping age; reap the stale.
        let me = self.clone();
        let own = url.clone();
        tokio::spawn(async move {
            me.reap_stale_inboxes(&own).await;
            let every = me.inner.cfg.reply_ttl / 4;
            loop {
                let _ = me
                    .inner
                    .sqs
                    .tag_queue()
                    .queue_url(&own)
                    .tags(SEEN_TAG, now_s().to_string())
                    .send()
                    .await;
                tokio::select! {
                    () = me.inner.closed.closed() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
        let (tx, mut rx) = mpsc::channel(1024);
        let lost = Arc::new(tokio::sync::watch::channel(0u64).0);
        tokio::spawn(read_queue(
            self.clone(),
            url.clone(),
            url.clone(),
            tx,
            Reading::Replies(lost.clone()),
        ));
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Ok(Inbox::new(url, Subscription::new(stream)).with_connection_lost(lost.subscribe()))
    }
}

/// Reads one queue with long polls while its subscription is open, taking no more than the
/// subscription has room for. Replies (`replies`: the inbox's connection-lost counter) are
/// deleted as they are read; other messages when their handler settles them.
///
/// The reply queue is read without the SDK's retries, so that the first failure to reach the
/// endpoint is seen: the requests waiting for replies then fail at once, retryably, instead of
/// at their deadlines.
async fn read_queue(
    t: SnsSqsTransport,
    url: String,
    pattern: String,
    tx: mpsc::Sender<Delivery>,
    reading: Reading,
) {
    let replies = match &reading {
        Reading::Replies(lost) => Some(lost.clone()),
        Reading::Handled(..) => None,
    };
    let cfg = &t.inner.cfg;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.capacity() == 0 {
            tokio::select! {
                () = t.inner.closed.closed() => return,
                permit = tx.reserve() => match permit {
                    Ok(p) => drop(p),
                    Err(_) => return,
                },
            }
        }
        let max = (tx.capacity() as i32).clamp(1, cfg.receive_batch);
        let receive = t
            .inner
            .sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max)
            .wait_time_seconds(cfg.wait.as_secs() as i32)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount);
        let receive = match replies {
            Some(_) => receive
                .customize()
                .config_override(
                    aws_sdk_sqs::config::Builder::default().retry_config(RetryConfig::disabled()),
                )
                .send()
                .boxed(),
            None => receive.send().boxed(),
        };
        let out = tokio::select! {
            () = t.inner.closed.closed() => return,
            () = tx.closed() => return,
            out = receive => out,
        };
        let messages = match out {
            Ok(out) => {
                backoff = Duration::from_millis(100);
                out.messages.unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!(queue = %url, error = %DisplayErrorContext(&e), "receiving");
                if let Some(lost) = &replies
                    && matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_))
                {
                    lost.send_modify(|n| *n += 1);
                }
                tokio::select! {
                    () = t.inner.closed.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut done = Vec::new();
        for m in messages {
            let attempt = m
                .attributes
                .as_ref()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(1);
            let attributes: Vec<(String, String)> = m
                .message_attributes
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v)| v.string_value.map(|s| (k, s)))
                .collect();
            let (headers, payload, malformed) =
                codec::decode(m.body.as_deref().unwrap_or_default(), attributes);
            let receipt = m.receipt_handle.unwrap_or_default();
            let acker: Box<dyn Acker> = match &reading {
                Reading::Replies(_) => {
                    done.push(receipt);
                    Box::new(NoAck)
                }
                Reading::Handled(in_hand, deletes) => Box::new(SqsAcker {
                    transport: t.clone(),
                    url: url.clone(),
                    deletes: deletes.clone(),
                    hand: Some(in_hand.hold(&receipt)),
                    receipt,
                    settled: false,
                }),
            };
            let d = Delivery::read(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                payload,
                &pattern,
                None,
                attempt,
                acker,
                |_, bad| {
                    if let Some(reason) = malformed {
                        *bad = Some(reason);
                    }
                },
            );
            if tx.send(d).await.is_err() {
                return;
            }
        }
        if !done.is_empty() {
            delete_all(&t, &url, done).await;
        }
    }
}

/// What a queue reader reads for.
enum Reading {
    /// A reply queue: messages are deleted as read; the counter goes up when the endpoint
    /// cannot be reached.
    Replies(Arc<tokio::sync::watch::Sender<u64>>),
    /// Messages for handlers, kept invisible while in hand, deleted in batches when handled.
    Handled(Arc<InHand>, mpsc::UnboundedSender<Delete>),
}

/// A handled message to delete, and where to say how it went.
type Delete = (String, tokio::sync::oneshot::Sender<Result<()>>);

/// Most delete calls of one subscription in flight at once.
const DELETES_IN_FLIGHT: usize = 4;

/// Deletes a subscription's handled messages with `DeleteMessageBatch`: each call takes up to
/// ten of the deletes waiting (none is held back to fill a batch: deletes that arrive while
/// calls are in flight make the next batch), at most [`DELETES_IN_FLIGHT`] calls at once.
/// Ends when every acknowledger of the subscription is gone.
async fn delete_batches(t: SnsSqsTransport, url: String, mut rx: mpsc::UnboundedReceiver<Delete>) {
    let mut calls = tokio::task::JoinSet::new();
    loop {
        if calls.len() >= DELETES_IN_FLIGHT {
            calls.join_next().await;
            continue;
        }
        let first = tokio::select! {
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
            d = rx.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < 10 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let (t, url) = (t.clone(), url.clone());
        calls.spawn(async move { delete_batch(&t, &url, batch).await });
    }
    while calls.join_next().await.is_some() {}
}

/// One `DeleteMessageBatch` call for up to ten receipts: for each that was not deleted, its
/// position and why.
async fn delete_ten<'a>(
    t: &SnsSqsTransport,
    url: &str,
    receipts: impl Iterator<Item = &'a str>,
) -> Result<HashMap<usize, String>> {
    let entries: Vec<_> = receipts
        .enumerate()
        .filter_map(|(i, r)| {
            aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(r)
                .build()
                .ok()
        })
        .collect();
    let out = t
        .inner
        .sqs
        .delete_message_batch()
        .queue_url(url)
        .set_entries(Some(entries))
        .send()
        .await
        .map_err(|e| aws_error("deleting messages", e))?;
    Ok(out
        .failed
        .into_iter()
        .filter_map(|f| Some((f.id.parse().ok()?, f.message.unwrap_or(f.code))))
        .collect())
}

/// One `DeleteMessageBatch` call for handled messages; each delete hears its own outcome.
async fn delete_batch(t: &SnsSqsTransport, url: &str, batch: Vec<Delete>) {
    match delete_ten(t, url, batch.iter().map(|(r, _)| r.as_str())).await {
        Ok(mut failed) => {
            for (i, (_, reply)) in batch.into_iter().enumerate() {
                let r = match failed.remove(&i) {
                    None => Ok(()),
                    Some(why) => Err(Error::new(
                        ErrorKind::Connection,
                        NAME,
                        format!("deleting a handled message: {why}"),
                    )),
                };
                let _ = reply.send(r);
            }
        }
        Err(e) => {
            for (_, reply) in batch {
                let _ = reply.send(Err(Error::new(e.kind(), NAME, e.to_string())));
            }
        }
    }
}

/// The receipts of the messages a subscription holds (handed out, not yet settled).
#[derive(Default)]
struct InHand {
    receipts: Mutex<HashMap<u64, String>>,
    next: std::sync::atomic::AtomicU64,
}

impl InHand {
    /// Registers a receipt until the returned hold is dropped.
    fn hold(self: &Arc<Self>, receipt: &str) -> Hold {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, receipt.to_owned());
        Hold {
            in_hand: self.clone(),
            id,
        }
    }

    fn receipts(&self) -> Vec<String> {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// A message's place in [`InHand`]; dropped when the message is settled.
struct Hold {
    in_hand: Arc<InHand>,
    id: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.in_hand
            .receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// Keeps the messages a subscription holds invisible while their handlers run: every third of
/// the visibility timeout, their visibility is set to the whole timeout again (ten per call),
/// so a handler that runs longer than `visibility_s` does not see its message handed to
/// another consumer. Ends with the subscription.
async fn keep_invisible(t: SnsSqsTransport, url: String, in_hand: std::sync::Weak<InHand>) {
    let visibility = t.inner.cfg.visibility;
    let every = (visibility / 3).max(Duration::from_millis(500));
    let secs = visibility.as_secs().clamp(1, 43_200) as i32;
    loop {
        tokio::select! {
            () = t.inner.closed.closed() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(receipts) = in_hand.upgrade().map(|h| h.receipts()) else {
            return;
        };
        for chunk in receipts.chunks(10) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(secs)
                        .build()
                        .ok()
                })
                .collect();
            // A message settled meanwhile fails its entry; nothing to do about it.
            if let Err(e) = t
                .inner
                .sqs
                .change_message_visibility_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                tracing::warn!(queue = %url, error = %DisplayErrorContext(&e), "visibility not extended");
            }
        }
    }
}

/// Deletes read replies, ten at a time.
async fn delete_all(t: &SnsSqsTransport, url: &str, receipts: Vec<String>) {
    for chunk in receipts.chunks(10) {
        match delete_ten(t, url, chunk.iter().map(String::as_str)).await {
            Ok(failed) if failed.is_empty() => {}
            Ok(failed) => {
                tracing::warn!(queue = %url, not_deleted = failed.len(), "replies not deleted");
            }
            Err(e) => tracing::warn!(queue = %url, error = %e, "replies not deleted"),
        }
    }
}

/// Settles one SQS message: ack deletes it; nack makes it visible again after the delay
/// (SQS counts the receive, which is the attempt number).
struct SqsAcker {
    transport: SnsSqsTransport,
    url: String,
    /// Where acks go to be deleted in batches.
    deletes: mpsc::UnboundedSender<Delete>,
    receipt: String,
    /// Keeps the message invisible until settled (let go first when it is handed back, so
    /// the extension does not undo the retry delay).
    hand: Option<Hold>,
    settled: bool,
}

/// Makes a received message visible again after `delay` (SQS counts whole seconds, up to 12
/// hours).
async fn visible_in(t: &SnsSqsTransport, url: &str, receipt: &str, delay: Duration) -> Result<()> {
    let secs = delay.as_secs_f64().ceil().min(43_200.0) as i32;
    t.inner
        .sqs
        .change_message_visibility()
        .queue_url(url)
        .receipt_handle(receipt)
        .visibility_timeout(secs)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| aws_error("handing a message back", e))
}

#[async_trait]
impl Acker for SqsAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.settled = true;
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self
            .deletes
            .send((std::mem::take(&mut self.receipt), tx))
            .is_err()
        {
            return Err(Error::closed(NAME));
        }
        rx.await.unwrap_or_else(|_| Err(Error::closed(NAME)))
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<()> {
        self.settled = true;
        self.hand = None;
        visible_in(&self.transport, &self.url, &self.receipt, delay).await
    }
}

impl Drop for SqsAcker {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped unsettled: visible again at once, for another consumer. Without a runtime,
        // the visibility timeout brings it back.
        self.hand = None;
        let (t, url, receipt) = (
            self.transport.clone(),
            std::mem::take(&mut self.url),
            std::mem::take(&mut self.receipt),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = visible_in(&t, &url, &receipt, Duration::ZERO).await;
            });
        }
    }
}

#[async_trait]
impl Transport for SnsSqsTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MAX_PAYLOAD)
            .redelivery_on_nack(true)
            .ordered(self.inner.cfg.fifo)
            .durable(true)
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.close();
        self.delete_inboxes().await;
        Ok(())
    }
}
