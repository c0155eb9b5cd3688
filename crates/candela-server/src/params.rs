//! Validation: OpenAI request fields to the engine's [`SamplingParams`], by hand.
//!
//! Every check answers a 400 naming the parameter, before anything reaches the engine, so a
//! bad request never costs a tokenizer call or a queue slot.

use std::num::NonZeroU32;

use candela_engine::api::{OutputConstraint, SamplingParams, TokenId};
use candela_engine::{ChatMessage, ContentPart};
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::{ChatMessageIn, CommonParams, MessageContent, OneOrMany};

/// Most choices one request may ask for.
pub const N_MAX: u32 = 16;
/// Most alternatives per token in logprobs (the engine's limit).
pub const TOP_LOGPROBS_MAX: u32 = candela_engine::api::LOGPROBS_MAX;
/// Most prompts in one text-completion request.
pub const PROMPTS_MAX: usize = 64;

/// What the handlers need from a validated request, besides its prompt.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Sampling for the engine.
    pub sampling: SamplingParams,
    /// Choices per prompt.
    pub n: NonZeroU32,
    /// Scheduling priority.
    pub priority: i32,
    /// Stream with SSE.
    pub stream: bool,
    /// Send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// Return prompt and output token ids.
    pub return_token_ids: bool,
}

/// Checks that `requested` (when given) names the served model.
pub fn check_model(requested: Option<&str>, served: &[String]) -> Result<(), ApiError> {
    match requested {
        Some(name) if !served.iter().any(|s| s == name) => {
            Err(ApiError::ModelNotFound(name.to_owned()))
        }
        _ => Ok(()),
    }
}

/// Validates the shared parameters. `max_tokens` is the effective value (chat's
/// `max_completion_tokens` wins over `max_tokens`); `logprobs` is the number of alternatives
/// when logprobs were asked for.
pub fn plan(
    c: &CommonParams,
    max_tokens: Option<i64>,
    logprobs: Option<u32>,
    vocab_size: u32,
) -> Result<Plan, ApiError> {
    // Only conversions here; every range is checked once, by `SamplingParams::validate`.
    let mut s = SamplingParams::default();
    let narrow = |v: f64| v as f32;
    s.temperature = c.temperature.map_or(s.temperature, narrow);
    s.top_p = c.top_p.map_or(s.top_p, narrow);
    s.min_p = c.min_p.map_or(s.min_p, narrow);
    s.presence_penalty = c.presence_penalty.map_or(s.presence_penalty, narrow);
    s.frequency_penalty = c.frequency_penalty.map_or(s.frequency_penalty, narrow);
    s.repetition_penalty = c.repetition_penalty.map_or(s.repetition_penalty, narrow);
    s.top_k = match c.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => NonZeroU32::new(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be positive, 0 or -1 (off), got {k}"),
            ))
        }
    };
    if let Some(bias) = &c.logit_bias {
        let mut pairs = Vec::with_capacity(bias.len());
        for (key, &value) in bias {
            let id: TokenId = key.parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key `{key}` is not a token id"),
                )
            })?;
            pairs.push((id, value as f32));
        }
        pairs.sort_by_key(|&(id, _)| id);
        s.logit_bias = pairs;
    }
    s.seed = c.seed.map(|seed| seed as u64); // a negative seed is just another 64-bit pattern
    s.max_tokens = match max_tokens {
        None => None,
        Some(m) if m >= 1 => NonZeroU32::new(u32::try_from(m).unwrap_or(u32::MAX)),
        Some(m) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("max_tokens must be at least 1, got {m}"),
            ))
        }
    };
    s.stop = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(x)) => vec![x.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    s.stop_token_ids = token_ids(
        c.stop_token_ids.as_deref().unwrap_or(&[]),
        vocab_size,
        "stop_token_ids",
    )?;
    s.ignore_eos = c.ignore_eos.unwrap_or(false);
    s.logprobs = logprobs;

    let n = match c.n {
        None => NonZeroU32::MIN,
        Some(n) if (1..=i64::from(N_MAX)).contains(&n) => {
            NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN)
        }
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be in 1..={N_MAX}, got {n}"),
            ))
        }
    };
    let priority = match c.priority {
        None => 0,
        Some(p) => i32::try_from(p)
            .map_err(|_| ApiError::invalid("priority", "priority is out of range"))?,
    };
    let stream = c.stream.unwrap_or(false);
    let include_usage = c.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if include_usage && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed with stream: true",
        ));
    }
    s.constraint = output_constraint(c)?;
    s.validate(vocab_size as usize)
        .map_err(|e| ApiError::invalid(e.param, e.message))?;
    Ok(Plan {
        sampling: s,
        n,
        priority,
        stream,
        include_usage,
        return_token_ids: c.return_token_ids.unwrap_or(false),
    })
}

/// The structured-output constraint of a request, from whichever spelling it uses: OpenAI's
/// `response_format`, vLLM's `guided_*` and `structured_outputs`, llama.cpp's `json_schema`.
/// At most one may be given. The engine compiles it (a bad schema or regex is a 400 there).
pub fn output_constraint(c: &CommonParams) -> Result<Option<OutputConstraint>, ApiError> {
    if c.grammar.is_some() {
        return Err(ApiError::invalid(
            "grammar",
            "GBNF grammars are not supported: give the grammar in Lark syntax as `guided_grammar`, or a JSON schema in `response_format`",
        ));
    }
    let mut found: Vec<(&'static str, OutputConstraint)> = Vec::new();
    if let Some(format) = &c.response_format {
        if let Some(constraint) = response_format(format)? {
            found.push(("response_format", constraint));
        }
    }
    if let Some(schema) = &c.guided_json {
        found.push(("guided_json", json_schema("guided_json", schema)?));
    }
    if let Some(regex) = &c.guided_regex {
        found.push(("guided_regex", OutputConstraint::Regex(regex.clone())));
    }
    if let Some(choices) = &c.guided_choice {
        found.push(("guided_choice", OutputConstraint::Choice(choices.clone())));
    }
    if let Some(grammar) = &c.guided_grammar {
        found.push(("guided_grammar", OutputConstraint::Lark(grammar.clone())));
    }
    if let Some(spec) = &c.structured_outputs {
        found.push(("structured_outputs", structured_outputs(spec)?));
    }
    if let Some(schema) = &c.json_schema {
        found.push(("json_schema", json_schema("json_schema", schema)?));
    }
    match found.as_slice() {
        [] | [_] => Ok(found.pop().map(|(_, constraint)| constraint)),
        [_, (second, _), ..] => {
            let names: Vec<&str> = found.iter().map(|(name, _)| *name).collect();
            Err(ApiError::invalid(
                second,
                format!(
                    "give at most one output constraint, got {}",
                    names.join(", ")
                ),
            ))
        }
    }
}

/// OpenAI's `response_format`; `None` for plain text.
fn response_format(format: &Value) -> Result<Option<OutputConstraint>, ApiError> {
    const PARAM: &str = "response_format";
    let kind = format.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            PARAM,
            "response_format needs a `type`: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(OutputConstraint::JsonObject)),
        "json_schema" => {
            let spec = format.get("json_schema").ok_or_else(|| {
                ApiError::invalid(
                    PARAM,
                    "response_format of type json_schema needs `json_schema: {name, schema}`",
                )
            })?;
            match spec.get("schema") {
                Some(schema) => json_schema(PARAM, schema).map(Some),
                // OpenAI's `schema` is optional: without one, any JSON value.
                None => Ok(Some(OutputConstraint::JsonSchema("{}".into()))),
            }
        }
        other => Err(ApiError::invalid(
            PARAM,
            format!("response_format type must be text, json_object or json_schema, got {other:?}"),
        )),
    }
}

/// A JSON schema given as an object (or `true`/`false`), or as a string holding one (vLLM).
fn json_schema(param: &'static str, schema: &Value) -> Result<OutputConstraint, ApiError> {
    match schema {
        Value::String(text) => Ok(OutputConstraint::JsonSchema(text.clone())),
        Value::Object(_) | Value::Bool(_) => Ok(OutputConstraint::JsonSchema(schema.to_string())),
        _ => Err(ApiError::invalid(
            param,
            format!("{param}: a JSON schema must be an object"),
        )),
    }
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar` or
/// `json_object: true`.
fn structured_outputs(spec: &Value) -> Result<OutputConstraint, ApiError> {
    const PARAM: &str = "structured_outputs";
    let invalid = |message: String| ApiError::invalid(PARAM, message);
    let fields = spec
        .as_object()
        .ok_or_else(|| invalid("structured_outputs must be an object".into()))?;
    let mut found = Vec::new();
    for (key, value) in fields {
        let text = || {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(format!("structured_outputs.{key} must be a string")))
        };
        match key.as_str() {
            "json" => found.push(json_schema(PARAM, value)?),
            "regex" => found.push(OutputConstraint::Regex(text()?)),
            "grammar" => found.push(OutputConstraint::Lark(text()?)),
            "choice" => {
                let choices = value
                    .as_array()
                    .and_then(|items| {
                        items
                            .iter()
                            .map(|c| c.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        invalid("structured_outputs.choice must be a list of strings".into())
                    })?;
                found.push(OutputConstraint::Choice(choices));
            }
            "json_object" => match value {
                Value::Bool(true) => found.push(OutputConstraint::JsonObject),
                Value::Bool(false) | Value::Null => {}
                _ => return Err(invalid("structured_outputs.json_object must be a boolean".into())),
            },
            other => {
                return Err(invalid(format!(
                    "structured_outputs.{other} is not supported (json, regex, choice, grammar, json_object)"
                )))
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(invalid(format!(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; got {n}"
        ))),
    }
}

/// Chat logprobs: `logprobs: true` plus `top_logprobs` in 0..=20.
pub fn chat_logprobs(
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
) -> Result<Option<u32>, ApiError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=i64::from(TOP_LOGPROBS_MAX)).contains(&k) => Ok(Some(k as u32)),
        (true, Some(k)) => Err(ApiError::invalid(
            "top_logprobs",
            format!("top_logprobs must be in 0..={TOP_LOGPROBS_MAX}, got {k}"),
        )),
    }
}

/// Completion logprobs: an integer in 0..=20.
pub fn completion_logprobs(logprobs: Option<i64>) -> Result<Option<u32>, ApiError> {
    match logprobs {
        None => Ok(None),
        Some(k) if (0..=i64::from(TOP_LOGPROBS_MAX)).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::invalid(
            "logprobs",
            format!("logprobs must be in 0..={TOP_LOGPROBS_MAX}, got {k}"),
        )),
    }
}

/// Checks token ids against the vocabulary.
pub fn token_ids(
    ids: &[i64],
    vocab_size: u32,
    param: &'static str,
) -> Result<Vec<TokenId>, ApiError> {
    ids.iter()
        .map(|&id| match u32::try_from(id) {
            Ok(t) if t < vocab_size => Ok(t),
            _ => Err(ApiError::invalid(
                param,
                format!("token id {id} is outside the vocabulary (0..{vocab_size})"),
            )),
        })
        .collect()
}

/// Checks that the prompt leaves room for the output within the context.
pub fn check_context(
    prompt_tokens: usize,
    max_tokens: Option<NonZeroU32>,
    model_len_max: u32,
    prompt_param: &'static str,
) -> Result<(), ApiError> {
    let model_len_max = model_len_max as usize;
    if prompt_tokens == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    match max_tokens {
        Some(m) if prompt_tokens + m.get() as usize > model_len_max => Err(ApiError::invalid(
            "max_tokens",
            format!(
                "prompt ({prompt_tokens} tokens) plus max_tokens ({m}) exceeds the model's context length of {model_len_max} tokens"
            ),
        )),
        None if prompt_tokens >= model_len_max => Err(ApiError::invalid(
            prompt_param,
            format!(
                "the prompt ({prompt_tokens} tokens) leaves no room for output in the model's context length of {model_len_max} tokens"
            ),
        )),
        _ => Ok(()),
    }
}

/// Validates chat messages. A list of text parts stays a list: the chat template renders it
/// as parts when it can, else the engine joins the parts with newlines (as vLLM does).
pub fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                // `developer` is OpenAI's newer name for `system`.
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("messages[{i}].role `{other}` is not one of system, developer, user, assistant, tool"),
                    ))
                }
            };
            let content = match &m.content {
                None => candela_engine::MessageContent::Text(String::new()),
                Some(MessageContent::Text(t)) => candela_engine::MessageContent::Text(t.clone()),
                Some(MessageContent::Parts(parts)) => {
                    let parts = parts
                        .iter()
                        .enumerate()
                        .map(|(j, part)| match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => Ok(ContentPart::Text(t.clone())),
                            ("text", None) => Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}].content[{j}] of type `text` has no `text`"),
                            )),
                            (kind, _) => Err(ApiError::invalid(
                                "messages",
                                format!("messages[{i}].content[{j}]: content parts of type `{kind}` are not supported (only text)"),
                            )),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    candela_engine::MessageContent::Parts(parts)
                }
            };
            let mut message = ChatMessage::with_content(role, content);
            message.tool_calls = crate::tools::message_tool_calls(i, m)?;
            message.tool_call_id = m.tool_call_id.clone();
            message.name = m.name.clone();
            Ok(message)
        })
        .collect::<Result<Vec<_>, ApiError>>()
        .and_then(|messages| {
            crate::tools::check_tool_history(&messages)?;
            Ok(messages)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(json: &str) -> CommonParams {
        serde_json::from_str(json).unwrap_or_default()
    }

    fn param_of(r: Result<Plan, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body().error.param)
    }

    #[test]
    fn defaults_follow_openai() {
        let p = plan(&common("{}"), None, None, 100).map_err(|e| e.to_string());
        let Ok(p) = p else { panic!("{p:?}") };
        assert_eq!(p.sampling, SamplingParams::default());
        assert_eq!(p.n.get(), 1);
        assert!(!p.stream);
    }

    fn constraint_of(json: &str) -> Result<Option<OutputConstraint>, Option<String>> {
        let c: CommonParams = serde_json::from_str(json).map_err(|e| Some(e.to_string()))?;
        output_constraint(&c).map_err(|e| e.body().error.param)
    }

    #[test]
    fn every_spelling_of_an_output_constraint_is_read() {
        use OutputConstraint::*;
        let schema = r#"{"type":"object"}"#;
        for (json, expected) in [
            (r#"{}"#.to_string(), None),
            (r#"{"response_format": {"type": "text"}}"#.into(), None),
            (
                r#"{"response_format": {"type": "json_object"}}"#.into(),
                Some(JsonObject),
            ),
            (
                format!(
                    r#"{{"response_format": {{"type": "json_schema", "json_schema": {{"name": "x", "schema": {schema}}}}}}}"#
                ),
                Some(JsonSchema(schema.into())),
            ),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}"#
                    .into(),
                Some(JsonSchema("{}".into())),
            ),
            (
                format!(r#"{{"guided_json": {schema}}}"#),
                Some(JsonSchema(schema.into())),
            ),
            (
                r#"{"guided_json": "{\"type\": \"string\"}"}"#.into(),
                Some(JsonSchema(r#"{"type": "string"}"#.into())),
            ),
            (r#"{"guided_regex": "a+"}"#.into(), Some(Regex("a+".into()))),
            (
                r#"{"guided_choice": ["a", "b"]}"#.into(),
                Some(Choice(vec!["a".into(), "b".into()])),
            ),
            (
                r#"{"guided_grammar": "start: \"x\""}"#.into(),
                Some(Lark(r#"start: "x""#.into())),
            ),
            (
                r#"{"structured_outputs": {"regex": "b+"}}"#.into(),
                Some(Regex("b+".into())),
            ),
            (
                r#"{"structured_outputs": {"choice": ["c"]}}"#.into(),
                Some(Choice(vec!["c".into()])),
            ),
            (
                r#"{"structured_outputs": {"json_object": true}}"#.into(),
                Some(JsonObject),
            ),
            (
                format!(r#"{{"json_schema": {schema}}}"#),
                Some(JsonSchema(schema.into())),
            ),
        ] {
            assert_eq!(constraint_of(&json), Ok(expected), "{json}");
        }
    }

    #[test]
    fn bad_or_conflicting_output_constraints_name_their_parameter() {
        for (json, param) in [
            (r#"{"response_format": {}}"#, "response_format"),
            (
                r#"{"response_format": {"type": "yaml"}}"#,
                "response_format",
            ),
            (
                r#"{"response_format": {"type": "json_schema"}}"#,
                "response_format",
            ),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}"#,
                "response_format",
            ),
            (r#"{"guided_json": [1]}"#, "guided_json"),
            (r#"{"grammar": "root ::= \"x\""}"#, "grammar"),
            (r#"{"structured_outputs": 1}"#, "structured_outputs"),
            (r#"{"structured_outputs": {}}"#, "structured_outputs"),
            (
                r#"{"structured_outputs": {"regex": 1}}"#,
                "structured_outputs",
            ),
            (
                r#"{"structured_outputs": {"choice": [1]}}"#,
                "structured_outputs",
            ),
            (
                r#"{"structured_outputs": {"yaml": "x"}}"#,
                "structured_outputs",
            ),
            (
                r#"{"structured_outputs": {"regex": "a", "grammar": "b"}}"#,
                "structured_outputs",
            ),
            (
                r#"{"response_format": {"type": "json_object"}, "guided_regex": "a"}"#,
                "guided_regex",
            ),
        ] {
            assert_eq!(constraint_of(json), Err(Some(param.to_string())), "{json}");
        }
        // The constraint travels in the plan's sampling parameters.
        let p =
            plan(&common(r#"{"guided_regex": "x"}"#), None, None, 100).map_err(|e| e.to_string());
        let Ok(p) = p else { panic!("{p:?}") };
        assert_eq!(
            p.sampling.constraint,
            Some(OutputConstraint::Regex("x".into()))
        );
    }

    #[test]
    fn out_of_range_values_name_their_parameter() {
        for (json, param) in [
            (r#"{"temperature": -0.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"min_p": 2}"#, "min_p"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"presence_penalty": 3}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -3}"#, "frequency_penalty"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"logit_bias": {"abc": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"100": 1}}"#, "logit_bias"),
            (r#"{"logit_bias": {"5": 101}}"#, "logit_bias"),
            (r#"{"stop": ["a", ""]}"#, "stop"),
            (r#"{"stop_token_ids": [-1]}"#, "stop_token_ids"),
            (
                r#"{"stream_options": {"include_usage": true}}"#,
                "stream_options",
            ),
        ] {
            assert_eq!(
                param_of(plan(&common(json), None, None, 100)).as_deref(),
                Some(param),
                "{json}"
            );
        }
        assert_eq!(
            param_of(plan(&common("{}"), Some(-1), None, 100)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            param_of(plan(&common("{}"), Some(0), None, 100)).as_deref(),
            Some("max_tokens")
        );
    }

    #[test]
    fn valid_values_reach_the_sampling_params() {
        let c = common(
            r#"{"temperature": 0, "top_k": 5, "stop": "x", "seed": -1, "logit_bias": {"7": -100},
                "n": 3, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true}"#,
        );
        let Ok(p) = plan(&c, Some(12), Some(2), 100) else {
            panic!("rejected")
        };
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_k.map(NonZeroU32::get), Some(5));
        assert_eq!(p.sampling.stop, vec!["x".to_owned()]);
        assert_eq!(p.sampling.seed, Some(u64::MAX));
        assert_eq!(p.sampling.logit_bias, vec![(7, -100.0)]);
        assert_eq!(p.sampling.max_tokens.map(NonZeroU32::get), Some(12));
        assert_eq!(p.sampling.logprobs, Some(2));
        assert!(p.sampling.ignore_eos && p.stream && p.include_usage);
        assert_eq!(p.n.get(), 3);
    }

    #[test]
    fn context_check_counts_prompt_and_output() {
        let m = NonZeroU32::new(10);
        assert!(check_context(90, m, 100, "prompt").is_ok());
        assert!(check_context(91, m, 100, "prompt").is_err());
        assert!(check_context(99, None, 100, "prompt").is_ok());
        assert!(check_context(100, None, 100, "prompt").is_err());
        assert!(check_context(0, m, 100, "prompt").is_err());
    }

    #[test]
    fn chat_roles_are_checked_and_parts_kept() {
        let msgs: Vec<ChatMessageIn> = serde_json::from_str(
            r#"[{"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]"#,
        )
        .unwrap_or_default();
        let Ok(out) = chat_messages(&msgs) else {
            panic!("rejected")
        };
        assert_eq!(out[0].role, "system");
        // Parts reach the template as parts; a string-only template gets them joined by
        // newlines (vLLM's rule), never glued together.
        assert_eq!(
            out[1].content,
            candela_engine::MessageContent::Parts(vec![
                ContentPart::Text("a".into()),
                ContentPart::Text("b".into())
            ])
        );
        assert_eq!(out[1].content.joined_text(), "a\nb");
        let bad: Vec<ChatMessageIn> =
            serde_json::from_str(r#"[{"role": "wizard", "content": "x"}]"#).unwrap_or_default();
        assert!(chat_messages(&bad).is_err());
        assert!(chat_messages(&[]).is_err());
    }

    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        assert_eq!(token_ids(&[0, 99], 100, "prompt").ok(), Some(vec![0, 99]));
        assert!(token_ids(&[100], 100, "prompt").is_err());
        assert!(token_ids(&[-1], 100, "prompt").is_err());
    }

    #[test]
    fn logprobs_ranges() {
        assert_eq!(chat_logprobs(None, None).ok(), Some(None));
        assert_eq!(chat_logprobs(Some(true), Some(3)).ok(), Some(Some(3)));
        assert!(chat_logprobs(Some(true), Some(21)).is_err());
        assert!(chat_logprobs(None, Some(2)).is_err());
        assert_eq!(completion_logprobs(Some(0)).ok(), Some(Some(0)));
        assert!(completion_logprobs(Some(-1)).is_err());
    }
}
