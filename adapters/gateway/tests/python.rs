//! A Python service through the gateway binary: `examples/python/demo.py` (grpcio, stubs
//! generated from proto/ by grpcio-tools) serves a handler, sends, emits, requests and
//! subscribes against `switchboard-gateway` started on 127.0.0.1:0 with a token; then the
//! gateway is stopped with SIGTERM and must exit cleanly. The test script installs grpcio and
//! grpcio-tools when they are missing; without them this test says so loudly and skips.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const DEMO_WITHIN: Duration = Duration::from_secs(90);

fn skip(why: &str) {
    common::skip(&format!("SKIPPED python gateway test: {why}"));
}

#[tokio::test]
async fn a_python_service_uses_switchboard_through_the_gateway() {
    let probe = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .await;
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(_) => {
            return skip(
                "python3 lacks grpcio/grpcio-tools (scripts/test installs them: pip install grpcio grpcio-tools)",
            );
        }
        Err(e) => return skip(&format!("no python3 on this machine ({e})")),
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_switchboard-gateway"))
        .args(["--listen", "127.0.0.1:0", "--backend", "memory://"])
        .env("SWITCHBOARD_GATEWAY_TOKEN", "py-s3cret")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway binary starts");
    let stdout = gateway.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the gateway says where it listens within 20 s")
        .expect("reads stdout")
        .expect("a line");
    let addr = first
        .strip_prefix("switchboard-gateway listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"))
        .to_owned();
    let demo = Command::new("python3")
        .arg(format!("{root}/examples/python/demo.py"))
        .args(["--target", &addr, "--token", "py-s3cret"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEMO_WITHIN, demo)
        .await
        .unwrap_or_else(|_| panic!("demo.py did not finish within {DEMO_WITHIN:?}"))
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.lines().last(),
        Some("ok: python sent, emitted, requested, subscribed and served"),
        "{stdout}\n{stderr}"
    );
    // A wrong token is refused, and the demo says so.
    let refused = Command::new("python3")
        .arg(format!("{root}/examples/python/demo.py"))
        .args(["--target", &addr, "--token", "wrong"])
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(DEMO_WITHIN, refused)
        .await
        .expect("demo.py with a wrong token ends")
        .expect("python3 runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // SIGTERM: the gateway drains and exits 0.
    let pid = gateway.id().expect("running").to_string();
    let term = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(20), gateway.wait())
        .await
        .expect("the gateway exits within 20 s of SIGTERM")
        .expect("waits");
    assert!(status.success(), "gateway exit status {status}");
}
