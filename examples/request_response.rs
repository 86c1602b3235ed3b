//! Request-response with `send`: the caller waits for the reply, bounded by a deadline that
//! travels with the request. A handler's error arrives as a typed error, a missing handler as
//! `NoResponder` (or a timeout where the transport cannot tell), never as a hang.
//!
//! Run: `cargo run --example request_response` (set `MSG_URL` for another transport).

use std::time::Duration;

use switchboard::{CallOptions, ErrorKind, HandlerError};

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let url = std::env::var("MSG_URL").unwrap_or_else(|_| "memory://".into());
    let pricing = switchboard::connect(&url).await?;
    pricing
        .handle("prices.quote", |sku: String, _ctx| async move {
            match sku.as_str() {
                "apple" => Ok(120u32),
                "pear" => Ok(95),
                other => Err(HandlerError::new(
                    "unknown_sku",
                    format!("no price for {other}"),
                )),
            }
        })
        .await?;

    let shop = switchboard::connect(&url).await?;
    let mut answered = 0;
    for sku in ["apple", "pear"] {
        let cents: u32 = shop.send("prices.quote", sku).await?;
        println!("{sku}: {cents} cents");
        answered += 1;
    }

    let err = shop
        .send::<_, u32>("prices.quote", &"durian")
        .await
        .expect_err("unknown sku");
    assert_eq!(err.kind(), ErrorKind::Handler);
    println!("durian: {} (code `{}`)", err, err.code());

    let quick = CallOptions::new().timeout(Duration::from_millis(200));
    let err = shop
        .send_with::<_, u32>("stock.count", &"apple", &quick)
        .await
        .expect_err("no handler");
    assert!(matches!(
        err.kind(),
        ErrorKind::NoResponder | ErrorKind::Timeout
    ));
    println!("stock.count: {err} (retryable: {})", err.is_retryable());

    shop.shutdown().await?;
    pricing.shutdown().await?;
    println!("ok: {answered} replies received");
    Ok(())
}
