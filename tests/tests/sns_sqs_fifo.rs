//! The conformance suite on SNS/SQS with FIFO topics and queues (`fifo=true`): order per key
//! is declared, and kept.

#![cfg(feature = "sns-sqs")]

#[path = "common/sns_sqs.rs"]
mod sns_sqs_harness;

switchboard_conformance::conformance_suite!(
    sns_sqs_harness::harness(
        "sns-sqs-fifo",
        sns_sqs_harness::url("&fifo=true&prefix=sbf")
    )
    .await
);
