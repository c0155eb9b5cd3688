//! The engine thread: owns the model, the KV cache and the scheduler, and runs the step loop.
//!
//! ```text
//! loop {
//!     take commands (Add / Abort / Shutdown); block only when there is nothing to run
//!     drop requests whose event receiver is closed (their blocks are freed at once)
//!     batch  = scheduler.schedule()                  who runs, how many tokens, which slots
//!     inputs = BatchInputs (flattened tokens, positions, cu_seqlens, block tables, slots)
//!     logits = model.forward(&inputs, &mut kv)       [num_sampled, vocab], copied to host once
//!     per sampled sequence: sample -> detokenize -> EOS / stop / length -> send events
//!     scheduler.update_after_step(outputs)           append tokens, free finished sequences
//! }
//! ```
//!
//! All mutable state lives on this thread: no locks around the model or the scheduler. The
//! handle shares only atomics (readiness, the waiting-request count) and the metrics.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candela_kernels::kv_cache::PagedKvCache;
use candela_models::tokenizer::IncrementalDecoder;
use candela_models::{BatchBuilder, BatchInputs, Model, SeqChunk};
use candela_scheduler::{
    Policy, ScheduledBatch, Scheduler, SchedulerConfig, SchedulerStats, SeqId, StepOutput,
};
use candle_core::{DType, Device, Storage, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rayon::prelude::*;

use crate::api::{
    FinishReason, GenerateEvent, RequestId, StopCause, Timings, TokenId, TokenLogprob, Usage,
};
use crate::config::{EngineConfig, EngineDevice};
use crate::error::EngineError;
use crate::handle::{AdmittedRequest, EngineCommand, ModelInfo, SharedState};
use crate::kv_layout::{kv_layout, KvBudget};
use crate::sampler::{argmax, ChoiceSampler, SamplerScratch};
use crate::stop::{StopMatcher, StopOutcome};
use crate::structured::{Advance, ChoiceConstraint, TokenMask};
use crate::text::TextTools;

/// Tokens of the warm-up sequence of a GPU's KV sizing probe: enough to run every kernel of a
/// prefill.
#[cfg(feature = "cuda")]
const WARMUP_TOKENS: usize = 8;
/// Most tokens of the warm-up prefill chunk (more adds start-up time, not warmth).
const WARMUP_PREFILL_TOKENS: usize = 256;
/// Most sequences of the warm-up decode step.
const WARMUP_DECODE_SEQS: usize = 16;

/// What `spawn` hands back to the handle.
pub(crate) struct Started {
    pub(crate) info: ModelInfo,
    pub(crate) text: Arc<TextTools>,
    pub(crate) thread: JoinHandle<()>,
}

/// Loads the model on a new engine thread (so a model that is not `Sync` never leaves it),
/// waits for the load to finish, and lets the thread warm up and run its loop.
pub(crate) fn spawn(
    config: EngineConfig,
    shared: Arc<SharedState>,
    commands: Receiver<EngineCommand>,
) -> Result<Started, EngineError> {
    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("candela-engine".into())
        .spawn(move || {
            let _exit = ExitGuard(Arc::clone(&shared));
            let mut core = match EngineCore::load(&config, Arc::clone(&shared)) {
                Ok(core) => {
                    // The receiver waits in `spawn`; it cannot be gone.
                    let _ = loaded_tx.send(Ok((core.info.clone(), Arc::clone(&core.text))));
                    core
                }
                Err(error) => {
                    let _ = loaded_tx.send(Err(error));
                    return;
                }
            };
            match core.warm_up() {
                Ok(()) => {
                    shared.beat();
                    shared.ready.store(true, Ordering::Release);
                }
                Err(error) => {
                    tracing::error!(%error, "engine warm-up failed");
                    if let Ok(mut slot) = shared.warmup_error.lock() {
                        *slot = Some(error.to_string());
                    }
                    shared.accepting.store(false, Ordering::Release);
                    return;
                }
            }
            core.run(&commands);
        })
        .map_err(|e| EngineError::Stopped(format!("spawning the engine thread: {e}")))?;
    match loaded_rx.recv() {
        Ok(Ok((info, text))) => Ok(Started { info, text, thread }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            Err(EngineError::Stopped(
                "the engine thread died while loading".into(),
            ))
        }
    }
}

/// Whatever way the engine thread ends, it stops being ready; a panic that escaped the step
/// guard (in command handling, say) marks the engine failed, so `/health` and `submit` say so
/// instead of waiting on a thread that is gone.
struct ExitGuard(Arc<SharedState>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("the engine thread panicked".into());
        }
        self.0.ready.store(false, Ordering::Release);
        self.0.accepting.store(false, Ordering::Release);
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Per-choice state on the engine thread.
struct Choice {
    index: u32,
    seq_id: SeqId,
    sampler: ChoiceSampler,
    /// The structured-output constraint at this choice's output so far.
    constraint: Option<ChoiceConstraint>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// Most tokens this choice may generate (clamped to the context at admission).
    tokens_max: u32,
    tokens_generated: u32,
    cached_prompt_tokens: u32,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    finished: bool,
}

/// Per-request state on the engine thread.
struct RequestState {
    events: tokio::sync::mpsc::UnboundedSender<GenerateEvent>,
    arrival: Instant,
    prompt_tokens: u32,
    stop_token_ids: Vec<TokenId>,
    ignore_eos: bool,
    /// Still counted in `SharedState::waiting_requests` (not yet scheduled).
    counted_waiting: bool,
    choices: Vec<Choice>,
    choices_unfinished: u32,
}

impl RequestState {
    /// Leaves the waiting count once: when first scheduled, or when it ends before that.
    fn uncount_waiting(&mut self, shared: &SharedState) {
        if self.counted_waiting {
            self.counted_waiting = false;
            shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Everything the engine thread owns.
struct EngineCore {
    model: Box<dyn Model>,
    kv: PagedKvCache,
    scheduler: Scheduler,
    device: Device,
    block_size: usize,
    info: ModelInfo,
    text: Arc<TextTools>,
    shared: Arc<SharedState>,
    requests: HashMap<RequestId, RequestState>,
    /// Which request and choice each scheduler sequence belongs to.
    seq_owner: HashMap<SeqId, (RequestId, usize)>,
    next_seq_id: u64,
    /// Draws seeds for requests that bring none.
    seed_rng: ChaCha12Rng,
    /// When shutdown was asked for: stop taking requests, abort what is left at the deadline.
    shutdown_deadline: Option<Instant>,
    /// All handles dropped: no more commands will come.
    commands_closed: bool,
    /// Scheduler counters already exported (the metrics are monotonic counters).
    stats_exported: SchedulerStats,
    // Host buffers reused between steps (allocation-light steady state).
    scratch: SamplerScratch,
    /// Reduce plain greedy rows to their argmax where the logits are
    /// (`EngineConfig::greedy_on_device`).
    greedy_on_device: bool,
    /// This step's sampled rows: whether the device picks each one's token.
    rows_on_device: Vec<bool>,
    /// This step's sampled rows: the token the device picked, or `None` for a row whose
    /// logits are in `logits_host`.
    device_tokens: Vec<Option<TokenId>>,
    /// Logits of the sampled rows the host samples, `[rows, vocab]`, in batch order.
    logits_host: Vec<f32>,
    /// Where the last `run_model` spent its time (for the step trace).
    step_times: StepTimes,
    block_tables_host: Vec<u32>,
    /// The window pool's tables, at the same offsets as `block_tables_host` (hybrid cache).
    window_tables_host: Vec<u32>,
    /// Host buffers of the step's inputs, reused from step to step.
    batch_builder: BatchBuilder,
    step_outputs: Vec<StepOutput>,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::FaultCounter,
}

impl EngineCore {
    fn load(config: &EngineConfig, shared: Arc<SharedState>) -> Result<Self, EngineError> {
        let device = match config.device {
            EngineDevice::Cpu => Device::Cpu,
            EngineDevice::Cuda(ordinal) => open_cuda(ordinal)
                .map_err(|e| EngineError::Load(format!("CUDA device {ordinal}: {e}")))?,
        };
        let files = candela_models::hub::resolve(&config.model)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let text = Arc::new(TextTools::load(&files, config.chat_template.as_deref())?);
        let options = candela_models::LoadOptions {
            quantize: config.quantize,
        };
        let loaded = candela_models::load_files_with(files, &device, &options)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let model_config = loaded.config().clone();
        let model = loaded.model;

        let vocab_size = model_config.vocab_size;
        let model_len_max = match config.model_len_max {
            Some(limit) => limit.min(model_config.max_position),
            None => model_config.max_position,
        };
        let block_size = config.kv_block_size_tokens;
        let kv_dtype = config.kv_cache_dtype.resolve(model.dtype(), &device);
        let kv_cache_memory_bytes = match config.gpu_memory_utilization {
            Some(fraction) if device.is_cuda() => {
                gpu_kv_cache_bytes(&*model, &device, fraction, block_size, kv_dtype)?
            }
            _ => config.kv_cache_memory_bytes,
        };
        let layout = kv_layout(
            &model_config,
            &KvBudget {
                bytes: kv_cache_memory_bytes,
                block_size,
                dtype: kv_dtype,
                seqs_max: config.seqs_running_max,
                batch_tokens_max: config.batch_tokens_max,
                model_len_max,
                hybrid: config.hybrid_kv_cache,
            },
        )
        .map_err(EngineError::Config)?;
        let num_blocks = layout.num_blocks;
        let to_u32 = |name: &str, value: usize| {
            u32::try_from(value)
                .map_err(|_| EngineError::Config(format!("{name} ({value}) is too large")))
        };
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: to_u32("seqs_running_max", config.seqs_running_max)?,
            max_num_batched_tokens: to_u32("batch_tokens_max", config.batch_tokens_max)?,
            block_size: to_u32("kv_block_size_tokens", block_size)?,
            num_blocks: to_u32("KV blocks", num_blocks)?,
            policy: Policy::Priority,
            enable_prefix_caching: config.enable_prefix_caching,
            window: layout.window,
        })
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let kv = PagedKvCache::with_layer_blocks(
            &layout.layer_blocks,
            block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            kv_dtype,
            &device,
        )
        .map_err(|e| EngineError::Load(format!("allocating the KV cache: {e}")))?;
        tracing::info!(
            model = %config.model,
            kv_cache_memory_bytes,
            num_blocks,
            block_size,
            kv_cache_tokens = num_blocks * block_size,
            window = ?layout.window,
            model_len_max,
            kv_dtype = ?kv_dtype,
            "engine loaded"
        );

        let mut eos_token_ids = text.eos_token_ids();
        for id in &model_config.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let name = config.served_model_name.clone().unwrap_or_else(|| {
            std::path::Path::new(&config.model).file_stem().map_or_else(
                || config.model.clone(),
                |s| s.to_string_lossy().into_owned(),
            )
        });
        shared.metrics.set_info(
            &crate::metrics::CacheConfigLabels {
                block_size,
                num_gpu_blocks: num_blocks,
                cache_dtype: match kv_dtype {
                    DType::F16 => "float16",
                    DType::BF16 => "bfloat16",
                    _ => "float32",
                }
                .to_owned(),
                enable_prefix_caching: config.enable_prefix_caching,
            },
            &name,
        );
        let greedy_on_device = config.greedy_on_device.unwrap_or(true);
        Ok(Self {
            model,
            kv,
            scheduler,
            device,
            block_size,
            info: ModelInfo {
                name,
                model_len_max,
                vocab_size,
                eos_token_ids,
            },
            text,
            shared,
            requests: HashMap::new(),
            seq_owner: HashMap::new(),
            next_seq_id: 0,
            seed_rng: ChaCha12Rng::seed_from_u64(config.seed),
            shutdown_deadline: None,
            commands_closed: false,
            stats_exported: SchedulerStats::default(),
            scratch: SamplerScratch::default(),
            greedy_on_device,
            rows_on_device: Vec::new(),
            device_tokens: Vec::new(),
            logits_host: Vec::new(),
            step_times: StepTimes::default(),
            block_tables_host: Vec::new(),
            window_tables_host: Vec::new(),
            batch_builder: BatchBuilder::default(),
            step_outputs: Vec::new(),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::FaultCounter::new(config.fault),
        })
    }

    /// Real forwards at the shapes the loop will run, before the engine says ready, so the first
    /// requests do not pay for lazy initialisation (thread pools and their stacks, kernel
    /// compilation on a GPU, scratch buffers, allocator growth, first touches of cache pages):
    /// a prefill chunk (up to `batch_tokens_max`, at most 256 tokens) and a decode step of up
    /// to 16 sequences, each followed by both ways of bringing logits to the host. They write
    /// blocks of the cache that hold no sequence yet (every block is free before the loop
    /// starts) and allocate nothing in the scheduler, so nothing is left to free. Logs how long
    /// it took.
    fn warm_up(&mut self) -> Result<(), EngineError> {
        assert_eq!(self.scheduler.block_manager().num_used(), 0);
        let started = Instant::now();
        let stats = self.scheduler.stats();
        // Blocks every pool has (the window pool may be the smaller).
        let blocks = match stats.window_blocks_total {
            0 => stats.blocks_total,
            window => window.min(stats.blocks_total),
        } as usize;
        let bs = self.block_size;
        let vocab = self.info.vocab_size;
        let prefill = WARMUP_PREFILL_TOKENS
            .min(self.scheduler.config().max_num_batched_tokens as usize)
            .min(blocks * bs)
            .min(self.info.model_len_max)
            .max(1);
        let decode = WARMUP_DECODE_SEQS
            .min(self.scheduler.config().max_num_seqs as usize)
            .min(blocks)
            .max(1);
        let prefill_ids: Vec<u32> = (0..prefill).map(|i| (i % vocab) as u32).collect();
        let prefill_table: Vec<u32> = (0..prefill.div_ceil(bs) as u32).collect();
        let decode_tables: Vec<[u32; 1]> = (0..decode as u32).map(|b| [b]).collect();
        let decode_ids: Vec<[u32; 1]> = (0..decode).map(|i| [(i % vocab) as u32]).collect();
        let windowed = stats.window_blocks_total > 0;
        fn chunk<'a>(ids: &'a [u32], table: &'a [u32], windowed: bool) -> SeqChunk<'a> {
            SeqChunk {
                token_ids: ids,
                tokens_cached: 0,
                block_table: table,
                // Same ids in the window pool: both pools are empty.
                window_block_table: windowed.then_some(table),
                sample: true,
            }
        }
        let steps: [Vec<SeqChunk<'_>>; 2] = [
            vec![chunk(&prefill_ids, &prefill_table, windowed)],
            decode_ids
                .iter()
                .zip(&decode_tables)
                .map(|(ids, table)| chunk(ids, table, windowed))
                .collect(),
        ];
        let warm = |e: &dyn std::fmt::Display| EngineError::Warmup(e.to_string());
        for seqs in &steps {
            let inputs = BatchInputs::from_seqs(seqs, bs, &self.device).map_err(|e| warm(&e))?;
            let logits = self
                .model
                .forward(&inputs, &mut self.kv)
                .map_err(|e| warm(&e))?;
            let dims = logits.dims().to_vec();
            if dims != [seqs.len(), vocab] {
                return Err(EngineError::Warmup(format!(
                    "the model returned logits of shape {dims:?}, expected [{}, {vocab}]",
                    seqs.len()
                )));
            }
            // Both ways to the host, so the first request compiles no kernel.
            if self.greedy_on_device {
                logits_to_host(
                    &logits,
                    &vec![true; seqs.len()],
                    &mut self.device_tokens,
                    &mut self.logits_host,
                )
                .map_err(|e| warm(&e))?;
            }
            copy_logits_to_host(&logits, &mut self.logits_host).map_err(|e| warm(&e))?;
        }
        tracing::info!(
            prefill_tokens = prefill,
            decode_seqs = decode,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine warmed up"
        );
        Ok(())
    }

    /// The step loop; returns when shut down (or every handle is gone) and nothing is left,
    /// or when a step fails: then every request ends with the error and the engine is dead.
    fn run(&mut self, commands: &Receiver<EngineCommand>) {
        // The pools' sizes are known before any step.
        self.export_stats();
        loop {
            self.publish_progress();
            if !self.scheduler.has_unfinished() {
                if self.shutdown_deadline.is_some() || self.commands_closed {
                    break;
                }
                // Idle: block until a command arrives. No step is owed meanwhile, so the
                // heartbeat's age says nothing.
                self.shared.idle.store(true, Ordering::Release);
                let received = commands.recv();
                self.shared.beat();
                self.shared.idle.store(false, Ordering::Release);
                match received {
                    Ok(command) => self.handle_command(command),
                    Err(_) => self.commands_closed = true,
                }
            }
            self.drain_commands(commands);
            self.drop_closed_requests();
            if let Some(deadline) = self.shutdown_deadline {
                if Instant::now() >= deadline {
                    self.abort_all();
                    break;
                }
            }
            if self.scheduler.has_unfinished() {
                // A panic inside a step leaves its state half-updated: the engine cannot go
                // on, but every client must hear why rather than wait on a dead thread.
                let stepped =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()))
                        .unwrap_or_else(|payload| {
                            Err(format!("the engine panicked: {}", panic_message(&*payload)))
                        });
                if let Err(fault) = stepped {
                    self.die(fault, commands);
                    return;
                }
            }
            self.export_stats();
        }
        self.abort_all();
        self.export_stats();
        self.publish_progress();
    }

    /// The heartbeat and the count of requests held, for `EngineHandle::health`.
    fn publish_progress(&self) {
        self.shared
            .requests_held
            .store(self.requests.len(), Ordering::Release);
        self.shared.beat();
    }

    /// The engine failed: refuse new work, end every request it holds or has queued with the
    /// error, and free their blocks.
    fn die(&mut self, fault: String, commands: &Receiver<EngineCommand>) {
        tracing::error!(%fault, "the engine failed; every request ends with an error");
        self.shared.fail(fault.clone());
        let reason = FinishReason::Error(fault);
        // Events first: they need nothing of the scheduler, whose state a panic may have left
        // half-updated.
        for state in self.requests.values_mut() {
            state.uncount_waiting(&self.shared);
            finish_all(state, &reason, &self.shared);
        }
        while let Ok(command) = commands.try_recv() {
            if let EngineCommand::Add(admitted) = command {
                self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
                for index in 0..admitted.request.n.get() {
                    let _ = admitted.events.send(GenerateEvent::Finished {
                        index,
                        reason: reason.clone(),
                        usage: Usage {
                            prompt_tokens: u32::try_from(admitted.request.prompt_token_ids.len())
                                .unwrap_or(u32::MAX),
                            completion_tokens: 0,
                            cached_prompt_tokens: 0,
                        },
                        timings: Timings::default(),
                    });
                    self.shared.metrics.count_finished(&reason);
                }
            }
        }
        let freed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ids: Vec<RequestId> = self.requests.keys().copied().collect();
            for id in ids {
                self.abort_request(id, false);
            }
        }));
        if freed.is_err() {
            tracing::error!("freeing the failed engine's sequences panicked");
        }
        self.publish_progress();
    }

    fn drain_commands(&mut self, commands: &Receiver<EngineCommand>) {
        loop {
            match commands.try_recv() {
                Ok(command) => self.handle_command(command),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.commands_closed = true;
                    break;
                }
            }
        }
        let overflow = match self.shared.aborts_overflow.lock() {
            Ok(mut guard) => std::mem::take(&mut *guard),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        for id in overflow {
            self.abort_request(id, true);
        }
    }

    fn handle_command(&mut self, command: EngineCommand) {
        match command {
            EngineCommand::Add(admitted) => self.add_request(*admitted),
            EngineCommand::Abort(id) => self.abort_request(id, true),
            EngineCommand::Shutdown { deadline } => {
                // The earliest deadline wins if shutdown is asked for twice.
                self.shutdown_deadline = Some(match self.shutdown_deadline {
                    Some(earlier) => earlier.min(deadline),
                    None => deadline,
                });
            }
        }
    }

    fn add_request(&mut self, admitted: AdmittedRequest) {
        let AdmittedRequest {
            id,
            request,
            events,
            constraint,
        } = admitted;
        let prompt_tokens = request.prompt_token_ids.len();
        // `submit` checked prompt + max(max_tokens, 1) <= model_len_max.
        let room = self.info.model_len_max.saturating_sub(prompt_tokens).max(1);
        let tokens_max = request
            .sampling
            .max_tokens
            .map_or(room, |m| (m.get() as usize).min(room));
        let tokens_max = u32::try_from(tokens_max).unwrap_or(u32::MAX);
        let n = request.n.get();
        let seed = request
            .sampling
            .seed
            .unwrap_or_else(|| self.seed_rng.random::<u64>());
        let seq_ids: Vec<SeqId> = (0..n)
            .map(|_| {
                let seq_id = SeqId(self.next_seq_id);
                self.next_seq_id += 1;
                seq_id
            })
            .collect();
        let choices: Vec<Choice> = seq_ids
            .iter()
            .zip(0u32..)
            .map(|(&seq_id, index)| Choice {
                index,
                seq_id,
                sampler: ChoiceSampler::new(
                    request.sampling.clone(),
                    seed.wrapping_add(u64::from(index)),
                    &request.prompt_token_ids,
                ),
                constraint: constraint.clone(),
                decoder: IncrementalDecoder::new(
                    Arc::clone(&self.text.tokenizer),
                    &request.prompt_token_ids,
                    true,
                ),
                stop: StopMatcher::new(&request.sampling.stop),
                tokens_max,
                tokens_generated: 0,
                cached_prompt_tokens: 0,
                first_scheduled: None,
                first_token: None,
                last_token: None,
                finished: false,
            })
            .collect();
        let mut state = RequestState {
            events,
            arrival: request.arrival,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            stop_token_ids: request.sampling.stop_token_ids.clone(),
            ignore_eos: request.sampling.ignore_eos,
            counted_waiting: true,
            choices,
            choices_unfinished: n,
        };
        if self.shutdown_deadline.is_some() {
            // Accepted just before shutdown began; it would never be scheduled in time.
            state.uncount_waiting(&self.shared);
            finish_all(&mut state, &FinishReason::Abort, &self.shared);
            return;
        }
        match self.scheduler.add_group(
            &seq_ids,
            request.prompt_token_ids,
            tokens_max,
            request.priority,
        ) {
            Ok(()) => {
                self.shared
                    .metrics
                    .prompt_tokens_total
                    .inc_by(u64::from(state.prompt_tokens));
                for (index, seq_id) in seq_ids.into_iter().enumerate() {
                    self.seq_owner.insert(seq_id, (id, index));
                }
                self.requests.insert(id, state);
            }
            Err(error) => {
                state.uncount_waiting(&self.shared);
                finish_all(
                    &mut state,
                    &FinishReason::Error(error.to_string()),
                    &self.shared,
                );
            }
        }
    }

    /// Aborts every unfinished choice of request `id` and frees its blocks now. With `notify`
    /// each choice gets a `Finished { reason: Abort }` event.
    fn abort_request(&mut self, id: RequestId, notify: bool) {
        let Some(mut state) = self.requests.remove(&id) else {
            return;
        };
        for choice in &state.choices {
            self.seq_owner.remove(&choice.seq_id);
            if !choice.finished {
                self.scheduler.abort(choice.seq_id);
            }
        }
        state.uncount_waiting(&self.shared);
        if notify {
            finish_all(&mut state, &FinishReason::Abort, &self.shared);
        } else {
            // Nobody is listening: count the aborted choices without sending events.
            for _ in state.choices.iter().filter(|c| !c.finished) {
                self.shared.metrics.count_finished(&FinishReason::Abort);
            }
        }
    }

    fn abort_all(&mut self) {
        let ids: Vec<RequestId> = self.requests.keys().copied().collect();
        for id in ids {
            self.abort_request(id, true);
        }
    }

    /// Requests whose receiver is gone (client disconnected) are aborted without events.
    fn drop_closed_requests(&mut self) {
        let closed: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, state)| state.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in closed {
            self.abort_request(id, false);
        }
    }

    /// Runs one step: schedule, forward, sample, emit, update. An error is a failed forward
    /// pass: the engine cannot trust its device or cache any more (vLLM's EngineDeadError).
    fn step(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let batch = self.scheduler.schedule();
        let now = Instant::now();
        for (seq_id, error) in &batch.failed {
            self.finish_seq(*seq_id, FinishReason::Error(error.to_string()));
        }
        self.mark_scheduled(&batch, now);
        if batch.is_empty() {
            if let Err(error) = self.scheduler.update_after_step(&[]) {
                tracing::error!(%error, "scheduler rejected an empty step");
            }
            return Ok(());
        }
        self.run_model(&batch)
            .map_err(|message| format!("a forward pass failed: {message}"))?;
        let mut outputs = std::mem::take(&mut self.step_outputs);
        outputs.clear();
        let sampling = Instant::now();
        self.sample_batch(&batch, &mut outputs);
        self.step_times.schedule = now - start;
        self.step_times.sample = sampling.elapsed();
        if let Err(error) = self.scheduler.update_after_step(&outputs) {
            // A bug in this loop: the outputs do not match the batch. Fail the batch's
            // sequences rather than leave the scheduler with a step in flight.
            tracing::error!(%error, "scheduler rejected the step outputs");
            for output in outputs.iter_mut() {
                output.new_token = None;
                output.finished = true;
            }
            let _ = self.scheduler.update_after_step(&outputs);
            for output in &outputs {
                self.finish_seq(output.seq_id, FinishReason::Error(error.to_string()));
            }
        }
        self.step_outputs = outputs;
        let t = &self.step_times;
        tracing::trace!(
            target: STEP_TRACE,
            seqs = batch.seqs.len(),
            tokens = batch.seqs.iter().map(|s| s.positions.len()).sum::<usize>(),
            schedule_us = t.schedule.as_micros() as u64,
            inputs_us = t.inputs.as_micros() as u64,
            forward_us = t.forward.as_micros() as u64,
            to_host_us = t.to_host.as_micros() as u64,
            sample_us = t.sample.as_micros() as u64,
            step_us = start.elapsed().as_micros() as u64,
            "step"
        );
        Ok(())
    }

    /// First-schedule bookkeeping: queue time, cached prompt tokens, the waiting count.
    fn mark_scheduled(&mut self, batch: &ScheduledBatch, now: Instant) {
        for seq in &batch.seqs {
            let Some(&(request_id, index)) = self.seq_owner.get(&seq.seq_id) else {
                continue;
            };
            let Some(state) = self.requests.get_mut(&request_id) else {
                continue;
            };
            state.uncount_waiting(&self.shared);
            let choice = &mut state.choices[index];
            if choice.first_scheduled.is_none() {
                choice.first_scheduled = Some(now);
                choice.cached_prompt_tokens = seq.num_cached_tokens.min(state.prompt_tokens);
                self.shared
                    .metrics
                    .request_queue_time_seconds
                    .observe(now.saturating_duration_since(state.arrival).as_secs_f64());
            }
        }
    }

    /// Builds the step's inputs, runs the forward pass and brings the sampled rows to the
    /// host: `device_tokens` for rows the device reduced, `logits_host` for the others.
    fn run_model(&mut self, batch: &ScheduledBatch) -> Result<(), String> {
        let start = Instant::now();
        // Block tables as u32, one after another; chunks borrow slices of these buffers. A
        // released window block keeps its id (`u32::MAX`), which no kernel reads.
        self.block_tables_host.clear();
        self.window_tables_host.clear();
        let mut table_ranges = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let start = self.block_tables_host.len();
            self.block_tables_host
                .extend(batch.block_table(seq).iter().map(|block| block.0));
            if let Some(table) = batch.window_block_table(seq) {
                self.window_tables_host
                    .extend(table.iter().map(|block| block.0));
            }
            table_ranges.push(start..self.block_tables_host.len());
        }
        let windowed = !self.window_tables_host.is_empty();
        let chunks: Vec<SeqChunk<'_>> = batch
            .seqs
            .iter()
            .zip(&table_ranges)
            .map(|(seq, range)| SeqChunk {
                token_ids: batch.input_ids(seq),
                tokens_cached: seq.positions.start as usize,
                block_table: &self.block_tables_host[range.clone()],
                window_block_table: windowed.then(|| &self.window_tables_host[range.clone()]),
                sample: seq.sample,
            })
            .collect();
        let inputs = self
            .batch_builder
            .build(&chunks, self.block_size, &self.device)
            .map_err(|e| e.to_string())?;
        let num_sampled = inputs.num_sampled();
        #[cfg(feature = "fault-injection")]
        self.faults.before_forward()?;
        let built = Instant::now();
        self.step_times = StepTimes {
            inputs: built - start,
            ..StepTimes::default()
        };
        if num_sampled == 0 {
            // Only non-final prefill chunks: their KV still has to be written.
            self.model
                .forward(&inputs, &mut self.kv)
                .map_err(|e| e.to_string())?;
            self.device_tokens.clear();
            self.logits_host.clear();
            return Ok(());
        }
        let logits = self
            .model
            .forward(&inputs, &mut self.kv)
            .map_err(|e| e.to_string())?;
        let forwarded = Instant::now();
        self.step_times.forward = forwarded - built;
        let dims = logits.dims();
        if dims != [num_sampled, self.info.vocab_size] {
            return Err(format!(
                "the model returned logits of shape {dims:?}, expected [{num_sampled}, {}]",
                self.info.vocab_size
            ));
        }
        self.rows_on_device.clear();
        if self.greedy_on_device {
            for seq in batch.seqs.iter().filter(|s| s.sample) {
                let plain = match self.seq_owner.get(&seq.seq_id) {
                    Some((request_id, index)) => self
                        .requests
                        .get(request_id)
                        .and_then(|state| state.choices.get(*index))
                        .is_none_or(|choice| {
                            choice.constraint.is_none() && choice.sampler.is_plain_greedy()
                        }),
                    // Aborted after scheduling: its output is dropped, any token will do.
                    None => true,
                };
                self.rows_on_device.push(plain);
            }
        }
        let copied = logits_to_host(
            &logits,
            &self.rows_on_device,
            &mut self.device_tokens,
            &mut self.logits_host,
        )
        .map_err(|e| e.to_string());
        self.step_times.to_host = forwarded.elapsed();
        copied
    }

    /// Samples every sampled sequence of the batch, emits its events and fills `outputs`.
    fn sample_batch(&mut self, batch: &ScheduledBatch, outputs: &mut Vec<StepOutput>) {
        let vocab_size = self.info.vocab_size;
        let mut masks = self.constraint_masks(batch);
        // Sampled rows follow the sampled sequences in batch order; host logit rows follow the
        // rows the device did not reduce, in the same order.
        let mut host_row = 0;
        for (row, seq) in batch.seqs.iter().filter(|s| s.sample).enumerate() {
            let pick = match self.device_tokens.get(row).copied().flatten() {
                Some(token) => Pick::Token(token),
                None => {
                    host_row += 1;
                    Pick::Logits(
                        &mut self.logits_host[(host_row - 1) * vocab_size..host_row * vocab_size],
                    )
                }
            };
            let Some(&(request_id, index)) = self.seq_owner.get(&seq.seq_id) else {
                // Aborted after scheduling: the scheduler ignores outputs of unknown sequences.
                continue;
            };
            let Some(state) = self.requests.get_mut(&request_id) else {
                continue;
            };
            let now = Instant::now();
            let decision = step_choice(
                state,
                index,
                pick,
                masks.remove(&seq.seq_id),
                &mut self.scratch,
                &self.info.eos_token_ids,
                now,
                &self.shared,
            );
            outputs.push(StepOutput {
                seq_id: seq.seq_id,
                new_token: Some(decision.token),
                finished: decision.finished.is_some(),
            });
            if let Some(reason) = decision.finished {
                finish_choice(state, index, &reason, &self.shared);
                self.seq_owner.remove(&seq.seq_id);
                if state.choices_unfinished == 0 {
                    self.requests.remove(&request_id);
                }
            }
        }
    }

    /// The token masks of this step's constrained rows, computed in parallel (llguidance
    /// takes tenths of a millisecond a row, which one thread would add up over a batch).
    fn constraint_masks(
        &mut self,
        batch: &ScheduledBatch,
    ) -> HashMap<SeqId, Result<TokenMask, String>> {
        let any_constrained = self
            .requests
            .values()
            .any(|state| state.choices.iter().any(|c| c.constraint.is_some()));
        if !any_constrained {
            return HashMap::new();
        }
        let sampled: HashSet<SeqId> = batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.seq_id)
            .collect();
        // Every unfinished constrained choice sampled this step, each borrowed on its own.
        let constrained: Vec<(SeqId, &mut ChoiceConstraint)> = self
            .requests
            .values_mut()
            .flat_map(|state| state.choices.iter_mut())
            .filter(|choice| !choice.finished && sampled.contains(&choice.seq_id))
            .filter_map(|choice| Some((choice.seq_id, choice.constraint.as_mut()?)))
            .collect();
        if constrained.len() < 2 {
            // One row: computed where it is sampled, without waking the pool.
            return HashMap::new();
        }
        constrained
            .into_par_iter()
            .map(|(seq_id, constraint)| (seq_id, constraint.compute_mask()))
            .collect()
    }

    /// Ends one choice (its sequence already left the scheduler) with `reason`.
    fn finish_seq(&mut self, seq_id: SeqId, reason: FinishReason) {
        let Some((request_id, index)) = self.seq_owner.remove(&seq_id) else {
            return;
        };
        let Some(state) = self.requests.get_mut(&request_id) else {
            return;
        };
        state.uncount_waiting(&self.shared);
        finish_choice(state, index, &reason, &self.shared);
        if state.choices_unfinished == 0 {
            self.requests.remove(&request_id);
        }
    }

    /// Publishes the scheduler's counters as metrics.
    fn export_stats(&mut self) {
        let stats = self.scheduler.stats();
        let metrics = &self.shared.metrics;
        metrics
            .num_requests_running
            .set(i64::from(stats.num_running));
        metrics
            .num_requests_waiting
            .set(i64::from(stats.num_waiting));
        if stats.blocks_total > 0 {
            metrics
                .kv_cache_usage_perc
                .set(f64::from(stats.blocks_used) / f64::from(stats.blocks_total));
        }
        metrics
            .kv_window_blocks_used
            .set(i64::from(stats.window_blocks_used));
        metrics
            .kv_window_blocks_total
            .set(i64::from(stats.window_blocks_total));
        let last = self.stats_exported;
        metrics.prefix_cache_queries_total.inc_by(
            stats
                .prefix_cache_queries_tokens
                .saturating_sub(last.prefix_cache_queries_tokens),
        );
        metrics.prefix_cache_hits_total.inc_by(
            stats
                .prefix_cache_hits_tokens
                .saturating_sub(last.prefix_cache_hits_tokens),
        );
        metrics.num_preemptions_total.inc_by(
            stats
                .preemptions_total
                .saturating_sub(last.preemptions_total),
        );
        self.stats_exported = stats;
    }
}

/// The tracing target of the per-step timings (`RUST_LOG=candela_engine::step=trace`).
const STEP_TRACE: &str = "candela_engine::step";

/// Where one step spent its time (what is left of `step_us` is the scheduler's update and
/// finishing requests). On a GPU the forward only enqueues kernels
/// (the host's launch cost) and the copy to the host waits for them, so a `forward` close to
/// the whole step means the step is bound by the host, a large `to_host` by the GPU.
#[derive(Debug, Default, Clone, Copy)]
struct StepTimes {
    /// `Scheduler::schedule` and the first-schedule bookkeeping.
    schedule: std::time::Duration,
    /// Building and uploading the step's inputs.
    inputs: std::time::Duration,
    /// `Model::forward`.
    forward: std::time::Duration,
    /// The argmax and/or logits copy (the first synchronization with the device).
    to_host: std::time::Duration,
    /// Sampling, detokenizing, stop checks and events of every sampled row.
    sample: std::time::Duration,
}

/// How one choice's token is chosen this step.
enum Pick<'a> {
    /// Sample from this raw logits row (overwritten with the processed logits).
    Logits(&'a mut [f32]),
    /// The device already took the argmax of a plain greedy row.
    Token(TokenId),
}

/// The outcome of sampling one choice in one step.
struct ChoiceStep {
    token: TokenId,
    finished: Option<FinishReason>,
}

/// Samples, detokenizes and checks the stop conditions of one choice, and sends its `Delta`.
#[allow(clippy::too_many_arguments)]
fn step_choice(
    state: &mut RequestState,
    index: usize,
    pick: Pick<'_>,
    mask: Option<Result<TokenMask, String>>,
    scratch: &mut SamplerScratch,
    eos_token_ids: &[TokenId],
    now: Instant,
    shared: &SharedState,
) -> ChoiceStep {
    let choice = &mut state.choices[index];
    let mut constraint_error = None;
    let (token, logprob) = match pick {
        Pick::Logits(logits) => match choice.constraint.as_mut() {
            None => choice.sampler.sample(logits, scratch),
            Some(constraint) => match mask.unwrap_or_else(|| constraint.compute_mask()) {
                Ok(mask) => choice
                    .sampler
                    .sample_masked(logits, scratch, |row| mask.apply(row)),
                Err(error) => {
                    constraint_error = Some(error);
                    choice.sampler.sample(logits, scratch)
                }
            },
        },
        Pick::Token(token) => (token, None),
    };
    choice.sampler.record_output(token);
    choice.tokens_generated += 1;
    let metrics = &shared.metrics;
    metrics.generation_tokens_total.inc();
    match choice.last_token {
        None => {
            choice.first_token = Some(now);
            metrics
                .time_to_first_token_seconds
                .observe(now.saturating_duration_since(state.arrival).as_secs_f64());
        }
        Some(last) => metrics
            .inter_token_latency_seconds
            .observe(now.saturating_duration_since(last).as_secs_f64()),
    }
    choice.last_token = Some(now);

    // Token stops first: their text is never emitted (as vLLM without
    // `include_stop_str_in_output`).
    let mut finished = if !state.ignore_eos && eos_token_ids.contains(&token) {
        Some(FinishReason::Stop(StopCause::Eos(token)))
    } else if state.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop(StopCause::StopToken(token)))
    } else {
        None
    };
    // A structured output ends where its constraint allows nothing more (an EOS token the
    // mask allowed included, under `ignore_eos` too); the token's text is still emitted.
    let mut constraint_complete = false;
    if let Some(error) = constraint_error {
        finished = Some(FinishReason::Error(format!("structured output: {error}")));
    } else if let (None, Some(constraint)) = (&finished, choice.constraint.as_mut()) {
        match constraint.advance(token, eos_token_ids.contains(&token)) {
            Ok(Advance::Continue) => {}
            Ok(Advance::Complete) => constraint_complete = true,
            Err(error) => {
                finished = Some(FinishReason::Error(format!("structured output: {error}")));
            }
        }
    }
    let mut text = String::new();
    if finished.is_none() {
        match choice.decoder.push(token) {
            Ok(piece) => match choice.stop.push(&piece) {
                StopOutcome::Continue(released) => text = released,
                StopOutcome::Stopped {
                    text: released,
                    stop,
                } => {
                    text = released;
                    finished = Some(FinishReason::Stop(StopCause::StopString(stop)));
                }
            },
            Err(error) => finished = Some(FinishReason::Error(format!("detokenizing: {error}"))),
        }
    }
    if finished.is_none() && constraint_complete {
        finished = Some(FinishReason::Stop(StopCause::Constraint));
    }
    if finished.is_none() && choice.tokens_generated >= choice.tokens_max {
        finished = Some(FinishReason::Length);
    }
    if matches!(
        finished,
        Some(
            FinishReason::Length
                | FinishReason::Stop(
                    StopCause::Eos(_) | StopCause::StopToken(_) | StopCause::Constraint
                )
        )
    ) {
        // Release what the decoder and the stop matcher held back; a stop string may still
        // complete inside the decoder's tail.
        let tail = choice.decoder.flush().unwrap_or_default();
        match choice.stop.push(&tail) {
            StopOutcome::Continue(released) => {
                text.push_str(&released);
                text.push_str(&choice.stop.flush());
            }
            StopOutcome::Stopped {
                text: released,
                stop,
            } => {
                text.push_str(&released);
                finished = Some(FinishReason::Stop(StopCause::StopString(stop)));
            }
        }
    }
    let logprobs: Vec<TokenLogprob> = logprob.into_iter().collect();
    // A send fails only when the receiver is gone; the request is dropped next step.
    let _ = state.events.send(GenerateEvent::Delta {
        index: choice.index,
        token_ids: vec![token],
        text,
        logprobs,
    });
    ChoiceStep { token, finished }
}

/// Sends `Finished` for one choice and counts it.
fn finish_choice(
    state: &mut RequestState,
    index: usize,
    reason: &FinishReason,
    shared: &SharedState,
) {
    let now = Instant::now();
    let arrival = state.arrival;
    let prompt_tokens = state.prompt_tokens;
    let choice = &mut state.choices[index];
    if choice.finished {
        return;
    }
    choice.finished = true;
    state.choices_unfinished -= 1;
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    let first_token = choice.first_token;
    let timings = Timings {
        queue_ms: choice.first_scheduled.map_or(0.0, |t| ms(arrival, t)),
        ttft_ms: first_token.map_or(0.0, |t| ms(arrival, t)),
        prompt_tokens_per_s: match (choice.first_scheduled, first_token) {
            (Some(scheduled), Some(first)) if first > scheduled => {
                f64::from(prompt_tokens) / first.duration_since(scheduled).as_secs_f64()
            }
            _ => 0.0,
        },
        generation_tokens_per_s: match (first_token, choice.last_token) {
            (Some(first), Some(last)) if last > first && choice.tokens_generated > 1 => {
                f64::from(choice.tokens_generated - 1) / last.duration_since(first).as_secs_f64()
            }
            _ => 0.0,
        },
        total_ms: ms(arrival, now),
    };
    let usage = Usage {
        prompt_tokens,
        completion_tokens: choice.tokens_generated,
        cached_prompt_tokens: choice.cached_prompt_tokens,
    };
    shared.metrics.count_finished(reason);
    shared
        .metrics
        .e2e_request_latency_seconds
        .observe(timings.total_ms / 1e3);
    let _ = state.events.send(GenerateEvent::Finished {
        index: choice.index,
        reason: reason.clone(),
        usage,
        timings,
    });
}

/// Finishes every unfinished choice of a request with `reason`.
fn finish_all(state: &mut RequestState, reason: &FinishReason, shared: &SharedState) {
    for index in 0..state.choices.len() {
        finish_choice(state, index, reason, shared);
    }
}

/// Brings a step's `[rows, vocab]` logits to the host. Rows marked in `on_device` are reduced
/// to their argmax where the logits are (one `u32` per row crosses to the host) and their ids
/// go to `tokens`; the other rows' logits go to `host`, in order, and get `None` in `tokens`.
/// An empty `on_device` means every row goes to `host`.
fn logits_to_host(
    logits: &Tensor,
    on_device: &[bool],
    tokens: &mut Vec<Option<TokenId>>,
    host: &mut Vec<f32>,
) -> candle_core::Result<()> {
    let rows = logits.dim(0)?;
    tokens.clear();
    if !on_device.contains(&true) {
        tokens.resize(rows, None);
        return copy_logits_to_host(logits, host);
    }
    if on_device.len() != rows {
        candle_core::bail!("{} row flags for {rows} logit rows", on_device.len());
    }
    if cpu_rows_to_host(logits, on_device, tokens, host)? {
        return Ok(());
    }
    // On a GPU candle's reduction may pick another of exactly equal maxima than the host
    // sampler's first one (a tie of f32 logits, rare).
    let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    let mut to_host = Vec::new();
    for (row, (&device, &id)) in on_device.iter().zip(&ids).enumerate() {
        if device {
            tokens.push(Some(id));
        } else {
            tokens.push(None);
            to_host.push(
                u32::try_from(row).map_err(|_| candle_core::Error::Msg(format!("row {row}")))?,
            );
        }
    }
    if to_host.is_empty() {
        host.clear();
        return Ok(());
    }
    let index = Tensor::new(to_host.as_slice(), logits.device())?;
    copy_logits_to_host(&logits.index_select(&index, 0)?, host)
}

/// [`logits_to_host`] for f32 logits in CPU memory: rows are read in place, the argmax rows
/// with the sampler's vectorised [`argmax`] (in parallel over rows; candle's reduction is one
/// scalar loop, 2 ms a step at batch 48). `false` when the logits are elsewhere.
fn cpu_rows_to_host(
    logits: &Tensor,
    on_device: &[bool],
    tokens: &mut Vec<Option<TokenId>>,
    host: &mut Vec<f32>,
) -> candle_core::Result<bool> {
    if logits.dtype() != DType::F32 {
        return Ok(false);
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(false);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(false);
    };
    let data = &cpu.as_slice::<f32>()?[start..end];
    let vocab = logits.dim(1)?;
    if vocab == 0 {
        candle_core::bail!("logits of an empty vocabulary");
    }
    let rows: Vec<&[f32]> = data.chunks_exact(vocab).collect();
    // A few rows are not worth waking the pool for (~15 us each).
    let argmaxes: Vec<Option<TokenId>> = if rows.len() >= 4 {
        rows.par_iter()
            .zip(on_device)
            .map(|(row, &device)| device.then(|| argmax(row)))
            .collect()
    } else {
        rows.iter()
            .zip(on_device)
            .map(|(row, &device)| device.then(|| argmax(row)))
            .collect()
    };
    host.clear();
    for ((row, &device), id) in rows.iter().zip(on_device).zip(argmaxes) {
        tokens.push(id);
        if !device {
            host.extend_from_slice(row);
        }
    }
    Ok(true)
}

/// Copies `[rows, vocab]` f32 logits into `host` (resized), reusing its allocation on CPU.
fn copy_logits_to_host(logits: &Tensor, host: &mut Vec<f32>) -> candle_core::Result<()> {
    let logits = if logits.dtype() == DType::F32 {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("logits are not contiguous".into()))?;
            host.clear();
            host.extend_from_slice(&data[start..end]);
        }
        _ => {
            drop(storage);
            *host = logits.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    Ok(())
}

/// Opens CUDA device `ordinal` for the engine (see `candela_kernels::cuda::open_device`).
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        candela_kernels::cuda::open_device(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::new_cuda(ordinal)
    }
}

/// KV-cache bytes on a CUDA device, as vLLM's `--gpu-memory-utilization`: the engine may use
/// `fraction` of the device's total memory, so the cache gets what is free after the weights
/// loaded and one warm-up forward ran (through a one-block cache, dropped after), less the
/// `1 - fraction` of the total left to other processes and to step activations.
fn gpu_kv_cache_bytes(
    model: &dyn Model,
    device: &Device,
    fraction: f64,
    block_size: usize,
    kv_dtype: DType,
) -> Result<u64, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let c = model.config();
        let probe = |e: &dyn std::fmt::Display| EngineError::Warmup(format!("KV sizing: {e}"));
        let mut kv = PagedKvCache::new(
            c.num_layers,
            1,
            block_size,
            c.num_kv_heads,
            c.head_dim,
            kv_dtype,
            device,
        )
        .map_err(|e| probe(&e))?;
        let tokens = WARMUP_TOKENS.min(block_size).min(c.vocab_size);
        let token_ids: Vec<u32> = (0..tokens as u32).collect();
        let chunk = SeqChunk {
            token_ids: &token_ids,
            tokens_cached: 0,
            block_table: &[0],
            window_block_table: None,
            sample: true,
        };
        let inputs = BatchInputs::from_seqs(&[chunk], block_size, device).map_err(|e| probe(&e))?;
        let logits = model.forward(&inputs, &mut kv).map_err(|e| probe(&e))?;
        drop((logits, inputs, kv));
        let (free, total) = candela_kernels::cuda::memory_info(device).map_err(|e| probe(&e))?;
        let reserved = (total as f64 * (1.0 - fraction)) as u64;
        let bytes = (free as u64).saturating_sub(reserved);
        tracing::info!(
            free,
            total,
            fraction,
            kv_cache_memory_bytes = bytes,
            "GPU memory after warm-up"
        );
        Ok(bytes)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, fraction, block_size, kv_dtype);
        Err(EngineError::Config(format!(
            "{device:?}: this build has no CUDA support (build with --features cuda)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_to_host_splits_device_rows_from_host_rows() {
        let logits = Tensor::new(
            &[
                [0.0f32, 3.0, 1.0, 3.0],
                [5.0, 1.0, 2.0, 0.0],
                [-1.0, -2.0, -0.5, -3.0],
            ],
            &Device::Cpu,
        )
        .expect("tensor");
        let (mut tokens, mut host) = (Vec::new(), Vec::new());
        logits_to_host(&logits, &[true, false, true], &mut tokens, &mut host).expect("splits");
        assert_eq!(tokens, [Some(1), None, Some(2)]);
        assert_eq!(host, [5.0, 1.0, 2.0, 0.0]);

        logits_to_host(&logits, &[], &mut tokens, &mut host).expect("copies");
        assert_eq!(tokens, [None, None, None]);
        assert_eq!(host.len(), 12);

        logits_to_host(&logits, &[true; 3], &mut tokens, &mut host).expect("reduces");
        assert_eq!(tokens, [Some(1), Some(0), Some(2)]);
        assert!(host.is_empty());

        assert!(logits_to_host(&logits, &[true, false], &mut tokens, &mut host).is_err());

        // Enough rows for the parallel path; NaN never wins, the first of equal maxima does.
        let rows: Vec<f32> = (0..5 * 300)
            .map(|i| match (i / 300, i % 300) {
                (r, c) if c == 17 + 40 * r => 9.0,
                (r, c) if c == 200 + r => 9.0,
                (_, 3) => f32::NAN,
                (_, c) => (c as f32 * 0.1).sin(),
            })
            .collect();
        let logits = Tensor::from_vec(rows.clone(), (5, 300), &Device::Cpu).expect("tensor");
        let flags = [true, true, false, true, true];
        logits_to_host(&logits, &flags, &mut tokens, &mut host).expect("splits");
        assert_eq!(tokens, [Some(17), Some(57), None, Some(137), Some(177)]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&host),
            bits(&rows[600..900]),
            "the host row, NaN included"
        );
    }
}
