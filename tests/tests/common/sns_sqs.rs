//! The SNS/SQS harness: the endpoint at `SB_SQS_URL` (default moto's server on
//! `127.0.0.1:4566`, `scripts/brokers up sqs`), and a plain aws-sdk-sns client as the foreign
//! producer (String message attributes, the adapter's topic naming).
//!
//! moto is a single-threaded emulator that backs up under load (BROKERS.md): load cases run
//! at a tenth of their size here, and each says so in the test output. Long polls are one
//! second so that a stopping consumer is not held up for twenty.

use switchboard_conformance::Harness;
use switchboard_sns_sqs::{Kind, SnsSqsConfig};

/// The endpoint, with `extra` options.
#[allow(dead_code, reason = "the restart case goes through the relay")]
pub(crate) fn url(extra: &str) -> String {
    with_options(
        std::env::var("SB_SQS_URL")
            .unwrap_or_else(|_| "sns+sqs://test:test@127.0.0.1:4566?region=us-east-1".into()),
        extra,
    )
}

/// The endpoint through the relay at `SB_SQS_RELAY_URL` (default `127.0.0.1:4567`,
/// `scripts/brokers up sqs-relay`), which the restart case stops and starts again.
#[allow(dead_code, reason = "the suite talks to the endpoint directly")]
pub(crate) fn relay_url(extra: &str) -> String {
    with_options(
        std::env::var("SB_SQS_RELAY_URL")
            .unwrap_or_else(|_| "sns+sqs://test:test@127.0.0.1:4567?region=us-east-1".into()),
        extra,
    )
}

fn with_options(base: String, extra: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}wait_s=1&visibility_s=10{extra}")
}

pub(crate) async fn harness(name: &'static str, url: String) -> Harness {
    let cfg = SnsSqsConfig::from_url(&url::Url::parse(&url).expect("URL")).expect("config");
    let sns = aws_sdk_sns::Client::new(&cfg.sdk_config().await);
    Harness::connecting_to(name, url)
        .await
        .scale_load(0.1)
        .foreign_producer(move |pattern, headers, payload| {
            let (sns, cfg) = (sns.clone(), cfg.clone());
            async move {
                let fail = |e: String| {
                    switchboard::Error::new(switchboard::ErrorKind::Connection, "sns", e)
                };
                let mut create = sns
                    .create_topic()
                    .name(cfg.name(Kind::Events, &pattern, None));
                if cfg.fifo {
                    create = create.attributes("FifoTopic", "true");
                }
                let topic = create
                    .send()
                    .await
                    .map_err(|e| fail(aws_sdk_sns::error::DisplayErrorContext(&e).to_string()))?
                    .topic_arn
                    .unwrap_or_default();
                let mut req = sns
                    .publish()
                    .topic_arn(topic)
                    .message(String::from_utf8_lossy(&payload).into_owned());
                if cfg.fifo {
                    // A FIFO topic takes a group and a deduplication id from every publisher.
                    let unique = format!("{:?}", std::time::SystemTime::now());
                    req = req.message_group_id("foreign").message_deduplication_id(
                        unique.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
                    );
                }
                for (k, v) in headers {
                    let value = aws_sdk_sns::types::MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(v)
                        .build()
                        .map_err(|e| fail(e.to_string()))?;
                    req = req.message_attributes(k, value);
                }
                req.send()
                    .await
                    .map(|_| ())
                    .map_err(|e| fail(aws_sdk_sns::error::DisplayErrorContext(&e).to_string()))
            }
        })
}
