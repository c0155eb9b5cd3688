//! What the chat template sees of a request's tools. A template that knows tools gets them
//! as `tools` and the history's calls as `tool_calls` / `tool` messages, as `transformers`
//! passes them. A template that does not (SmolLM2, Gemma 3) gets the generic format: the
//! tools and the answer's JSON shape described in the system message, past calls as the JSON
//! the model would have written, and tool results as user turns (templates such as Gemma's
//! refuse any role but user and assistant, and require them to alternate).

use candela_models::chat_template::{ChatMessage, MessageContent, ToolFormat};
use serde_json::{json, Value};

use crate::api::{ToolCalling, ToolChoice, ToolSpec};

/// The messages to render and the template's `tools` value.
pub(crate) fn prompt_messages(
    format: ToolFormat,
    messages: &[ChatMessage],
    calling: Option<&ToolCalling>,
) -> (Vec<ChatMessage>, Option<Value>) {
    let offered = calling.filter(|c| c.choice != ToolChoice::None);
    if format != ToolFormat::Generic {
        return (messages.to_vec(), offered.map(template_tools));
    }
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    // Whether the last message in `out` is tool results turned into a user turn.
    let mut last_was_tool = false;
    for message in messages {
        match message.role.as_str() {
            "assistant" if !message.tool_calls.is_empty() => {
                let calls: Vec<Value> = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        let arguments = serde_json::from_str::<Value>(&call.arguments)
                            .unwrap_or_else(|_| Value::String(call.arguments.clone()));
                        json!({"name": call.name, "arguments": arguments})
                    })
                    .collect();
                out.push(ChatMessage::new(
                    "assistant",
                    json!({ "tool_calls": calls }).to_string(),
                ));
                last_was_tool = false;
            }
            "tool" => {
                let name = message
                    .name
                    .clone()
                    .or_else(|| called_name(messages, message.tool_call_id.as_deref()));
                let result = json!({"tool_response": {
                    "name": name,
                    "content": message.content.joined_text(),
                }})
                .to_string();
                match out.last_mut() {
                    Some(previous) if last_was_tool => {
                        let text = format!("{}\n{result}", previous.content.joined_text());
                        previous.content = MessageContent::Text(text);
                    }
                    _ => out.push(ChatMessage::new("user", result)),
                }
                last_was_tool = true;
            }
            _ => {
                out.push(message.clone());
                last_was_tool = false;
            }
        }
    }
    if let Some(calling) = offered {
        let instructions = generic_instructions(calling);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                let text = format!("{}\n\n{instructions}", first.content.joined_text());
                first.content = MessageContent::Text(text);
            }
            _ => out.insert(0, ChatMessage::new("system", instructions)),
        }
    }
    (out, None)
}

/// The name of the function the call `id` (answered by a `tool` message) invoked.
fn called_name(messages: &[ChatMessage], id: Option<&str>) -> Option<String> {
    let id = id?;
    messages
        .iter()
        .flat_map(|m| m.tool_calls.iter())
        .find(|call| call.id == id)
        .map(|call| call.name.clone())
}

/// OpenAI's tool list as templates read it.
fn template_tools(calling: &ToolCalling) -> Value {
    Value::Array(
        calling
            .tools
            .iter()
            .map(|tool| json!({"type": "function", "function": function_json(tool)}))
            .collect(),
    )
}

fn function_json(tool: &ToolSpec) -> Value {
    let parameters: Value =
        serde_json::from_str(&tool.parameters).unwrap_or_else(|_| json!({"type": "object"}));
    let mut function = json!({"name": tool.name, "parameters": parameters});
    if let Some(description) = &tool.description {
        function["description"] = json!(description);
    }
    function
}

/// The system text of the generic format: the tools, and the one JSON answer expected.
fn generic_instructions(calling: &ToolCalling) -> String {
    let tools: Vec<&ToolSpec> = match &calling.choice {
        ToolChoice::Function(name) => calling.tools.iter().filter(|t| &t.name == name).collect(),
        _ => calling.tools.iter().collect(),
    };
    let listed: Vec<String> = tools.iter().map(|t| function_json(t).to_string()).collect();
    let call_shape = r#"{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}"#;
    let answer = match calling.choice {
        ToolChoice::Auto => format!(
            "Answer with one JSON object: {call_shape} to call functions, or {{\"response\": \"<your answer>\"}} to answer the user directly."
        ),
        _ => format!("Answer with one JSON object that calls a function: {call_shape}."),
    };
    format!(
        "You can call these functions (their arguments follow the JSON Schema given):\n{}\n\n{answer}\nFunction results come back as {{\"tool_response\": ...}}.",
        listed.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candela_models::chat_template::ToolCall;

    fn calling(choice: ToolChoice) -> ToolCalling {
        ToolCalling {
            tools: vec![ToolSpec {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: r#"{"type": "object"}"#.into(),
                strict: false,
            }],
            choice,
            parallel: true,
        }
    }

    fn history() -> Vec<ChatMessage> {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![
            ToolCall {
                id: "call_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Paris"}"#.into(),
            },
            ToolCall {
                id: "call_2".into(),
                name: "get_weather".into(),
                arguments: r#"{"city": "Rome"}"#.into(),
            },
        ];
        let mut first = ChatMessage::new("tool", "18C");
        first.tool_call_id = Some("call_1".into());
        let mut second = ChatMessage::new("tool", "25C");
        second.tool_call_id = Some("call_2".into());
        vec![ChatMessage::new("user", "Weather?"), call, first, second]
    }

    #[test]
    fn generic_history_alternates_user_and_assistant() {
        let (messages, tools) = prompt_messages(
            ToolFormat::Generic,
            &history(),
            Some(&calling(ToolChoice::Auto)),
        );
        assert!(tools.is_none());
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert!(messages[0].content.joined_text().contains("get_weather"));
        assert!(messages[0].content.joined_text().contains("\"response\""));
        assert_eq!(
            messages[2].content.joined_text(),
            r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_weather","arguments":{"city":"Rome"}}]}"#
        );
        let results = messages[3].content.joined_text();
        assert_eq!(results.lines().count(), 2, "{results}");
        assert!(results.contains("\"name\":\"get_weather\"") && results.contains("25C"));
    }

    #[test]
    fn templates_with_tools_get_them_as_given() {
        let (messages, tools) = prompt_messages(
            ToolFormat::Hermes,
            &history(),
            Some(&calling(ToolChoice::Required)),
        );
        assert_eq!(messages, history());
        let tools = tools.expect("tools");
        assert_eq!(tools[0]["function"]["name"], "get_weather");
        // `none` hides the tools from the model.
        let (_, tools) = prompt_messages(
            ToolFormat::Hermes,
            &history(),
            Some(&calling(ToolChoice::None)),
        );
        assert!(tools.is_none());
        let (messages, _) = prompt_messages(
            ToolFormat::Generic,
            &history(),
            Some(&calling(ToolChoice::None)),
        );
        assert_eq!(messages[0].role, "user");
    }
}
