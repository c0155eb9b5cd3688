//! `candela bench`: a closed-loop load generator for any OpenAI-compatible server (ours,
//! llama.cpp's `llama-server`, vLLM).
//!
//! At each concurrency level, that many clients each send a streaming request, wait for it to
//! end, and send the next, until the level's request count is spent. Every request is timed from
//! the client's side: TTFT (first content chunk), inter-token latency (gaps between content
//! chunks), time per output token (after the first) and end-to-end latency. Output tokens come
//! from the final `usage` chunk (`stream_options.include_usage`), else from the number of
//! content chunks. Results print as a table and can be written as JSON and plotted; several
//! result files plot as one line per server.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Most bytes of one SSE event before the stream is called broken.
const SSE_EVENT_BYTES_MAX: usize = 1 << 20;

/// Built-in prompt sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PromptSet {
    /// Short chat questions (tens of tokens).
    ShortChat,
    /// Chat over a long passage (about a thousand tokens of context).
    LongChat,
    /// Raw text completion (`/v1/completions`).
    Completion,
}

/// Arguments of `candela bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name to send; default: the first of GET /v1/models.
    #[arg(long)]
    model: Option<String>,
    /// Concurrency levels, run in order.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    concurrency: Vec<usize>,
    /// Requests per level: one number for every level, or one per level.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    requests: Vec<usize>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature of every request (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass of every request.
    #[arg(long)]
    top_p: Option<f64>,
    /// OpenAI `response_format` of every request: JSON text, or `@FILE` holding it (e.g.
    /// `{"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}`).
    #[arg(long)]
    response_format: Option<String>,
    /// Send `ignore_eos: true` (vLLM's and llama-server's field): every reply runs to
    /// `--max-tokens`, so a model that ends early (a random-weight one) is still measured at
    /// the intended length.
    #[arg(long)]
    ignore_eos: bool,
    /// Built-in prompts.
    #[arg(long, value_enum, default_value_t = PromptSet::ShortChat)]
    prompts: PromptSet,
    /// A JSONL file of prompts instead: each line `{"messages": [...]}` (chat) or
    /// `{"prompt": "..."}` (completion).
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Name of this server in the JSON and the plot legend; default: the model and URL.
    #[arg(long)]
    label: Option<String>,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Draw throughput vs latency curves (SVG) here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Do not run: plot these result files (comma-separated) into `--plot`.
    #[arg(long, value_delimiter = ',', requires = "plot")]
    plot_from: Vec<PathBuf>,
}

/// One prompt: a chat or a raw completion.
#[derive(Debug, Clone)]
enum Prompt {
    Chat(Value),
    Completion(String),
}

impl Prompt {
    fn path(&self) -> &'static str {
        match self {
            Self::Chat(_) => "/v1/chat/completions",
            Self::Completion(_) => "/v1/completions",
        }
    }

    fn body(&self, model: &str, shape: &Value) -> Value {
        let mut body = json!({
            "model": model,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let (Some(body), Some(shape)) = (body.as_object_mut(), shape.as_object()) {
            body.extend(shape.clone());
        }
        match self {
            Self::Chat(messages) => body["messages"] = messages.clone(),
            Self::Completion(prompt) => body["prompt"] = json!(prompt),
        }
        body
    }
}

const SHORT_QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for writing clean code.",
    "What does a CPU cache do?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
    "List four uses of a paperclip.",
];

const PASSAGE: &str = "The history of computing is a story of abstraction layered on abstraction. \
Early machines were programmed by rewiring panels; stored-program computers let instructions \
live in memory beside data; assemblers named the instructions; compilers translated whole \
languages; operating systems shared one machine among many programs; networks joined machines; \
and the web joined people. Each layer hid the one below, so that a programmer could think about \
the problem instead of the machine. Yet every abstraction leaks: caches make memory fast only \
when access is local, networks fail in ways a function call never does, and floating-point \
numbers are not real numbers. ";

const COMPLETION_OPENINGS: [&str; 4] = [
    "Once upon a time, in a small village by the sea,",
    "The three most important ideas in computer science are",
    "To bake a simple loaf of bread, you first",
    "The main difference between a list and an array is",
];

fn builtin_prompts(set: PromptSet) -> Vec<Prompt> {
    let chat = |text: String| Prompt::Chat(json!([{"role": "user", "content": text}]));
    match set {
        PromptSet::ShortChat => SHORT_QUESTIONS
            .iter()
            .map(|q| chat((*q).to_owned()))
            .collect(),
        PromptSet::LongChat => {
            let context = PASSAGE.repeat(8);
            SHORT_QUESTIONS
                .iter()
                .take(4)
                .map(|q| chat(format!("{context}\n\nAfter reading the text above: {q}")))
                .collect()
        }
        PromptSet::Completion => COMPLETION_OPENINGS
            .iter()
            .map(|p| Prompt::Completion((*p).to_owned()))
            .collect(),
    }
}

fn read_prompts(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not valid JSON", path.display(), i + 1))?;
        match (value.get("messages"), value.get("prompt")) {
            (Some(messages @ Value::Array(_)), _) => prompts.push(Prompt::Chat(messages.clone())),
            (_, Some(Value::String(prompt))) => prompts.push(Prompt::Completion(prompt.clone())),
            _ => bail!(
                "{}:{}: need {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}",
                path.display(),
                i + 1
            ),
        }
    }
    anyhow::ensure!(!prompts.is_empty(), "{} has no prompts", path.display());
    Ok(prompts)
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    ttft_ms: Option<f64>,
    e2e_ms: f64,
    output_tokens: u64,
    /// Gaps between consecutive content chunks.
    itl_ms: Vec<f64>,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    mean: f64,
}

fn percentiles(values: &mut [f64]) -> Percentiles {
    if values.is_empty() {
        return Percentiles::default();
    }
    values.sort_by(f64::total_cmp);
    // Nearest rank: the smallest value with at least p% of the samples at or below it.
    let at = |p: f64| {
        let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[rank.clamp(1, values.len()) - 1]
    };
    Percentiles {
        p50: at(50.0),
        p90: at(90.0),
        p99: at(99.0),
        mean: values.iter().sum::<f64>() / values.len() as f64,
    }
}

/// The results of one concurrency level.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Level {
    concurrency: usize,
    requests: usize,
    errors: usize,
    duration_s: f64,
    requests_per_s: f64,
    output_tokens: u64,
    output_tokens_per_s: f64,
    ttft_ms: Percentiles,
    itl_ms: Percentiles,
    tpot_ms: Percentiles,
    e2e_ms: Percentiles,
    /// The first few error messages, to say what went wrong.
    error_examples: Vec<String>,
}

/// A whole run, as written by `--json-out`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Report {
    label: String,
    url: String,
    model: String,
    max_tokens: u32,
    /// The sampling fields every request carried (`max_tokens`, `temperature`, ...).
    #[serde(default)]
    sampling: Value,
    prompts: String,
    levels: Vec<Level>,
}

/// Runs `candela bench`.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.plot_from.is_empty() {
        let reports = args
            .plot_from
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a bench result", path.display()))
            })
            .collect::<anyhow::Result<Vec<Report>>>()?;
        let plot = args.plot.as_deref().context("--plot-from needs --plot")?;
        return draw(&reports, plot);
    }
    anyhow::ensure!(
        !args.concurrency.is_empty() && args.concurrency.iter().all(|&c| c > 0),
        "--concurrency needs positive levels"
    );
    let requests = match args.requests.as_slice() {
        [one] => vec![*one; args.concurrency.len()],
        many if many.len() == args.concurrency.len() => many.to_vec(),
        _ => bail!("--requests takes one number or one per concurrency level"),
    };
    anyhow::ensure!(
        requests.iter().all(|&r| r > 0),
        "--requests must be positive"
    );
    anyhow::ensure!(args.max_tokens > 0, "--max-tokens must be at least 1");
    let (prompts, prompts_name) = match &args.prompts_file {
        Some(path) => (read_prompts(path)?, path.display().to_string()),
        None => (
            builtin_prompts(args.prompts),
            clap::ValueEnum::to_possible_value(&args.prompts)
                .map_or_else(String::new, |v| v.get_name().to_owned()),
        ),
    };
    let sampling = sampling_fields(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench(&args, &requests, prompts, prompts_name, sampling))?;
    print_table(&report);
    if let Some(path) = &args.json_out {
        let text = serde_json::to_string_pretty(&report).context("serializing the results")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        draw(std::slice::from_ref(&report), path)?;
    }
    Ok(())
}

/// The request fields `--max-tokens`, `--temperature`, `--top-p`, `--response-format` and
/// `--ignore-eos` set.
fn sampling_fields(args: &Args) -> anyhow::Result<Value> {
    let mut fields = json!({"max_tokens": args.max_tokens, "temperature": args.temperature});
    if args.ignore_eos {
        fields["ignore_eos"] = json!(true);
    }
    if let Some(top_p) = args.top_p {
        fields["top_p"] = json!(top_p);
    }
    if let Some(format) = &args.response_format {
        let text = match format.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("reading --response-format {path}"))?,
            None => format.clone(),
        };
        fields["response_format"] =
            serde_json::from_str(&text).context("--response-format is not JSON")?;
    }
    Ok(fields)
}

async fn bench(
    args: &Args,
    requests: &[usize],
    prompts: Vec<Prompt>,
    prompts_name: String,
    sampling: Value,
) -> anyhow::Result<Report> {
    let base = args.url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .pool_max_idle_per_host(args.concurrency.iter().copied().max().unwrap_or(1))
        .build()
        .context("building the HTTP client")?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => first_model(&client, &base).await?,
    };
    let prompts = Arc::new(prompts);
    let shape = Arc::new(sampling.clone());
    let mut levels = Vec::new();
    for (&concurrency, &count) in args.concurrency.iter().zip(requests) {
        eprintln!("concurrency {concurrency}: {count} requests");
        let level = run_level(
            &client,
            &base,
            &model,
            Arc::clone(&shape),
            Arc::clone(&prompts),
            concurrency,
            count,
        )
        .await;
        levels.push(level);
    }
    Ok(Report {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| format!("{model} @ {base}")),
        url: base,
        model,
        max_tokens: args.max_tokens,
        sampling,
        prompts: prompts_name,
        levels,
    })
}

async fn first_model(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let url = format!("{base}/v1/models");
    let models: Value = client
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url}"))?
        .json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))?;
    models
        .get("data")
        .and_then(|d| d.get(0))
        .and_then(|m| m.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("GET {url} lists no model; pass --model"))
}

async fn run_level(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    shape: Arc<Value>,
    prompts: Arc<Vec<Prompt>>,
    concurrency: usize,
    count: usize,
) -> Level {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(count) {
        let (client, next, prompts) = (client.clone(), Arc::clone(&next), Arc::clone(&prompts));
        let shape = Arc::clone(&shape);
        let (base, model) = (base.to_owned(), model.to_owned());
        workers.spawn(async move {
            let mut results = Vec::new();
            // Closed loop: each worker takes the next request index until all are spent.
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    break;
                }
                let prompt = &prompts[index % prompts.len()];
                results.push(one_request(&client, &base, &model, &shape, prompt).await);
            }
            results
        });
    }
    let mut results = Vec::with_capacity(count);
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(mut r) => results.append(&mut r),
            Err(e) => results.push(Err(format!("worker failed: {e}"))),
        }
    }
    let duration_s = started.elapsed().as_secs_f64().max(1e-9);
    summarize(concurrency, results, duration_s)
}

fn summarize(concurrency: usize, results: Vec<Result<Sample, String>>, duration_s: f64) -> Level {
    let requests = results.len();
    let mut error_examples = Vec::new();
    let mut errors = 0;
    let (mut ttft, mut itl, mut tpot, mut e2e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut output_tokens = 0;
    for result in results {
        match result {
            Ok(sample) => {
                output_tokens += sample.output_tokens;
                e2e.push(sample.e2e_ms);
                if let Some(t) = sample.ttft_ms {
                    ttft.push(t);
                    if sample.output_tokens > 1 {
                        tpot.push((sample.e2e_ms - t) / (sample.output_tokens - 1) as f64);
                    }
                }
                itl.extend(sample.itl_ms);
            }
            Err(message) => {
                errors += 1;
                if error_examples.len() < 3 {
                    error_examples.push(message);
                }
            }
        }
    }
    Level {
        concurrency,
        requests,
        errors,
        duration_s,
        requests_per_s: (requests - errors) as f64 / duration_s,
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / duration_s,
        ttft_ms: percentiles(&mut ttft),
        itl_ms: percentiles(&mut itl),
        tpot_ms: percentiles(&mut tpot),
        e2e_ms: percentiles(&mut e2e),
        error_examples,
    }
}

/// Sends one streaming request and times it.
async fn one_request(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    shape: &Value,
    prompt: &Prompt,
) -> Result<Sample, String> {
    let started = Instant::now();
    let send = || {
        client
            .post(format!("{base}{}", prompt.path()))
            .json(&prompt.body(model, shape))
            .send()
    };
    let response = match send().await {
        Ok(response) => response,
        // A pooled keep-alive connection that the server has already closed fails at once,
        // before the request reached it, and hyper never retries a POST by itself: one retry
        // on a fresh connection (seen against llama-server, 1-2 requests per level).
        Err(e) if e.is_request() && !e.is_timeout() => {
            send().await.map_err(|e| format!("sending: {e}"))?
        }
        Err(e) => return Err(format!("sending: {e}")),
    };
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {status}: {}",
            body.chars().take(300).collect::<String>()
        ));
    }
    let mut sse = SseParser::default();
    let mut stream = response.bytes_stream();
    let mut sample = Sample::default();
    let mut last_chunk: Option<Instant> = None;
    let mut content_chunks = 0u64;
    let mut usage_tokens = None;
    let mut done = false;
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.map_err(|e| format!("reading the stream: {e}"))?;
        for data in sse.push(&bytes)? {
            if data == "[DONE]" {
                done = true;
                break;
            }
            let chunk: Value =
                serde_json::from_str(&data).map_err(|e| format!("bad SSE data ({e}): {data}"))?;
            if let Some(error) = chunk.get("error") {
                return Err(format!("error in stream: {error}"));
            }
            if let Some(n) = chunk
                .get("usage")
                .and_then(|u| u.get("completion_tokens"))
                .and_then(Value::as_u64)
            {
                usage_tokens = Some(n);
            }
            if has_content(&chunk) {
                let now = Instant::now();
                match last_chunk {
                    None => sample.ttft_ms = Some(ms(now - started)),
                    Some(previous) => sample.itl_ms.push(ms(now - previous)),
                }
                last_chunk = Some(now);
                content_chunks += 1;
            }
        }
        if done {
            break;
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    sample.e2e_ms = ms(started.elapsed());
    sample.output_tokens = usage_tokens.unwrap_or(content_chunks);
    Ok(sample)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether a chunk carries generated text (chat `delta.content` or completion `text`).
fn has_content(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| {
            choices.iter().any(|c| {
                let text = c
                    .get("delta")
                    .and_then(|d| d.get("content"))
                    .or_else(|| c.get("text"));
                text.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
            })
        })
}

/// Splits a byte stream into SSE events and returns their `data` payloads.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, separator)) = find_event_end(&self.buffer) {
            let event: Vec<u8> = self.buffer.drain(..end + separator).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        if self.buffer.len() > SSE_EVENT_BYTES_MAX {
            return Err(format!("an SSE event exceeds {SSE_EVENT_BYTES_MAX} bytes"));
        }
        Ok(events)
    }
}

/// Where the first event ends (index of its blank-line separator) and the separator's length.
fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let lf = buffer.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buffer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn print_table(report: &Report) {
    println!(
        "{} ({} prompts, {})",
        report.label, report.prompts, report.sampling
    );
    println!(
        "{:>5} {:>5} {:>4} {:>7} {:>8} | {:>27} | {:>20} | {:>20} | {:>27}",
        "conc",
        "reqs",
        "err",
        "req/s",
        "out tok/s",
        "TTFT ms p50/p90/p99",
        "ITL ms p50/p90/p99",
        "TPOT ms p50/p90/p99",
        "E2E ms p50/p90/p99"
    );
    for l in &report.levels {
        let p = |x: &Percentiles, w: usize| {
            format!("{:.0}/{:.0}/{:.0}", x.p50, x.p90, x.p99)
                .chars()
                .take(w)
                .collect::<String>()
        };
        println!(
            "{:>5} {:>5} {:>4} {:>7.2} {:>8.1} | {:>27} | {:>20} | {:>20} | {:>27}",
            l.concurrency,
            l.requests,
            l.errors,
            l.requests_per_s,
            l.output_tokens_per_s,
            p(&l.ttft_ms, 27),
            p(&l.itl_ms, 20),
            p(&l.tpot_ms, 20),
            p(&l.e2e_ms, 27),
        );
        for e in &l.error_examples {
            println!("      error: {e}");
        }
    }
}

/// Reads one latency figure of a level.
type Metric = fn(&Level) -> f64;

/// Two panels, both against output tokens/s: p50 TTFT and p50 time per output token. One line
/// per report, one point per concurrency level.
fn draw(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, Metric); 2] = [
        ("p50 TTFT (ms)", |l| l.ttft_ms.p50),
        ("p50 time per output token (ms)", |l| l.tpot_ms.p50),
    ];
    let x_max = reports
        .iter()
        .flat_map(|r| &r.levels)
        .map(|l| l.output_tokens_per_s)
        .fold(1.0, f64::max)
        * 1.1;
    for (panel, (name, metric)) in panels.iter().zip(metrics) {
        let y_max = reports
            .iter()
            .flat_map(|r| &r.levels)
            .map(metric)
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} vs throughput"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("output tokens/s")
            .y_desc(name)
            .draw()
            .map_err(plot_error)?;
        for (report, color) in reports.iter().zip(colors.iter().cycle()) {
            let points: Vec<(f64, f64)> = report
                .levels
                .iter()
                .map(|l| (l.output_tokens_per_s, metric(l)))
                .collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(report.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().zip(&report.levels).flat_map(|(&(x, y), l)| {
                    [
                        Circle::new((x, y), 4, color.filled()).into_dyn(),
                        Text::new(format!("c{}", l.concurrency), (x, y), ("sans-serif", 12))
                            .into_dyn(),
                    ]
                }))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut parser = SseParser::default();
        assert_eq!(
            parser.push(b"data: {\"a\":1}\n\nda").expect("ok"),
            vec!["{\"a\":1}"]
        );
        assert_eq!(
            parser.push(b"ta: [DONE]\r\n\r\n").expect("ok"),
            vec!["[DONE]"]
        );
        assert!(parser.push(b": comment\n\n").expect("ok").is_empty());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = percentiles(&mut values);
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(p.mean, 50.5);
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    #[test]
    fn content_chunks_of_both_endpoints() {
        assert!(has_content(
            &json!({"choices":[{"delta":{"content":"hi"}}]})
        ));
        assert!(has_content(&json!({"choices":[{"text":"hi"}]})));
        assert!(!has_content(
            &json!({"choices":[{"delta":{"role":"assistant"}}]})
        ));
        assert!(!has_content(&json!({"choices":[], "usage": {}})));
    }
}
