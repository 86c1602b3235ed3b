//! The conformance suite on NATS (JetStream events), against the real server at
//! `SB_NATS_URL` (default `nats://127.0.0.1:4222`; `scripts/test` starts it if needed).

#![cfg(feature = "nats")]

#[path = "common/nats.rs"]
mod nats_harness;

switchboard_conformance::conformance_suite!(nats_harness::harness().await);
