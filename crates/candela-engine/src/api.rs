//! The engine's public contract: what a caller (the server, the CLI, a batch job) submits and
//! what it gets back. Plain data only; no HTTP, no serde. The server converts OpenAI JSON into
//! these types by hand, so the engine's types never become a wire-compatibility promise.

use std::num::NonZeroU32;
use std::time::Instant;

/// A token id in the model's vocabulary.
pub type TokenId = u32;

/// Engine-assigned id of one submitted request (all of its `n` choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// How the next token is chosen for one request. Defaults follow the OpenAI API
/// (temperature 1, top_p 1, no penalties).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    pub top_p: f32,
    /// Keep only the k most likely tokens; `None` keeps all.
    pub top_k: Option<NonZeroU32>,
    /// Drop tokens whose probability is below `min_p` times the top token's, in [0, 1].
    pub min_p: f32,
    /// Multiplicative penalty (> 0) on logits of tokens in prompt or output; 1 is none.
    pub repetition_penalty: f32,
    /// Subtracted from a logit once per occurrence of the token in the output, in [-2, 2].
    pub frequency_penalty: f32,
    /// Subtracted from a logit once if the token occurs in the output, in [-2, 2].
    pub presence_penalty: f32,
    /// Added to the logits of the given tokens before sampling.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Seed of this request's own RNG; the same seed and request give the same output whatever
    /// else is in the batch. `None` draws a seed from the engine's RNG.
    pub seed: Option<u64>,
    /// Most tokens to generate; `None` means up to the model's context length.
    pub max_tokens: Option<NonZeroU32>,
    /// Stop strings: generation ends when one appears in the output; it is never emitted.
    pub stop: Vec<String>,
    /// Stop token ids, besides the model's EOS tokens.
    pub stop_token_ids: Vec<TokenId>,
    /// Keep generating past EOS (vLLM's extension).
    pub ignore_eos: bool,
    /// `Some(k)`: report the sampled token's log-probability and the top `k` alternatives.
    pub logprobs: Option<u32>,
    /// Keep the output inside this constraint (structured outputs); compiled by `submit`.
    pub constraint: Option<OutputConstraint>,
    /// Tools the model may call; their calls come back as [`ToolCallDelta`]s, not text.
    /// Exclusive with `constraint` (the tool choice makes its own).
    pub tools: Option<ToolCalling>,
}

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// The name the model writes; unique within a request.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// A JSON Schema (as JSON text) its arguments follow; `{}` takes no arguments.
    pub parameters: String,
    /// The arguments must follow the schema exactly: a schema the grammar compiler does not
    /// fully support is refused rather than loosened.
    pub strict: bool,
}

/// Whether and which tool the model must call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Never call a tool: plain text, the tools not shown to the model.
    None,
    /// The model decides: free text until the format's call marker, a constrained call after.
    Auto,
    /// At least one call, constrained from the first token.
    Required,
    /// Exactly one call of this function.
    Function(String),
}

/// The tools of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCalling {
    /// The functions offered, in the request's order.
    pub tools: Vec<ToolSpec>,
    /// What the model must do with them.
    pub choice: ToolChoice,
    /// Several calls in one answer (OpenAI's default: true).
    pub parallel: bool,
}

/// A piece of one tool call of a choice. The first piece of a call has its `id` and `name`
/// and empty `arguments`; later pieces carry only more of `arguments` (JSON text, streamed
/// as the model writes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// The call's position in the choice's answer, from 0.
    pub index: u32,
    /// `call_...`, on the call's first piece.
    pub id: Option<String>,
    /// The function's name, on the call's first piece.
    pub name: Option<String>,
    /// More of the arguments' JSON text.
    pub arguments: String,
}

/// What a constrained output must be (OpenAI's `response_format`, vLLM's `guided_*`).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputConstraint {
    /// Any JSON object (`{"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this JSON Schema (the schema as JSON text).
    JsonSchema(String),
    /// The whole output matches this regular expression (Rust `regex` syntax).
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// The output is a sentence of this grammar, in llguidance's Lark syntax.
    Lark(String),
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            tools: None,
        }
    }
}

/// Most alternatives per token a request may ask for in logprobs (OpenAI's limit).
pub const LOGPROBS_MAX: u32 = 20;
/// Most stop strings per request.
pub const STOP_STRINGS_MAX: usize = 16;
/// Largest logit bias either way (OpenAI's range).
pub const LOGIT_BIAS_MAX: f32 = 100.0;

/// A sampling parameter outside its range: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    /// The parameter's name as the OpenAI API spells it (`top_p`, `logit_bias`, ...).
    pub param: &'static str,
    /// What is wrong, with the value given.
    pub message: String,
}

impl SamplingParams {
    /// The one check of every range: the server calls it to answer a 400 naming the
    /// parameter, and `EngineHandle::submit` calls it for every other caller.
    pub fn validate(&self, vocab_size: usize) -> Result<(), InvalidParam> {
        let fail = |param: &'static str, message: String| Err(InvalidParam { param, message });
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return fail("temperature", format!("temperature must be >= 0, got {t}"));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return fail("top_p", format!("top_p must be in (0, 1], got {p}"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return fail(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return fail(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {r}"),
            );
        }
        for (param, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return fail(param, format!("{param} must be in [-2, 2], got {v}"));
            }
        }
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab_size {
                return fail(
                    "logit_bias",
                    format!(
                        "logit_bias token id {id} is outside the vocabulary (size {vocab_size})"
                    ),
                );
            }
            if !(-LOGIT_BIAS_MAX..=LOGIT_BIAS_MAX).contains(&bias) {
                return fail(
                    "logit_bias",
                    format!("logit_bias values must be in [-100, 100], got {bias}"),
                );
            }
        }
        if self.stop.len() > STOP_STRINGS_MAX {
            return fail(
                "stop",
                format!(
                    "at most {STOP_STRINGS_MAX} stop strings, got {}",
                    self.stop.len()
                ),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return fail("stop", "stop strings must not be empty".into());
        }
        if let Some(&id) = self
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return fail(
                "stop_token_ids",
                format!("token id {id} is outside the vocabulary (0..{vocab_size})"),
            );
        }
        if let Some(k) = self.logprobs {
            if k > LOGPROBS_MAX {
                return fail(
                    "logprobs",
                    format!("logprobs must be in 0..={LOGPROBS_MAX}, got {k}"),
                );
            }
        }
        Ok(())
    }
}

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The full prompt, chat template already applied.
    pub prompt_token_ids: Vec<TokenId>,
    /// Sampling for every choice; choice `i` seeds its RNG with `seed + i`.
    pub sampling: SamplingParams,
    /// Number of choices; they share the prompt's KV blocks.
    pub n: NonZeroU32,
    /// Higher runs first when the scheduler is in priority mode.
    pub priority: i32,
    /// When the request reached the server (for queue time and TTFT).
    pub arrival: Instant,
}

/// Log-probability of one emitted token and its top alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The emitted token.
    pub token_id: TokenId,
    /// Its log-probability under the model's distribution (after temperature 1, before
    /// penalties and truncation, as the OpenAI API reports it).
    pub logprob: f32,
    /// The `k` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(TokenId, f32)>,
}

/// Why a choice stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop(StopCause),
    /// The answer ended after at least one tool call.
    ToolCalls,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The request was aborted (client gone, shutdown).
    Abort,
    /// The engine could not run it (it can never fit in the KV cache, a model error).
    Error(String),
}

/// What exactly ended a choice with [`FinishReason::Stop`].
#[derive(Debug, Clone, PartialEq)]
pub enum StopCause {
    /// One of the model's EOS tokens.
    Eos(TokenId),
    /// One of the request's `stop_token_ids`.
    StopToken(TokenId),
    /// One of the request's stop strings (which was not emitted).
    StopString(String),
    /// The constrained output is complete and its constraint allows nothing after it.
    Constraint,
}

/// Token counts of one choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated for this choice.
    pub completion_tokens: u32,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: u32,
}

/// Timings of one choice, all in milliseconds or tokens per second.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Arrival to first scheduled step.
    pub queue_ms: f64,
    /// Arrival to first emitted token.
    pub ttft_ms: f64,
    /// Prompt tokens over the time from first schedule to first token.
    pub prompt_tokens_per_s: f64,
    /// Generated tokens after the first, over the time from first to last token.
    pub generation_tokens_per_s: f64,
    /// Arrival to finish.
    pub total_ms: f64,
}

/// What the engine sends back on a request's channel.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// New output for choice `index`. `text` is the UTF-8-safe, stop-string-filtered text
    /// that became final with these tokens (it may be empty while a stop string could
    /// still match, or while a multi-byte character is incomplete).
    Delta {
        /// Choice index in `0..n`.
        index: u32,
        /// Tokens generated this step for this choice (usually one).
        token_ids: Vec<TokenId>,
        /// Text released by this delta (with tools: the answer's content, tool calls left out).
        text: String,
        /// One entry per token in `token_ids` when logprobs were requested.
        logprobs: Vec<TokenLogprob>,
        /// With tools: pieces of the calls this delta completed more of.
        tool_calls: Vec<ToolCallDelta>,
    },
    /// Choice `index` is done; no more events for it.
    Finished {
        /// Choice index in `0..n`.
        index: u32,
        /// Why it stopped.
        reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
    },
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full; try again later (HTTP 429).
    #[error("the waiting queue is full ({queue_waiting_max} requests)")]
    QueueFull {
        /// The configured bound.
        queue_waiting_max: usize,
    },
    /// `prompt + max_tokens` exceeds the model's context (HTTP 400).
    #[error("prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the model's context length of {model_len_max} tokens")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Requested output tokens.
        max_tokens: usize,
        /// The limit.
        model_len_max: usize,
    },
    /// Empty prompt or a token id outside the vocabulary (HTTP 400).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A sampling parameter outside its range (HTTP 400 naming it).
    #[error("invalid request: {0}")]
    InvalidParam(#[from] InvalidParam),
    /// Not warmed up yet (HTTP 503).
    #[error("the engine is not ready")]
    NotReady,
    /// The engine is draining for shutdown or has stopped (HTTP 503).
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine failed (a forward pass errored or panicked) and serves nothing more
    /// (HTTP 503; `/health` says so too, so an orchestrator restarts the process).
    #[error("the engine has failed: {0}")]
    EngineDead(String),
}

/// Whether the engine can serve: what `/health` reports. Only `Healthy` is a 200.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineHealth {
    /// Loading the model or running the warm-up step.
    Starting,
    /// Serving.
    Healthy,
    /// Shutdown began: in-flight requests finish, new ones are refused.
    Draining,
    /// Work is pending and the engine has finished no step for this long (a hung kernel,
    /// a deadlock): longer than `EngineConfig::step_stall_max`.
    Stalled {
        /// Milliseconds since the engine last made progress.
        stalled_ms: u64,
    },
    /// The engine failed to warm up, or failed while serving, and stopped.
    Dead(String),
}

/// How an embedding pools the final hidden states (the final norm's output, what the LM head
/// reads) of its prompt's positions; llama.cpp's `--pooling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The last position's: in a causal model the only one that has seen the whole input.
    Last,
    /// The mean over every position. A prompt never starts from the prefix cache, which holds
    /// KV, not hidden states.
    Mean,
}

/// Most inputs in one embedding request (OpenAI's limit).
pub const EMBED_INPUTS_MAX: usize = 2048;

/// Embeddings of one or more inputs, already tokenized. Each input is a prefill-only sequence,
/// scheduled in the same batches as generation; it holds its KV blocks only until its last
/// prompt chunk has run.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    /// The inputs, each a non-empty prompt within the context length.
    pub inputs: Vec<Vec<TokenId>>,
    /// How each input's hidden states become one vector.
    pub pooling: Pooling,
    /// Higher runs first when the scheduler is in priority mode.
    pub priority: i32,
    /// When the request reached the server (for queue time).
    pub arrival: Instant,
}

/// What the engine sends back on an embedding request's channel: one event per input, in the
/// order they finish.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedEvent {
    /// Input `index` is embedded.
    Embedding {
        /// Input index in `0..inputs.len()`.
        index: u32,
        /// The pooled vector, L2-normalised (all zeros if the pooled vector was zero, as
        /// llama.cpp does); as long as the model's hidden size.
        embedding: Vec<f32>,
        /// Tokens of the input; `cached_prompt_tokens` of them came from the prefix cache.
        usage: Usage,
    },
    /// Input `index` was not embedded: aborted, or the engine could not run it.
    Failed {
        /// Input index in `0..inputs.len()`.
        index: u32,
        /// `Abort` or `Error`.
        reason: FinishReason,
    },
}
