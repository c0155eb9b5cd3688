//! `candela batch`: an offline generation job over a JSONL file in the OpenAI Batch API format,
//! run in-process through continuous batching.
//!
//! Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
//! "/v1/completions", "body"}`; each output line is `{"id", "custom_id", "response":
//! {"status_code", "request_id", "body"}, "error"}`. The bodies are exactly what `candela serve`
//! answers: every request goes through candela-server's own router (`app()`), driven with
//! `tower::ServiceExt::oneshot` in this process, so parsing, validation, error bodies and
//! response shapes cannot drift from the server's. No socket is opened.
//!
//! Requests are all in flight at once, up to the engine's waiting-queue bound, and more are
//! submitted as others finish. Nothing is lost: each output line is written whole and flushed;
//! Ctrl-C stops submitting, aborts what is in flight (those requests are not written) and exits
//! non-zero; a rerun with the same output file skips the custom_ids already answered.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use candela_engine::{EngineConfig, EngineHandle};
use candela_server::{AppState, Backend, EngineBackend, ServerConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

/// How long loading and warm-up may take.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest response body read back from the router (a full context of text with logprobs
/// fits many times over).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// How often a request answered 429 (waiting queue full) is retried before it is recorded.
const QUEUE_FULL_RETRIES_MAX: u32 = 600;
/// Wait between those retries.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(100);
/// The endpoints a batch line may name.
const URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// Arguments of `candela batch`.
#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a directory with safetensors, or a Hugging Face model id.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[command(flatten)]
    storage: crate::storage::StorageArgs,
    /// Requests, one JSON object per line (OpenAI Batch API input format).
    #[arg(long)]
    input: PathBuf,
    /// Results, one JSON object per line (OpenAI Batch API output format). An existing file is
    /// resumed: its custom_ids are skipped and new results are appended.
    #[arg(long)]
    output: PathBuf,
    /// Answer at most this many new requests in this run, then stop (rerun to go on).
    #[arg(long)]
    max_requests: Option<usize>,
    /// Most sequences (choices) in one engine step.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decode tokens) in one engine step.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Most requests waiting to be scheduled; the job keeps this many in flight.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Memory for the paged KV cache, in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_memory_mib: u64,
    /// Context length (prompt plus output); default: the model's own.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// A Jinja chat template file that replaces the model's own.
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

/// One request read from the input, ready for the router.
#[derive(Debug, Clone, PartialEq)]
struct BatchRequest {
    custom_id: String,
    url: &'static str,
    body: Value,
}

/// What one input line turned into.
#[derive(Debug, Clone, PartialEq)]
enum Line {
    Request(BatchRequest),
    /// The line cannot become a request; it is answered with an error record.
    Invalid {
        /// 1-based line number in the input.
        line_number: usize,
        custom_id: Option<String>,
        code: &'static str,
        message: String,
    },
}

/// Parses one non-blank input line.
fn parse_line(line_number: usize, text: &str) -> Line {
    let invalid = |custom_id: Option<String>, code, message: String| Line::Invalid {
        line_number,
        custom_id,
        code,
        message: format!("line {line_number}: {message}"),
    };
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return invalid(None, "invalid_json", format!("not valid JSON: {e}")),
    };
    let custom_id = match value.get("custom_id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        _ => {
            return invalid(
                None,
                "missing_custom_id",
                "`custom_id` must be a non-empty string".into(),
            )
        }
    };
    let id = Some(custom_id.clone());
    match value.get("method").and_then(Value::as_str) {
        Some("POST") => {}
        other => {
            return invalid(
                id,
                "invalid_method",
                format!("`method` must be \"POST\", got {other:?}"),
            )
        }
    }
    let Some(url) = value
        .get("url")
        .and_then(Value::as_str)
        .and_then(|u| URLS.iter().copied().find(|known| *known == u))
    else {
        return invalid(id, "invalid_url", format!("`url` must be one of {URLS:?}"));
    };
    match value.get("body") {
        Some(body @ Value::Object(_)) => Line::Request(BatchRequest {
            custom_id,
            url,
            body: body.clone(),
        }),
        _ => invalid(id, "invalid_body", "`body` must be a JSON object".into()),
    }
}

/// Reads and parses the input; fails on duplicate custom_ids (before any model load).
fn read_input(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut lines = Vec::new();
    for (index, text) in BufReader::new(file).lines().enumerate() {
        let text = text.with_context(|| format!("reading {}", path.display()))?;
        if !text.trim().is_empty() {
            lines.push(parse_line(index + 1, &text));
        }
    }
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut duplicates = Vec::new();
    for line in &lines {
        let (id, line_number) = match line {
            Line::Request(r) => (r.custom_id.as_str(), None),
            Line::Invalid {
                custom_id: Some(id),
                line_number,
                ..
            } => (id.as_str(), Some(*line_number)),
            Line::Invalid { .. } => continue,
        };
        if first_seen.insert(id, line_number.unwrap_or(0)).is_some() {
            duplicates.push(id.to_owned());
        }
    }
    if !duplicates.is_empty() {
        duplicates.sort();
        duplicates.dedup();
        let shown: Vec<_> = duplicates.iter().take(10).collect();
        bail!(
            "{} has {} duplicate custom_id(s): {shown:?}{}; every custom_id must be unique",
            path.display(),
            duplicates.len(),
            if duplicates.len() > shown.len() {
                " ..."
            } else {
                ""
            }
        );
    }
    Ok(lines)
}

/// What an existing output file already answers.
#[derive(Debug, Default)]
struct Answered {
    custom_ids: HashSet<String>,
    /// Input lines without a usable custom_id that already have an error record.
    line_numbers: HashSet<usize>,
}

/// Opens the output for appending, first cutting off a torn last line (a crash mid-write) and
/// collecting what it already answers.
fn open_output(path: &Path) -> anyhow::Result<(File, Answered)> {
    let mut file = OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut answered = Answered::default();
    let mut whole_bytes = 0u64;
    let mut reader = BufReader::new(&mut file);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", path.display()))?;
        if read == 0 || !line.ends_with('\n') {
            break;
        }
        whole_bytes += read as u64;
        let Ok(record) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match record.get("custom_id") {
            Some(Value::String(id)) => {
                answered.custom_ids.insert(id.clone());
            }
            _ => {
                if let Some(n) = record.get("line").and_then(Value::as_u64) {
                    answered.line_numbers.insert(n as usize);
                }
            }
        }
    }
    drop(reader);
    if file.seek(SeekFrom::End(0))? != whole_bytes {
        tracing::warn!(
            "{}: dropping a torn last line from an interrupted run",
            path.display()
        );
        file.set_len(whole_bytes)
            .with_context(|| format!("truncating {}", path.display()))?;
    }
    Ok((file, answered))
}

/// Token counts of one answered request, for the progress bar and summary.
#[derive(Debug, Default, Clone, Copy)]
struct Tokens {
    prompt: u64,
    completion: u64,
}

fn usage_of(body: &Value) -> Tokens {
    let count = |key| {
        body.get("usage")
            .and_then(|u| u.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Tokens {
        prompt: count("prompt_tokens"),
        completion: count("completion_tokens"),
    }
}

fn record_id() -> String {
    format!("batch_req_{}", uuid::Uuid::new_v4().simple())
}

/// The output record of a request the router answered.
fn response_record(custom_id: &str, status: StatusCode, body: Value) -> Value {
    let request_id = body
        .get("id")
        .and_then(Value::as_str)
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    json!({
        "id": record_id(),
        "custom_id": custom_id,
        "response": {
            "status_code": status.as_u16(),
            "request_id": request_id,
            "body": body,
        },
        "error": null,
    })
}

/// The output record of a line that never became a request. Without a custom_id, `line`
/// (an extension) names the input line so a rerun does not report it twice.
fn error_record(line_number: usize, custom_id: Option<&str>, code: &str, message: &str) -> Value {
    let mut record = json!({
        "id": record_id(),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": message},
    });
    if custom_id.is_none() {
        record["line"] = json!(line_number);
    }
    record
}

/// Sends one request through the router, retrying while the waiting queue is full.
async fn call(router: Router, request: &BatchRequest) -> (StatusCode, Value) {
    let mut body = request.body.clone();
    // One response per line: streaming has no meaning in a batch file.
    if let Value::Object(map) = &mut body {
        map.insert("stream".into(), Value::Bool(false));
        map.remove("stream_options");
        // The job runs the one model it was started with, whatever the file names.
        map.remove("model");
    }
    let bytes = body.to_string();
    for _ in 0..QUEUE_FULL_RETRIES_MAX {
        let http_request = Request::post(request.url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes.clone()));
        let http_request = match http_request {
            Ok(r) => r,
            Err(e) => return internal_error(format!("building the request: {e}")),
        };
        let response = match router.clone().oneshot(http_request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            tokio::time::sleep(QUEUE_FULL_BACKOFF).await;
            continue;
        }
        let body = match axum::body::to_bytes(response.into_body(), RESPONSE_BYTES_MAX).await {
            Ok(b) => b,
            Err(e) => return internal_error(format!("reading the response: {e}")),
        };
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        return (status, value);
    }
    internal_error("the engine's waiting queue stayed full".into())
}

fn internal_error(message: String) -> (StatusCode, Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": {"message": message, "type": "internal_error", "param": null, "code": null}}),
    )
}

/// Totals of one run.
#[derive(Debug, Default)]
struct Summary {
    requests: u64,
    errors: u64,
    tokens: Tokens,
}

struct Output {
    file: File,
    summary: Summary,
    progress: ProgressBar,
    started: Instant,
}

impl Output {
    /// Writes one record as one line and flushes it, so a crash never tears a record.
    fn write(&mut self, record: &Value, is_error: bool, tokens: Tokens) -> anyhow::Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .context("writing the output")?;
        self.summary.requests += 1;
        self.summary.errors += u64::from(is_error);
        self.summary.tokens.prompt += tokens.prompt;
        self.summary.tokens.completion += tokens.completion;
        let elapsed_s = self.started.elapsed().as_secs_f64().max(1e-3);
        self.progress.set_message(format!(
            "{:.1} tok/s, {} errors",
            self.summary.tokens.completion as f64 / elapsed_s,
            self.summary.errors
        ));
        self.progress.inc(1);
        Ok(())
    }
}

/// Runs `candela batch`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let lines = read_input(&args.input)?;
    let (file, answered) = open_output(&args.output)?;
    let mut invalid = Vec::new();
    let mut pending = Vec::new();
    for line in lines {
        match line {
            Line::Request(r) if !answered.custom_ids.contains(&r.custom_id) => pending.push(r),
            Line::Invalid {
                line_number,
                custom_id,
                code,
                message,
            } if !custom_id.as_ref().map_or_else(
                || answered.line_numbers.contains(&line_number),
                |id| answered.custom_ids.contains(id),
            ) =>
            {
                invalid.push((line_number, custom_id, code, message))
            }
            _ => {}
        }
    }
    let skipped = answered.custom_ids.len() + answered.line_numbers.len();
    if skipped > 0 {
        eprintln!(
            "resuming: {skipped} records already in {}",
            args.output.display()
        );
    }
    let limit = args.max_requests.unwrap_or(usize::MAX);
    invalid.truncate(limit);
    pending.truncate(limit - invalid.len());
    let total = invalid.len() + pending.len();
    if total == 0 {
        eprintln!("nothing to do: every request already has a result");
        return Ok(());
    }

    let chat_template = crate::generate::read_chat_template(args.chat_template.as_deref())?;
    anyhow::ensure!(args.max_waiting > 0, "--max-waiting must be at least 1");
    let config = EngineConfig {
        model: args.model.clone(),
        quantize: args.storage.to_quantize()?,
        kv_cache_dtype: args.storage.kv_cache_dtype(),
        kv_cache_memory_bytes: args.kv_cache_memory_mib << 20,
        seqs_running_max: args.max_num_seqs,
        batch_tokens_max: args.max_num_batched_tokens,
        queue_waiting_max: args.max_waiting,
        model_len_max: args.max_model_len,
        chat_template,
        ..EngineConfig::default()
    };
    let engine = EngineHandle::start(config)
        .with_context(|| format!("cannot load model `{}`", args.model))?;
    let outcome = engine
        .wait_ready(READY_TIMEOUT)
        .context("the engine did not become ready")
        .and_then(|()| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let progress =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            progress.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} requests, {msg}, elapsed {elapsed}, ETA {eta}",
                )
                .context("progress bar template")?,
            );
            let mut output = Output {
                file,
                summary: Summary::default(),
                progress,
                started: Instant::now(),
            };
            for (line_number, custom_id, code, message) in &invalid {
                let record = error_record(*line_number, custom_id.as_deref(), code, message);
                output.write(&record, true, Tokens::default())?;
            }
            let interrupted = runtime.block_on(run_requests(
                &engine,
                pending,
                args.max_waiting,
                &mut output,
            ))?;
            output.progress.finish_and_clear();
            runtime.shutdown_timeout(Duration::from_secs(1));
            Ok((output, interrupted))
        });
    engine.shutdown(Instant::now() + Duration::from_secs(1));
    let (output, interrupted) = outcome?;
    let Summary {
        requests,
        errors,
        tokens,
    } = output.summary;
    let wall_s = output.started.elapsed().as_secs_f64();
    eprintln!(
        "{requests} requests, {errors} errors, {} prompt tokens, {} generated tokens, {wall_s:.1} s, {:.1} generated tokens/s",
        tokens.prompt,
        tokens.completion,
        tokens.completion as f64 / wall_s.max(1e-3),
    );
    if interrupted {
        bail!(
            "interrupted: {requests} results written to {}; rerun the same command to finish the rest",
            args.output.display()
        );
    }
    if requests < total as u64 {
        bail!("the job ended early: {requests} of {total} results written");
    }
    Ok(())
}

/// Keeps up to `in_flight_max` requests in the engine until all are answered or Ctrl-C;
/// returns whether it was interrupted.
async fn run_requests(
    engine: &EngineHandle,
    pending: Vec<BatchRequest>,
    in_flight_max: usize,
    output: &mut Output,
) -> anyhow::Result<bool> {
    let backend: Arc<dyn Backend> = Arc::new(EngineBackend::new(engine.clone()));
    let router = candela_server::app(AppState::new(
        backend,
        ServerConfig {
            served_model_names: vec![engine.model_name().to_owned()],
            api_key: None,
            body_limit_bytes: usize::MAX,
        },
    ));
    let (results, mut received) = mpsc::channel(in_flight_max);
    let slots = Arc::new(Semaphore::new(in_flight_max));
    // Dropping this task (on Ctrl-C) drops its JoinSet, which aborts every in-flight request:
    // the server's abort guard then frees their KV blocks at the next engine step.
    let submitter = tokio::spawn(async move {
        let mut in_flight = JoinSet::new();
        for request in pending {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                break;
            };
            let router = router.clone();
            let results = results.clone();
            in_flight.spawn(async move {
                let (status, body) = call(router, &request).await;
                // The receiver is gone only when the job is being interrupted.
                let _ = results.send((request.custom_id, status, body)).await;
                drop(slot);
            });
            // Reap finished tasks so the set stays as small as the number in flight.
            while in_flight.try_join_next().is_some() {}
        }
        while in_flight.join_next().await.is_some() {}
    });
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            biased;
            signal = &mut ctrl_c => {
                signal.context("listening for Ctrl-C")?;
                submitter.abort();
                return Ok(true);
            }
            result = received.recv() => match result {
                Some((custom_id, status, body)) => {
                    let tokens = usage_of(&body);
                    let record = response_record(&custom_id, status, body);
                    if let Err(e) = output.write(&record, !status.is_success(), tokens) {
                        submitter.abort();
                        return Err(e);
                    }
                }
                None => break,
            },
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_lines_become_requests() {
        let line = parse_line(
            1,
            r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}"#,
        );
        assert_eq!(
            line,
            Line::Request(BatchRequest {
                custom_id: "a".into(),
                url: "/v1/completions",
                body: json!({"prompt": "x"}),
            })
        );
    }

    #[test]
    fn invalid_lines_say_why() {
        for (text, expected_code, has_id) in [
            ("{", "invalid_json", false),
            (r#"{"method":"POST"}"#, "missing_custom_id", false),
            (
                r#"{"custom_id":"a","method":"GET"}"#,
                "invalid_method",
                true,
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}"#,
                "invalid_url",
                true,
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":[]}"#,
                "invalid_body",
                true,
            ),
        ] {
            match parse_line(7, text) {
                Line::Invalid {
                    line_number,
                    custom_id,
                    code,
                    message,
                } => {
                    assert_eq!(line_number, 7);
                    assert_eq!(code, expected_code, "{text}");
                    assert_eq!(custom_id.is_some(), has_id, "{text}");
                    assert!(message.starts_with("line 7: "), "{message}");
                }
                other => panic!("{text} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn torn_output_lines_are_cut_and_answers_collected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(
            &path,
            "{\"custom_id\":\"a\"}\n{\"custom_id\":null,\"line\":3}\n{\"custom_id\":\"b\"",
        )
        .expect("write");
        let (_file, answered) = open_output(&path).expect("open");
        assert_eq!(answered.custom_ids, HashSet::from(["a".to_owned()]));
        assert_eq!(answered.line_numbers, HashSet::from([3]));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("\"line\":3}\n"), "{text}");
    }
}
