//! Events with `emit`: every consumer group subscribed to the pattern gets each event; inside a
//! group the members share the work (one member per event). A failing handler is retried with
//! backoff, then the event goes to the pattern's dead letters with the reason.
//!
//! Run: `cargo run --example emit_event` (set `MSG_URL` for another transport).

use std::time::Duration;

use switchboard::{Backoff, HandlerError, HandlerOptions, header};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let url = std::env::var("MSG_URL").unwrap_or_else(|_| "memory://".into());
    let (tx, mut rx) = mpsc::unbounded_channel::<(&'static str, u32)>();
    let mut services = Vec::new();
    // Two members of group "mailer", one member of group "ledger".
    for group in ["mailer", "mailer", "ledger"] {
        let svc = switchboard::connect(&url).await?;
        let tx = tx.clone();
        let opts = HandlerOptions::new()
            .max_attempts(3)
            .backoff(Backoff::exponential(
                Duration::from_millis(10),
                Duration::from_millis(50),
            ));
        svc.on_event_with("signups.created", group, opts, move |user: u32, _ctx| {
            let tx = tx.clone();
            async move {
                if group == "ledger" && user == 13 {
                    return Err(HandlerError::new("rejected", "the ledger refuses user 13"));
                }
                tx.send((group, user))
                    .map_err(|_| HandlerError::new("closed", "main is gone"))
            }
        })
        .await?;
        services.push(svc);
    }

    let app = switchboard::connect(&url).await?;
    let mut dead = app.dead_letters("signups.created").await?;
    for user in [1u32, 2, 3, 13] {
        app.emit("signups.created", &user).await?;
    }
    let mut handled = Vec::new();
    while handled.len() < 7 {
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("in time");
        handled.extend(got);
    }
    handled.sort();
    println!("handled (group, user): {handled:?}");
    let dl = tokio::time::timeout(Duration::from_secs(5), futures_next(&mut dead))
        .await
        .expect("in time");
    println!("dead letter: {}", dl.headers[header::DEAD_LETTER_REASON]);

    app.shutdown().await?;
    for svc in services {
        svc.shutdown().await?;
    }
    println!("ok: {} events handled, 1 dead-lettered", handled.len());
    Ok(())
}

async fn futures_next(sub: &mut switchboard::Subscription) -> switchboard::Envelope {
    use futures::StreamExt;
    let delivery = sub.next().await.expect("dead letters keep coming");
    let env = delivery.envelope().clone();
    delivery.ack().await.expect("acked");
    env
}
