//! TLS and credentials on NATS, against the second nats-server `scripts/brokers up` starts on
//! 127.0.0.1:4223 (TLS with a test CA from `$SB_TLS_DIR`, user `switchboard`).

#![cfg(feature = "nats")]

use std::time::Duration;

use switchboard::ErrorKind;
use switchboard_conformance::{SECURE_PASSWORD as PASSWORD, refused_connect, test_ca as ca};

fn url(user: &str, password: &str, query: &str) -> String {
    format!("tls://{user}:{password}@127.0.0.1:4223?events=core&connect_timeout_ms=3000{query}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_credentials_carries_send_and_emit() {
    let u = url("switchboard", PASSWORD, &format!("&tls_ca={}", ca()));
    switchboard_conformance::secure_round_trip(&u, PASSWORD, "the TLS NATS server").await;
}

#[tokio::test]
async fn wrong_password_is_unauthenticated_and_not_shown() {
    let secret = "not-the-password-8c1f";
    let u = url("switchboard", secret, &format!("&tls_ca={}", ca()));
    switchboard_conformance::wrong_password_is_refused(&u, secret, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn server_certificate_from_an_unknown_ca_is_refused() {
    let (err, took) = refused_connect(&url("switchboard", PASSWORD, "")).await;
    assert!(
        matches!(err.kind(), ErrorKind::InvalidConfig | ErrorKind::Connection),
        "{err}"
    );
    assert!(took < Duration::from_secs(5), "bounded");
}
