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
//! submitted as others finish. Nothing is lost: each output line is written whole and synced;
//! Ctrl-C stops submitting, aborts what is in flight (those requests are not written) and exits
//! non-zero; a rerun with the same output file skips the custom_ids already answered.
//!
//! The format, the resumable output file and the dispatch loop are candela-server's
//! `batch::{jsonl, runner}`, which the HTTP Batch API (`/v1/batches`) runs on too; this file
//! is the command line around them (arguments, progress bar, summary, Ctrl-C).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candela_engine::{EngineConfig, EngineHandle};
use candela_server::batch::jsonl::{
    duplicate_custom_ids, error_record, parse_lines, response_record, shown_ids, BatchRequest,
    Line, ResultsFile,
};
use candela_server::batch::runner::{Answer, Dispatch, Patience, RunEnd};
use candela_server::{AppState, Backend, EngineBackend, ServerConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tokio::sync::Semaphore;

/// How long loading and warm-up may take.
const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// Arguments of `candela batch`.
#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a directory with safetensors, or a Hugging Face model id.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[command(flatten)]
    storage: crate::storage::StorageArgs,
    #[command(flatten)]
    speculative: crate::speculative::SpeculativeArgs,
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

/// Reads and parses the input; fails on duplicate custom_ids (before any model load).
fn read_input(path: &Path) -> anyhow::Result<Vec<Line>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines = parse_lines(BufReader::new(file), usize::MAX)
        .with_context(|| format!("reading {}", path.display()))?;
    let duplicates = duplicate_custom_ids(&lines);
    if !duplicates.is_empty() {
        bail!(
            "{} has {} duplicate custom_id(s): {}; every custom_id must be unique",
            path.display(),
            duplicates.len(),
            shown_ids(&duplicates),
        );
    }
    Ok(lines)
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

/// Totals of one run.
#[derive(Debug, Default)]
struct Summary {
    requests: u64,
    errors: u64,
    tokens: Tokens,
}

struct Output {
    file: ResultsFile,
    summary: Summary,
    progress: ProgressBar,
    started: Instant,
}

impl Output {
    /// Writes one record as one synced line, so a crash never tears or loses a record.
    fn write(&mut self, record: &Value, is_error: bool, tokens: Tokens) -> std::io::Result<()> {
        self.file.append(record)?;
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
    let (file, answered) = ResultsFile::open(&args.output)
        .with_context(|| format!("opening {}", args.output.display()))?;
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
    let skipped = answered.len();
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
        speculative: args.speculative.to_config()?,
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
                output
                    .write(&record, true, Tokens::default())
                    .context("writing the output")?;
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
    let dispatch = Dispatch {
        router: candela_server::app(AppState::new(
            backend,
            ServerConfig {
                served_model_names: vec![engine.model_name().to_owned()],
                api_key: None,
                body_limit_bytes: usize::MAX,
                embeddings: None,
            },
        )),
        // The job runs alone in its engine: the lines' own priorities stand.
        priority: None,
        strip_model: true,
        patience: Patience::Bounded,
    };
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let end = dispatch
        .run(
            pending,
            Arc::new(Semaphore::new(in_flight_max)),
            |answer: Answer| {
                let tokens = usage_of(&answer.body);
                let is_error = !answer.status.is_success();
                let record =
                    response_record(&answer.custom_id, answer.status.as_u16(), answer.body);
                std::future::ready(output.write(&record, is_error, tokens))
            },
            ctrl_c,
        )
        .await
        .context("writing the output")?;
    Ok(end == RunEnd::Stopped)
}
