//! The OpenAI wire format: request bodies as clients send them and response bodies as clients
//! expect them (plus vLLM's `return_token_ids` and llama.cpp-style `timings`).
//!
//! **API Boundary:** this is the only module that knows the JSON field names. Requests are
//! parsed loosely here (numbers as `i64`/`f64` so that a negative `max_tokens` gets a clear
//! 400 from [`crate::params`] rather than a serde type error) and validated there.

use std::collections::HashMap;

use serde::{Deserialize, Serialize, Serializer};

/// A value sent either as one string or as a list of strings (`stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// `"stop": "\n"`.
    One(String),
    /// `"stop": ["\n", "END"]`.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `choices: []`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and control parameters shared by chat and text completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    /// Must name the served model when given.
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Sampling temperature, >= 0; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// Top-k; 0 or -1 turn it off (vLLM).
    pub top_k: Option<i64>,
    /// Min-p in [0, 1].
    pub min_p: Option<f64>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// Stream with SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stop token ids (vLLM's extension).
    pub stop_token_ids: Option<Vec<i64>>,
    /// Seed of the request's RNG.
    pub seed: Option<i64>,
    /// In [-2, 2].
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// > 0; 1 is none.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    /// Keep generating past EOS.
    pub ignore_eos: Option<bool>,
    /// vLLM's extension: return `prompt_token_ids` and per-choice `token_ids`.
    pub return_token_ids: Option<bool>,
    /// Ignored (OpenAI's end-user id).
    pub user: Option<String>,
    /// Higher runs first when the scheduler runs by priority.
    pub priority: Option<i64>,
    /// OpenAI's structured outputs: `{"type": "text" | "json_object" | "json_schema", ...}`.
    /// Kept as JSON so that a malformed one gets a 400 naming what is wrong.
    pub response_format: Option<serde_json::Value>,
    /// vLLM's extension: a JSON schema (an object, or a string holding one).
    pub guided_json: Option<serde_json::Value>,
    /// vLLM's extension: a regular expression the output matches.
    pub guided_regex: Option<String>,
    /// vLLM's extension: the output is one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's extension: a grammar (llguidance's Lark syntax).
    pub guided_grammar: Option<String>,
    /// vLLM's newer form of the four above: `{"json" | "regex" | "choice" | "grammar": ...}`.
    pub structured_outputs: Option<serde_json::Value>,
    /// llama.cpp server's extension: a JSON schema.
    pub json_schema: Option<serde_json::Value>,
    /// llama.cpp server's GBNF grammar: refused with a pointer to `guided_grammar`.
    pub grammar: Option<serde_json::Value>,
}

/// The content of a chat message: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": "..."}]`.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// May be null for an assistant message that only called tools.
    pub content: Option<MessageContent>,
    /// An assistant message's tool calls (checked by [`crate::tools`]).
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message: the call it answers.
    pub tool_call_id: Option<String>,
    /// A `tool` message: the function's name (optional in OpenAI's API).
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    /// Report logprobs of the sampled tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per token, 0..=20 (needs `logprobs: true`).
    pub top_logprobs: Option<i64>,
    /// Functions the model may call (kept as JSON: [`crate::tools`] checks them).
    pub tools: Option<serde_json::Value>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<serde_json::Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Everything shared with text completions.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Fields none of the above takes (after them, so it gets only the leftovers): refused by
    /// [`refuse_unknown`], never silently dropped.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// The `prompt` of a text completion in any of its four shapes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    /// One text prompt.
    Text(String),
    /// Several text prompts.
    Texts(Vec<String>),
    /// One tokenized prompt.
    Ids(Vec<i64>),
    /// Several tokenized prompts.
    IdsList(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt(s).
    pub prompt: PromptIn,
    /// Logprobs of the sampled token plus this many alternatives (0..=20).
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the output.
    pub echo: Option<bool>,
    /// Everything shared with chat completions.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Fields none of the above takes: refused by [`refuse_unknown`].
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

/// Fields that routers add to every request they forward, with the one value that asks for
/// what this server does anyway: vLLM's router (vllm-router) re-serialises each request with
/// SGLang's defaults. We trim stop strings, skip special tokens in text, return no hidden
/// states, start a new assistant turn, and have no reasoning parser (with none, SGLang ignores
/// the three reasoning switches too). Any other value asks for something we do not do.
const ROUTER_DEFAULTS: &[(&str, bool)] = &[
    ("no_stop_trim", false),
    ("skip_special_tokens", true),
    ("return_hidden_states", false),
    ("continue_final_message", false),
    ("separate_reasoning", true),
    ("stream_reasoning", true),
    ("include_reasoning", true),
];

/// A 400 naming the first field of a request that this server does not take (OpenAI's
/// `tools`, `tool_choice`, `functions`, `audio`, ... until they are implemented), in name order
/// so the answer is the same whatever the body's key order. A field of [`ROUTER_DEFAULTS`] at
/// its value passes.
pub fn refuse_unknown(
    unknown: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), crate::error::ApiError> {
    let ours = |name: &str, value: &serde_json::Value| {
        ROUTER_DEFAULTS
            .iter()
            .any(|&(n, v)| n == name && value.as_bool() == Some(v))
    };
    let refused = unknown
        .iter()
        .filter(|(name, value)| !ours(name, value))
        .map(|(name, _)| name)
        .min();
    match refused {
        Some(name) => Err(crate::error::ApiError::UnsupportedParam(name.clone())),
        None => Ok(()),
    }
}

/// `POST /tokenize`: a prompt or a chat (vLLM's shape).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    /// Must name the served model when given.
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// A chat to render and tokenize.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Add BOS (default: true for a prompt, false for a chat, whose template has its own).
    pub add_special_tokens: Option<bool>,
    /// Chat only: end the rendered text with the assistant's header (default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return each token's text.
    pub return_token_strs: Option<bool>,
}

/// The answer of `POST /tokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The model's context length.
    pub max_model_len: u32,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// Each token's text when asked for.
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    /// Must name the served model when given.
    pub model: Option<String>,
    /// Token ids to decode.
    pub tokens: Vec<i64>,
}

/// The answer of `POST /detokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The name clients pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when the server started.
    pub created: u64,
    /// Always `candela`.
    pub owned_by: &'static str,
    /// The context length.
    pub max_model_len: u32,
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct UsageOut {
    /// Prompt tokens (summed over prompts).
    pub prompt_tokens: u32,
    /// Generated tokens (summed over choices).
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// Details of the prompt.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Prompt details of [`UsageOut`].
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// The `timings` object of every final response.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct TimingsOut {
    /// Arrival to first scheduled step.
    pub queue_ms: f64,
    /// Arrival to first token.
    pub ttft_ms: f64,
    /// Prompt tokens per second of prefill.
    pub prompt_tokens_per_s: f64,
    /// Generated tokens per second after the first.
    pub generation_tokens_per_s: f64,
    /// Arrival to finish.
    pub total_ms: f64,
}

/// `usage` of a streamed chunk: left out without `include_usage`, else null until the last.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum ChunkUsage {
    /// `include_usage` is off: no `usage` field.
    #[default]
    Absent,
    /// `"usage": null`.
    Null,
    /// The final usage.
    Final(UsageOut),
}

impl ChunkUsage {
    fn is_absent(&self) -> bool {
        matches!(self, Self::Absent)
    }
}

impl Serialize for ChunkUsage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Absent | Self::Null => s.serialize_none(),
            Self::Final(u) => u.serialize(s),
        }
    }
}

/// One alternative token in chat logprobs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
}

/// One emitted token in chat logprobs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// The most likely alternatives.
    pub top_logprobs: Vec<TopLogprob>,
}

/// `logprobs` of a chat choice.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// `logprobs` of a text-completion choice, in the legacy shape.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct LegacyLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Per token: the alternatives' texts to their log-probabilities.
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Per token: its character offset in the returned text.
    pub text_offset: Vec<u32>,
}

/// The assistant's message in a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text; null when the answer is only tool calls (as OpenAI).
    pub content: Option<String>,
    /// The tool calls, when the model made any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One tool call of a response.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallOut {
    /// `call_...`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments.
    pub function: FunctionCallOut,
}

/// The function of a [`ToolCallOut`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionCallOut {
    /// The function's name.
    pub name: String,
    /// The arguments as a JSON string (never an object: llama.cpp #20198).
    pub arguments: String,
}

/// A piece of a tool call in a streamed delta: the first has `id`, `type` and the name with
/// empty arguments, later ones only the index and more arguments.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallChunk {
    /// The call's index within the choice.
    pub index: u32,
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, on the first piece.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The name (first piece) and arguments text.
    pub function: FunctionChunk,
}

/// The function part of a [`ToolCallChunk`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionChunk {
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More of the arguments' JSON text (`""` on the first piece).
    pub arguments: String,
}

/// One choice of a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: u32,
    /// The generated message.
    pub message: AssistantMessage,
    /// Logprobs when asked for, else null.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, `abort`, `error`.
    pub finish_reason: Option<&'static str>,
    /// Generated token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A non-streamed chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// One per choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageOut,
    /// Timings.
    pub timings: TimingsOut,
    /// The prompt's token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// The delta of a streamed chat choice.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// Logprobs of this chunk's tokens.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<&'static str>,
    /// This chunk's token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// One text-completion choice, streamed or not.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Choice index (`prompt_index * n + i`).
    pub index: u32,
    /// The generated text (with the prompt in front under `echo`).
    pub text: String,
    /// Legacy logprobs when asked for, else null.
    pub logprobs: Option<LegacyLogprobs>,
    /// `stop`, `length`, `abort`, `error`; null until the choice ends.
    pub finish_reason: Option<&'static str>,
    /// The prompt's token ids (with `return_token_ids`; first chunk only when streaming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Generated token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A text-completion response, or one streamed chunk of it (`object` tells which), or a
/// streamed chat chunk: the envelope is the same.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<C> {
    /// `chatcmpl-...` or `cmpl-...`, the same on every chunk.
    pub id: String,
    /// `text_completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// The choices this body or chunk is about.
    pub choices: Vec<C>,
    /// Streaming: see [`ChunkUsage`].
    #[serde(skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
    /// On the final chunk or body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsOut>,
    /// Chat with `return_token_ids`: on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_parse_in_all_four_shapes() {
        let parse = |s: &str| serde_json::from_str::<PromptIn>(s).map_err(|e| e.to_string());
        assert!(matches!(parse(r#""hi""#), Ok(PromptIn::Text(_))));
        assert!(matches!(parse(r#"["a","b"]"#), Ok(PromptIn::Texts(v)) if v.len() == 2));
        assert!(matches!(parse("[1,2,3]"), Ok(PromptIn::Ids(v)) if v == [1, 2, 3]));
        assert!(matches!(parse("[[1],[2,3]]"), Ok(PromptIn::IdsList(v)) if v.len() == 2));
        assert!(parse("{}").is_err());
    }

    #[test]
    fn chunk_usage_is_absent_null_or_final() {
        let env = |usage| Envelope::<u32> {
            id: "x".into(),
            object: "text_completion",
            created: 0,
            model: "m".into(),
            choices: vec![],
            usage,
            timings: None,
            prompt_token_ids: None,
        };
        let absent = serde_json::to_value(env(ChunkUsage::Absent)).unwrap_or_default();
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(env(ChunkUsage::Null)).unwrap_or_default();
        assert!(null.get("usage").is_some_and(|u| u.is_null()));
        let done =
            serde_json::to_value(env(ChunkUsage::Final(UsageOut::default()))).unwrap_or_default();
        assert_eq!(done["usage"]["total_tokens"], 0);
    }
}
