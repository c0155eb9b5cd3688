//! `candela batch` as a user runs it: the built binary on the real default model, with valid
//! and invalid lines, duplicates, an early stop, an interrupt, and resumes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn model_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn batch_command(input: &Path, output: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_candela"));
    command
        .arg("batch")
        .arg("--model")
        .arg(model_path())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--kv-cache-memory-mib", "64"])
        .args(extra)
        .env("RUST_LOG", "warn");
    command
}

fn batch(input: &Path, output: &Path, extra: &[&str]) -> Output {
    batch_command(input, output, extra)
        .output()
        .expect("the binary runs")
}

fn chat_line(id: &str, question: &str, max_tokens: u32) -> String {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    })
    .to_string()
}

fn completion_line(id: &str, prompt: &str, max_tokens: u32) -> String {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    })
    .to_string()
}

fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("the output exists");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "torn output: {text}"
    );
    text.lines()
        .map(|line| serde_json::from_str(line).expect("each output line is JSON"))
        .collect()
}

/// Records by custom_id; fails on a custom_id answered twice.
fn by_custom_id(records: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for record in records {
        if let Some(id) = record["custom_id"].as_str() {
            assert!(
                map.insert(id.to_owned(), record.clone()).is_none(),
                "{id} answered twice"
            );
        }
    }
    map
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn valid_and_invalid_lines_in_the_openai_output_format() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("requests.jsonl");
    let output = dir.path().join("results.jsonl");
    let lines = [
        chat_line("chat-1", "What is the capital of France?", 8),
        completion_line("cmpl-1", "Once upon a time", 6),
        "{not json".to_owned(),
        String::new(),
        json!({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}})
            .to_string(),
        // Valid framing, but the server rejects the body: a 400 response record.
        json!({"custom_id": "bad-temp", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}})
        .to_string(),
    ];
    std::fs::write(&input, lines.join("\n") + "\n").expect("write input");
    let run = batch(&input, &output, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("5 requests, 3 errors"),
        "summary: {}",
        stderr(&run)
    );

    let records = records(&output);
    assert_eq!(records.len(), 5, "{records:#?}");
    for record in &records {
        assert!(record["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("batch_req_")));
    }
    let by_id = by_custom_id(&records);

    let chat = &by_id["chat-1"];
    assert_eq!(chat["error"], Value::Null);
    assert_eq!(chat["response"]["status_code"], 200);
    let body = &chat["response"]["body"];
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(chat["response"]["request_id"], body["id"]);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    let completion_tokens = body["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=8).contains(&completion_tokens), "{body}");

    let cmpl = &by_id["cmpl-1"];
    assert_eq!(cmpl["response"]["status_code"], 200);
    assert_eq!(cmpl["response"]["body"]["object"], "text_completion");
    assert!(cmpl["response"]["body"]["usage"]["completion_tokens"]
        .as_u64()
        .is_some_and(|n| (1..=6).contains(&n)));

    let bad_url = &by_id["bad-url"];
    assert_eq!(bad_url["response"], Value::Null);
    assert_eq!(bad_url["error"]["code"], "invalid_url");

    let bad_temp = &by_id["bad-temp"];
    assert_eq!(bad_temp["response"]["status_code"], 400);
    assert!(bad_temp["response"]["body"]["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("temperature")));

    let not_json: Vec<_> = records
        .iter()
        .filter(|r| r["custom_id"].is_null())
        .collect();
    assert_eq!(not_json.len(), 1);
    assert_eq!(not_json[0]["error"]["code"], "invalid_json");
    assert_eq!(not_json[0]["line"], 3);

    // A rerun finds everything answered and adds nothing.
    let rerun = batch(&input, &output, &[]);
    assert!(rerun.status.success(), "{}", stderr(&rerun));
    assert!(
        stderr(&rerun).contains("nothing to do"),
        "{}",
        stderr(&rerun)
    );
    assert_eq!(self::records(&output).len(), 5);
}

#[test]
fn duplicate_custom_ids_are_rejected_up_front() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("requests.jsonl");
    let output = dir.path().join("results.jsonl");
    let lines = [
        chat_line("a", "Hi", 4),
        chat_line("b", "Hello", 4),
        completion_line("a", "Again", 4),
    ];
    std::fs::write(&input, lines.join("\n")).expect("write input");
    let run = batch(&input, &output, &[]);
    assert!(!run.status.success());
    let message = stderr(&run);
    assert!(
        message.contains("duplicate custom_id") && message.contains("\"a\""),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&output).unwrap_or_default(), "");
}

fn many_requests(n: usize, max_tokens: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                chat_line(&format!("req-{i}"), &format!("Count to {i}."), max_tokens)
            } else {
                completion_line(
                    &format!("req-{i}"),
                    &format!("Item number {i} is"),
                    max_tokens,
                )
            }
        })
        .collect()
}

#[test]
fn an_early_stop_then_a_rerun_answers_each_request_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("requests.jsonl");
    let output = dir.path().join("results.jsonl");
    std::fs::write(&input, many_requests(10, 4).join("\n")).expect("write input");

    let first = batch(&input, &output, &["--max-requests", "4"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(records(&output).len(), 4);

    let second = batch(&input, &output, &[]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("resuming: 4 records"),
        "{}",
        stderr(&second)
    );
    let by_id = by_custom_id(&records(&output));
    assert_eq!(by_id.len(), 10);
    for i in 0..10 {
        let record = &by_id[&format!("req-{i}")];
        assert_eq!(record["response"]["status_code"], 200, "{record}");
    }
}

#[test]
fn an_interrupted_job_resumes_without_losing_or_repeating_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("requests.jsonl");
    let output = dir.path().join("results.jsonl");
    let total = 12;
    // Long enough replies, few at a time, that the job is still running when the first
    // results land.
    std::fs::write(&input, many_requests(total, 32).join("\n")).expect("write input");

    let mut child = batch_command(
        &input,
        &output,
        &["--max-waiting", "4", "--max-num-seqs", "2"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the binary starts");
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut interrupted = false;
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        let done = std::fs::read_to_string(&output)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if done >= 2 {
            let sent = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(sent.success());
            interrupted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = child.wait_with_output().expect("the job exits");
    assert!(
        interrupted,
        "the job ended before it could be interrupted: {}",
        stderr(&result)
    );
    assert!(!result.status.success(), "an interrupt exits non-zero");
    assert!(
        stderr(&result).contains("interrupted"),
        "{}",
        stderr(&result)
    );
    let partial = by_custom_id(&records(&output)).len();
    assert!(
        (2..total).contains(&partial),
        "{partial} results after the interrupt"
    );

    let resumed = batch(&input, &output, &[]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let by_id = by_custom_id(&records(&output));
    assert_eq!(by_id.len(), total);
    assert!(by_id.values().all(|r| r["response"]["status_code"] == 200));
}
