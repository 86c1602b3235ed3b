//! The restart case on RabbitMQ: the broker is stopped and started again (`scripts/brokers
//! restart rabbitmq`) while events are emitted. A file of its own, so no other case runs while
//! the broker is away.

#![cfg(feature = "rabbitmq")]

#[path = "common/rabbitmq.rs"]
mod rabbitmq_harness;

switchboard_conformance::restart_case!(
    rabbitmq_harness::harness()
        .await
        .broker_restart_script("rabbitmq")
);
