//! The conformance suite on SNS/SQS (standard topics and queues), against moto by default
//! (see `common/sns_sqs.rs`).

#![cfg(feature = "sns-sqs")]

#[path = "common/sns_sqs.rs"]
mod sns_sqs_harness;

switchboard_conformance::conformance_suite!(
    sns_sqs_harness::harness("sns-sqs", sns_sqs_harness::url("")).await
);
