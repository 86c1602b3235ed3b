//! The conformance suite on RabbitMQ, against the real server at
//! `SB_AMQP_URL` (default `amqp://127.0.0.1:5672`; `scripts/test` starts it if needed).

#![cfg(feature = "rabbitmq")]

#[path = "common/rabbitmq.rs"]
mod rabbitmq_harness;

switchboard_conformance::conformance_suite!(rabbitmq_harness::harness().await);
