//! `memory`: no client library exists, so the raw side is bare tokio channels doing the same
//! JSON work. Both sides run in this process: an in-memory transport cannot cross processes.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::workload::{self, Counter, Counts, Figure, check_reply, echo_bytes, encode};

type RawReq = (Bytes, oneshot::Sender<Bytes>);

fn responder() -> mpsc::Sender<RawReq> {
    let (tx, mut rx) = mpsc::channel::<RawReq>(1024);
    tokio::spawn(async move {
        while let Some((req, reply)) = rx.recv().await {
            let _ = reply.send(Bytes::from(echo_bytes(&req)));
        }
    });
    tx
}

async fn call(tx: mpsc::Sender<RawReq>, i: u64) {
    let (rtx, rrx) = oneshot::channel();
    tx.send((Bytes::from(encode(i)), rtx)).await.expect("send");
    check_reply(&rrx.await.expect("reply"), i);
}

pub(crate) async fn raw_run(c: &Counts) -> Vec<Figure> {
    let tx = responder();
    let t = tx.clone();
    let mut figs = workload::request_reply(c, move |i| call(t.clone(), i)).await;
    figs.extend(workload::async_calls(c, |i| call(tx.clone(), i)).await);

    let (counted, all) = workload::local_counter();
    let (etx, mut erx) = mpsc::channel::<Bytes>(c.events_outstanding);
    let (n, a, total) = (counted.clone(), all.clone(), c.events);
    tokio::spawn(async move {
        while let Some(b) = erx.recv().await {
            let _p: workload::Person = serde_json::from_slice(&b).expect("decode");
            workload::count(&n, &a, total);
        }
    });
    let mut counter = Counter::Local(counted, all);
    figs.extend(
        workload::events(
            c,
            |i| {
                let etx = etx.clone();
                async move { etx.send(Bytes::from(encode(i))).await.expect("send") }
            },
            &mut counter,
        )
        .await,
    );
    figs
}
