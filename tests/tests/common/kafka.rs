//! The Kafka harness shared by the suite and the restart case: a Kafka-API broker (tansu on
//! this machine), and a plain rdkafka producer as the foreign producer.
//!
//! Two settings for tansu's sake, not Apache Kafka's:
//! - `fetch_wait_ms=5`: tansu holds every fetch until `fetch.wait.max.ms` passes, even with
//!   records waiting (Apache Kafka answers as soon as there are), so a hop would cost the
//!   adapter's default 100 ms there.
//! - `batch_records=1`: tansu 0.6.0 answers a fetch with the stored batches whose first offset
//!   is at or after the fetch offset (its dynostore `fetch`: `offsets.split_off(&offset)`),
//!   so a fetch from inside a batch skips the rest of that batch, where Apache Kafka returns
//!   the batch holding the offset. A group member that takes over a partition fetches from
//!   the committed offset, often inside a batch. One record per batch leaves no inside.
//! - `publish_timeout_ms=120000`: a produce request per record makes tansu slow (~650
//!   records/s here), so the 10,000 requests of the load case take longer than the default
//!   30 s to reach it; the producer keeps them for two minutes instead.

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_conformance::Harness;

/// The broker at `SB_KAFKA_URL`, default `kafka://127.0.0.1:9092` (`scripts/brokers up kafka`).
#[allow(dead_code, reason = "the restart case uses the durable broker only")]
pub(crate) fn url() -> String {
    std::env::var("SB_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".into())
}

/// The broker at `SB_KAFKA_DURABLE_URL`, default `kafka://127.0.0.1:9094`: tansu storing in
/// sqlite (`scripts/brokers up kafka-durable`), for the restart case.
#[allow(dead_code, reason = "the suite uses the in-memory broker only")]
pub(crate) fn durable_url() -> String {
    std::env::var("SB_KAFKA_DURABLE_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9094".into())
}

/// A harness for the broker at `base`, with the settings tansu needs (above).
pub(crate) async fn harness(base: &str) -> Harness {
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}fetch_wait_ms=5&batch_records=1&publish_timeout_ms=120000");
    let cfg = switchboard_kafka::KafkaConfig::from_url(&url::Url::parse(&url).expect("URL"))
        .expect("config");
    // The foreign producer: plain rdkafka, string headers, the adapter's topic naming.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cfg.brokers.join(","))
        .create()
        .expect("a plain rdkafka producer");
    let prefix = cfg.prefix.clone();
    Harness::connecting_to("kafka", url)
        .await
        .foreign_producer(move |pattern, headers, payload| {
            let producer = producer.clone();
            let topic = format!("{prefix}.evt.{pattern}");
            async move {
                let mut h = OwnedHeaders::new();
                for (k, v) in &headers {
                    h = h.insert(Header {
                        key: k.as_str(),
                        value: Some(v.as_bytes()),
                    });
                }
                let record = FutureRecord::<str, [u8]>::to(&topic)
                    .payload(&payload[..])
                    .headers(h);
                producer
                    .send(record, std::time::Duration::from_secs(10))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| {
                        switchboard::Error::new(
                            switchboard::ErrorKind::Connection,
                            "kafka",
                            e.to_string(),
                        )
                    })
            }
        })
}
