//! `POST /v1/responses`: OpenAI's Responses API, the subset llama.cpp and vLLM serve, as a
//! translation over the chat path.
//!
//! The request becomes chat messages ([`input`]), chat's tools in their flat shape
//! ([`crate::tools::Shape::Flat`]), and the same [`Plan`] chat makes; the handler renders the
//! chat template and submits a chat job. The same `generate::Run` as chat's drives it, and
//! `output::Assembler` turns its deltas into output items and stream events.
//!
//! Not served: stored responses (`previous_response_id` is a 400, `store` is ignored),
//! built-in tools, non-text input, reasoning items, logprobs, background mode.

pub mod input;
pub(crate) mod output;
pub mod wire;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use candela_engine::api::{OutputConstraint, ToolCalling, ToolChoice};
use candela_engine::ChatMessage;
use futures::stream;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::error::ApiError;
use crate::generate::{totals, Job, Run, Step};
use crate::openai::CommonParams;
use crate::params::{self, Plan};
use crate::tools::{self, Shape};
use output::Assembler;
use wire::{ResponseObject, ResponsesRequest, StreamEvent};

/// Most `metadata` pairs, and the longest key and value (OpenAI's limits).
const METADATA_PAIRS_MAX: usize = 16;
const METADATA_KEY_LEN_MAX: usize = 64;
const METADATA_VALUE_LEN_MAX: usize = 512;

/// A checked request: what the handler renders and submits, and the response's skeleton
/// (the request's settings as the answer echoes them).
#[derive(Debug)]
pub struct Checked {
    /// `instructions` and `input` as chat messages.
    pub messages: Vec<ChatMessage>,
    /// The tools, also in `plan.sampling.tools` (the template shows them to the model).
    pub tools: Option<ToolCalling>,
    /// Sampling and streaming, as chat's.
    pub plan: Plan,
    /// The response before any output; `id`, `model` and `created_at` are the job's.
    pub skeleton: ResponseObject,
}

/// Checks a request and translates it to the chat path's terms.
pub fn check(req: ResponsesRequest, vocab_size: u32) -> Result<Checked, ApiError> {
    if req
        .previous_response_id
        .as_ref()
        .is_some_and(|v| !v.is_null())
    {
        return Err(ApiError::invalid(
            "previous_response_id",
            "previous_response_id is not supported: this server stores no responses; send the whole conversation as input items",
        ));
    }
    let unknown: serde_json::Map<String, Value> = req
        .unknown
        .iter()
        .filter(|(name, value)| !asks_for_nothing(name, value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    crate::openai::refuse_unknown(&unknown)?;
    let metadata = metadata(req.metadata.as_ref())?;
    let tools = tools::tool_calling(
        Shape::Flat,
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let (constraint, text) = text_format(req.text.as_ref())?;
    let calls = tools.as_ref().is_some_and(|t| t.choice != ToolChoice::None);
    if constraint.is_some() && calls {
        return Err(ApiError::invalid(
            "text",
            "text.format cannot be combined with tools unless tool_choice is none (the tool choice constrains the output)",
        ));
    }
    let max_output_tokens = match req.max_output_tokens {
        None => None,
        Some(m) if m >= 1 => Some(u32::try_from(m).unwrap_or(u32::MAX)),
        Some(m) => {
            return Err(ApiError::invalid(
                "max_output_tokens",
                format!("max_output_tokens must be at least 1, got {m}"),
            ))
        }
    };
    let common = CommonParams {
        model: req.model.clone(),
        temperature: req.temperature,
        top_p: req.top_p,
        stream: req.stream,
        user: req.user.clone(),
        ..CommonParams::default()
    };
    let mut plan = params::plan(&common, max_output_tokens.map(i64::from), None, vocab_size)?;
    plan.sampling.constraint = constraint;
    plan.sampling.tools.clone_from(&tools);
    let messages = input::messages(req.instructions.as_ref(), req.input.as_ref())?;
    let skeleton = ResponseObject {
        id: String::new(),
        object: "response",
        created_at: 0,
        status: "in_progress",
        completed_at: None,
        error: None,
        incomplete_details: None,
        instructions: req
            .instructions
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_owned),
        max_output_tokens,
        metadata,
        model: String::new(),
        output: Vec::new(),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        previous_response_id: None,
        reasoning: None,
        store: false,
        temperature: plan.sampling.temperature,
        top_p: plan.sampling.top_p,
        text,
        tool_choice: tool_choice_echo(tools.as_ref(), req.tool_choice.as_ref()),
        tools: tools.as_ref().map_or_else(Vec::new, tools_echo),
        truncation: "disabled",
        usage: None,
        user: req.user,
        background: false,
        timings: None,
    };
    Ok(Checked {
        messages,
        tools,
        plan,
        skeleton,
    })
}

/// Fields outside the subset that clients (the OpenAI Agents SDK among them) send with values
/// that ask for what this server does anyway; any other value is refused by name.
fn asks_for_nothing(name: &str, value: &Value) -> bool {
    match name {
        // Identifiers for OpenAI's abuse monitoring and cache routing: the prefix cache finds
        // shared prefixes by itself, and an identifier changes no output.
        "safety_identifier" | "prompt_cache_key" => value.is_string() || value.is_null(),
        "include" => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
        "truncation" => value.is_null() || value == "disabled",
        "background" => value.is_null() || value == false,
        "reasoning" => value.is_null(),
        "service_tier" => value.is_null() || value == "auto" || value == "default",
        _ => false,
    }
}

/// `metadata`: at most 16 string pairs, echoed as given (`{}` when absent).
fn metadata(metadata: Option<&Value>) -> Result<Value, ApiError> {
    let pairs = match metadata {
        None | Some(Value::Null) => return Ok(json!({})),
        Some(Value::Object(pairs)) => pairs,
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata",
                "metadata must be an object of strings",
            ))
        }
    };
    if pairs.len() > METADATA_PAIRS_MAX {
        return Err(ApiError::invalid(
            "metadata",
            format!(
                "metadata holds at most {METADATA_PAIRS_MAX} pairs, got {}",
                pairs.len()
            ),
        ));
    }
    for (key, value) in pairs {
        let fits = value
            .as_str()
            .is_some_and(|v| v.chars().count() <= METADATA_VALUE_LEN_MAX);
        if key.chars().count() > METADATA_KEY_LEN_MAX || !fits {
            return Err(ApiError::invalid(
                "metadata",
                format!("metadata keys are strings of at most {METADATA_KEY_LEN_MAX} characters and values strings of at most {METADATA_VALUE_LEN_MAX}; `{key}` is not"),
            ));
        }
    }
    Ok(Value::Object(pairs.clone()))
}

/// `text`: the output constraint its `format` asks for, and the `text` the answer echoes.
fn text_format(text: Option<&Value>) -> Result<(Option<OutputConstraint>, Value), ApiError> {
    const PARAM: &str = "text";
    let plain = json!({"format": {"type": "text"}});
    let fields = match text {
        None | Some(Value::Null) => return Ok((None, plain)),
        Some(Value::Object(fields)) => fields,
        Some(_) => return Err(ApiError::invalid(PARAM, "text must be an object")),
    };
    for (key, value) in fields {
        // `verbosity` steers reasoning models; unset, it asks for nothing.
        if key != "format" && !(key == "verbosity" && value.is_null()) {
            return Err(ApiError::invalid(
                PARAM,
                format!("text.{key} is not supported (only text.format)"),
            ));
        }
    }
    let format = match fields.get("format") {
        None | Some(Value::Null) => return Ok((None, plain)),
        Some(format) => format,
    };
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            PARAM,
            "text.format needs a `type`: text, json_object or json_schema",
        )
    })?;
    let constraint = match kind {
        "text" => None,
        "json_object" => Some(OutputConstraint::JsonObject),
        "json_schema" => {
            if !format.get("name").is_some_and(Value::is_string) {
                return Err(ApiError::invalid(
                    PARAM,
                    "text.format of type json_schema needs a `name`",
                ));
            }
            if format
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return Err(ApiError::invalid(
                    PARAM,
                    "text.format.strict must be a boolean",
                ));
            }
            match format.get("schema") {
                // The output always follows the schema: the constraint is enforced, strict or not.
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    Some(OutputConstraint::JsonSchema(schema.to_string()))
                }
                _ => {
                    return Err(ApiError::invalid(
                        PARAM,
                        "text.format of type json_schema needs a `schema` object",
                    ))
                }
            }
        }
        other => {
            return Err(ApiError::invalid(
                PARAM,
                format!("text.format type must be text, json_object or json_schema, got {other:?}"),
            ))
        }
    };
    Ok((constraint, json!({ "format": format })))
}

/// `tool_choice` as the answer echoes it.
fn tool_choice_echo(tools: Option<&ToolCalling>, given: Option<&Value>) -> Value {
    match tools.map(|t| &t.choice) {
        Some(ToolChoice::None) => json!("none"),
        Some(ToolChoice::Auto) => json!("auto"),
        Some(ToolChoice::Required) => json!("required"),
        Some(ToolChoice::Function(name)) => json!({"type": "function", "name": name}),
        // No tools: `none` when asked for, else OpenAI's default.
        None => match given.and_then(Value::as_str) {
            Some("none") => json!("none"),
            _ => json!("auto"),
        },
    }
}

/// The tools in the flat form, as the answer echoes them.
fn tools_echo(tools: &ToolCalling) -> Vec<Value> {
    tools
        .tools
        .iter()
        .map(|t| {
            json!({
                "type": "function",
                "name": t.name,
                "description": t.description,
                // Parsed from JSON the request held; `null` is unreachable.
                "parameters": serde_json::from_str::<Value>(&t.parameters).unwrap_or(Value::Null),
                "strict": t.strict,
            })
        })
        .collect()
}

/// The Responses API calls chat's `max_tokens` `max_output_tokens`: a 400 about one (the
/// context check's, the engine's) names the other.
pub fn output_tokens_param(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidRequest {
            message,
            param: Some("max_tokens"),
        } => ApiError::invalid(
            "max_output_tokens",
            message.replace("max_tokens", "max_output_tokens"),
        ),
        other => other,
    }
}

/// Answers a checked request's job: one `Response` body, or its events over SSE.
pub async fn respond(
    backend: Arc<dyn Backend>,
    job: Job,
    mut skeleton: ResponseObject,
) -> Result<Response, ApiError> {
    skeleton.id.clone_from(&job.id);
    skeleton.model.clone_from(&job.model);
    skeleton.created_at = job.created;
    let stream = job.plan.stream;
    let run = Run::start(backend, job).map_err(output_tokens_param)?;
    let out = Assembler::new(skeleton);
    if stream {
        Ok(respond_stream(run, out))
    } else {
        Ok(respond_once(run, out).await?.into_response())
    }
}

/// Applies one step of the run to the response.
fn apply(run: &Run, out: &mut Assembler, step: Step) {
    match step {
        Step::Delta(_, delta) => out.delta(&delta),
        Step::Finished(i) => {
            let Some(finish) = run.choices.get(i).and_then(|c| c.finish.as_ref()) else {
                return;
            };
            let (usage, timings) = totals(&run.job, &run.choices);
            out.finish(&finish.reason, usage, timings);
        }
    }
}

async fn respond_once(
    mut run: Run,
    mut out: Assembler,
) -> Result<axum::Json<ResponseObject>, ApiError> {
    while let Some(step) = run.next().await {
        apply(&run, &mut out, step?);
        // Only the final response is answered; the events are the streaming view of it.
        out.take_events();
    }
    run.check_finished()?;
    Ok(axum::Json(out.into_response()))
}

/// The state of one streamed response; owning the run ties the engine request to the body.
struct Streamer {
    run: Run,
    out: Assembler,
    pending: VecDeque<StreamEvent>,
}

impl Streamer {
    /// The next event, or `None` after the last.
    async fn next(&mut self) -> Option<StreamEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.out.is_done() {
                return None;
            }
            match self.run.next().await {
                Some(Ok(step)) => apply(&self.run, &mut self.out, step),
                Some(Err(e)) => {
                    tracing::error!(error = %e, "streaming response failed");
                    self.out.fail(&e);
                }
                None => {
                    let e = ApiError::Internal(
                        "the engine ended a stream before finishing it".to_owned(),
                    );
                    tracing::error!(error = %e, "streaming response failed");
                    self.out.fail(&e);
                }
            }
            self.pending.extend(self.out.take_events());
        }
    }
}

fn respond_stream(run: Run, mut out: Assembler) -> Response {
    let pending = out.take_events().into();
    let streamer = Streamer { run, out, pending };
    let body = stream::unfold(streamer, |mut s| async move {
        let event = s.next().await?;
        let sse = match Event::default().event(event.kind).json_data(&event) {
            Ok(sse) => sse,
            Err(e) => {
                tracing::error!(error = %e, "could not encode a response event");
                Event::default().event(event.kind)
            }
        };
        Some((Ok::<_, Infallible>(sse), s))
    });
    Sse::new(body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).unwrap_or_else(|e| panic!("{e}"))
    }

    fn param_of(body: Value) -> Option<String> {
        check(request(body), 100)
            .err()
            .and_then(|e| e.body().error.param)
    }

    #[test]
    fn the_subset_is_checked_and_echoed() {
        let checked = check(
            request(json!({
                "model": "m", "input": "hi", "instructions": "Be brief.",
                "max_output_tokens": 12, "temperature": 0, "top_p": 0.5,
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": false}],
                "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": false,
                "metadata": {"k": "v"}, "user": "u", "store": true, "stream": true,
                "include": [], "truncation": "disabled", "reasoning": null,
                "safety_identifier": "s", "previous_response_id": null,
            })),
            100,
        );
        let Ok(c) = checked else {
            panic!("{checked:?}")
        };
        assert_eq!(c.messages.len(), 2);
        assert_eq!(c.plan.sampling.max_tokens.map(|m| m.get()), Some(12));
        assert_eq!(c.plan.sampling.temperature, 0.0);
        assert!(c.plan.stream);
        assert_eq!(c.plan.sampling.tools, c.tools);
        assert!(c.tools.as_ref().is_some_and(|t| !t.parallel));
        let echo = serde_json::to_value(&c.skeleton).unwrap_or_default();
        assert_eq!(
            echo["tool_choice"],
            json!({"type": "function", "name": "f"})
        );
        assert_eq!(echo["tools"][0]["parameters"], json!({"type": "object"}));
        assert_eq!(echo["tools"][0]["strict"], false);
        assert_eq!(echo["instructions"], "Be brief.");
        assert_eq!(echo["metadata"], json!({"k": "v"}));
        assert_eq!(echo["store"], false);
        assert_eq!(echo["top_p"], 0.5);
        assert_eq!(echo["text"], json!({"format": {"type": "text"}}));
    }

    #[test]
    fn max_tokens_errors_are_about_max_output_tokens() {
        let e = output_tokens_param(ApiError::invalid(
            "max_tokens",
            "max_tokens (9) is too many",
        ));
        assert_eq!(e.body().error.param.as_deref(), Some("max_output_tokens"));
        assert_eq!(e.to_string(), "max_output_tokens (9) is too many");
        let other = output_tokens_param(ApiError::invalid("top_p", "x"));
        assert_eq!(other.body().error.param.as_deref(), Some("top_p"));
    }

    #[test]
    fn text_format_is_the_output_constraint() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let c = check(
            request(
                json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": true}}}),
            ),
            100,
        );
        let Ok(c) = c else { panic!("{c:?}") };
        assert_eq!(
            c.plan.sampling.constraint,
            Some(OutputConstraint::JsonSchema(schema.to_string()))
        );
        assert_eq!(c.skeleton.text["format"]["name"], "n");
        let c = check(
            request(json!({"input": "x", "text": {"format": {"type": "json_object"}}})),
            100,
        );
        assert!(c.is_ok_and(|c| c.plan.sampling.constraint == Some(OutputConstraint::JsonObject)));
        let c = check(
            request(json!({"input": "x", "text": {"format": {"type": "text"}}})),
            100,
        );
        assert!(c.is_ok_and(|c| c.plan.sampling.constraint.is_none()));
    }

    #[test]
    fn mistakes_name_their_parameter() {
        let tools = json!([{"type": "function", "name": "f"}]);
        for (body, param) in [
            (
                json!({"input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (
                json!({"input": "x", "frequency_penalty": 1}),
                "frequency_penalty",
            ),
            (
                json!({"input": "x", "include": ["reasoning.encrypted_content"]}),
                "include",
            ),
            (json!({"input": "x", "truncation": "auto"}), "truncation"),
            (json!({"input": "x", "background": true}), "background"),
            (
                json!({"input": "x", "max_output_tokens": 0}),
                "max_output_tokens",
            ),
            (json!({"input": "x", "temperature": -1}), "temperature"),
            (json!({"input": "x", "top_p": 2}), "top_p"),
            (json!({"input": "x", "metadata": {"k": 1}}), "metadata"),
            (json!({"input": "x", "metadata": [1]}), "metadata"),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
                "text",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}),
                "text",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
                "text",
            ),
            (json!({"input": "x", "text": {"verbosity": "low"}}), "text"),
            (
                json!({"input": "x", "tools": tools, "tool_choice": "required", "text": {"format": {"type": "json_object"}}}),
                "text",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools",
            ),
            (
                json!({"input": "x", "tools": tools, "tool_choice": {"type": "function", "name": "g"}}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "tool_choice": "required"}),
                "tool_choice",
            ),
            (json!({}), "input"),
            (
                json!({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}),
                "input",
            ),
            (json!({"input": "x", "instructions": 3}), "instructions"),
        ] {
            assert_eq!(param_of(body.clone()).as_deref(), Some(param), "{body}");
        }
        // With tool_choice none the tools constrain nothing, so a format may apply.
        let body = json!({"input": "x", "tools": tools, "tool_choice": "none", "text": {"format": {"type": "json_object"}}});
        assert!(check(request(body), 100).is_ok());
    }
}
