//! A flaky inventory service, protected by retry, a circuit breaker and a fallback: the
//! policies are read from `examples/resilience.toml`, and every step prints what each layer
//! did.
//!
//! 1. A blip: the first attempt fails with `unavailable`; the retry recovers it.
//! 2. An outage: attempts fail until the breaker opens; the fallback answers.
//! 3. While the circuit is open, calls are answered by the fallback at once.
//! 4. The service is back: after the reset timeout a probe succeeds and closes the circuit.
//!
//! Run: `cargo run --example resilience` (set `MSG_URL` for another transport).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard::HandlerError;
use switchboard::resilience::{CircuitState, Policies, Resilient};

#[derive(Debug, Serialize, Deserialize)]
struct Stock {
    sku: String,
    in_stock: u32,
    source: String,
}

#[tokio::main]
async fn main() -> switchboard::Result<()> {
    let url = std::env::var("MSG_URL").unwrap_or_else(|_| "memory://".into());

    // The inventory service: its first call fails (a blip), and it fails while `down`.
    let inventory = switchboard::connect(&url).await?;
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let (is_down, seen) = (down.clone(), calls.clone());
    inventory
        .handle("inventory.check", move |sku: String, _ctx| {
            let call = seen.fetch_add(1, Ordering::SeqCst) + 1;
            let fail = call == 1 || is_down.load(Ordering::SeqCst);
            async move {
                if fail {
                    println!("  service  call {call}: unavailable");
                    return Err(HandlerError::new("unavailable", "inventory is restarting"));
                }
                println!("  service  call {call}: answered");
                Ok(Stock {
                    in_stock: 7,
                    sku,
                    source: "service".into(),
                })
            }
        })
        .await?;

    let policies = Policies::from_toml(include_str!("resilience.toml"))?
        .on_event(|event| println!("  {event}"));
    let shop = Resilient::new(switchboard::connect(&url).await?, policies)?;
    let mut by = (0, 0);
    let mut check = async |step: &str, sku: &str| -> switchboard::Result<()> {
        println!("{step}: check {sku}");
        let stock: Stock = shop.send("inventory.check", sku).await?;
        println!(
            "  => {} in stock (from the {})",
            stock.in_stock, stock.source
        );
        if stock.source == "service" {
            by.0 += 1
        } else {
            by.1 += 1
        }
        Ok(())
    };

    check("1. a blip", "apple").await?;
    down.store(true, Ordering::SeqCst);
    check("2. an outage", "pear").await?;
    check("3. circuit open", "plum").await?;
    down.store(false, Ordering::SeqCst);
    // The breaker probes once its reset time (300 ms) has passed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    check("4. back again", "fig").await?;

    let state = shop
        .circuit_state("inventory.check")
        .unwrap_or(CircuitState::Closed);
    shop.client().shutdown().await?;
    inventory.shutdown().await?;
    println!(
        "ok: {} answered by the service, {} by the fallback, circuit {state}",
        by.0, by.1
    );
    Ok(())
}
