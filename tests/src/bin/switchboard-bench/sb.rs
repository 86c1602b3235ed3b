//! The switchboard side: the same code whatever the URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use futures::StreamExt;
use switchboard::{CallOptions, Client, HandlerError, HandlerOptions, Service};
use tokio::sync::Notify;

use crate::workload::{self, Counter, Counts, Figure, Person, person, rate};

pub(crate) const ECHO: &str = "bench.echo";
pub(crate) const EVENTS: &str = "bench.events";

/// The responder and the event consumer: an echo handler and a counting group.
pub(crate) async fn serve(
    url: &str,
    counted: Arc<AtomicU64>,
    all: Arc<Notify>,
    total: u64,
) -> (Client, Service) {
    let server = switchboard::connect(url).await.expect("connect server");
    server
        .handle_with(
            ECHO,
            HandlerOptions::new().concurrency(128),
            |p: Person, _ctx| async move { Ok::<_, HandlerError>(p) },
        )
        .await
        .expect("handler");
    let events = server
        .on_event_with(
            EVENTS,
            "bench",
            HandlerOptions::new().concurrency(64),
            move |_p: Person, _ctx| {
                let (counted, all) = (counted.clone(), all.clone());
                async move {
                    workload::count(&counted, &all, total);
                    Ok::<_, HandlerError>(())
                }
            },
        )
        .await
        .expect("subscribe");
    (server, events)
}

/// The client side of every workload.
pub(crate) async fn run(url: &str, c: &Counts, counter: &mut Counter) -> Vec<Figure> {
    let client = switchboard::connect(url).await.expect("connect client");
    let cl = client.clone();
    let mut figs = workload::request_reply(c, move |i| {
        let client = cl.clone();
        async move {
            let r: Person = client.send(ECHO, &person(i)).await.expect("send");
            assert_eq!(r.id, i);
        }
    })
    .await;

    if c.async_rr > 0 {
        let mut stream = client.reply_stream::<Person>().await.expect("stream");
        let opts = CallOptions::new().timeout(Duration::from_secs(60));
        let mut ids = HashMap::with_capacity(c.async_outstanding);
        let (mut sent, mut got) = (0u64, 0u64);
        let t = Instant::now();
        while got < c.async_rr {
            while sent < c.async_rr && stream.outstanding() < c.async_outstanding {
                let cid = stream
                    .request_with(ECHO, &person(sent), &opts)
                    .await
                    .expect("request");
                ids.insert(cid, sent);
                sent += 1;
            }
            let (cid, r) = stream.next().await.expect("a reply");
            assert_eq!(r.expect("reply").id, ids.remove(&cid).expect("known id"));
            got += 1;
        }
        figs.push(rate("async_rr_throughput", "replies/s", got, t.elapsed()));
        drop(stream);
    }

    let cl = client.clone();
    figs.extend(
        workload::events(
            c,
            move |i| {
                let client = cl.clone();
                async move { client.emit(EVENTS, &person(i)).await.expect("emit") }
            },
            counter,
        )
        .await,
    );
    client.shutdown().await.expect("shutdown");
    figs
}
