//! The restart case on Kafka: the broker at `SB_KAFKA_DURABLE_URL` (default
//! `kafka://127.0.0.1:9094`, tansu storing in sqlite so that records and committed offsets
//! survive) is stopped and started again (`scripts/brokers restart kafka-durable`) while
//! events are emitted. A file of its own, so no other case runs while the broker is away.

#![cfg(feature = "kafka")]

#[path = "common/kafka.rs"]
mod kafka_harness;

switchboard_conformance::restart_case!(
    kafka_harness::harness(&kafka_harness::durable_url())
        .await
        .broker_restart_script("kafka-durable")
);
