//! The conformance suite on Kafka, against the Kafka-API broker at `SB_KAFKA_URL` (default
//! `kafka://127.0.0.1:9092`; `scripts/brokers up kafka` starts tansu there, in memory).

#![cfg(feature = "kafka")]

#[path = "common/kafka.rs"]
mod kafka_harness;

switchboard_conformance::conformance_suite!(kafka_harness::harness(&kafka_harness::url()).await);
