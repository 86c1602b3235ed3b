//! The gateway over TLS and mutual TLS, reached with the `grpcs://` transport; and its
//! reflection service. The certificates are made for each run with `openssl` (a test CA, a
//! server certificate for 127.0.0.1, a client certificate); without `openssl` the TLS tests
//! say so loudly and skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use switchboard::config::Secret;
use switchboard::{ErrorKind, HandlerError};
use switchboard_gateway::{Gateway, GatewayConfig, TlsFiles};

const STEP: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

fn skip(why: &str) {
    common::skip(&format!("SKIPPED gateway TLS test: {why}"));
}

fn openssl(dir: &Path, args: &[&str]) -> bool {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A test CA, a server certificate for 127.0.0.1 and a client certificate, in a new folder.
fn certificates() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sb-gw-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .ok()?;
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .ok()?;
    let ok = openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=switchboard gateway test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    ) && ["server", "client"].iter().all(|who| {
        openssl(
            &dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={who}"),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ],
        ) && openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-days",
                "1",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ],
        )
    });
    ok.then_some(dir)
}

async fn tls_gateway(dir: &Path, client_ca: bool) -> Gateway {
    let bus = format!("memory://gw-tls-{}", uuid::Uuid::new_v4().simple());
    let cfg = GatewayConfig::new("127.0.0.1:0".parse().expect("address"), bus)
        .token(Secret::new("tls-token"))
        .tls(TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: client_ca.then(|| dir.join("ca.pem")),
        });
    let g = within("start", Gateway::start(cfg)).await.expect("starts");
    g.backend()
        .handle("tls.echo", |n: u64, _ctx| async move {
            Ok::<_, HandlerError>(n)
        })
        .await
        .expect("registers");
    g
}

#[tokio::test]
async fn a_rust_service_reaches_the_gateway_over_tls_with_a_token() {
    let Some(dir) = certificates() else {
        return skip("openssl could not make test certificates");
    };
    let g = tls_gateway(&dir, false).await;
    let addr = g.local_addr();
    let ca = dir.join("ca.pem");
    let url = format!("grpcs://{addr}?tls_ca={}&token=tls-token", ca.display());
    let client = within("connect", switchboard::connect(&url))
        .await
        .expect("connects over TLS");
    let n: u64 = within("send", client.send("tls.echo", &7u64))
        .await
        .expect("answered");
    assert_eq!(n, 7);
    // Plain text to a TLS port, or the right CA with a wrong token: refused, typed.
    let plain = within("connect", switchboard::connect(&format!("grpc://{addr}")))
        .await
        .expect_err("no TLS");
    assert_eq!(plain.kind(), ErrorKind::Connection, "{plain}");
    let wrong = format!("grpcs://{addr}?tls_ca={}&token=nope", ca.display());
    let wrong = within("connect", switchboard::connect(&wrong))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.kind(), ErrorKind::Unauthenticated, "{wrong}");
    assert!(
        !wrong.to_string().contains("nope"),
        "the token never shows: {wrong}"
    );
    within("shutdown", g.shutdown(STEP)).await.expect("stops");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate() {
    let Some(dir) = certificates() else {
        return skip("openssl could not make test certificates");
    };
    let g = tls_gateway(&dir, true).await;
    let addr = g.local_addr();
    let ca = dir.join("ca.pem").display().to_string();
    let without = format!("grpcs://{addr}?tls_ca={ca}&token=tls-token&connect_timeout_ms=3000");
    let err = within("connect", switchboard::connect(&without))
        .await
        .expect_err("no client certificate");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    let with = format!(
        "grpcs://{addr}?tls_ca={ca}&token=tls-token&tls_cert={}&tls_key={}",
        dir.join("client.pem").display(),
        dir.join("client.key").display()
    );
    let client = within("connect", switchboard::connect(&with))
        .await
        .expect("connects with a client certificate");
    let n: u64 = within("send", client.send("tls.echo", &9u64))
        .await
        .expect("answered");
    assert_eq!(n, 9);
    within("shutdown", g.shutdown(STEP)).await.expect("stops");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let bus = format!("memory://gw-refl-{}", uuid::Uuid::new_v4().simple());
    let g = within(
        "start",
        Gateway::start(GatewayConfig::new(
            "127.0.0.1:0".parse().expect("address"),
            bus,
        )),
    )
    .await
    .expect("starts");
    let channel = within(
        "connect",
        tonic::transport::Channel::from_shared(format!("http://{}", g.local_addr()))
            .expect("uri")
            .connect(),
    )
    .await
    .expect("connects");
    let mut client = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = within(
        "reflection",
        client.server_reflection_info(futures::stream::iter([ask])),
    )
    .await
    .expect("answers")
    .into_inner();
    let answer = within("list", answers.next())
        .await
        .expect("one answer")
        .expect("ok");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected answer {answer:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in ["switchboard.v1.Switchboard", "grpc.health.v1.Health"] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}
