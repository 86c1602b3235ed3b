//! Two services talk through switchboard with all three calls: `send` (request-response),
//! `emit` (an event, fanned out to every consumer group) and `request` (async request-reply,
//! replies matched later by correlation id). No broker needed: the default transport is
//! `memory://`. Another transport is one URL away: `MSG_URL=nats://127.0.0.1:4222` (with the
//! matching cargo feature).
//!
//! Run: `cargo run --example quickstart`

use serde::{Deserialize, Serialize};
use switchboard::HandlerError;

#[derive(Debug, Serialize, Deserialize)]
struct GetUser {
    id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u64,
    user: u64,
}

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let url = std::env::var("MSG_URL").unwrap_or_else(|_| "memory://".into());

    // Service 1, "users": answers users.get and keeps a tally of orders.
    let users = switchboard::connect(&url).await?;
    users
        .handle("users.get", |req: GetUser, _ctx| async move {
            match req.id {
                0 => Err(HandlerError::new("not_found", "there is no user 0")),
                id => Ok(User {
                    id,
                    name: format!("user-{id}"),
                }),
            }
        })
        .await?;
    let (tally_tx, mut tally_rx) = tokio::sync::mpsc::unbounded_channel();
    users
        .on_event("orders.placed", "billing", move |e: OrderPlaced, _ctx| {
            let tx = tally_tx.clone();
            async move {
                println!("users/billing: order {} placed by user {}", e.order, e.user);
                tx.send(e.order)
                    .map_err(|_| HandlerError::new("closed", "tally gone"))
            }
        })
        .await?;

    // Service 2, "web": calls users in all three ways.
    let web = switchboard::connect(&url).await?;

    let ada: User = web.send("users.get", &GetUser { id: 1 }).await?;
    println!("web: send users.get -> {ada:?}");
    let missing = web.send::<_, User>("users.get", &GetUser { id: 0 }).await;
    println!(
        "web: send users.get(0) -> error {}",
        missing.expect_err("user 0 does not exist")
    );

    web.emit(
        "orders.placed",
        &OrderPlaced {
            order: 42,
            user: ada.id,
        },
    )
    .await?;
    let order = tokio::time::timeout(std::time::Duration::from_secs(5), tally_rx.recv())
        .await
        .expect("the event is handled within 5 s");
    println!("web: emit orders.placed -> handled: order {order:?}");

    let mut pending = Vec::new();
    for id in 1..=3 {
        let handle = web.request::<_, User>("users.get", &GetUser { id }).await?;
        println!(
            "web: request users.get({id}) -> correlation id {}",
            handle.correlation_id()
        );
        pending.push(handle);
    }
    let mut matched = 0;
    for (i, handle) in pending.into_iter().enumerate() {
        let user = handle.await?;
        assert_eq!(user.id, i as u64 + 1, "each reply matches its request");
        matched += 1;
    }

    web.shutdown().await?;
    users.shutdown().await?;
    println!("ok: {matched} replies matched");
    Ok(())
}
