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
//!
//! Files: this one spawns the thread and runs the loop (commands, admission, aborts, metrics);
//! `load.rs` loads the model, sizes the cache and warms up; `step.rs` is one step (schedule,
//! inputs, forward, logits to the host, sampling); `choice.rs` is per-request and per-choice
//! state and what one choice does in a step (sample, detokenize, stop, emit, finish);
//! `embed.rs` is embedding requests (prefill-only sequences whose hidden states are pooled).

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
use crate::speculative::{propose_ngram, Acceptance, SpeculativeConfig};
use crate::stop::{StopMatcher, StopOutcome};
use crate::structured::{Advance, ChoiceConstraint, TokenMask};
use crate::text::TextTools;
use crate::tools::{ChoiceTools, CompiledTools};
use candela_models::chat_template::ToolFormat;

mod choice;
mod embed;
mod load;
mod speculate;
mod step;

use choice::{finish_all, finish_choice, Choice, RequestState};
use embed::Embeddings;
use step::StepTimes;

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
    /// Embedding requests and their sequences (`embed.rs`).
    embeddings: Embeddings,
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
    /// Speculative decoding (`EngineConfig::speculative`).
    speculative: Option<SpeculativeConfig>,
    /// The drafts being proposed for one sequence.
    drafts: Vec<TokenId>,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::FaultCounter,
}

impl EngineCore {
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
        self.shared.requests_held.store(
            self.requests.len() + self.embeddings.len(),
            Ordering::Release,
        );
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
        self.fail_embeds(&reason);
        while let Ok(command) = commands.try_recv() {
            if let EngineCommand::Embed(admitted) = &command {
                self.shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
                for index in 0..admitted.request.inputs.len() {
                    let _ = admitted.events.send(crate::api::EmbedEvent::Failed {
                        index: index as u32,
                        reason: reason.clone(),
                    });
                }
            }
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
            let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
            ids.extend(self.embed_ids());
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
            EngineCommand::Embed(admitted) => self.add_embed(*admitted),
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
            tools,
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
        // Call ids: random per request (from the OS, not the engine's seeded RNG, so they
        // differ across restarts too), then the choice and the call.
        let call_ids = format!("call_{:016x}", rand::random::<u64>());
        // Mistral's `[TOOL_CALLS]` is a control token: its parser needs to see it.
        let skip_special_tokens = !matches!(
            tools,
            Some(CompiledTools {
                format: ToolFormat::Mistral,
                ..
            })
        );
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
                tools: tools
                    .as_ref()
                    .map(|t| ChoiceTools::new(t, format!("{call_ids}_{index}_"))),
                decoder: IncrementalDecoder::new(
                    Arc::clone(&self.text.tokenizer),
                    &request.prompt_token_ids,
                    skip_special_tokens,
                ),
                stop: StopMatcher::new(&request.sampling.stop),
                tokens_max,
                tokens_generated: 0,
                cached_prompt_tokens: 0,
                first_scheduled: None,
                first_token: None,
                last_token: None,
                finished: false,
                acceptance: Acceptance::default(),
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
        if self.abort_embed(id, notify) {
            return;
        }
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
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.extend(self.embed_ids());
        for id in ids {
            self.abort_request(id, true);
        }
    }

    /// Requests whose receiver is gone (client disconnected) are aborted without events.
    fn drop_closed_requests(&mut self) {
        let mut closed: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, state)| state.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        closed.extend(self.closed_embeds());
        for id in closed {
            self.abort_request(id, false);
        }
    }

    /// Ends one choice (its sequence already left the scheduler) with `reason`.
    fn finish_seq(&mut self, seq_id: SeqId, reason: FinishReason) {
        if self.fail_embed_seq(seq_id, reason.clone()) {
            return;
        }
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
