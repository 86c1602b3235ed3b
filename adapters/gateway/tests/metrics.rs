//! The gateway binary's Prometheus endpoint: off unless `--metrics-listen` is given; with it,
//! `GET /metrics` shows the SDK's metrics of the calls the gateway made on its clients' behalf
//! (the handlers' own metrics are in the processes that run them).

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const STEP: Duration = Duration::from_secs(20);

async fn get(addr: &str, path: &str) -> String {
    let mut stream = tokio::time::timeout(STEP, TcpStream::connect(addr))
        .await
        .expect("bounded")
        .expect("the metrics endpoint accepts");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("writes");
    let mut out = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut out))
        .await
        .expect("bounded")
        .expect("reads");
    out
}

#[tokio::test]
async fn metrics_are_served_on_request_and_count_the_calls_made_through_the_gateway() {
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_switchboard-gateway"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway binary starts");
    let mut lines = BufReader::new(gateway.stdout.take().expect("stdout")).lines();
    let mut next = async || {
        tokio::time::timeout(STEP, lines.next_line())
            .await
            .expect("the gateway prints its addresses")
            .expect("reads stdout")
            .expect("a line")
    };
    let grpc = next()
        .await
        .strip_prefix("switchboard-gateway listening on ")
        .expect("the gRPC address first")
        .to_owned();
    let metrics_url = next().await;
    let metrics = metrics_url
        .strip_prefix("switchboard-gateway metrics on http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected line: {metrics_url}"))
        .to_owned();

    // A handler served through the gateway, and a call to it.
    let service = switchboard::connect(&format!("grpc://{grpc}"))
        .await
        .expect("connects");
    service
        .handle("metrics.echo", |n: u32, _ctx| async move {
            Ok::<_, switchboard::HandlerError>(n)
        })
        .await
        .expect("registers");
    let caller = switchboard::connect(&format!("grpc://{grpc}"))
        .await
        .expect("connects");
    let n: u32 = tokio::time::timeout(STEP, caller.send("metrics.echo", &5u32))
        .await
        .expect("bounded")
        .expect("answered");
    assert_eq!(n, 5);

    tokio::time::timeout(STEP, caller.emit("metrics.happened", &1u32))
        .await
        .expect("bounded")
        .expect("accepted");

    // The gateway's backend client (memory) made one send and one emit on their behalf.
    let page = get(&metrics, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    for line in [
        r#"switchboard_messages_sent_total{transport="memory",call="send"} 1"#,
        r#"switchboard_messages_sent_total{transport="memory",call="emit"} 1"#,
        r#"switchboard_send_duration_seconds_count{transport="memory"} 1"#,
        r#"switchboard_sends_in_flight{transport="memory"} 0"#,
    ] {
        assert!(page.contains(line), "no `{line}` in:\n{page}");
    }
    assert!(get(&metrics, "/other").await.starts_with("HTTP/1.1 404"));
    service.shutdown().await.expect("shutdown");
    caller.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn without_the_flag_no_metrics_endpoint_is_started() {
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_switchboard-gateway"))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway binary starts");
    let mut lines = BufReader::new(gateway.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(STEP, lines.next_line())
        .await
        .expect("bounded")
        .expect("reads")
        .expect("a line");
    assert!(
        first.starts_with("switchboard-gateway listening on "),
        "{first}"
    );
    // Nothing more is printed: the next read ends only when the gateway is stopped.
    gateway.start_kill().expect("stops");
    let rest = tokio::time::timeout(STEP, lines.next_line())
        .await
        .expect("bounded")
        .expect("reads");
    assert_eq!(rest, None, "no metrics address printed");
}
