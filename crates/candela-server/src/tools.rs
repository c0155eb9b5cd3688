//! OpenAI tool calling on the wire: `tools`, `tool_choice` and `parallel_tool_calls` of a
//! request, and the tool fields of its messages, checked into the engine's types. Every
//! mistake is a 400 naming the parameter (llama.cpp answers some of them with a 500).
//!
//! Chat Completions nest a tool's fields under `function`; the Responses API writes them flat
//! (`{"type": "function", "name": ...}`, and `{"type": "function", "name": ...}` as a named
//! `tool_choice`). [`Shape`] says which; everything else is checked the same way.

use candela_engine::api::{ToolCalling, ToolChoice, ToolSpec};
use candela_engine::ToolCall;
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::ChatMessageIn;

/// Longest function name OpenAI accepts.
const NAME_LEN_MAX: usize = 64;
/// Most tools in one request (OpenAI's limit).
const TOOLS_MAX: usize = 128;

/// Where a tool's fields are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Chat Completions: `{"type": "function", "function": {"name", ...}}`.
    Nested,
    /// The Responses API: `{"type": "function", "name", ...}`, where an omitted `strict`
    /// means true (OpenAI's default there).
    Flat,
}

/// The request's tools, or `None` when it offers none.
pub fn tool_calling(
    shape: Shape,
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel_tool_calls: Option<bool>,
) -> Result<Option<ToolCalling>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| tool_spec(shape, i, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(ApiError::invalid("tools", "tools must be a list")),
    };
    if tools.len() > TOOLS_MAX {
        return Err(ApiError::invalid(
            "tools",
            format!("at most {TOOLS_MAX} tools, got {}", tools.len()),
        ));
    }
    for (i, tool) in tools.iter().enumerate() {
        if tools[..i].iter().any(|t| t.name == tool.name) {
            return Err(ApiError::invalid(
                "tools",
                format!(
                    "tools[{i}]: the function name `{}` is given twice",
                    tool.name
                ),
            ));
        }
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => {
            if tools.is_empty() {
                ToolChoice::None
            } else {
                ToolChoice::Auto
            }
        }
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!(
                        "tool_choice `{other}` is not one of none, auto, required, or {}",
                        named_choice(shape)
                    ),
                ))
            }
        },
        Some(Value::Object(object)) => {
            let name = match object.get("type").and_then(Value::as_str) {
                Some("function") => match shape {
                    Shape::Nested => object.get("function").and_then(|f| f.get("name")),
                    Shape::Flat => object.get("name"),
                },
                _ => None,
            };
            let name = name.and_then(Value::as_str);
            let Some(name) = name else {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("a named tool_choice is {}", named_choice(shape)),
                ));
            };
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    format!("tool_choice names the function `{name}`, which is not in tools"),
                ));
            }
            ToolChoice::Function(name.to_owned())
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be a string or an object",
            ))
        }
    };
    if tools.is_empty() {
        if matches!(choice, ToolChoice::None) && tool_choice.is_none() {
            return Ok(None);
        }
        if !matches!(choice, ToolChoice::None) {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice needs tools to choose from",
            ));
        }
        return Ok(None);
    }
    Ok(Some(ToolCalling {
        tools,
        choice,
        parallel: parallel_tool_calls.unwrap_or(true),
    }))
}

/// How a named `tool_choice` is written, for error messages.
fn named_choice(shape: Shape) -> &'static str {
    match shape {
        Shape::Nested => r#"{"type": "function", "function": {"name": ...}}"#,
        Shape::Flat => r#"{"type": "function", "name": ...}"#,
    }
}

fn tool_spec(shape: Shape, i: usize, item: &Value) -> Result<ToolSpec, ApiError> {
    let bad = |message: String| ApiError::invalid("tools", format!("tools[{i}]: {message}"));
    match item.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(bad(format!(
                "tools of type `{other}` are not supported (only function)"
            )))
        }
        None => return Err(bad("`type` must be \"function\"".into())),
    }
    // `at` is where the fields are, for error messages: `function.name` or `name`.
    let (function, at) = match shape {
        Shape::Nested => match item.get("function").filter(|f| f.is_object()) {
            Some(function) => (function, "function."),
            None => return Err(bad("`function` must be an object".into())),
        },
        Shape::Flat => (item, ""),
    };
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("`{at}name` must be a string")))?;
    let valid_name = !name.is_empty()
        && name.len() <= NAME_LEN_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !valid_name {
        return Err(bad(format!(
            "function name `{name}` must be 1 to {NAME_LEN_MAX} letters, digits, `_`, `-` or `.`"
        )));
    }
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad(format!("`{at}description` must be a string"))),
    };
    // A function without parameters takes none (vLLM #28806 lost these).
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => r#"{"type": "object", "properties": {}}"#.to_owned(),
        Some(schema @ Value::Object(_)) => schema.to_string(),
        Some(_) => {
            return Err(bad(format!(
                "`{at}parameters` must be a JSON Schema object"
            )))
        }
    };
    let strict = match function.get("strict") {
        None | Some(Value::Null) => shape == Shape::Flat,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad(format!("`{at}strict` must be a boolean"))),
    };
    Ok(ToolSpec {
        name: name.to_owned(),
        description,
        parameters,
        strict,
    })
}

/// The tool calls of assistant message `i`.
pub fn message_tool_calls(i: usize, message: &ChatMessageIn) -> Result<Vec<ToolCall>, ApiError> {
    let calls = match &message.tool_calls {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                format!("messages[{i}].tool_calls must be a list"),
            ))
        }
    };
    if message.role != "assistant" && !calls.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            format!("messages[{i}]: only assistant messages have tool_calls"),
        ));
    }
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let bad = |what: &str| {
                ApiError::invalid("messages", format!("messages[{i}].tool_calls[{j}]: {what}"))
            };
            let id = call
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`id` must be a string"))?;
            if call
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t != "function")
            {
                return Err(bad("`type` must be \"function\""));
            }
            let function = call
                .get("function")
                .ok_or_else(|| bad("`function` is missing"))?;
            let name = function
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`function.name` must be a string"))?;
            // OpenAI sends a JSON string; an object (as some clients send) is taken as its text.
            let arguments = match function.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(object @ Value::Object(_)) => object.to_string(),
                None | Some(Value::Null) => "{}".to_owned(),
                Some(_) => return Err(bad("`function.arguments` must be a JSON string")),
            };
            Ok(ToolCall {
                id: id.to_owned(),
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

/// Checks that every `tool` message answers a call an earlier assistant message made.
pub fn check_tool_history(messages: &[candela_engine::ChatMessage]) -> Result<(), ApiError> {
    for (i, message) in messages.iter().enumerate() {
        if message.role != "tool" {
            continue;
        }
        let Some(id) = &message.tool_call_id else {
            return Err(ApiError::invalid(
                "messages",
                format!("messages[{i}]: a tool message needs `tool_call_id`"),
            ));
        };
        let answered = messages[..i]
            .iter()
            .any(|m| m.tool_calls.iter().any(|call| &call.id == id));
        if !answered {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "messages[{i}]: tool_call_id `{id}` answers no earlier assistant tool call"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn param_of(r: Result<Option<ToolCalling>, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.body().error.param)
    }

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    }

    #[test]
    fn tool_choice_defaults_follow_openai() {
        let calling = tool_calling(Shape::Nested, Some(&weather()), None, None)
            .ok()
            .flatten();
        let calling = calling.expect("tools");
        assert_eq!(calling.choice, ToolChoice::Auto);
        assert!(calling.parallel);
        assert!(matches!(
            tool_calling(Shape::Nested, None, None, None),
            Ok(None)
        ));
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let calling = tool_calling(Shape::Nested, Some(&weather()), Some(&named), Some(false));
        assert!(
            matches!(calling, Ok(Some(ToolCalling { choice: ToolChoice::Function(ref n), parallel: false, .. })) if n == "get_weather")
        );
    }

    #[test]
    fn mistakes_name_their_parameter() {
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            param_of(tool_calling(
                Shape::Nested,
                Some(&weather()),
                Some(&unknown),
                None
            ))
            .as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            param_of(tool_calling(
                Shape::Nested,
                None,
                Some(&json!("required")),
                None
            ))
            .as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            param_of(tool_calling(
                Shape::Nested,
                Some(&weather()),
                Some(&json!("sometimes")),
                None
            ))
            .as_deref(),
            Some("tool_choice")
        );
        for bad in [
            json!({"type": "function"}),
            json!([{"type": "code_interpreter"}]),
            json!([{"type": "function", "function": {"name": "has space"}}]),
            json!([{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
            json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
        ] {
            assert_eq!(
                param_of(tool_calling(Shape::Nested, Some(&bad), None, None)).as_deref(),
                Some("tools"),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_flat_shape_of_the_responses_api() {
        let tools = json!([{"type": "function", "name": "get_weather", "description": "d",
                            "parameters": {"type": "object"}}]);
        let named = json!({"type": "function", "name": "get_weather"});
        let calling = tool_calling(Shape::Flat, Some(&tools), Some(&named), None)
            .ok()
            .flatten()
            .expect("tools");
        assert_eq!(calling.choice, ToolChoice::Function("get_weather".into()));
        assert_eq!(calling.tools[0].description.as_deref(), Some("d"));
        // OpenAI's default for flat function tools is strict.
        assert!(calling.tools[0].strict);
        let lenient = json!([{"type": "function", "name": "f", "strict": false}]);
        let calling = tool_calling(Shape::Flat, Some(&lenient), None, None)
            .ok()
            .flatten();
        assert!(calling.is_some_and(|c| !c.tools[0].strict));
        // The nested forms are mistakes in the flat shape, and the reverse.
        let nested_choice = json!({"type": "function", "function": {"name": "get_weather"}});
        assert_eq!(
            param_of(tool_calling(
                Shape::Flat,
                Some(&tools),
                Some(&nested_choice),
                None
            ))
            .as_deref(),
            Some("tool_choice")
        );
        assert_eq!(
            param_of(tool_calling(Shape::Flat, Some(&weather()), None, None)).as_deref(),
            Some("tools")
        );
        assert_eq!(
            param_of(tool_calling(Shape::Nested, Some(&tools), None, None)).as_deref(),
            Some("tools")
        );
    }

    #[test]
    fn parameterless_tools_take_an_empty_object() {
        let tools = json!([{"type": "function", "function": {"name": "now"}}]);
        let calling = tool_calling(Shape::Nested, Some(&tools), None, None)
            .ok()
            .flatten()
            .expect("tools");
        assert_eq!(
            calling.tools[0].parameters,
            r#"{"type": "object", "properties": {}}"#
        );
    }
}
