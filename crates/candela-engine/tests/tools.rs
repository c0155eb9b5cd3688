//! Tool calling through the real engine and the default model (SmolLM2), in each format: the
//! generic JSON format SmolLM2's own template gets, and the Hermes, Mistral and Llama 3
//! formats chosen by overriding the chat template with one that shows their markers. A
//! required or named tool choice must give calls whose name is a tool's and whose arguments
//! are a JSON object valid for it, finishing with `tool_calls`; greedy runs repeat exactly.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candela_engine::api::{
    FinishReason, GenerateEvent, GenerateRequest, SamplingParams, SubmitError, ToolCallDelta,
    ToolCalling, ToolChoice, ToolSpec,
};
use candela_engine::{ChatMessage, EngineConfig, EngineHandle, ToolFormat};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn start(template: Option<&str>) -> EngineHandle {
    let chat_template = template.map(|name| {
        std::fs::read_to_string(repo(&format!("testdata/templates/{name}"))).expect("template")
    });
    let engine = EngineHandle::start(EngineConfig {
        model: repo("models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .to_string_lossy()
            .into_owned(),
        chat_template,
        ..EngineConfig::default()
    })
    .expect("the default model loads");
    engine
        .wait_ready(Duration::from_secs(120))
        .expect("the engine warms up");
    engine
}

fn tools(choice: ToolChoice, parallel: bool) -> ToolCalling {
    ToolCalling {
        tools: vec![
            ToolSpec {
                name: "get_weather".into(),
                description: Some("The current weather in a city".into()),
                parameters: r#"{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}"#.into(),
                strict: false,
            },
            ToolSpec {
                name: "get_time".into(),
                description: Some("The current time".into()),
                parameters: r#"{"type": "object", "properties": {}}"#.into(),
                strict: true,
            },
        ],
        choice,
        parallel,
    }
}

/// A call as assembled from its pieces: id, name, arguments.
type Call = (String, String, String);

/// Runs one chat with tools to the end: content, calls, finish reason.
fn run(
    engine: &EngineHandle,
    calling: ToolCalling,
    max_tokens: u32,
) -> (String, Vec<Call>, FinishReason) {
    let messages = [ChatMessage::new("user", "What is the weather in Paris?")];
    let prompt = engine
        .apply_chat_template_with_tools(&messages, Some(&calling), true)
        .expect("renders");
    let prompt = engine.tokenize(&prompt, false).expect("tokenizes");
    let (_, mut events) = engine
        .submit(GenerateRequest {
            prompt_token_ids: prompt,
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: NonZeroU32::new(max_tokens),
                tools: Some(calling),
                ..SamplingParams::default()
            },
            n: NonZeroU32::MIN,
            priority: 0,
            arrival: Instant::now(),
        })
        .expect("submits");
    let mut content = String::new();
    let mut calls: Vec<Call> = Vec::new();
    loop {
        match events
            .blocking_recv()
            .expect("the engine finishes the choice")
        {
            GenerateEvent::Delta {
                text, tool_calls, ..
            } => {
                content.push_str(&text);
                for ToolCallDelta {
                    index,
                    id,
                    name,
                    arguments,
                } in tool_calls
                {
                    if let (Some(id), Some(name)) = (id, name) {
                        assert_eq!(index as usize, calls.len(), "calls are announced in order");
                        assert!(
                            arguments.is_empty(),
                            "a call's first piece has no arguments"
                        );
                        calls.push((id, name, String::new()));
                    } else {
                        calls[index as usize].2.push_str(&arguments);
                    }
                }
            }
            GenerateEvent::Finished { reason, .. } => return (content, calls, reason),
        }
    }
}

fn assert_valid_calls(calls: &[Call], only: Option<&str>) {
    assert!(!calls.is_empty());
    for (id, name, arguments) in calls {
        assert!(id.starts_with("call_"), "{id}");
        assert!(
            ["get_weather", "get_time"].contains(&name.as_str()) && only.is_none_or(|o| o == name),
            "{name}"
        );
        let arguments: serde_json::Value =
            serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
        let object = arguments.as_object().expect("arguments are an object");
        match name.as_str() {
            "get_weather" => assert!(
                object.get("city").is_some_and(|c| c.is_string()),
                "{object:?}"
            ),
            _ => assert!(object.is_empty(), "get_time takes no arguments: {object:?}"),
        }
    }
}

#[test]
fn each_format_gives_valid_calls_for_required_and_named_choices() {
    for (template, format) in [
        (None, ToolFormat::Generic),
        (Some("hermes-qwen2.5.jinja"), ToolFormat::Hermes),
        (Some("mistral-tools.jinja"), ToolFormat::Mistral),
        (Some("llama3.1-tools.jinja"), ToolFormat::Llama3),
    ] {
        let engine = start(template);
        assert_eq!(engine.tool_format(), format);
        let (content, calls, reason) = run(&engine, tools(ToolChoice::Required, false), 80);
        assert_eq!(
            reason,
            FinishReason::ToolCalls,
            "{format:?}: {content:?} {calls:?}"
        );
        assert_eq!(
            calls.len(),
            1,
            "{format:?}: parallel_tool_calls false gives one call"
        );
        assert_valid_calls(&calls, None);
        let named = tools(ToolChoice::Function("get_time".into()), true);
        let (_, calls, reason) = run(&engine, named, 80);
        assert_eq!(reason, FinishReason::ToolCalls, "{format:?}");
        assert_valid_calls(&calls, Some("get_time"));
        // Greedy: the same request gives the same calls (ids aside).
        let again = |engine: &EngineHandle| {
            let (content, calls, reason) = run(engine, tools(ToolChoice::Required, false), 80);
            let calls: Vec<(String, String)> = calls.into_iter().map(|(_, n, a)| (n, a)).collect();
            (content, calls, reason)
        };
        assert_eq!(again(&engine), again(&engine), "{format:?}");
        // `none` is plain text.
        let (content, calls, reason) = run(&engine, tools(ToolChoice::None, true), 8);
        assert!(calls.is_empty() && !content.is_empty(), "{format:?}");
        assert!(matches!(
            reason,
            FinishReason::Length | FinishReason::Stop(_)
        ));
    }
}

#[test]
fn tool_grammar_errors_are_client_errors_naming_tools() {
    let engine = start(None);
    let mut calling = tools(ToolChoice::Required, true);
    calling.tools[0].parameters = r#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]}"#.into();
    calling.tools[0].strict = true;
    calling.tools.truncate(1);
    let prompt = engine.tokenize("hi", false).expect("tokenizes");
    let result = engine.submit(GenerateRequest {
        prompt_token_ids: prompt,
        sampling: SamplingParams {
            tools: Some(calling),
            ..SamplingParams::default()
        },
        n: NonZeroU32::MIN,
        priority: 0,
        arrival: Instant::now(),
    });
    match result {
        Err(SubmitError::InvalidParam(e)) => assert_eq!(e.param, "tools", "{e}"),
        other => panic!("expected a 400 naming tools, got {other:?}"),
    }
}
