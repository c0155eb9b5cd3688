//! The Responses API on the wire: the request body as clients send it, and the `Response`
//! object, its output items and its stream events as the `openai` SDK's models read them
//! (`openai/types/responses/`).
//!
//! Requests are parsed loosely (the nested parts as JSON values) so that [`super`] can answer a
//! mistake with a 400 naming the parameter rather than a serde type error.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::openai::TimingsOut;

/// `POST /v1/responses`.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponsesRequest {
    /// Must name the served model when given.
    pub model: Option<String>,
    /// A string (one user message) or a list of items.
    pub input: Option<Value>,
    /// A system message put before the input.
    pub instructions: Option<Value>,
    /// Function tools in the flat form.
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "name": ...}`.
    pub tool_choice: Option<Value>,
    /// Several calls in one answer (default true).
    pub parallel_tool_calls: Option<bool>,
    /// Most tokens to generate.
    pub max_output_tokens: Option<i64>,
    /// Sampling temperature, >= 0; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    pub text: Option<Value>,
    /// Stream the events with SSE.
    pub stream: Option<bool>,
    /// Accepted and ignored: nothing is stored (`store: true` is OpenAI's default).
    pub store: Option<bool>,
    /// Up to 16 string pairs, echoed in the response.
    pub metadata: Option<Value>,
    /// The end user's id: echoed, otherwise ignored.
    pub user: Option<String>,
    /// Refused with a 400: no response is stored to continue from.
    pub previous_response_id: Option<Value>,
    /// Fields none of the above takes: refused unless [`super`] knows them to ask for what
    /// this server does anyway.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, Value>,
}

/// OpenAI's `Response` object: the body of a non-streamed answer, and the `response` of the
/// lifecycle events of a streamed one.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseObject {
    /// `resp_...`.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix seconds.
    pub created_at: u64,
    /// `in_progress`, `completed`, `incomplete`, `failed` or `cancelled`.
    pub status: &'static str,
    /// Unix seconds, once completed.
    pub completed_at: Option<u64>,
    /// Why the response failed.
    pub error: Option<ResponseErrorOut>,
    /// Why the response is incomplete.
    pub incomplete_details: Option<IncompleteDetails>,
    /// The request's instructions.
    pub instructions: Option<String>,
    /// The request's `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// The request's metadata (`{}` when none).
    pub metadata: Value,
    /// The served model's name.
    pub model: String,
    /// The message and function calls the model produced, in order.
    pub output: Vec<OutputItem>,
    /// The request's setting (default true).
    pub parallel_tool_calls: bool,
    /// Always null: nothing is stored.
    pub previous_response_id: Option<String>,
    /// Always null: no reasoning model.
    pub reasoning: Option<Value>,
    /// Always false: nothing is stored, whatever the request asked.
    pub store: bool,
    /// The effective temperature.
    pub temperature: f32,
    /// The effective nucleus mass.
    pub top_p: f32,
    /// `{"format": ...}` as the request gave it (`{"type": "text"}` by default).
    pub text: Value,
    /// The effective tool choice.
    pub tool_choice: Value,
    /// The function tools, in the flat form.
    pub tools: Vec<Value>,
    /// Always `disabled`: an input that does not fit is a 400.
    pub truncation: &'static str,
    /// Token counts, once finished.
    pub usage: Option<ResponseUsage>,
    /// The request's `user`.
    pub user: Option<String>,
    /// Always false.
    pub background: bool,
    /// llama.cpp-style timings, once finished (as every final answer of this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timings: Option<TimingsOut>,
}

/// `error` of a failed response.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseErrorOut {
    /// Always `server_error`.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

/// `incomplete_details` of an incomplete response.
#[derive(Debug, Clone, Serialize)]
pub struct IncompleteDetails {
    /// Always `max_output_tokens` (the context length counts as the same limit).
    pub reason: &'static str,
}

/// `usage` of a response.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct ResponseUsage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Details of the prompt.
    pub input_tokens_details: InputTokensDetails,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Details of the output.
    pub output_tokens_details: OutputTokensDetails,
    /// Their sum.
    pub total_tokens: u32,
}

/// `usage.input_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
    /// Always 0: the prefix cache is written as a side effect, never billed.
    pub cache_write_tokens: u32,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct OutputTokensDetails {
    /// Always 0: no reasoning model.
    pub reasoning_tokens: u32,
}

/// One item of `output`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's text.
    Message {
        /// `msg_...`.
        id: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
        /// Always `assistant`.
        role: &'static str,
        /// One `output_text` part (none while a streamed message has just been added).
        content: Vec<OutputText>,
    },
    /// A call of one of the request's functions.
    FunctionCall {
        /// `fc_...`.
        id: String,
        /// `call_...`: what the `function_call_output` answering it names.
        call_id: String,
        /// The function's name.
        name: String,
        /// The arguments as a JSON string.
        arguments: String,
        /// `in_progress`, `completed` or `incomplete`.
        status: &'static str,
    },
}

/// An `output_text` content part.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OutputText {
    /// Always `output_text`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The text.
    pub text: String,
    /// Always empty.
    pub annotations: Vec<Value>,
}

impl OutputText {
    /// A part holding `text`.
    pub fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
        }
    }
}

/// One streamed event: `type` (also the SSE event name), its `sequence_number`, and the
/// fields of its kind.
#[derive(Debug, Clone, Serialize)]
pub struct StreamEvent {
    /// `response.created`, `response.output_text.delta`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// From 0, one more per event of the response.
    pub sequence_number: u32,
    /// The fields of this kind of event.
    #[serde(flatten)]
    pub body: EventBody,
}

/// The fields of a [`StreamEvent`], by the kinds of events that share them.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum EventBody {
    /// `response.created`, `.in_progress`, `.completed`, `.failed`.
    Response {
        /// The response as it stands.
        response: Box<ResponseObject>,
    },
    /// `response.output_item.added`, `.done`.
    Item {
        /// The item's position in `output`.
        output_index: u32,
        /// The item as it stands.
        item: OutputItem,
    },
    /// `response.content_part.added`, `.done`.
    Part {
        /// The message's id.
        item_id: String,
        /// The message's position in `output`.
        output_index: u32,
        /// The part's position in the message's `content` (always 0).
        content_index: u32,
        /// The part as it stands.
        part: OutputText,
    },
    /// `response.output_text.delta`.
    TextDelta {
        /// The message's id.
        item_id: String,
        /// The message's position in `output`.
        output_index: u32,
        /// Always 0.
        content_index: u32,
        /// The new text.
        delta: String,
        /// Always empty (no logprobs on this API).
        logprobs: Vec<Value>,
    },
    /// `response.output_text.done`.
    TextDone {
        /// The message's id.
        item_id: String,
        /// The message's position in `output`.
        output_index: u32,
        /// Always 0.
        content_index: u32,
        /// The whole text.
        text: String,
        /// Always empty.
        logprobs: Vec<Value>,
    },
    /// `response.function_call_arguments.delta`.
    ArgumentsDelta {
        /// The call item's id.
        item_id: String,
        /// The call's position in `output`.
        output_index: u32,
        /// More of the arguments' JSON text.
        delta: String,
    },
    /// `response.function_call_arguments.done`.
    ArgumentsDone {
        /// The call item's id.
        item_id: String,
        /// The call's position in `output`.
        output_index: u32,
        /// The function's name.
        name: String,
        /// The whole arguments' JSON text.
        arguments: String,
    },
    /// `error`: the stream failed after its headers were sent.
    Error {
        /// A machine-readable code, or null.
        code: Option<String>,
        /// What went wrong.
        message: String,
        /// The parameter at fault, or null.
        param: Option<String>,
    },
}
