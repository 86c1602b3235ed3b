//! A subscription's finishing work (`Subscription::with_finish`, a consumer's last commit, say)
//! runs once, after every delivery the handler took has settled, and a graceful stop returns
//! only when it is done.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_core::memory::{MemoryConfig, MemoryTransport};
use switchboard_core::transport::{
    Capabilities, Inbox, Publisher, Route, SubscribeOptions, Subscriber, Subscription, Transport,
};
use switchboard_core::{Client, ClientConfig, Envelope, HandlerError, Result};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(5);

/// What the finishing work of the test transport's subscriptions records.
#[derive(Debug, Default)]
struct Finishes {
    /// Times a finishing work ran.
    runs: AtomicUsize,
    /// Set by the test's handler once it has settled its delivery.
    handled: AtomicBool,
    /// Whether every finishing work found the handled delivery settled when it began.
    began_too_early: AtomicBool,
}

/// The in-memory transport, whose subscriptions finish by telling `began`, then waiting at
/// `gate`.
#[derive(Debug)]
struct Finishing {
    inner: MemoryTransport,
    finishes: Arc<Finishes>,
    began: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl Publisher for Finishing {
    async fn publish(&self, route: Route<'_>, msg: Envelope) -> Result<()> {
        self.inner.publish(route, msg).await
    }
}

#[async_trait]
impl Subscriber for Finishing {
    async fn subscribe(&self, route: Route<'_>, opts: SubscribeOptions) -> Result<Subscription> {
        let sub = self.inner.subscribe(route, opts).await?;
        let (finishes, began, gate) =
            (self.finishes.clone(), self.began.clone(), self.gate.clone());
        Ok(sub.with_finish(async move {
            if !finishes.handled.load(Ordering::Acquire) {
                finishes.began_too_early.store(true, Ordering::Release);
            }
            let _ = began.send(());
            let _ = gate.acquire().await.map(|p| p.forget());
            finishes.runs.fetch_add(1, Ordering::AcqRel);
        }))
    }

    async fn open_inbox(&self, name: &str) -> Result<Inbox> {
        self.inner.open_inbox(name).await
    }
}

#[async_trait]
impl Transport for Finishing {
    fn name(&self) -> &'static str {
        "finishing"
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct Setup {
    service: Client,
    emitter: Client,
    finishes: Arc<Finishes>,
    began: mpsc::UnboundedReceiver<()>,
    gate: Arc<Semaphore>,
}

fn setup(bus: &str) -> Setup {
    let config = MemoryConfig::default().bus(bus);
    let finishes = Arc::new(Finishes::default());
    let gate = Arc::new(Semaphore::new(0));
    let (began_tx, began) = mpsc::unbounded_channel();
    let service = Client::new(
        Finishing {
            inner: MemoryTransport::connect(config.clone()),
            finishes: finishes.clone(),
            began: began_tx,
            gate: gate.clone(),
        },
        ClientConfig::default(),
    );
    let emitter = Client::new(MemoryTransport::connect(config), ClientConfig::default());
    Setup {
        service,
        emitter,
        finishes,
        began,
        gate,
    }
}

#[tokio::test]
async fn a_service_shutdown_returns_after_the_finishing_work_which_follows_the_settled_deliveries()
{
    let mut s = setup("finish-service");
    // The handler holds its delivery until let go; it is settled once the handler returns.
    let hold = Arc::new(Semaphore::new(0));
    let (took_tx, mut took) = mpsc::unbounded_channel();
    let service = {
        let (hold, finishes) = (hold.clone(), s.finishes.clone());
        s.service
            .on_event("orders.placed", "billing", move |_n: u64, _ctx| {
                let (hold, finishes, took) = (hold.clone(), finishes.clone(), took_tx.clone());
                async move {
                    let _ = took.send(());
                    let _ = hold.acquire().await.map(|p| p.forget());
                    finishes.handled.store(true, Ordering::Release);
                    Ok::<_, HandlerError>(())
                }
            })
            .await
            .expect("subscribes")
    };
    s.emitter.emit("orders.placed", &1u64).await.expect("emit");
    timeout(STEP, took.recv())
        .await
        .expect("the handler took the event")
        .expect("open");
    let shutdown = tokio::spawn(service.shutdown());
    // Let the handler finish only now: the finishing work must wait for it.
    hold.add_permits(1);
    timeout(STEP, s.began.recv())
        .await
        .expect("the finishing work began")
        .expect("open");
    assert!(
        !s.finishes.began_too_early.load(Ordering::Acquire),
        "the finishing work began before the handled delivery settled"
    );
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while the finishing work was still waiting"
    );
    s.gate.add_permits(1);
    timeout(STEP, shutdown)
        .await
        .expect("shutdown returns once the finishing work is done")
        .expect("no panic");
    assert_eq!(s.finishes.runs.load(Ordering::Acquire), 1);
}

#[tokio::test]
async fn a_client_shutdown_finishes_its_services_side_by_side_each_once() {
    let mut s = setup("finish-client");
    s.finishes.handled.store(true, Ordering::Release);
    let mut services = Vec::new();
    for group in ["billing", "shipping"] {
        services.push(
            s.service
                .on_event("orders.placed", group, |_n: u64, _ctx| async move {
                    Ok::<_, HandlerError>(())
                })
                .await
                .expect("subscribes"),
        );
    }
    let shutdown = {
        let client = s.service.clone();
        tokio::spawn(async move { client.shutdown().await })
    };
    // Both finishing works begin before either may end: they are not run one after another.
    for _ in 0..2 {
        timeout(STEP, s.began.recv())
            .await
            .expect("both finishing works began")
            .expect("open");
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown returned before finishing"
    );
    s.gate.add_permits(2);
    timeout(STEP, shutdown)
        .await
        .expect("client shutdown returns")
        .expect("no panic")
        .expect("closed");
    // Stopping a service again does not run its finishing work again.
    for service in services {
        timeout(STEP, service.shutdown())
            .await
            .expect("an ended service stops at once");
    }
    assert_eq!(s.finishes.runs.load(Ordering::Acquire), 2);
}
