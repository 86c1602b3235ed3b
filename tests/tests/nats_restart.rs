//! The restart case on NATS: the server is stopped and started again (`scripts/brokers
//! restart nats`) while events are emitted. A file of its own, so no other case runs while
//! the server is away.

#![cfg(feature = "nats")]

#[path = "common/nats.rs"]
mod nats_harness;

switchboard_conformance::restart_case!(nats_harness::harness().await.broker_restart_script("nats"));
