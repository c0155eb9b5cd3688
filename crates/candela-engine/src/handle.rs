//! [`EngineHandle`]: the cheap, cloneable, thread-safe front of an engine. It validates and
//! admits requests, hands them to the engine thread over a bounded channel, and answers the
//! synchronous questions a server needs (tokenizer, chat template, limits, readiness, metrics)
//! without a round trip to that thread.
//!
//! **API Boundary:** this and [`crate::api`] are all a caller sees; the scheduler, the model and
//! the KV cache live on the engine thread only.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::api::{
    EmbedEvent, EmbedRequest, EngineHealth, GenerateEvent, GenerateRequest, InvalidParam,
    OutputConstraint, RequestId, SubmitError, TokenId, ToolCalling, ToolChoice, EMBED_INPUTS_MAX,
};
use crate::config::EngineConfig;
use crate::engine;
use crate::error::EngineError;
use crate::metrics::EngineMetrics;
use crate::structured::{ChoiceConstraint, Structured};
use crate::text::TextTools;
use crate::tools::grammar::tool_grammar;
use crate::tools::CompiledTools;
use crate::ChatMessage;

/// What the engine thread receives.
pub(crate) enum EngineCommand {
    /// A new request, already validated.
    Add(Box<AdmittedRequest>),
    /// A new embedding request, already validated.
    Embed(Box<AdmittedEmbed>),
    /// Abort a request (all its choices or inputs); unknown or finished ids are ignored.
    Abort(RequestId),
    /// Stop accepting, finish what is in flight (aborting what is left at `deadline`), exit.
    Shutdown {
        /// When to give up on in-flight requests.
        deadline: Instant,
    },
}

/// A request that passed `submit`'s checks, with its event channel.
pub(crate) struct AdmittedRequest {
    pub(crate) id: RequestId,
    pub(crate) request: GenerateRequest,
    /// Unbounded, but bounded in practice: the engine sends at most one `Delta` per generated
    /// token and one `Finished` per choice, so at most `n * (max_tokens + 1)` events, and
    /// `max_tokens` is capped by the context length at submit.
    pub(crate) events: UnboundedSender<GenerateEvent>,
    /// The compiled `sampling.constraint`, at the start of the output (each choice clones it).
    pub(crate) constraint: Option<ChoiceConstraint>,
    /// The compiled `sampling.tools`, unless the tool choice is `none`.
    pub(crate) tools: Option<CompiledTools>,
}

/// An embedding request that passed `embed`'s checks, with its event channel.
pub(crate) struct AdmittedEmbed {
    pub(crate) id: RequestId,
    pub(crate) request: EmbedRequest,
    /// Unbounded, but the engine sends exactly one event per input.
    pub(crate) events: UnboundedSender<EmbedEvent>,
}

/// Facts about the loaded model, fixed for the engine's life.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub(crate) name: String,
    pub(crate) model_len_max: usize,
    pub(crate) vocab_size: usize,
    pub(crate) eos_token_ids: Vec<TokenId>,
}

/// State shared between handles and the engine thread.
pub(crate) struct SharedState {
    /// Requests submitted and not yet scheduled for the first time (admission control).
    pub(crate) waiting_requests: AtomicUsize,
    /// Warmed up and accepting.
    pub(crate) ready: AtomicBool,
    /// False once shutdown began (or the engine thread stopped).
    pub(crate) accepting: AtomicBool,
    /// Aborts that did not fit in the full command channel; the engine drains them every step.
    pub(crate) aborts_overflow: Mutex<Vec<RequestId>>,
    /// Why warm-up failed, if it did.
    pub(crate) warmup_error: Mutex<Option<String>>,
    /// Why the engine failed while serving (a forward pass that errored or panicked, or the
    /// thread's death); set once, never cleared: a failed engine serves nothing more.
    pub(crate) fault: OnceLock<String>,
    /// The heartbeat: when the engine thread last made progress (finished a step, took a
    /// command, went idle), in milliseconds since `epoch`.
    pub(crate) heartbeat_ms: AtomicU64,
    /// The engine thread is blocked waiting for a command: no step is owed.
    pub(crate) idle: AtomicBool,
    /// Requests the engine thread holds (waiting in the scheduler or running).
    pub(crate) requests_held: AtomicUsize,
    pub(crate) epoch: Instant,
    pub(crate) metrics: EngineMetrics,
}

impl SharedState {
    /// Milliseconds since `epoch`.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Records progress of the engine thread.
    pub(crate) fn beat(&self) {
        self.heartbeat_ms.store(self.now_ms(), Ordering::Release);
    }

    /// Marks the engine failed (the first reason wins) and refuses new work.
    pub(crate) fn fail(&self, reason: String) {
        if self.fault.set(reason).is_err() {
            tracing::debug!("the engine had already failed");
        }
        self.accepting.store(false, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }
}

struct Inner {
    config: EngineConfig,
    info: ModelInfo,
    text: Arc<TextTools>,
    commands: SyncSender<EngineCommand>,
    shared: Arc<SharedState>,
    next_request_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The vocabulary trie structured outputs compile against, built by the first request
    /// that asks for one (most servers never do).
    structured: OnceLock<Result<Structured, String>>,
}

impl Inner {
    /// The vocabulary structured outputs compile against, built on first use.
    fn structured(&self) -> &Result<Structured, String> {
        self.structured.get_or_init(|| {
            let started = Instant::now();
            let built = Structured::new(
                Arc::clone(&self.text.tokenizer),
                self.info.vocab_size,
                &self.info.eos_token_ids,
            );
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                ok = built.is_ok(),
                "structured outputs: vocabulary trie built"
            );
            built
        })
    }
}

/// A running engine. Clone it freely; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("model", &self.inner.info.name)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl EngineHandle {
    /// Loads the model, tokenizer and chat template, sizes the KV cache from
    /// `config.kv_cache_memory_bytes`, and starts the engine thread. Blocks while loading
    /// (seconds); returns before the warm-up step finishes: see [`Self::is_ready`] and
    /// [`Self::wait_ready`].
    pub fn start(config: EngineConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let metrics = EngineMetrics::new()
            .map_err(|e| EngineError::Config(format!("metrics registry: {e}")))?;
        let shared = Arc::new(SharedState {
            waiting_requests: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
            aborts_overflow: Mutex::new(Vec::new()),
            warmup_error: Mutex::new(None),
            fault: OnceLock::new(),
            heartbeat_ms: AtomicU64::new(0),
            idle: AtomicBool::new(false),
            requests_held: AtomicUsize::new(0),
            epoch: Instant::now(),
            metrics,
        });
        let (commands, receiver) = std::sync::mpsc::sync_channel(config.queue_waiting_max);
        let started = engine::spawn(config.clone(), Arc::clone(&shared), receiver)?;
        let handle = Self {
            inner: Arc::new(Inner {
                config,
                info: started.info,
                text: started.text,
                commands,
                shared,
                next_request_id: AtomicU64::new(0),
                thread: Mutex::new(Some(started.thread)),
                structured: OnceLock::new(),
            }),
        };
        // The vocabulary trie takes ~0.2 s of one core; built here, beside the warm-up, it is
        // ready before the first constrained request, which would otherwise wait for it on the
        // caller's (an async runtime's) thread.
        let inner = Arc::clone(&handle.inner);
        let spawned = std::thread::Builder::new()
            .name("candela-structured".into())
            .spawn(move || {
                let _ = inner.structured();
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no thread to prepare structured outputs; the first request will");
        }
        Ok(handle)
    }

    /// Blocks until the warm-up step is done (or failed, or `timeout` passed).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), EngineError> {
        let started = Instant::now();
        // Polling keeps the shared state two flags; readiness is awaited once per process.
        loop {
            if self.is_ready() {
                return Ok(());
            }
            if let Some(error) = self.warmup_error() {
                return Err(EngineError::Warmup(error));
            }
            if !self.inner.shared.accepting.load(Ordering::Acquire) {
                return Err(EngineError::Stopped(
                    "shut down before becoming ready".into(),
                ));
            }
            if started.elapsed() >= timeout {
                return Err(EngineError::ReadyTimeout {
                    timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn warmup_error(&self) -> Option<String> {
        match self.inner.shared.warmup_error.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Validates and enqueues a request. Never blocks: a full queue is `QueueFull`.
    ///
    /// The returned channel carries `Delta` and `Finished` events for each of the `n` choices;
    /// it is unbounded, but the engine sends at most `n * (max_tokens + 1)` events on it.
    /// Dropping the receiver aborts the request at the next step.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<(RequestId, UnboundedReceiver<GenerateEvent>), SubmitError> {
        self.check_accepting()?;
        self.validate(&request)?;
        let (constraint, tools) = self.compile_constraint(&request)?;
        let (events, receiver) = unbounded_channel();
        let id = self.enqueue(|id| {
            EngineCommand::Add(Box::new(AdmittedRequest {
                id,
                request,
                events,
                constraint,
                tools,
            }))
        })?;
        Ok((id, receiver))
    }

    /// Validates and enqueues an embedding request (each input a prefill-only sequence in the
    /// same batches as generation). Never blocks: a full queue is `QueueFull`; the request
    /// counts as one waiting request, whatever its number of inputs.
    ///
    /// The returned channel carries exactly one [`EmbedEvent`] per input. Dropping the
    /// receiver aborts the request at the next step.
    pub fn embed(
        &self,
        request: EmbedRequest,
    ) -> Result<(RequestId, UnboundedReceiver<EmbedEvent>), SubmitError> {
        self.check_accepting()?;
        self.validate_embed(&request)?;
        let (events, receiver) = unbounded_channel();
        let id = self.enqueue(|id| {
            EngineCommand::Embed(Box::new(AdmittedEmbed {
                id,
                request,
                events,
            }))
        })?;
        Ok((id, receiver))
    }

    fn check_accepting(&self) -> Result<(), SubmitError> {
        let shared = &self.inner.shared;
        if let Some(fault) = shared.fault.get() {
            return Err(SubmitError::EngineDead(fault.clone()));
        }
        if !shared.accepting.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        if !shared.ready.load(Ordering::Acquire) {
            return Err(SubmitError::NotReady);
        }
        Ok(())
    }

    /// Takes a waiting slot and sends the command `make` builds for the new request's id.
    fn enqueue(
        &self,
        make: impl FnOnce(RequestId) -> EngineCommand,
    ) -> Result<RequestId, SubmitError> {
        let shared = &self.inner.shared;
        let queue_waiting_max = self.inner.config.queue_waiting_max;
        // Reserve a waiting slot first so concurrent submits cannot overshoot the bound.
        let reserved =
            shared
                .waiting_requests
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                    (waiting < queue_waiting_max).then_some(waiting + 1)
                });
        if reserved.is_err() {
            return Err(SubmitError::QueueFull { queue_waiting_max });
        }
        let id = RequestId(self.inner.next_request_id.fetch_add(1, Ordering::Relaxed));
        match self.inner.commands.try_send(make(id)) {
            Ok(()) => Ok(id),
            Err(error) => {
                shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
                match error {
                    TrySendError::Full(_) => Err(SubmitError::QueueFull { queue_waiting_max }),
                    TrySendError::Disconnected(_) => Err(SubmitError::ShuttingDown),
                }
            }
        }
    }

    fn validate(&self, request: &GenerateRequest) -> Result<(), SubmitError> {
        let info = &self.inner.info;
        let prompt_tokens = request.prompt_token_ids.len();
        if prompt_tokens == 0 {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if let Some(&bad) = request
            .prompt_token_ids
            .iter()
            .find(|&&t| t as usize >= info.vocab_size)
        {
            return Err(SubmitError::Invalid(format!(
                "token id {bad} is outside the vocabulary (size {})",
                info.vocab_size
            )));
        }
        let max_tokens = request.sampling.max_tokens.map_or(0, |m| m.get() as usize);
        // Without max_tokens the prompt must leave room for at least one token.
        if prompt_tokens + max_tokens.max(1) > info.model_len_max {
            return Err(SubmitError::PromptTooLong {
                prompt_tokens,
                max_tokens,
                model_len_max: info.model_len_max,
            });
        }
        request.sampling.validate(info.vocab_size)?;
        let n = request.n.get() as usize;
        if n > self.inner.config.seqs_running_max {
            return Err(SubmitError::Invalid(format!(
                "n ({n}) exceeds the most sequences the engine runs at once ({})",
                self.inner.config.seqs_running_max
            )));
        }
        Ok(())
    }

    /// The one check of an embedding request's inputs; the server makes the same checks first
    /// to name the parameter in its 400s.
    fn validate_embed(&self, request: &EmbedRequest) -> Result<(), SubmitError> {
        let info = &self.inner.info;
        let fail = |message: String| {
            Err(SubmitError::InvalidParam(InvalidParam {
                param: "input",
                message,
            }))
        };
        let count = request.inputs.len();
        if count == 0 || count > EMBED_INPUTS_MAX {
            return fail(format!(
                "give between 1 and {EMBED_INPUTS_MAX} inputs, got {count}"
            ));
        }
        for (index, input) in request.inputs.iter().enumerate() {
            if input.is_empty() {
                return fail(format!("input {index} is empty"));
            }
            if input.len() > info.model_len_max {
                return fail(format!(
                    "input {index} has {} tokens, more than the model's context length of {} \
                     tokens",
                    input.len(),
                    info.model_len_max
                ));
            }
            if let Some(&bad) = input.iter().find(|&&t| t as usize >= info.vocab_size) {
                return fail(format!(
                    "input {index}: token id {bad} is outside the vocabulary (0..{})",
                    info.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Compiles the request's structured-output constraint and its tools' constraints, if
    /// it has them: about a millisecond for a schema of a few properties.
    fn compile_constraint(
        &self,
        request: &GenerateRequest,
    ) -> Result<(Option<ChoiceConstraint>, Option<CompiledTools>), SubmitError> {
        let structured = || {
            self.inner.structured().as_ref().map_err(|e| {
                SubmitError::Invalid(format!(
                    "structured outputs are unavailable for this model: {e}"
                ))
            })
        };
        let calling = request
            .sampling
            .tools
            .as_ref()
            .filter(|t| t.choice != ToolChoice::None);
        let Some(calling) = calling else {
            let Some(constraint) = &request.sampling.constraint else {
                return Ok((None, None));
            };
            let compiled = structured()?
                .compile(constraint)
                .map_err(|e| SubmitError::Invalid(format!("invalid output constraint: {e}")))?;
            return Ok((Some(compiled), None));
        };
        let invalid = |param: &'static str, message: String| {
            SubmitError::InvalidParam(InvalidParam { param, message })
        };
        if request.sampling.constraint.is_some() {
            return Err(invalid(
                "response_format",
                "structured outputs cannot be combined with tools (the tool choice constrains the output)".into(),
            ));
        }
        let format = self.inner.text.tool_format();
        let grammar = tool_grammar(format, calling).map_err(|e| invalid("tools", e))?;
        let structured = structured()?;
        let compile = |constraint: &OutputConstraint| {
            structured
                .compile(constraint)
                .map_err(|e| invalid("tools", format!("the tools' schemas do not compile: {e}")))
        };
        let eager = grammar.eager.as_ref().map(compile).transpose()?;
        let lazy = match &grammar.lazy {
            Some((marker, constraint)) => Some((*marker, compile(constraint)?)),
            None => None,
        };
        Ok((eager, Some(CompiledTools { format, lazy })))
    }

    /// Aborts a request: its choices finish with `FinishReason::Abort` and their KV blocks are
    /// freed at the next step. Unknown or finished ids are ignored. Never blocks.
    pub fn abort(&self, id: RequestId) {
        match self.inner.commands.try_send(EngineCommand::Abort(id)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                let mut overflow = match self.inner.shared.aborts_overflow.lock() {
                    Ok(guard) => guard,
                    Err(poisoned) => poisoned.into_inner(),
                };
                overflow.push(id);
            }
        }
    }

    /// Tokenizes `text`. `add_special_tokens` adds the model's BOS if it has one; special tokens
    /// written in the text are parsed as such.
    pub fn tokenize(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenId>, EngineError> {
        self.inner.text.tokenize(text, add_special_tokens)
    }

    /// Decodes token ids to text, special tokens included.
    pub fn detokenize(&self, ids: &[TokenId]) -> Result<String, EngineError> {
        self.inner.text.detokenize(ids)
    }

    /// The bytes of each token on its own (for logprobs' `bytes`); a byte-level token may
    /// hold an incomplete UTF-8 sequence.
    pub fn token_bytes(&self, ids: &[TokenId]) -> Result<Vec<Vec<u8>>, EngineError> {
        self.inner.text.token_bytes(ids)
    }

    /// Ids that end generation unless `ignore_eos` (EOS, then end-of-turn tokens).
    pub fn eos_token_ids(&self) -> &[TokenId] {
        &self.inner.info.eos_token_ids
    }

    /// Renders the model's chat template over `messages`. A template that raises (for example
    /// on an unsupported role) gives [`EngineError::Template`]: a client error.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::apply_chat_template`] for a request that offers `tools`: the template gets
    /// them in the model's own format, or the generic format's system message.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolCalling>,
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.inner
            .text
            .apply_chat_template(messages, tools, add_generation_prompt)
    }

    /// How the loaded model writes tool calls (from its chat template).
    pub fn tool_format(&self) -> crate::ToolFormat {
        self.inner.text.tool_format()
    }

    /// The served model name.
    pub fn model_name(&self) -> &str {
        &self.inner.info.name
    }

    /// Context length in tokens (prompt plus output).
    pub fn model_len_max(&self) -> usize {
        self.inner.info.model_len_max
    }

    /// Number of token ids; valid ids are `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.inner.info.vocab_size
    }

    /// The configuration the engine was started with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// True once warmed up, until shutdown begins.
    pub fn is_ready(&self) -> bool {
        let shared = &self.inner.shared;
        shared.ready.load(Ordering::Acquire) && shared.accepting.load(Ordering::Acquire)
    }

    /// Whether the engine can serve, for `/health`: starting, healthy, draining, stalled
    /// (work pending and no step finished for `step_stall_max`) or dead.
    pub fn health(&self) -> EngineHealth {
        let shared = &self.inner.shared;
        if let Some(fault) = shared.fault.get() {
            return EngineHealth::Dead(fault.clone());
        }
        if let Some(error) = self.warmup_error() {
            return EngineHealth::Dead(format!("warm-up failed: {error}"));
        }
        if !shared.accepting.load(Ordering::Acquire) {
            return EngineHealth::Draining;
        }
        if !shared.ready.load(Ordering::Acquire) {
            return EngineHealth::Starting;
        }
        let pending = shared.waiting_requests.load(Ordering::Acquire) > 0
            || shared.requests_held.load(Ordering::Acquire) > 0;
        if pending && !shared.idle.load(Ordering::Acquire) {
            let stalled_ms = shared
                .now_ms()
                .saturating_sub(shared.heartbeat_ms.load(Ordering::Acquire));
            if u128::from(stalled_ms) > self.inner.config.step_stall_max.as_millis() {
                return EngineHealth::Stalled { stalled_ms };
            }
        }
        EngineHealth::Healthy
    }

    /// Requests submitted and not finished: waiting to be scheduled, or held by the engine.
    /// Zero exactly when there are none (a request briefly counts in both places on its way
    /// in: this is a drain signal, not a gauge).
    pub fn requests_in_flight(&self) -> usize {
        let shared = &self.inner.shared;
        shared.waiting_requests.load(Ordering::Acquire)
            + shared.requests_held.load(Ordering::Acquire)
    }

    /// The engine's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        self.inner.shared.metrics.render()
    }

    /// Stops accepting requests, lets in-flight ones finish until `deadline` (then aborts
    /// them), and waits for the engine thread to exit. Blocks: call it off async threads.
    /// Calling it again (or from another clone) just waits for the same exit.
    pub fn shutdown(&self, deadline: Instant) {
        self.inner.shared.accepting.store(false, Ordering::Release);
        // A blocking send: the engine drains its channel every step, so this waits at most
        // a step when the queue is full. An error means the thread is already gone.
        let _ = self
            .inner
            .commands
            .send(EngineCommand::Shutdown { deadline });
        let thread = match self.inner.thread.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}
