//! The restart case on SNS/SQS. AWS runs the service: there is no broker a user restarts, and
//! what a client sees of an incident is its endpoint going away (connections cut, new ones
//! refused) and coming back with the queues as they were. The case does that to moto's
//! endpoint through a relay (`scripts/brokers restart sqs-relay`: the relay stops, stays away
//! for a few seconds, starts again); restarting moto itself would wipe its memory, which AWS
//! never does. A file of its own, so no other case runs while the endpoint is away.

#![cfg(feature = "sns-sqs")]

#[path = "common/sns_sqs.rs"]
mod sns_sqs_harness;

switchboard_conformance::restart_case!(
    sns_sqs_harness::harness("sns-sqs", sns_sqs_harness::relay_url(""))
        .await
        .broker_restart_script("sqs-relay")
);
