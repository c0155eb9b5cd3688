//! The Files and Batch APIs through `app().oneshot(..)` over the fake backend: uploads and
//! their limits, every bad input, a batch run to the end with its output and error files,
//! cancel, the priority and in-flight bound batch work runs under, and a restart mid-batch
//! (the server's runtime dropped, a new service on the same directory) that answers every
//! line exactly once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use candela_server::batch::runner::BATCH_PRIORITY;
use candela_server::batch::{BatchConfig, BatchService};
use candela_server::{app, AppState};
use common::{state, Fake, MODEL};
use serde_json::{json, Value};
use tower::ServiceExt;

const BOUNDARY: &str = "candela-test-boundary";
/// How long a batch may take to finish on the fake backend.
const FINISH_TIMEOUT: Duration = Duration::from_secs(20);

fn multipart(fields: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
    let mut body = String::new();
    for (name, filename, content) in fields {
        body.push_str(&format!("--{BOUNDARY}\r\n"));
        match filename {
            Some(f) => body.push_str(&format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                 Content-Type: application/jsonl\r\n\r\n"
            )),
            None => body.push_str(&format!(
                "Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"
            )),
        }
        body.push_str(content);
        body.push_str("\r\n");
    }
    body.push_str(&format!("--{BOUNDARY}--\r\n"));
    body.into_bytes()
}

fn upload_request(body: Vec<u8>, with_length: bool) -> Request<Body> {
    let mut builder = Request::post("/v1/files").header(
        header::CONTENT_TYPE,
        format!("multipart/form-data; boundary={BOUNDARY}"),
    );
    if with_length {
        builder = builder.header(header::CONTENT_LENGTH, body.len());
    }
    builder.body(Body::from(body)).expect("request")
}

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn ok(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.text());
        self.json()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Checks the OpenAI error shape and returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        let e = self.json()["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["type"].is_string(), "{e}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{e}");
        e
    }
}

async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body")
        .to_vec();
    Reply { status, body }
}

async fn get(app: &Router, uri: &str) -> Reply {
    send(app, Request::get(uri).body(Body::empty()).expect("request")).await
}

async fn post_json(app: &Router, uri: &str, body: Value) -> Reply {
    let request = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    send(app, request).await
}

fn chat_line(id: &str, max_tokens: u32) -> String {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": max_tokens, "priority": 7},
    })
    .to_string()
}

fn lines(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| chat_line(&format!("req-{i}"), max_tokens))
        .collect::<Vec<_>>()
        .join("\n")
}

struct Server {
    app: Router,
    fake: Arc<Fake>,
}

async fn server(fake: Fake, dir: &Path, in_flight_max: usize, api_key: Option<&str>) -> Server {
    let fake = Arc::new(fake);
    let base: AppState = state(&fake, api_key);
    let config = BatchConfig {
        data_dir: dir.to_owned(),
        file_bytes_max: 32 * 1024,
        in_flight_max,
    };
    // A previous server on the directory may still be tidying up on another thread (its
    // lock goes with its last task).
    let deadline = Instant::now() + Duration::from_secs(10);
    let batches = loop {
        match BatchService::open(config.clone(), &base) {
            Ok(batches) => break batches,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("opening the data directory: {e}"),
        }
    };
    batches.resume();
    Server {
        app: app(base.with_batches(batches)),
        fake,
    }
}

async fn upload(app: &Router, content: &str) -> Value {
    let body = multipart(&[
        ("purpose", None, "batch"),
        ("file", Some("in.jsonl"), content),
    ]);
    send(app, upload_request(body, true)).await.ok()
}

async fn create_batch(app: &Router, file_id: &str) -> Value {
    post_json(
        app,
        "/v1/batches",
        json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
               "completion_window": "24h", "metadata": {"job": "test"}}),
    )
    .await
    .ok()
}

/// Polls the batch until `done` holds of it, or fails after the timeout.
async fn wait_for(app: &Router, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    loop {
        let batch = get(app, &format!("/v1/batches/{id}")).await.ok();
        if done(&batch) {
            return batch;
        }
        assert!(Instant::now() < deadline, "batch stuck: {batch}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn content(app: &Router, file_id: &str) -> Vec<Value> {
    let reply = get(app, &format!("/v1/files/{file_id}/content")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    assert!(text.ends_with('\n'), "{text}");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Records by custom_id; fails on a custom_id answered twice.
fn by_custom_id(records: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for r in records {
        let id = r["custom_id"].as_str().expect("custom_id").to_owned();
        assert!(map.insert(id.clone(), r.clone()).is_none(), "{id} twice");
    }
    map
}

#[tokio::test]
async fn without_a_data_directory_the_routes_say_how_to_turn_them_on() {
    let fake = Arc::new(Fake::new());
    let app = app(state(&fake, None));
    for uri in ["/v1/files", "/v1/batches", "/v1/batches/batch_x"] {
        let e = get(&app, uri).await.error(StatusCode::NOT_FOUND);
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("--data-dir")),
            "{e}"
        );
    }
}

#[tokio::test]
async fn a_batch_runs_to_the_end_with_output_and_error_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = server(Fake::new(), dir.path(), 2, None).await;
    let mut input = lines(6, 4);
    // Valid framing, but the route refuses the body: a 400 record in the error file.
    input.push_str(&format!(
        "\n{}\n",
        json!({"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}})
    ));
    let file = upload(&s.app, &input).await;
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["filename"], "in.jsonl");
    assert_eq!(file["bytes"], input.len());
    let file_id = file["id"].as_str().expect("id");
    assert_eq!(
        get(&s.app, &format!("/v1/files/{file_id}")).await.ok(),
        file
    );
    let stored = get(&s.app, &format!("/v1/files/{file_id}/content")).await;
    assert_eq!(stored.text(), input);

    let batch = create_batch(&s.app, file_id).await;
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["metadata"], json!({"job": "test"}));
    assert_eq!(
        batch["expires_at"].as_u64(),
        batch["created_at"].as_u64().map(|t| t + 86400)
    );
    let id = batch["id"].as_str().expect("id");
    let done = wait_for(&s.app, id, |b| b["status"] == "completed").await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 7, "completed": 6, "failed": 1})
    );
    for at in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[at].is_u64(), "{at}: {done}");
    }

    let output =
        by_custom_id(&content(&s.app, done["output_file_id"].as_str().expect("out")).await);
    assert_eq!(output.len(), 6);
    for i in 0..6 {
        let r = &output[&format!("req-{i}")];
        assert_eq!(r["response"]["status_code"], 200);
        assert!(r["error"].is_null());
        let body = &r["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(r["response"]["request_id"], body["id"]);
        assert_eq!(body["usage"]["completion_tokens"], 4);
    }
    let errors = by_custom_id(&content(&s.app, done["error_file_id"].as_str().expect("err")).await);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors["bad-temp"]["response"]["status_code"], 400);
    assert_eq!(
        errors["bad-temp"]["response"]["body"]["error"]["param"],
        "temperature"
    );

    // Every batch request ran at batch priority, whatever its line asked for.
    let submitted = s.fake.submitted();
    assert_eq!(submitted.len(), 6);
    assert!(submitted.iter().all(|r| r.priority == BATCH_PRIORITY));

    // Output files are files: listed, with purpose batch_output.
    let listed = get(&s.app, "/v1/files?purpose=batch_output").await.ok();
    assert_eq!(listed["object"], "list");
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2));
    // Paging walks every file once.
    let mut seen = Vec::new();
    let mut uri = "/v1/files?order=asc&limit=2".to_owned();
    loop {
        let page = get(&s.app, &uri).await.ok();
        for f in page["data"].as_array().expect("data") {
            seen.push(f["id"].as_str().expect("id").to_owned());
        }
        if page["has_more"] != true {
            break;
        }
        uri = format!(
            "/v1/files?order=asc&limit=2&after={}",
            page["last_id"].as_str().expect("last")
        );
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().any(|f| f == file_id));
    let batches = get(&s.app, "/v1/batches").await.ok();
    assert_eq!(batches["data"][0]["id"], id);
    assert_eq!(batches["has_more"], false);

    // A new service on the same directory knows the finished batch and its files.
    drop(s);
    let again = server(Fake::new(), dir.path(), 2, None).await;
    let reread = get(&again.app, &format!("/v1/batches/{id}")).await.ok();
    assert_eq!(reread, done);
    assert_eq!(
        content(&again.app, done["output_file_id"].as_str().expect("out"))
            .await
            .len(),
        6
    );
    assert!(again.fake.submitted().is_empty());
}

#[tokio::test]
async fn batch_work_is_bounded_and_leaves_room_for_interactive_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fake = Fake::new();
    fake.token_delay = Duration::from_millis(5);
    let s = server(fake, dir.path(), 2, None).await;
    let file = upload(&s.app, &lines(12, 4)).await;
    let batch = create_batch(&s.app, file["id"].as_str().expect("id")).await;
    let id = batch["id"].as_str().expect("id");
    let mut running_max = 0;
    let mut interactive_done = false;
    let deadline = Instant::now() + FINISH_TIMEOUT;
    loop {
        running_max = running_max.max(s.fake.running.load(Ordering::SeqCst));
        let b = get(&s.app, &format!("/v1/batches/{id}")).await.ok();
        if !interactive_done && b["status"] == "in_progress" {
            // An interactive request is answered while the batch runs.
            let reply = post_json(
                &s.app,
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "now"}], "max_tokens": 2}),
            )
            .await;
            reply.ok();
            interactive_done = true;
        }
        if b["status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "batch stuck: {b}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(interactive_done);
    // Two batch requests at most, plus the interactive one.
    assert!((1..=3).contains(&running_max), "{running_max}");
    let interactive: Vec<_> = s
        .fake
        .submitted()
        .into_iter()
        .filter(|r| r.priority != BATCH_PRIORITY)
        .collect();
    assert_eq!(interactive.len(), 1);
    assert_eq!(interactive[0].priority, 0);
}

#[tokio::test]
async fn cancel_stops_the_batch_and_keeps_what_was_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut fake = Fake::new();
    fake.token_delay = Duration::from_millis(20);
    let s = server(fake, dir.path(), 1, None).await;
    let file = upload(&s.app, &lines(50, 4)).await;
    let batch = create_batch(&s.app, file["id"].as_str().expect("id")).await;
    let id = batch["id"].as_str().expect("id");
    wait_for(&s.app, id, |b| {
        b["request_counts"]["completed"].as_u64() >= Some(1)
    })
    .await;
    let cancelling = post_json(&s.app, &format!("/v1/batches/{id}/cancel"), json!({}))
        .await
        .ok();
    assert!(
        ["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap_or("")),
        "{cancelling}"
    );
    assert!(cancelling["cancelling_at"].is_u64());
    let done = wait_for(&s.app, id, |b| b["status"] == "cancelled").await;
    assert!(done["cancelled_at"].is_u64());
    let completed = done["request_counts"]["completed"].as_u64().expect("count");
    assert!((1..50).contains(&completed), "{done}");
    let output = content(&s.app, done["output_file_id"].as_str().expect("out")).await;
    assert_eq!(output.len() as u64, completed);
    // The request in flight at the cancel was aborted in the engine.
    assert!(!s.fake.aborted().is_empty());
    // Cancelling again answers the batch as it is; a finished batch cannot be cancelled.
    let again = post_json(&s.app, &format!("/v1/batches/{id}/cancel"), json!({}))
        .await
        .ok();
    assert_eq!(again["status"], "cancelled");

    let small = upload(&s.app, &lines(1, 1)).await;
    let other = create_batch(&s.app, small["id"].as_str().expect("id")).await;
    let other_id = other["id"].as_str().expect("id");
    wait_for(&s.app, other_id, |b| b["status"] == "completed").await;
    let e = post_json(&s.app, &format!("/v1/batches/{other_id}/cancel"), json!({}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("completed")));
}

#[test]
fn a_restart_mid_batch_answers_every_line_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let total = 40;
    let id = {
        // The first server: its runtime is dropped mid-batch, as a crash would stop it
        // (no shutdown, no drain: tasks stop at whatever await they were at).
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let id = runtime.block_on(async {
            let mut fake = Fake::new();
            fake.token_delay = Duration::from_millis(10);
            let s = server(fake, dir.path(), 2, None).await;
            let file = upload(&s.app, &lines(total, 4)).await;
            let batch = create_batch(&s.app, file["id"].as_str().expect("id")).await;
            let id = batch["id"].as_str().expect("id").to_owned();
            let b = wait_for(&s.app, &id, |b| {
                b["request_counts"]["completed"].as_u64() >= Some(5)
            })
            .await;
            assert_eq!(b["status"], "in_progress");
            id
        });
        // Stops every task at its current await, as a crash would (nothing runs to an end).
        runtime.shutdown_timeout(Duration::from_secs(10));
        id
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let s = server(Fake::new(), dir.path(), 2, None).await;
        let done = wait_for(&s.app, &id, |b| b["status"] == "completed").await;
        assert_eq!(
            done["request_counts"],
            json!({"total": total, "completed": total, "failed": 0})
        );
        let output =
            by_custom_id(&content(&s.app, done["output_file_id"].as_str().expect("out")).await);
        assert_eq!(output.len(), total);
        // The second server ran only what the first had not answered.
        let rerun = s.fake.submitted().len();
        assert!(rerun < total, "{rerun}");
        assert!(done["error_file_id"].is_null());
    });
}

#[tokio::test]
async fn bad_uploads_are_refused_with_openai_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = server(Fake::new(), dir.path(), 2, None).await;
    let good = lines(2, 2);
    let cases: Vec<(Vec<u8>, StatusCode, Option<&str>, &str)> = vec![
        (
            multipart(&[("file", Some("a.jsonl"), &good)]),
            StatusCode::BAD_REQUEST,
            Some("purpose"),
            "required",
        ),
        (
            multipart(&[
                ("purpose", None, "fine-tune"),
                ("file", Some("a.jsonl"), &good),
            ]),
            StatusCode::BAD_REQUEST,
            Some("purpose"),
            "batch",
        ),
        (
            multipart(&[("purpose", None, "batch")]),
            StatusCode::BAD_REQUEST,
            Some("file"),
            "required",
        ),
        (
            multipart(&[
                ("purpose", None, "batch"),
                (
                    "file",
                    Some("a.jsonl"),
                    &format!("{}\n{{oops\n", chat_line("a", 1)),
                ),
            ]),
            StatusCode::BAD_REQUEST,
            Some("file"),
            "line 2",
        ),
        (
            multipart(&[
                ("purpose", None, "batch"),
                (
                    "file",
                    Some("a.jsonl"),
                    &format!("{}\n{}\n", chat_line("a", 1), chat_line("a", 2)),
                ),
            ]),
            StatusCode::BAD_REQUEST,
            Some("file"),
            "duplicate custom_id",
        ),
        (
            multipart(&[("purpose", None, "batch"), ("file", Some("a.jsonl"), "\n")]),
            StatusCode::BAD_REQUEST,
            Some("file"),
            "no request",
        ),
        (
            multipart(&[
                ("purpose", None, "batch"),
                ("file", Some("a.jsonl"), &good),
                ("expires_after", None, "3600"),
            ]),
            StatusCode::BAD_REQUEST,
            Some("expires_after"),
            "unsupported",
        ),
        (
            multipart(&[
                ("purpose", None, "batch"),
                ("file", Some("a.jsonl"), &"x".repeat(33_000)),
            ]),
            StatusCode::PAYLOAD_TOO_LARGE,
            Some("file"),
            "32768 bytes",
        ),
    ];
    for (body, status, param, needle) in cases {
        for with_length in [true, false] {
            let e = send(&s.app, upload_request(body.clone(), with_length))
                .await
                .error(status);
            assert_eq!(e["param"].as_str(), param, "{e}");
            assert!(
                e["message"].as_str().is_some_and(|m| m.contains(needle)),
                "{needle}: {e}"
            );
        }
    }
    // Far over the limit: refused from the declared length, before the body is read.
    let e = send(
        &s.app,
        upload_request(
            multipart(&[("file", Some("a"), &"x".repeat(200_000))]),
            true,
        ),
    )
    .await
    .error(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(e["code"], "file_too_large");
    // Not multipart at all.
    let e = post_json(&s.app, "/v1/files", json!({"purpose": "batch"}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("multipart")),
        "{e}"
    );
    // Nothing was stored, and the server still serves.
    let listed = get(&s.app, "/v1/files").await.ok();
    assert_eq!(listed["data"], json!([]));
    upload(&s.app, &good).await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("files"))
        .expect("files dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn bad_batch_requests_name_the_parameter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = server(Fake::new(), dir.path(), 2, None).await;
    let chat = upload(&s.app, &lines(2, 2)).await;
    let chat_id = chat["id"].as_str().expect("id");
    let completion_line = json!({"custom_id": "c", "method": "POST", "url": "/v1/completions",
                                 "body": {"prompt": "x"}})
    .to_string();
    let completions = upload(&s.app, &completion_line).await;
    let completions_id = completions["id"].as_str().expect("id");
    let base = json!({"input_file_id": chat_id, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"});
    let with = |key: &str, value: Value| {
        let mut body = base.clone();
        body[key] = value;
        body
    };
    let without = |key: &str| {
        let mut body = base.clone();
        body.as_object_mut().expect("object").remove(key);
        body
    };
    for (body, param) in [
        (
            with(
                "input_file_id",
                json!("file-0123456789abcdef0123456789abcdef"),
            ),
            "input_file_id",
        ),
        (
            with("input_file_id", json!("../etc/passwd")),
            "input_file_id",
        ),
        (without("input_file_id"), "input_file_id"),
        (
            with("input_file_id", json!(completions_id)),
            "input_file_id",
        ),
        (with("endpoint", json!("/v1/embeddings")), "endpoint"),
        (without("endpoint"), "endpoint"),
        (with("completion_window", json!("1h")), "completion_window"),
        (without("completion_window"), "completion_window"),
        (with("metadata", json!({"k": 1})), "metadata"),
        (with("surprise", json!(true)), "surprise"),
    ] {
        let e = post_json(&s.app, "/v1/batches", body.clone())
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post_json(&s.app, "/v1/batches", json!("nope"))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().is_some_and(|m| m.contains("JSON")));
    // Unknown or malformed ids are 404s naming the id; bad queries are 400s.
    for uri in [
        "/v1/files/file-0123456789abcdef0123456789abcdef",
        "/v1/files/..%2F..%2Fetc%2Fpasswd/content",
        "/v1/batches/batch_0123456789abcdef0123456789abcdef",
        "/v1/batches/nope",
    ] {
        get(&s.app, uri).await.error(StatusCode::NOT_FOUND);
    }
    let cancel = Request::post("/v1/batches/batch_nope/cancel")
        .body(Body::empty())
        .expect("request");
    send(&s.app, cancel).await.error(StatusCode::NOT_FOUND);
    for uri in [
        "/v1/batches?limit=0",
        "/v1/batches?limit=many",
        "/v1/batches?after=batch_nope",
        "/v1/files?order=sideways",
        "/v1/files?purpose=vision",
    ] {
        get(&s.app, uri).await.error(StatusCode::BAD_REQUEST);
    }
    let wrong_method = Request::builder()
        .method(Method::PUT)
        .uri("/v1/batches")
        .body(Body::empty())
        .expect("request");
    send(&s.app, wrong_method)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
    // A file in use by a running batch cannot be deleted; an idle one can.
    let mut fake = Fake::new();
    fake.token_delay = Duration::from_millis(50);
    let slow_dir = tempfile::tempdir().expect("temp dir");
    let slow = server(fake, slow_dir.path(), 1, None).await;
    let input = upload(&slow.app, &lines(20, 4)).await;
    let input_id = input["id"].as_str().expect("id");
    create_batch(&slow.app, input_id).await;
    let delete = |id: &str| {
        Request::delete(format!("/v1/files/{id}"))
            .body(Body::empty())
            .expect("request")
    };
    let e = send(&slow.app, delete(input_id))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert!(e["message"]
        .as_str()
        .is_some_and(|m| m.contains("input of batch")));
    let deleted = send(&s.app, delete(completions_id)).await.ok();
    assert_eq!(
        deleted,
        json!({"id": completions_id, "object": "file", "deleted": true})
    );
    get(&s.app, &format!("/v1/files/{completions_id}"))
        .await
        .error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_batch_routes_need_the_api_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = server(Fake::new(), dir.path(), 2, Some("sekret")).await;
    for uri in ["/v1/files", "/v1/batches"] {
        get(&s.app, uri).await.error(StatusCode::UNAUTHORIZED);
        let request = Request::get(uri)
            .header(header::AUTHORIZATION, "Bearer sekret")
            .body(Body::empty())
            .expect("request");
        send(&s.app, request).await.ok();
    }
    // Batch requests themselves go through without the key (they never cross the network).
    let body = multipart(&[
        ("purpose", None, "batch"),
        ("file", Some("in.jsonl"), &lines(2, 2)),
    ]);
    let mut request = upload_request(body, true);
    request.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer sekret".parse().expect("header"),
    );
    let file = send(&s.app, request).await.ok();
    let request = Request::post("/v1/batches")
        .header(header::AUTHORIZATION, "Bearer sekret")
        .body(Body::from(
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                   "completion_window": "24h"})
            .to_string(),
        ))
        .expect("request");
    let batch = send(&s.app, request).await.ok();
    let id = batch["id"].as_str().expect("id");
    let deadline = Instant::now() + FINISH_TIMEOUT;
    loop {
        let request = Request::get(format!("/v1/batches/{id}"))
            .header(header::AUTHORIZATION, "Bearer sekret")
            .body(Body::empty())
            .expect("request");
        let b = send(&s.app, request).await.ok();
        if b["status"] == "completed" {
            assert_eq!(b["request_counts"]["completed"], 2, "{b}");
            break;
        }
        assert!(Instant::now() < deadline, "{b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The records of a batch's output and error files together, by custom_id: each custom_id
/// must appear once over both.
async fn all_records(app: &Router, batch: &Value) -> HashMap<String, Value> {
    let mut records = Vec::new();
    for key in ["output_file_id", "error_file_id"] {
        if let Some(id) = batch[key].as_str() {
            records.extend(content(app, id).await);
        }
    }
    by_custom_id(&records)
}

#[test]
fn a_batch_past_its_window_expires_with_batch_expired_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let total = 10;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let id = runtime.block_on(async {
        let mut fake = Fake::new();
        fake.token_delay = Duration::from_millis(30);
        let s = server(fake, dir.path(), 1, None).await;
        let file = upload(&s.app, &lines(total, 4)).await;
        let batch = create_batch(&s.app, file["id"].as_str().expect("id")).await;
        let id = batch["id"].as_str().expect("id").to_owned();
        wait_for(&s.app, &id, |b| {
            b["request_counts"]["completed"].as_u64() >= Some(1)
        })
        .await;
        id
    });
    runtime.shutdown_timeout(Duration::from_secs(10));
    // The window ends while the server is down.
    let path = dir.path().join("batches").join(format!("{id}.json"));
    let mut record: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("record")).expect("JSON");
    record["batch"]["expires_at"] = json!(1);
    std::fs::write(&path, record.to_string()).expect("write");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let s = server(Fake::new(), dir.path(), 1, None).await;
        let done = wait_for(&s.app, &id, |b| b["status"] == "expired").await;
        assert!(done["expired_at"].is_u64());
        let counts = &done["request_counts"];
        let completed = counts["completed"].as_u64().expect("completed");
        assert!((1..total as u64).contains(&completed), "{done}");
        assert_eq!(counts["failed"].as_u64(), Some(total as u64 - completed));
        let records = all_records(&s.app, &done).await;
        assert_eq!(records.len(), total);
        let expired = records
            .values()
            .filter(|r| r["error"]["code"] == "batch_expired")
            .count();
        assert_eq!(expired as u64, total as u64 - completed);
        // Nothing ran after the window.
        assert!(s.fake.submitted().is_empty());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_pauses_batches_without_waiting_for_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let total = 30;
    let id = {
        let mut fake = Fake::new();
        fake.token_delay = Duration::from_millis(30);
        let fake = Arc::new(fake);
        let base = state(&fake, None);
        let batches = BatchService::open(
            BatchConfig {
                data_dir: dir.path().to_owned(),
                file_bytes_max: 32 * 1024,
                in_flight_max: 2,
            },
            &base,
        )
        .expect("open");
        let state = base.with_batches(batches);
        let router = app(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(candela_server::serve(
            listener,
            state,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(30),
        ));
        let file = upload(&router, &lines(total, 4)).await;
        let batch = create_batch(&router, file["id"].as_str().expect("id")).await;
        let id = batch["id"].as_str().expect("id").to_owned();
        wait_for(&router, &id, |b| {
            b["request_counts"]["completed"].as_u64() >= Some(2)
        })
        .await;
        let began = Instant::now();
        stop.send(()).expect("the server listens");
        server.await.expect("join").expect("serve");
        // The drain waited for the in-flight batch requests to be aborted, not for the batch.
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
        let paused = get(&router, &format!("/v1/batches/{id}")).await.ok();
        assert_eq!(paused["status"], "in_progress");
        assert!(paused["request_counts"]["completed"].as_u64() < Some(total as u64));
        // New batches are refused while draining.
        let again = post_json(
            &router,
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                   "completion_window": "24h"}),
        )
        .await;
        again.error(StatusCode::SERVICE_UNAVAILABLE);
        id
    };
    // The next server on the directory finishes it, each line once.
    let s = server(Fake::new(), dir.path(), 2, None).await;
    let done = wait_for(&s.app, &id, |b| b["status"] == "completed").await;
    assert_eq!(done["request_counts"]["completed"], total);
    assert_eq!(all_records(&s.app, &done).await.len(), total);
}
