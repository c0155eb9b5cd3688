//! `candela serve`: the OpenAI-compatible HTTP server over one engine.
//!
//! The port is bound before the model loads, so `/health` answers at once and `/ready` says
//! 503 until the engine has warmed up. SIGTERM or Ctrl-C stops accepting, lets in-flight
//! requests finish for up to `--drain-timeout-s`, shuts the engine down and exits 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candela_engine::{EngineConfig, EngineDevice, EngineHandle};
use candela_server::batch::{BatchConfig, BatchService, FILE_BYTES_MAX_DEFAULT};
use candela_server::{
    AppState, Backend, EmbeddingPooling, EngineBackend, ServerConfig, BODY_LIMIT_BYTES_DEFAULT,
};

/// Arguments of `candela serve`.
#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file, a directory with safetensors, or a Hugging Face model id.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: String,
    #[command(flatten)]
    storage: crate::storage::StorageArgs,
    #[command(flatten)]
    speculative: crate::speculative::SpeculativeArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model names clients may pass as `model` (default: the file stem or model id);
    /// several names are aliases, all listed by /v1/models, and responses report the first.
    #[arg(long, num_args = 1..)]
    served_model_name: Vec<String>,
    /// Require `Authorization: Bearer <key>` on /v1/*, /tokenize and /detokenize.
    #[arg(long, env = "CANDELA_API_KEY")]
    api_key: Option<String>,
    /// Most sequences (choices) in one engine step.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens (prefill chunks plus decode tokens) in one engine step.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Memory for the paged KV cache, in GiB.
    #[arg(long, default_value_t = 0.5)]
    kv_cache_memory: f64,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most requests waiting to be scheduled; beyond it requests get 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Context length (prompt plus output); default: the model's own.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On CUDA: the fraction of the GPU's memory the engine may use (weights, activations
    /// and the KV cache, which gets the rest); replaces --kv-cache-memory there.
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// Turn off prefix caching.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Keep the whole context in every layer, windowed ones included, instead of giving
    /// sliding-window layers (Gemma 3, Mistral) a KV pool that holds only their window
    /// (vLLM's flag of the same name).
    #[arg(long)]
    disable_hybrid_kv_cache_manager: bool,
    /// Serve `/v1/embeddings` from the same model and batches (prefill-only sequences whose
    /// final hidden states are pooled and L2-normalised); without it the route answers 501.
    #[arg(long)]
    embeddings: bool,
    /// How an embedding pools its tokens' final hidden states (default: last). `none` (one
    /// vector per token) starts, but `/v1/embeddings` then refuses every request with a 400, as
    /// llama.cpp's server does: OpenAI's shape has one vector per input.
    #[arg(long, value_enum, requires = "embeddings")]
    pooling: Option<PoolingArg>,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = BODY_LIMIT_BYTES_DEFAULT)]
    body_limit_bytes: usize,
    /// On shutdown, how long in-flight requests may still run.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// How long loading and warm-up may take before the server gives up.
    #[arg(long, default_value_t = 600)]
    ready_timeout_s: u64,
    /// With requests pending, how long the engine may finish no step before `/health` says
    /// 503 (stalled). Longer than the slowest step: a full prefill chunk takes seconds on a CPU.
    #[arg(long, default_value_t = 60)]
    health_stall_timeout_s: u64,
    /// A Jinja chat template file that replaces the model's own (vLLM's `--chat-template`);
    /// its tool-call markers also choose the tool-call format.
    #[arg(long)]
    chat_template: Option<std::path::PathBuf>,
    /// Turns on the Files and Batch APIs (/v1/files, /v1/batches), storing uploads, batches
    /// and results here; a restarted server on the same directory finishes unfinished
    /// batches. Off without it: nothing is written to disk unless asked for.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Largest file /v1/files accepts, in bytes.
    #[arg(long, default_value_t = FILE_BYTES_MAX_DEFAULT)]
    max_file_bytes: u64,
    /// Most batch requests in the engine at once, over all batches (default: a quarter of
    /// --max-num-seqs, at least 1). Batch work also runs at the lowest priority; this bound
    /// keeps the other running slots free for interactive requests.
    #[arg(long)]
    batch_max_in_flight: Option<usize>,
}

/// `--pooling` values (llama.cpp's names; its `cls` and `rank` are for encoder models).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PoolingArg {
    Last,
    Mean,
    None,
}

/// What `/v1/embeddings` serves: nothing without `--embeddings`, else `--pooling` (last by
/// default: a causal model's last token is the only one that has read the whole input).
fn embeddings_config(args: &Args) -> Option<EmbeddingPooling> {
    args.embeddings.then_some(match args.pooling {
        None | Some(PoolingArg::Last) => EmbeddingPooling::Last,
        Some(PoolingArg::Mean) => EmbeddingPooling::Mean,
        Some(PoolingArg::None) => EmbeddingPooling::None,
    })
}

pub(crate) fn parse_device(device: &str) -> anyhow::Result<EngineDevice> {
    match device {
        "cpu" => Ok(EngineDevice::Cpu),
        "cuda" => Ok(EngineDevice::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse) {
            Some(Ok(ordinal)) => Ok(EngineDevice::Cuda(ordinal)),
            _ => anyhow::bail!("--device must be cpu, cuda or cuda:N, got `{other}`"),
        },
    }
}

/// The name a model is served under when none is given: a file's stem, else the id as is.
fn default_served_name(model: &str) -> String {
    let path = Path::new(model);
    if path.is_file() {
        if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
            return stem.to_owned();
        }
    }
    model.trim_end_matches('/').to_owned()
}

fn engine_config(args: &Args, served_model_name: &str) -> anyhow::Result<EngineConfig> {
    anyhow::ensure!(
        args.kv_cache_memory.is_finite() && args.kv_cache_memory > 0.0,
        "--kv-cache-memory must be a positive number of GiB"
    );
    Ok(EngineConfig {
        model: args.model.clone(),
        chat_template: crate::generate::read_chat_template(args.chat_template.as_deref())?,
        quantize: args.storage.to_quantize()?,
        kv_cache_dtype: args.storage.kv_cache_dtype(),
        speculative: args.speculative.to_config()?,
        served_model_name: Some(served_model_name.to_owned()),
        device: parse_device(&args.device)?,
        kv_cache_memory_bytes: (args.kv_cache_memory * f64::from(1u32 << 30)) as u64,
        gpu_memory_utilization: Some(args.gpu_memory_utilization),
        kv_block_size_tokens: args.block_size,
        seqs_running_max: args.max_num_seqs,
        batch_tokens_max: args.max_num_batched_tokens,
        queue_waiting_max: args.max_waiting,
        model_len_max: args.max_model_len,
        enable_prefix_caching: !args.no_prefix_caching,
        hybrid_kv_cache: !args.disable_hybrid_kv_cache_manager,
        step_stall_max: Duration::from_secs(args.health_stall_timeout_s.max(1)),
        #[cfg(feature = "fault-injection")]
        fault: match std::env::var("CANDELA_FAULT_INJECT") {
            Ok(spec) => Some(spec.parse().map_err(|e: String| anyhow::anyhow!(e))?),
            Err(_) => None,
        },
        ..EngineConfig::default()
    })
}

/// The Batch API's settings, when `--data-dir` is given.
fn batch_config(args: &Args) -> anyhow::Result<Option<BatchConfig>> {
    let Some(data_dir) = &args.data_dir else {
        return Ok(None);
    };
    let in_flight_max = args
        .batch_max_in_flight
        .unwrap_or((args.max_num_seqs / 4).max(1));
    anyhow::ensure!(
        in_flight_max > 0,
        "--batch-max-in-flight must be at least 1"
    );
    if in_flight_max >= args.max_num_seqs {
        tracing::warn!(
            in_flight_max,
            max_num_seqs = args.max_num_seqs,
            "--batch-max-in-flight leaves no running slot to interactive requests"
        );
    }
    Ok(Some(BatchConfig {
        data_dir: data_dir.clone(),
        file_bytes_max: args.max_file_bytes,
        in_flight_max,
    }))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// Runs `candela serve`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args));
    // A model still loading on a blocking thread must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut served_model_names = args.served_model_name.clone();
    if served_model_names.is_empty() {
        served_model_names.push(default_served_name(&args.model));
    }
    let served_model_name = served_model_names[0].clone();
    let config = engine_config(&args, &served_model_name)?;
    let batch_config = batch_config(&args)?;
    let drain_timeout = Duration::from_secs(args.drain_timeout_s);
    let ready_timeout = Duration::from_secs(args.ready_timeout_s);

    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr: SocketAddr = listener.local_addr().context("reading the bound address")?;
    tracing::info!(%addr, model = %args.model, served_model_name = %served_model_name, "listening; loading the model");

    let backend = Arc::new(EngineBackend::loading());
    let mut state = AppState::new(
        Arc::clone(&backend) as Arc<dyn Backend>,
        ServerConfig {
            served_model_names,
            api_key: args.api_key.clone(),
            body_limit_bytes: args.body_limit_bytes,
            embeddings: embeddings_config(&args),
        },
    );
    if let Some(batch_config) = batch_config {
        let data_dir = batch_config.data_dir.clone();
        let batches = BatchService::open(batch_config, &state)
            .with_context(|| format!("opening the data directory {}", data_dir.display()))?;
        // Unfinished batches start again now; their requests wait for the model to load.
        batches.resume();
        state = state.with_batches(batches);
    }
    let server = tokio::spawn(candela_server::serve(
        listener,
        state,
        shutdown_signal(),
        drain_timeout,
    ));
    let loader = tokio::task::spawn_blocking(move || -> anyhow::Result<EngineHandle> {
        let started = Instant::now();
        let engine = EngineHandle::start(config).context("starting the engine")?;
        engine
            .wait_ready(ready_timeout)
            .context("warming up the engine")?;
        tracing::info!(load_ms = started.elapsed().as_millis() as u64, "ready");
        Ok(engine)
    });

    tokio::pin!(server);
    let engine = tokio::select! {
        loaded = loader => loaded.context("the loading thread failed")??,
        served = &mut server => {
            served.context("the server task failed")?.context("serving")?;
            tracing::info!("stopped before the model finished loading");
            return Ok(());
        }
    };
    backend.set(engine.clone());
    server
        .await
        .context("the server task failed")?
        .context("serving")?;
    // In-flight requests have drained (or their deadline passed): stop the engine, aborting
    // whatever is left.
    tokio::task::spawn_blocking(move || engine.shutdown(Instant::now() + Duration::from_secs(1)))
        .await
        .context("shutting the engine down")?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").ok(), Some(EngineDevice::Cpu));
        assert_eq!(parse_device("cuda:1").ok(), Some(EngineDevice::Cuda(1)));
        assert!(parse_device("tpu").is_err());
    }

    #[test]
    fn embeddings_need_the_flag_and_pool_last_by_default() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let parse = |extra: &[&str]| {
            Cli::try_parse_from(std::iter::once("serve").chain(extra.iter().copied()))
                .map(|cli| embeddings_config(&cli.args))
        };
        assert_eq!(parse(&[]).ok(), Some(None));
        assert_eq!(
            parse(&["--embeddings"]).ok(),
            Some(Some(EmbeddingPooling::Last))
        );
        assert_eq!(
            parse(&["--embeddings", "--pooling", "mean"]).ok(),
            Some(Some(EmbeddingPooling::Mean))
        );
        assert_eq!(
            parse(&["--embeddings", "--pooling", "none"]).ok(),
            Some(Some(EmbeddingPooling::None))
        );
        assert!(parse(&["--pooling", "mean"]).is_err(), "needs --embeddings");
        assert!(parse(&["--embeddings", "--pooling", "cls"]).is_err());
    }

    #[test]
    fn served_name_of_an_id_is_the_id() {
        assert_eq!(
            default_served_name("HuggingFaceTB/SmolLM2-135M-Instruct"),
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
    }
}
