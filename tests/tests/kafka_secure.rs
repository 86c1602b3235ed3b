//! TLS and SASL on Kafka, against the `kafka-secure` broker `scripts/brokers up` starts: TLS
//! on 127.0.0.1:9095 (a certificate from the test CA in `$SB_TLS_DIR`) in front of a tansu
//! that requires SASL SCRAM-SHA-512 from user `switchboard`.

#![cfg(feature = "kafka")]

use std::time::Duration;

use switchboard::ErrorKind;
use switchboard_conformance::{SECURE_PASSWORD as PASSWORD, refused_connect, test_ca as ca};

/// The secure broker's URL; `query` adds options. tansu holds every fetch for
/// `fetch_wait_ms` (docs/kafka.md), so the tests ask for a short one.
fn url(user: &str, password: &str, query: &str) -> String {
    let prefix = format!("sbsec{}", std::process::id());
    format!(
        "kafka://{user}:{password}@127.0.0.1:9095?security_protocol=sasl_ssl\
         &sasl_mechanism=SCRAM-SHA-512&fetch_wait_ms=5&connect_timeout_ms=3000\
         &prefix={prefix}{query}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_scram_credentials_carries_send_and_emit() {
    let u = url("switchboard", PASSWORD, &format!("&ssl_ca={}", ca()));
    switchboard_conformance::secure_round_trip(&u, PASSWORD, "the TLS+SASL Kafka broker").await;
}

#[tokio::test]
async fn wrong_password_is_unauthenticated_and_not_shown() {
    let secret = "not-the-password-8c1f";
    let u = url("switchboard", secret, &format!("&ssl_ca={}", ca()));
    switchboard_conformance::wrong_password_is_refused(&u, secret, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn server_certificate_from_an_unknown_ca_is_refused() {
    // No `ssl_ca`: the system's roots, which do not know the test CA.
    let (err, took) = refused_connect(&url("switchboard", PASSWORD, "")).await;
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate")
            || err.to_string().to_lowercase().contains("ssl"),
        "the error says why: {err}"
    );
    assert!(took < Duration::from_secs(10), "bounded");
}
