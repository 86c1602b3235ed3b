//! Asynchronous requests return once the transport has them in order
//! (`Publisher::enqueue`), not once it acknowledged them; a refusal that comes after is the
//! request's reply, at once, not a timeout at its deadline.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::transport::{
    Capabilities, Confirmation, Inbox, Publisher, Route, SubscribeOptions, Subscriber,
    Subscription, Transport,
};
use switchboard_core::{Client, ClientConfig, Envelope, Error, ErrorKind, HandlerError, Result};
use tokio::sync::Semaphore;
use tokio::time::timeout;

/// The in-memory transport, whose requests on `refused.*` are enqueued and then refused, and
/// whose other requests are confirmed only when the test lets them (`acks`).
#[derive(Debug)]
struct Deferred {
    inner: MemoryTransport,
    acks: std::sync::Arc<Semaphore>,
}

#[async_trait]
impl Publisher for Deferred {
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()> {
        self.inner.publish(route, msg).await
    }

    async fn enqueue(&self, route: Route<'_>, msg: Envelope) -> Result<Confirmation> {
        if matches!(route, Route::Request(p) if p.starts_with("refused.")) {
            return Ok(Confirmation::pending(async {
                Err(Error::new(
                    ErrorKind::Connection,
                    "deferred",
                    "the broker did not acknowledge the request",
                ))
            }));
        }
        self.inner.publish(route, msg).await?;
        let acks = self.acks.clone();
        Ok(Confirmation::pending(async move {
            acks.acquire()
                .await
                .map(|p| p.forget())
                .map_err(|_| Error::new(ErrorKind::Closed, "deferred", "no more acknowledgements"))
        }))
    }
}

#[async_trait]
impl Subscriber for Deferred {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        self.inner.subscribe(route, opts).await
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        self.inner.open_inbox(name).await
    }
}

#[async_trait]
impl Transport for Deferred {
    fn name(&self) -> &'static str {
        "deferred"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

const STEP: Duration = Duration::from_secs(5);

async fn clients(bus: &str) -> (Client, Client, std::sync::Arc<Semaphore>) {
    let config = MemoryConfig::default().bus(bus);
    let acks = std::sync::Arc::new(Semaphore::new(0));
    let service = Client::new(
        MemoryTransport::connect(config.clone()),
        ClientConfig::default(),
    );
    service
        .handle("math.square", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n * n)
        })
        .await
        .expect("handler");
    let caller = Client::new(
        Deferred {
            inner: MemoryTransport::connect(config),
            acks: acks.clone(),
        },
        ClientConfig::default(),
    );
    (service, caller, acks)
}

#[tokio::test]
async fn requests_return_before_their_acknowledgement_and_a_late_refusal_is_their_reply() {
    let (_service, caller, acks) = clients("enqueue-request").await;
    // No acknowledgement has come for either, yet both return, and the replies arrive.
    let a = timeout(STEP, caller.request::<_, u64>("math.square", &3u64))
        .await
        .expect("returns without waiting for the acknowledgement")
        .expect("enqueued");
    let b = timeout(STEP, caller.request::<_, u64>("math.square", &4u64))
        .await
        .expect("returns without waiting for the acknowledgement")
        .expect("enqueued");
    assert_eq!(timeout(STEP, a).await.expect("reply").expect("reply"), 9);
    assert_eq!(timeout(STEP, b).await.expect("reply").expect("reply"), 16);
    acks.add_permits(2);

    let refused = caller
        .request_with::<_, u64>(
            "refused.square",
            &5u64,
            &switchboard_core::CallOptions::new().timeout(Duration::from_secs(60)),
        )
        .await
        .expect("enqueued: the refusal comes later");
    let err = timeout(STEP, refused)
        .await
        .expect("the refusal ends the wait long before the 60 s deadline")
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
}

#[tokio::test]
async fn a_reply_stream_yields_a_late_refusal_under_its_correlation_id() {
    let (_service, caller, acks) = clients("enqueue-stream").await;
    acks.add_permits(100);
    let mut stream = caller.reply_stream::<u64>().await.expect("stream");
    let ok = stream
        .request("math.square", &6u64)
        .await
        .expect("enqueued");
    let refused = stream
        .request("refused.square", &7u64)
        .await
        .expect("enqueued");
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(
            timeout(STEP, stream.next())
                .await
                .expect("an item")
                .expect("open"),
        );
    }
    let answer = got.iter().find(|(id, _)| *id == ok).expect("the reply");
    assert_eq!(answer.1.as_ref().ok(), Some(&36));
    let failure = got
        .iter()
        .find(|(id, _)| *id == refused)
        .expect("the refusal");
    assert_eq!(
        failure.1.as_ref().err().map(Error::kind),
        Some(ErrorKind::Connection)
    );
}
