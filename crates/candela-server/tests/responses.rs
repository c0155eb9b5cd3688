//! `POST /v1/responses` through `app().oneshot(..)` over the fake backend: the Response
//! object, the event stream, tools both ways, the output constraint, and every refusal, each
//! with what reached the backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use candela_engine::api::{OutputConstraint, ToolChoice};
use common::{expected_text, state, Fake, CALL_PIECES, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Checks the OpenAI error shape and returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v: Value = serde_json::from_str(&self.body).unwrap_or_default();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        e.clone()
    }

    /// The events of an SSE body: each is `event: <type>` then `data: <json>` whose `type` is
    /// the event's name, numbered from 0 by `sequence_number`, with no `[DONE]`.
    fn events(&self) -> Vec<Value> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert!(self.content_type.starts_with("text/event-stream"));
        assert!(self.body.ends_with("\n\n"), "{:?}", self.body);
        let events: Vec<Value> = self
            .body
            .trim_end()
            .split("\n\n")
            .map(|frame| {
                let lines: Vec<&str> = frame.lines().collect();
                let [event, data] = lines[..] else {
                    panic!("bad SSE frame {frame:?}")
                };
                let name = event.strip_prefix("event: ").expect("event line");
                let data = data.strip_prefix("data: ").expect("data line");
                let v: Value = serde_json::from_str(data)
                    .unwrap_or_else(|e| panic!("event not JSON ({e}): {data}"));
                assert_eq!(v["type"], name, "{frame}");
                v
            })
            .collect();
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i, "{e}");
        }
        events
    }
}

async fn send(fake: &Arc<Fake>, body: impl Into<Body>) -> Reply {
    let request = Request::post("/v1/responses")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_else(|e| panic!("{e}"));
    let response = candela_server::app(state(fake, None))
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    Reply {
        status,
        content_type,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn post(fake: &Arc<Fake>, body: Value) -> Reply {
    send(fake, body.to_string()).await
}

fn fake() -> Arc<Fake> {
    Arc::new(Fake::new())
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["type"].as_str()).collect()
}

const WEATHER: &str = r#"[{"type": "function", "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}, "strict": false}]"#;

fn weather() -> Value {
    serde_json::from_str(WEATHER).unwrap_or_default()
}

#[tokio::test]
async fn a_string_input_with_instructions_answers_a_response_object() {
    let f = fake();
    let v = post(
        &f,
        json!({"model": MODEL, "input": "hi", "instructions": "Be brief.", "max_output_tokens": 5,
               "temperature": 0, "metadata": {"run": "7"}, "user": "u1", "store": true}),
    )
    .await
    .json();
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("resp_")));
    assert_eq!(v["object"], "response");
    assert!(v["created_at"].is_u64());
    assert_eq!(v["model"], MODEL);
    // The fake never stops by itself: it runs into max_output_tokens.
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert!(v["error"].is_null());
    let output = v["output"].as_array().cloned().unwrap_or_default();
    assert_eq!(output.len(), 1, "{v}");
    let message = &output[0];
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["status"], "incomplete");
    assert!(message["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("msg_")));
    assert_eq!(
        message["content"],
        json!([{"type": "output_text", "text": expected_text(0, 0, 5), "annotations": []}])
    );
    let prompt_len = "<system>Be brief.\n<user>hi\n<assistant>".len();
    assert_eq!(
        v["usage"],
        json!({"input_tokens": prompt_len, "output_tokens": 5, "total_tokens": prompt_len + 5,
               "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
               "output_tokens_details": {"reasoning_tokens": 0}})
    );
    // The request's settings, echoed.
    assert_eq!(v["instructions"], "Be brief.");
    assert_eq!(v["max_output_tokens"], 5);
    assert_eq!(v["temperature"], 0.0);
    assert_eq!(v["top_p"], 1.0);
    assert_eq!(v["metadata"], json!({"run": "7"}));
    assert_eq!(v["user"], "u1");
    assert_eq!(v["store"], false);
    assert_eq!(v["tools"], json!([]));
    assert_eq!(v["tool_choice"], "auto");
    assert_eq!(v["parallel_tool_calls"], true);
    assert_eq!(v["text"], json!({"format": {"type": "text"}}));
    assert!(v["timings"]["ttft_ms"].is_number());
    // What reached the backend: the instructions as the system message, no BOS, the limits.
    let templated = f.templated();
    assert_eq!(templated.len(), 1);
    let roles: Vec<&str> = templated[0].0.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user"]);
    let sent = f.submitted();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].prompt_token_ids.len(), prompt_len);
    assert_eq!(sent[0].sampling.max_tokens.map(|m| m.get()), Some(5));
    assert_eq!(sent[0].sampling.temperature, 0.0);
    assert_eq!(sent[0].n.get(), 1);
}

#[tokio::test]
async fn item_input_in_every_message_shape() {
    let f = fake();
    let input = json!([
        {"role": "developer", "content": "Fr."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo", "annotations": []}]},
        {"role": "user", "content": "again"},
    ]);
    let v = post(&f, json!({"input": input, "max_output_tokens": 3}))
        .await
        .json();
    assert_eq!(v["output"][0]["content"][0]["text"], expected_text(0, 0, 3));
    let messages = &f.templated()[0].0;
    let turns: Vec<(&str, String)> = messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.joined_text()))
        .collect();
    assert_eq!(
        turns,
        [
            ("system", "Fr.".to_owned()),
            ("user", "hi".to_owned()),
            ("assistant", "yo".to_owned()),
            ("user", "again".to_owned())
        ]
    );
}

#[tokio::test]
async fn streaming_events_build_the_same_response() {
    let f = fake();
    let events = post(
        &f,
        json!({"input": "hi", "max_output_tokens": 4, "stream": true}),
    )
    .await
    .events();
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let id = &events[0]["response"]["id"];
    assert!(id.as_str().is_some_and(|id| id.starts_with("resp_")));
    assert_eq!(events[0]["response"]["status"], "in_progress");
    assert!(events[0]["response"]["usage"].is_null());
    let deltas: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(deltas, expected_text(0, 0, 4));
    assert_eq!(events[8]["text"], deltas);
    let item_id = &events[2]["item"]["id"];
    for e in &events[3..10] {
        assert_eq!(&e["item_id"], item_id, "{e}");
        assert_eq!(e["output_index"], 0);
    }
    assert_eq!(&events[10]["item"]["id"], item_id);
    let last = &events[11]["response"];
    assert_eq!(&last["id"], id);
    assert_eq!(last["status"], "incomplete");
    assert_eq!(last["output"], json!([events[10]["item"]]));
    assert_eq!(last["output"][0]["content"][0]["text"], deltas);
    assert_eq!(last["usage"]["output_tokens"], 4);
    assert!(f.aborted().is_empty());
}

#[tokio::test]
async fn required_tool_choice_answers_a_function_call() {
    let f = fake();
    let v = post(
        &f,
        json!({"input": "Weather in Paris?", "tools": weather(), "tool_choice": "required"}),
    )
    .await
    .json();
    assert_eq!(v["status"], "completed");
    assert!(v["completed_at"].is_u64());
    let output = v["output"].as_array().cloned().unwrap_or_default();
    assert_eq!(output.len(), 1, "no empty message beside the call: {v}");
    let call = &output[0];
    assert_eq!(call["type"], "function_call");
    assert!(call["id"].as_str().is_some_and(|id| id.starts_with("fc_")));
    assert_eq!(call["call_id"], "call_fake0");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], CALL_PIECES.concat());
    assert_eq!(call["status"], "completed");
    assert_eq!(v["tool_choice"], "required");
    assert_eq!(v["tools"], weather());
    // The tools reached the template and the engine.
    let (_, tools) = &f.templated()[0];
    let tools = tools.as_ref().expect("tools templated");
    assert_eq!(tools.choice, ToolChoice::Required);
    assert_eq!(tools.tools[0].name, "get_weather");
    assert!(!tools.tools[0].strict);
    assert_eq!(f.submitted()[0].sampling.tools.as_ref(), Some(tools));
}

#[tokio::test]
async fn a_named_tool_streams_its_arguments() {
    let f = fake();
    let body = json!({"input": "x", "tools": weather(), "stream": true,
                      "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": false});
    let events = post(&f, body).await.events();
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let added = &events[2]["item"];
    assert_eq!(added["type"], "function_call");
    assert_eq!(added["arguments"], "");
    assert_eq!(added["name"], "get_weather");
    assert_eq!(added["status"], "in_progress");
    let pieces: String = events[3..5]
        .iter()
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(pieces, CALL_PIECES.concat());
    assert_eq!(events[5]["arguments"], pieces);
    assert_eq!(events[5]["item_id"], added["id"]);
    let last = &events[7]["response"];
    assert_eq!(last["status"], "completed");
    assert_eq!(last["output"], json!([events[6]["item"]]));
    assert_eq!(last["parallel_tool_calls"], false);
    assert_eq!(
        last["tool_choice"],
        json!({"type": "function", "name": "get_weather"})
    );
}

#[tokio::test]
async fn the_follow_up_turn_carries_the_call_and_its_output() {
    let f = fake();
    let input = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\"}", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]);
    let v = post(
        &f,
        json!({"input": input, "tools": weather(), "max_output_tokens": 3}),
    )
    .await
    .json();
    assert_eq!(v["output"][0]["type"], "message");
    let messages = &f.templated()[0].0;
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "tool"]);
    assert_eq!(messages[1].tool_calls.len(), 1);
    assert_eq!(messages[1].tool_calls[0].id, "call_1");
    assert_eq!(messages[1].tool_calls[0].arguments, "{\"city\": \"Paris\"}");
    assert_eq!(messages[2].tool_call_id.as_deref(), Some("call_1"));
    assert_eq!(messages[2].name.as_deref(), Some("get_weather"));
    assert_eq!(messages[2].content.joined_text(), "sunny");
}

#[tokio::test]
async fn text_format_json_schema_constrains_the_output() {
    let f = fake();
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]});
    let format = json!({"type": "json_schema", "name": "thing", "schema": schema, "strict": true});
    let v = post(
        &f,
        json!({"input": "x", "max_output_tokens": 2, "text": {"format": format}}),
    )
    .await
    .json();
    assert_eq!(v["text"], json!({ "format": format }));
    assert_eq!(
        f.submitted()[0].sampling.constraint,
        Some(OutputConstraint::JsonSchema(schema.to_string()))
    );
}

#[tokio::test]
async fn bad_requests_are_400s_naming_the_parameter_and_the_server_carries_on() {
    let f = fake();
    for (body, param) in [
        (
            json!({"input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (json!({"input": "x", "seed": 1}), "seed"),
        (
            json!({"input": "x", "max_output_tokens": -1}),
            "max_output_tokens",
        ),
        (
            json!({"input": "x", "max_output_tokens": 100}),
            "max_output_tokens",
        ),
        (json!({"input": []}), "input"),
        (json!({"input": [{"type": "input_image"}]}), "input"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}),
            "input",
        ),
        (
            json!({"input": "x", "tools": [{"type": "file_search"}]}),
            "tools",
        ),
        (
            json!({"input": "x", "tools": weather(), "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            "tool_choice",
        ),
        (
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": 3}}}),
            "text",
        ),
        (json!({"input": "x", "temperature": -1}), "temperature"),
    ] {
        let e = post(&f, body.clone()).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post(&f, json!({"input": "x", "seed": 1}))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "unsupported_parameter");
    let e = post(&f, json!({"input": "x", "model": "other"}))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(e["param"], "model");
    send(&f, "{not json").await.error(StatusCode::BAD_REQUEST);
    // Nothing reached the engine, and the next good request is answered.
    assert!(f.submitted().is_empty());
    let v = post(&f, json!({"input": "x", "max_output_tokens": 1}))
        .await
        .json();
    assert_eq!(v["output"][0]["content"][0]["text"], expected_text(0, 0, 1));
}

#[tokio::test]
async fn a_client_gone_mid_stream_aborts_the_request() {
    let f = fake();
    let request = Request::post("/v1/responses")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"input": "a", "max_output_tokens": 30, "stream": true}).to_string(),
        ))
        .unwrap_or_else(|e| panic!("{e}"));
    let response = candela_server::app(state(&f, None))
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    assert_eq!(response.status(), StatusCode::OK);
    let mut data = response.into_body().into_data_stream();
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_secs(10), data.next()).await {
            Ok(Some(Ok(_))) => {}
            other => panic!("stream ended early: {other:?}"),
        }
    }
    assert!(f.aborted().is_empty());
    drop(data);
    assert_eq!(f.aborted().len(), 1, "dropping the body aborts at once");
}
