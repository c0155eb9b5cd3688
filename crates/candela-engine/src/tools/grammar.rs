//! The constraints that make a tool call well-formed: its name one of the tools, its arguments
//! valid under the tool's schema, in the model's own [`ToolFormat`].
//!
//! `required` and a named function are eager (the whole output is constrained from the first
//! token); `auto` is lazy where the format has a marker (free text until the marker, the
//! call constrained after it) and eager where it has none (generic JSON: the answer is either
//! calls or a `response`; Llama 3: text that does not open with `{`, or calls). Grammars are
//! llguidance's Lark with inline `%json` schemas.

use candela_models::chat_template::ToolFormat;
use serde_json::{json, Value};

use crate::api::{OutputConstraint, ToolCalling, ToolChoice, ToolSpec};
use crate::structured::json_options;

/// The constraints of one request's tool choice.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolGrammar {
    /// From the first token.
    pub(crate) eager: Option<OutputConstraint>,
    /// Once the output contains the marker: the constraint of what follows it.
    pub(crate) lazy: Option<(&'static str, OutputConstraint)>,
}

/// Builds the constraints; `Err` names what is wrong with a tool (its schema not JSON, or not
/// an object schema).
pub(crate) fn tool_grammar(
    format: ToolFormat,
    calling: &ToolCalling,
) -> Result<ToolGrammar, String> {
    let none = ToolGrammar {
        eager: None,
        lazy: None,
    };
    let tools: Vec<&ToolSpec> = match &calling.choice {
        ToolChoice::None => return Ok(none),
        ToolChoice::Function(name) => calling.tools.iter().filter(|t| &t.name == name).collect(),
        ToolChoice::Auto | ToolChoice::Required => calling.tools.iter().collect(),
    };
    if tools.is_empty() {
        return Err("no tool matches tool_choice".into());
    }
    let one_call = !calling.parallel || matches!(calling.choice, ToolChoice::Function(_));
    // Non-strict tools accept schemas with keywords the grammar compiler cannot enforce (it
    // skips them); one strict tool makes the whole request strict.
    let lenient = !tools.iter().any(|t| t.strict);
    let args_key = match format {
        ToolFormat::Llama3 => "parameters",
        _ => "arguments",
    };
    let mut calls = Vec::with_capacity(tools.len());
    for tool in &tools {
        calls.push(call_schema(tool, args_key)?);
    }
    let call = match calls.len() {
        1 => calls.remove(0),
        _ => json!({ "anyOf": calls }),
    };
    let mut array = json!({"type": "array", "items": call.clone(), "minItems": 1});
    if one_call {
        array["maxItems"] = json!(1);
    }
    let auto = matches!(calling.choice, ToolChoice::Auto);
    let lark_json = |schema: &Value| format!("%json {}", with_options(schema.clone(), lenient));
    Ok(match format {
        ToolFormat::Generic => {
            let calls = json!({
                "type": "object",
                "properties": {"tool_calls": array},
                "required": ["tool_calls"],
                "additionalProperties": false,
            });
            let schema = if auto {
                json!({"anyOf": [calls, {
                    "type": "object",
                    "properties": {"response": {"type": "string"}},
                    "required": ["response"],
                    "additionalProperties": false,
                }]})
            } else {
                calls
            };
            ToolGrammar {
                eager: Some(OutputConstraint::JsonSchema(
                    with_options(schema, lenient).to_string(),
                )),
                lazy: None,
            }
        }
        ToolFormat::Hermes => {
            let more = if one_call { "" } else { " (\"\\n\"? block)*" };
            let rules = format!(
                "block: \"<tool_call>\" body\nbody: \"\\n\"? call \"\\n\"? \"</tool_call>\"\ncall: {}\n",
                lark_json(&call)
            );
            after_marker("<tool_call>", &format!("body{more}"), &rules, auto)
        }
        ToolFormat::Mistral => after_marker("[TOOL_CALLS]", &lark_json(&array), "", auto),
        ToolFormat::Llama3 => {
            let more = if one_call {
                ""
            } else {
                " (\";\" \" \"? call)*"
            };
            let calls = format!("calls: call{more}\ncall: {}\n", lark_json(&call));
            // Llama 3 has no marker before a call: under `auto` the answer is text that does
            // not open with `{`, or calls (llguidance's own example for this format).
            let start = if auto {
                "start: TEXT | calls\nTEXT: /[^{](.|\\n)*/\n"
            } else {
                "start: calls\n"
            };
            ToolGrammar {
                eager: Some(OutputConstraint::Lark(format!("{start}{calls}"))),
                lazy: None,
            }
        }
    })
}

/// A format whose calls follow a marker: under `auto` the grammar of what follows the marker
/// (`start`, with `rules`), switched on when the marker appears; otherwise the same grammar
/// behind the marker, from the first token.
fn after_marker(marker: &'static str, start: &str, rules: &str, auto: bool) -> ToolGrammar {
    if auto {
        ToolGrammar {
            eager: None,
            lazy: Some((
                marker,
                OutputConstraint::Lark(format!("start: {start}\n{rules}")),
            )),
        }
    } else {
        ToolGrammar {
            eager: Some(OutputConstraint::Lark(format!(
                "start: \"{marker}\" {start}\n{rules}"
            ))),
            lazy: None,
        }
    }
}

/// `{"name": <the tool's name>, "<args_key>": <its parameters>}`, nothing else.
fn call_schema(tool: &ToolSpec, args_key: &str) -> Result<Value, String> {
    let mut parameters: Value = serde_json::from_str(&tool.parameters)
        .map_err(|e| format!("tool `{}`: parameters are not JSON: {e}", tool.name))?;
    let Some(object) = parameters.as_object_mut() else {
        return Err(format!(
            "tool `{}`: parameters must be a JSON Schema object",
            tool.name
        ));
    };
    // Arguments are the listed properties and no others unless the schema says otherwise
    // (as llama.cpp's grammars and OpenAI's strict mode): JSON Schema's default of allowing
    // any other key lets a small model wander off into keys no function takes.
    if object.contains_key("properties") || object.is_empty() {
        object
            .entry("additionalProperties")
            .or_insert(Value::Bool(false));
        object.entry("type").or_insert(json!("object"));
    }
    Ok(json!({
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: parameters},
        "required": ["name", args_key],
        "additionalProperties": false,
    }))
}

/// A schema with llguidance's compile options (bounded whitespace, leniency) at its root.
fn with_options(mut schema: Value, lenient: bool) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.insert("x-guidance".into(), json_options(lenient));
    }
    schema
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calling(choice: ToolChoice, parallel: bool) -> ToolCalling {
        let tool = |name: &str, parameters: &str| ToolSpec {
            name: name.into(),
            description: None,
            parameters: parameters.into(),
            strict: false,
        };
        ToolCalling {
            tools: vec![
                tool(
                    "get_weather",
                    r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#,
                ),
                tool("now", "{}"),
            ],
            choice,
            parallel,
        }
    }

    #[test]
    fn none_constrains_nothing_and_auto_is_lazy_where_there_is_a_marker() {
        let none = tool_grammar(ToolFormat::Hermes, &calling(ToolChoice::None, true));
        assert_eq!(none.map(|g| (g.eager, g.lazy)), Ok((None, None)));
        let auto =
            tool_grammar(ToolFormat::Hermes, &calling(ToolChoice::Auto, true)).expect("compiles");
        assert!(auto.eager.is_none());
        assert_eq!(auto.lazy.as_ref().map(|l| l.0), Some("<tool_call>"));
        let generic =
            tool_grammar(ToolFormat::Generic, &calling(ToolChoice::Auto, true)).expect("compiles");
        assert!(generic.eager.is_some() && generic.lazy.is_none());
    }

    #[test]
    fn a_named_function_allows_only_it_once() {
        let named = tool_grammar(
            ToolFormat::Generic,
            &calling(ToolChoice::Function("now".into()), true),
        )
        .expect("compiles");
        let Some(OutputConstraint::JsonSchema(schema)) = named.eager else {
            panic!("{named:?}");
        };
        assert!(
            schema.contains("\"maxItems\":1") && !schema.contains("get_weather"),
            "{schema}"
        );
    }

    #[test]
    fn bad_schemas_are_named() {
        let mut bad = calling(ToolChoice::Required, true);
        bad.tools[1].parameters = "[1]".into();
        let error = tool_grammar(ToolFormat::Generic, &bad).expect_err("refused");
        assert!(error.contains("`now`"), "{error}");
    }
}
