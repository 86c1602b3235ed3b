//! Async request-reply with `request`: each call returns at once with a handle carrying its
//! correlation id; replies come back on the client's one reply channel and are matched by that
//! id. Here 1,000 requests go out before any reply is read, first with handles, then as a
//! stream of replies.
//!
//! Run: `cargo run --example async_request_reply` (set `MSG_URL` for another transport).

use futures::StreamExt;
use switchboard::HandlerError;

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let url = std::env::var("MSG_URL").unwrap_or_else(|_| "memory://".into());
    let squares = switchboard::connect(&url).await?;
    squares
        .handle("math.square", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n * n)
        })
        .await?;

    let client = switchboard::connect(&url).await?;

    // Handles: issue all, await later.
    let mut handles = Vec::new();
    for n in 0..1_000u64 {
        handles.push((n, client.request::<_, u64>("math.square", &n).await?));
    }
    println!("{} requests in flight", client.requests_in_flight());
    let mut matched = 0;
    for (n, handle) in handles {
        assert_eq!(handle.await?, n * n);
        matched += 1;
    }

    // A stream: replies in arrival order, each with its correlation id.
    let mut replies = client.reply_stream::<u64>().await?;
    let mut sent = std::collections::HashMap::new();
    for n in 0..1_000u64 {
        sent.insert(replies.request("math.square", &n).await?, n);
    }
    while let Some((id, reply)) = replies.next().await {
        let n = sent.remove(&id).expect("a reply to one of ours");
        assert_eq!(reply?, n * n);
        matched += 1;
    }

    client.shutdown().await?;
    squares.shutdown().await?;
    println!("ok: {matched} replies matched");
    Ok(())
}
