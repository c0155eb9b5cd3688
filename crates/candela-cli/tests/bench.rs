//! `candela bench` against our own server: `candela serve` on a free loopback port, started
//! here and killed at the end, in a short bounded run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Kills the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn start_server() -> (Server, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_candela"))
        .arg("serve")
        .arg("--model")
        .arg(model_path())
        .args(["--port", &port.to_string(), "--kv-cache-memory", "0.0625"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the server starts");
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(300);
    while http_status(port, "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "the server never became ready");
        assert!(
            server.0.try_wait().expect("wait").is_none(),
            "the server exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, port)
}

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_candela"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

fn check_percentiles(level: &Value, key: &str) {
    let p = &level[key];
    let (p50, p90, p99) = (
        p["p50"].as_f64().expect("p50"),
        p["p90"].as_f64().expect("p90"),
        p["p99"].as_f64().expect("p99"),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{key}: {p}");
}

#[test]
fn bench_against_our_server_reports_every_level() {
    let (_server, port) = start_server();
    let dir = tempfile::tempdir().expect("temp dir");
    let json_path = dir.path().join("ours.json");
    let plot_path = dir.path().join("ours.svg");
    let url = format!("http://127.0.0.1:{port}");
    let json_arg = json_path.to_string_lossy().into_owned();
    let plot_arg = plot_path.to_string_lossy().into_owned();
    let run = bench(&[
        "--url",
        &url,
        "--concurrency",
        "1,3",
        "--requests",
        "2,4",
        "--max-tokens",
        "8",
        "--temperature",
        "0.3",
        "--top-p",
        "0.9",
        "--response-format",
        r#"{"type": "json_object"}"#,
        "--label",
        "candela",
        "--json-out",
        &json_arg,
        "--plot",
        &plot_arg,
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("TTFT ms p50/p90/p99"), "{stdout}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("valid JSON");
    assert_eq!(report["label"], "candela");
    // The model name came from GET /v1/models.
    assert_eq!(report["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(report["max_tokens"], 8);
    assert_eq!(
        report["sampling"],
        serde_json::json!({"max_tokens": 8, "temperature": 0.3, "top_p": 0.9, "response_format": {"type": "json_object"}})
    );
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    for (level, (concurrency, requests)) in levels.iter().zip([(1, 2), (3, 4)]) {
        assert_eq!(level["concurrency"], concurrency);
        assert_eq!(level["requests"], requests);
        assert_eq!(level["errors"], 0, "{level}");
        let tokens = level["output_tokens"].as_u64().expect("output_tokens");
        assert!(
            (requests as u64..=8 * requests as u64).contains(&tokens),
            "{level}"
        );
        assert!(level["requests_per_s"].as_f64().is_some_and(|x| x > 0.0));
        assert!(level["output_tokens_per_s"]
            .as_f64()
            .is_some_and(|x| x > 0.0));
        for key in ["ttft_ms", "e2e_ms", "itl_ms", "tpot_ms"] {
            check_percentiles(level, key);
        }
        assert!(level["e2e_ms"]["p50"].as_f64() >= level["ttft_ms"]["p50"].as_f64());
    }
    let svg = std::fs::read_to_string(&plot_path).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("candela"),
        "{svg:.200}"
    );

    // Two result files, one line each: both labels in the legend.
    let mut other = report.clone();
    other["label"] = "other-server".into();
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).expect("write");
    let both_path = dir.path().join("both.svg");
    let from = format!("{json_arg},{}", other_path.display());
    let both_arg = both_path.to_string_lossy().into_owned();
    let plotted = bench(&["--plot-from", &from, "--plot", &both_arg]);
    assert!(
        plotted.status.success(),
        "{}",
        String::from_utf8_lossy(&plotted.stderr)
    );
    let svg = std::fs::read_to_string(&both_path).expect("plot written");
    assert!(svg.contains("candela") && svg.contains("other-server"));
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let port = free_port();
    let run = bench(&[
        "--url",
        &format!("http://127.0.0.1:{port}"),
        "--requests",
        "1",
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("/v1/models"));
}
