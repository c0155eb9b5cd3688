//! The Responses API's `instructions` and `input` as the chat messages the template renders:
//! the translation that lets `/v1/responses` run on the chat path.
//!
//! | item                                            | chat message                        |
//! |-------------------------------------------------|-------------------------------------|
//! | `instructions`                                  | `system`, first                     |
//! | a string `input`                                | one `user` message                  |
//! | `{"type": "message", "role", "content"}`        | a message of that role (`developer` |
//! | (or the shorthand without `type`)               | is `system`)                        |
//! | `{"type": "function_call", "call_id", ...}`     | a `tool_calls` entry of the         |
//! |                                                 | assistant message before it (a new  |
//! |                                                 | one if there is none)               |
//! | `{"type": "function_call_output", "call_id"}`   | a `tool` message answering it       |
//!
//! Every mistake is a 400 naming `input` (or `instructions`) and the item's index.

use candela_engine::{ChatMessage, ContentPart, MessageContent, ToolCall};
use serde_json::Value;

use crate::error::ApiError;

/// Most items in one `input` (a bound on the work one request can ask of the template).
pub const ITEMS_MAX: usize = 2048;

/// The chat messages of a request's `instructions` and `input`.
pub fn messages(
    instructions: Option<&Value>,
    input: Option<&Value>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages = Vec::new();
    match instructions {
        None | Some(Value::Null) => {}
        Some(Value::String(text)) => {
            if !text.is_empty() {
                messages.push(ChatMessage::new("system", text.clone()));
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "instructions",
                "instructions must be a string",
            ))
        }
    }
    let items = match input {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "input",
                "input is required: a string or a list of items",
            ))
        }
        Some(Value::String(text)) => {
            messages.push(ChatMessage::new("user", text.clone()));
            return Ok(messages);
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "input must be a string or a list of items",
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid("input", "input must not be empty"));
    }
    if items.len() > ITEMS_MAX {
        return Err(ApiError::invalid(
            "input",
            format!("at most {ITEMS_MAX} input items, got {}", items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        add_item(&mut messages, i, item)?;
    }
    Ok(messages)
}

fn bad(i: usize, message: impl std::fmt::Display) -> ApiError {
    ApiError::invalid("input", format!("input[{i}]: {message}"))
}

/// A string field of item `i`.
fn string_field<'a>(item: &'a Value, i: usize, field: &str) -> Result<&'a str, ApiError> {
    item.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(i, format!("`{field}` must be a string")))
}

fn add_item(messages: &mut Vec<ChatMessage>, i: usize, item: &Value) -> Result<(), ApiError> {
    if !item.is_object() {
        return Err(bad(i, "an input item must be an object"));
    }
    // The shorthand `{"role": ..., "content": ...}` is a message without its `type`.
    let kind = match item.get("type") {
        None | Some(Value::Null) if item.get("role").is_some() => "message",
        Some(Value::String(kind)) => kind.as_str(),
        _ => return Err(bad(i, "an input item needs a `type`")),
    };
    match kind {
        "message" => {
            let role = match string_field(item, i, "role")? {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(bad(
                        i,
                        format!("role `{other}` is not one of user, assistant, system, developer"),
                    ))
                }
            };
            messages.push(ChatMessage::with_content(role, content(i, item)?));
        }
        "function_call" => {
            let call = ToolCall {
                id: string_field(item, i, "call_id")?.to_owned(),
                name: string_field(item, i, "name")?.to_owned(),
                // A JSON string, as OpenAI sends it; an object is taken as its text, as on chat.
                arguments: match item.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(object @ Value::Object(_)) => object.to_string(),
                    None | Some(Value::Null) => "{}".to_owned(),
                    Some(_) => return Err(bad(i, "`arguments` must be a JSON string")),
                },
            };
            if calls(messages).any(|c| c.id == call.id) {
                return Err(bad(
                    i,
                    format!("call_id `{}` is used by an earlier function_call", call.id),
                ));
            }
            // Calls right after an assistant message (or after other calls) belong to it: one
            // assistant turn, as the model wrote it and as chat templates expect it.
            match messages.last_mut() {
                Some(last) if last.role == "assistant" => last.tool_calls.push(call),
                _ => {
                    let mut message = ChatMessage::new("assistant", String::new());
                    message.tool_calls.push(call);
                    messages.push(message);
                }
            }
        }
        "function_call_output" => {
            let call_id = string_field(item, i, "call_id")?;
            let Some(name) = calls(messages)
                .find(|c| c.id == call_id)
                .map(|c| c.name.clone())
            else {
                return Err(bad(
                    i,
                    format!("call_id `{call_id}` answers no earlier function_call"),
                ));
            };
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => texts(i, parts)?.join("\n"),
                _ => return Err(bad(i, "`output` must be a string or a list of input_text parts")),
            };
            let mut message = ChatMessage::new("tool", output);
            message.tool_call_id = Some(call_id.to_owned());
            message.name = Some(name);
            messages.push(message);
        }
        other => {
            return Err(bad(
                i,
                format!("items of type `{other}` are not supported (message, function_call, function_call_output)"),
            ))
        }
    }
    Ok(())
}

/// Every tool call made so far.
fn calls(messages: &[ChatMessage]) -> impl Iterator<Item = &ToolCall> {
    messages.iter().flat_map(|m| m.tool_calls.iter())
}

/// A message's content: a string, or a list of text parts (kept as parts, as on chat).
fn content(i: usize, item: &Value) -> Result<MessageContent, ApiError> {
    match item.get("content") {
        Some(Value::String(text)) => Ok(MessageContent::Text(text.clone())),
        Some(Value::Array(parts)) => Ok(MessageContent::Parts(
            texts(i, parts)?
                .into_iter()
                .map(ContentPart::Text)
                .collect(),
        )),
        _ => Err(bad(i, "`content` must be a string or a list of parts")),
    }
}

/// The texts of `input_text` / `output_text` parts; any other part is refused.
fn texts(i: usize, parts: &[Value]) -> Result<Vec<String>, ApiError> {
    parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
            match (kind, part.get("text").and_then(Value::as_str)) {
                ("input_text" | "output_text" | "text", Some(text)) => Ok(text.to_owned()),
                ("input_text" | "output_text" | "text", None) => {
                    Err(bad(i, format!("part {j} of type `{kind}` has no `text`")))
                }
                _ => Err(bad(
                    i,
                    format!("part {j}: parts of type `{kind}` are not supported (only input_text and output_text)"),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn translate(input: Value) -> Result<Vec<ChatMessage>, String> {
        messages(Some(&json!("Be brief.")), Some(&input)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_string_is_one_user_message_after_the_instructions() {
        let out = translate(json!("hi")).unwrap_or_default();
        assert_eq!(
            out,
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "hi")
            ]
        );
        let none = messages(None, Some(&json!("hi"))).unwrap_or_default();
        assert_eq!(none, vec![ChatMessage::new("user", "hi")]);
    }

    #[test]
    fn items_in_every_shape() {
        let out = translate(json!([
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{\"x\":1}", "status": "completed"},
            {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "one"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "two"}]},
            {"type": "function_call", "call_id": "call_3", "name": "f", "arguments": {"x": 2}},
        ]));
        let Ok(out) = out else { panic!("{out:?}") };
        let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            [
                "system",
                "system",
                "user",
                "assistant",
                "tool",
                "tool",
                "assistant"
            ]
        );
        assert_eq!(out[2].content.joined_text(), "a\nb");
        // The calls join the assistant message they follow.
        assert_eq!(out[3].content.joined_text(), "Let me look.");
        let ids: Vec<&str> = out[3].tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["call_1", "call_2"]);
        assert_eq!(out[3].tool_calls[0].arguments, "{\"x\":1}");
        assert_eq!(out[4].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(out[4].name.as_deref(), Some("f"));
        assert_eq!(out[5].content.joined_text(), "two");
        // A call after a tool result starts a new assistant turn; an object is its JSON text.
        assert_eq!(out[6].tool_calls[0].arguments, r#"{"x":2}"#);
    }

    #[test]
    fn mistakes_name_input_and_the_item() {
        for (input, expected) in [
            (json!([]), "must not be empty"),
            (json!(3), "a string or a list"),
            (json!([1]), "input[0]: an input item must be an object"),
            (
                json!([{"content": "x"}]),
                "input[0]: an input item needs a `type`",
            ),
            (json!([{"role": "wizard", "content": "x"}]), "role `wizard`"),
            (json!([{"role": "user"}]), "`content` must be"),
            (
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                "`input_image` are not supported",
            ),
            (
                json!([{"type": "reasoning", "summary": []}]),
                "`reasoning` are not supported",
            ),
            (
                json!([{"type": "function_call_output", "call_id": "c", "output": "x"}]),
                "input[0]: call_id `c` answers no earlier function_call",
            ),
            (
                json!([{"type": "function_call", "call_id": "c"}]),
                "`name` must be a string",
            ),
            (
                json!([{"type": "function_call", "call_id": "c", "name": "f"},
                       {"type": "function_call", "call_id": "c", "name": "f"}]),
                "input[1]: call_id `c` is used by an earlier function_call",
            ),
            (
                json!([{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]),
                "`arguments` must be a JSON string",
            ),
        ] {
            let error = messages(None, Some(&input)).err();
            let Some(error) = error else {
                panic!("{input} was accepted")
            };
            assert_eq!(
                error.body().error.param.as_deref(),
                Some("input"),
                "{input}"
            );
            assert!(
                error.to_string().contains(expected),
                "{input}: {error} lacks {expected:?}"
            );
        }
        assert!(messages(None, None).is_err());
        let bad_instructions = messages(Some(&json!(["x"])), Some(&json!("hi"))).err();
        assert_eq!(
            bad_instructions
                .and_then(|e| e.body().error.param)
                .as_deref(),
            Some("instructions")
        );
    }
}
