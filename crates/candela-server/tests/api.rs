//! Every route and every bad input, through `app().oneshot(..)` over the fake backend.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use candela_engine::api::EngineHealth;
use candela_server::{AppState, Backend};
use common::{expected_text, state, token_of, Fake, MODEL, MODEL_LEN_MAX, VOCAB_SIZE};
use futures::StreamExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Checks the OpenAI error shape and returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e.clone()
    }

    /// The `data:` payloads of an SSE body, checking the framing on the way.
    fn sse(&self) -> Vec<String> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        assert!(self.headers[header::CONTENT_TYPE]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream")));
        assert!(self.body.ends_with("\n\n"), "{:?}", self.body);
        let events: Vec<String> = self
            .body
            .trim_end()
            .split("\n\n")
            .map(str::to_owned)
            .collect();
        for e in &events {
            assert!(
                e.starts_with("data: ") && !e.contains('\n'),
                "bad SSE event {e:?}"
            );
        }
        let data: Vec<String> = events
            .iter()
            .map(|e| e["data: ".len()..].to_owned())
            .collect();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
        data
    }

    fn chunks(&self) -> Vec<Value> {
        let data = self.sse();
        data[..data.len() - 1]
            .iter()
            .map(|d| {
                serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk not JSON ({e}): {d}"))
            })
            .collect()
    }
}

async fn call(app: Router, request: Request<Body>) -> Reply {
    let response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn post_raw(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn post(uri: &str, body: Value) -> Request<Body> {
    post_raw(uri, body.to_string())
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .body(Body::empty())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn fake() -> Arc<Fake> {
    Arc::new(Fake::new())
}

async fn send(fake: &Arc<Fake>, request: Request<Body>) -> Reply {
    call(candela_server::app(state(fake, None)), request).await
}

fn assert_timings(v: &Value) {
    let t = &v["timings"];
    for key in [
        "queue_ms",
        "ttft_ms",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
        "total_ms",
    ] {
        assert!(t[key].is_number(), "timings.{key} missing in {v}");
    }
}

#[tokio::test]
async fn health_ready_metrics_models() {
    let f = fake();
    let r = send(&f, get("/health")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&f, get("/ready")).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(&f, get("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE]
        .to_str()
        .is_ok_and(|c| c.starts_with("text/plain")));
    assert!(r.body.contains("candela:num_requests_running 0"));
    let r = send(&f, get("/v1/models")).await;
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], MODEL_LEN_MAX);
}

#[tokio::test]
async fn not_ready_is_503_everywhere_it_matters() {
    let f = fake();
    f.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    send(&f, get("/ready"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    send(&f, post("/v1/chat/completions", chat))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    send(&f, post("/v1/completions", json!({"prompt": "hi"})))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    // Loading or warming up: not alive yet either (a startup probe waits on /health).
    let r = send(&f, get("/health")).await;
    assert!(r.body.contains("loading"), "{}", r.body);
    r.error(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_failed_or_stalled_engine_is_503_on_health_ready_and_requests() {
    for (health, words) in [
        (
            EngineHealth::Dead("a forward pass failed".into()),
            "a forward pass failed",
        ),
        (EngineHealth::Stalled { stalled_ms: 61_000 }, "61000 ms"),
        (EngineHealth::Draining, "shutting down"),
    ] {
        let f = fake();
        f.set_health(health.clone());
        let r = send(&f, get("/health")).await;
        assert!(r.body.contains(words), "{health:?}: {}", r.body);
        r.error(StatusCode::SERVICE_UNAVAILABLE);
        send(&f, get("/ready"))
            .await
            .error(StatusCode::SERVICE_UNAVAILABLE);
        send(&f, post("/v1/completions", json!({"prompt": "hi"})))
            .await
            .error(StatusCode::SERVICE_UNAVAILABLE);
        f.set_health(EngineHealth::Healthy);
        assert_eq!(send(&f, get("/health")).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn chat_non_streaming_body() {
    let f = fake();
    let r = send(
        &f,
        post("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "seed": 2})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_text(2, 0, 5)
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["choices"][0]["logprobs"].is_null());
    let prompt_len = "<user>hi\n<assistant>".len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], prompt_len + 5);
    assert_timings(&v);
    assert_eq!(v["timings"]["ttft_ms"], common::TIMINGS.ttft_ms);
    assert!(v.get("prompt_token_ids").is_none());
    // The template ran and the chat prompt went in without a BOS.
    let sent = f.submitted();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].prompt_token_ids.first(), Some(&token_of(b'<')));
    assert_eq!(sent[0].sampling.seed, Some(2));
}

#[tokio::test]
async fn max_completion_tokens_wins_over_max_tokens() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 3});
    let v = send(&f, post("/v1/chat/completions", body)).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn chat_streaming_framing_and_timings() {
    let f = fake();
    let body =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true});
    let chunks = send(&f, post("/v1/chat/completions", body)).await.chunks();
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].clone();
    assert!(chunks.iter().all(|c| c["id"] == id && c["model"] == MODEL));
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "usage only with include_usage"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected_text(0, 0, 4));
    let last = chunks.last().unwrap_or_else(|| panic!("no chunks"));
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_timings(last);
    // Only the final chunk carries timings.
    assert_eq!(
        chunks.iter().filter(|c| c.get("timings").is_some()).count(),
        1
    );
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let chunks = send(&f, post("/v1/chat/completions", body)).await.chunks();
    let (last, rest) = chunks.split_last().unwrap_or_else(|| panic!("no chunks"));
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 3);
    assert_eq!(
        last["usage"]["total_tokens"],
        last["usage"]["prompt_tokens"].as_u64().unwrap_or(0) + 3
    );
    assert_timings(last);
    assert!(
        rest.iter()
            .all(|c| c["usage"].is_null() && c.get("usage").is_some()),
        "other chunks carry usage: null"
    );
}

#[tokio::test]
async fn completion_prompt_shapes() {
    let f = fake();
    // A string: BOS added, one choice.
    let v = send(
        &f,
        post("/v1/completions", json!({"prompt": "hey", "max_tokens": 2})),
    )
    .await
    .json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")));
    assert_eq!(v["choices"][0]["text"], expected_text(0, 0, 2));
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_timings(&v);
    // A list of strings with n=2: one choice set per prompt, indexed prompt * n + i.
    let v = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": ["a", "bb"], "n": 2, "max_tokens": 3, "seed": 1}),
        ),
    )
    .await
    .json();
    let choices = v["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 4);
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k);
        assert_eq!(c["text"], expected_text(1, k as u32 % 2, 3));
    }
    assert_eq!(v["usage"]["prompt_tokens"], 2 + 3);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    // Token ids and lists of them go in as they are.
    let _ = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": [5, 6, 7], "max_tokens": 1}),
        ),
    )
    .await
    .json();
    let _ = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": [[5], [6, 7]], "max_tokens": 1}),
        ),
    )
    .await
    .json();
    let sent: Vec<Vec<u32>> = f
        .submitted()
        .into_iter()
        .map(|r| r.prompt_token_ids)
        .collect();
    assert_eq!(sent[3..], [vec![5, 6, 7], vec![5], vec![6, 7]]);
}

#[tokio::test]
async fn completion_streaming_and_echo() {
    let f = fake();
    let body = json!({"prompt": "xy", "max_tokens": 3, "stream": true, "echo": true,
                      "stream_options": {"include_usage": true}});
    let chunks = send(&f, post("/v1/completions", body)).await.chunks();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, format!("xy{}", expected_text(0, 0, 3)));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[chunks.len() - 1]["usage"]["completion_tokens"], 3);
    // Non-streaming echo of token ids decodes them.
    let v = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": [3 + 65], "max_tokens": 1, "echo": true}),
        ),
    )
    .await
    .json();
    assert_eq!(
        v["choices"][0]["text"],
        format!("A{}", expected_text(0, 0, 1))
    );
}

#[tokio::test]
async fn n_choices_stream_with_their_indices() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3, "stream": true, "seed": 4});
    let chunks = send(&f, post("/v1/chat/completions", body)).await.chunks();
    for i in 0..2u32 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == i)
            .collect();
        assert_eq!(mine[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = mine
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, expected_text(4, i, 3));
        assert_eq!(
            mine.last()
                .map(|c| c["choices"][0]["finish_reason"].clone()),
            Some(json!("length"))
        );
    }
    assert_timings(chunks.last().unwrap_or_else(|| panic!("no chunks")));
}

#[tokio::test]
async fn chat_logprobs_shape() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": true, "top_logprobs": 3});
    let v = send(&f, post("/v1/chat/completions", body.clone()))
        .await
        .json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(content.len(), 2);
    assert_eq!(content[0]["token"], "a");
    assert_eq!(content[0]["bytes"], json!([b'a']));
    assert_eq!(content[0]["logprob"], -0.25);
    assert_eq!(content[0]["top_logprobs"].as_array().map(Vec::len), Some(3));
    assert_eq!(content[0]["top_logprobs"][1]["token"], "b");
    assert_eq!(f.submitted()[0].sampling.logprobs, Some(3));
    // Streaming: each content chunk carries its tokens' logprobs.
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let chunks = send(&f, post("/v1/chat/completions", stream_body))
        .await
        .chunks();
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content);
}

#[tokio::test]
async fn completion_logprobs_legacy_shape() {
    let f = fake();
    let v = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": "q", "max_tokens": 3, "logprobs": 2}),
        ),
    )
    .await
    .json();
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["a", "b", "c"]));
    assert_eq!(lp["token_logprobs"], json!([-0.25, -0.25, -0.25]));
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));
    assert_eq!(lp["top_logprobs"][0], json!({"a": -0.25, "b": -1.25}));
}

#[tokio::test]
async fn return_token_ids() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "return_token_ids": true});
    let v = send(&f, post("/v1/chat/completions", body)).await.json();
    let prompt: Vec<u32> = "<user>hi\n<assistant>".bytes().map(token_of).collect();
    assert_eq!(v["prompt_token_ids"], json!(prompt));
    assert_eq!(
        v["choices"][0]["token_ids"],
        json!([token_of(b'a'), token_of(b'b')])
    );
    let v = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": [9, 10], "max_tokens": 1, "return_token_ids": true}),
        ),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["prompt_token_ids"], json!([9, 10]));
    assert_eq!(v["choices"][0]["token_ids"], json!([token_of(b'a')]));
}

#[tokio::test]
async fn stop_finishes_with_stop() {
    let f = fake();
    let v = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": "q", "max_tokens": 8, "stop": "cd"}),
        ),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(f.submitted()[0].sampling.stop, vec!["cd".to_owned()]);
}

#[tokio::test]
async fn bad_parameters_are_400_with_the_param() {
    let f = fake();
    let user = json!([{"role": "user", "content": "hi"}]);
    for (body, param) in [
        (json!({"messages": user, "temperature": -1}), "temperature"),
        (json!({"messages": user, "max_tokens": -5}), "max_tokens"),
        (json!({"messages": user, "n": 0}), "n"),
        (json!({"messages": user, "top_p": 0}), "top_p"),
        (json!({"messages": user, "top_p": 1.01}), "top_p"),
        (
            json!({"messages": user, "top_logprobs": 25, "logprobs": true}),
            "top_logprobs",
        ),
        (
            json!({"messages": user, "logit_bias": {"999": 1}}),
            "logit_bias",
        ),
        (
            json!({"messages": user, "logit_bias": {"5": -101}}),
            "logit_bias",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages",
        ),
        (
            json!({"messages": user, "max_tokens": MODEL_LEN_MAX}),
            "max_tokens",
        ),
    ] {
        let e = send(&f, post("/v1/chat/completions", body.clone()))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    for (body, param) in [
        (json!({"prompt": [VOCAB_SIZE]}), "prompt"),
        (json!({"prompt": [[1], [-1]]}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (
            json!({"prompt": "x".repeat(MODEL_LEN_MAX as usize)}),
            "prompt",
        ),
        (
            json!({"prompt": "hi", "max_tokens": MODEL_LEN_MAX - 2}),
            "max_tokens",
        ),
        (json!({"prompt": "hi", "logprobs": 21}), "logprobs"),
        (json!({"prompt": "hi", "logprobs": 1, "echo": true}), "echo"),
    ] {
        let e = send(&f, post("/v1/completions", body.clone()))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}");
    }
    let e = send(&f, post("/detokenize", json!({"tokens": [1, 100000]})))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "tokens");
    assert!(
        f.submitted().is_empty(),
        "nothing invalid reaches the engine"
    );
}

#[tokio::test]
async fn malformed_json_is_400_with_an_openai_body() {
    let f = fake();
    for body in [
        "{not json",
        "",
        "[]",
        r#"{"messages": "hi"}"#,
        r#"{"messages": [{"content": "no role"}]}"#,
    ] {
        let e = send(&f, post_raw("/v1/chat/completions", body))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["type"], "invalid_request_error", "{body}");
    }
    // curl -d sends a form content type: still parsed as JSON.
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(r#"{"prompt": "a", "max_tokens": 1}"#))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(send(&f, request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn template_errors_are_400_and_engine_errors_500() {
    let f = fake();
    let body = json!({"messages": [{"role": "user", "content": "RAISE"}]});
    send(&f, post("/v1/chat/completions", body))
        .await
        .error(StatusCode::BAD_REQUEST);
    let e = send(&f, post("/v1/completions", json!({"prompt": "FAIL"})))
        .await
        .error(StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(e["type"], "server_error");
    // Streaming: the error arrives as a data line, then the stream ends properly.
    let data = send(
        &f,
        post("/v1/completions", json!({"prompt": "FAIL", "stream": true})),
    )
    .await
    .sse();
    assert!(data.iter().any(|d| d.contains("\"error\"")));
}

#[tokio::test]
async fn unknown_model_is_404() {
    let f = fake();
    let e = send(
        &f,
        post("/v1/completions", json!({"model": "gpt-9", "prompt": "a"})),
    )
    .await
    .error(StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    let body = json!({"model": "gpt-9", "messages": [{"role": "user", "content": "a"}]});
    send(&f, post("/v1/chat/completions", body))
        .await
        .error(StatusCode::NOT_FOUND);
    send(&f, get("/v1/nothing"))
        .await
        .error(StatusCode::NOT_FOUND);
    send(&f, get("/v1/completions"))
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn every_served_name_is_listed_and_accepted_and_responses_report_the_first() {
    let f = fake();
    let mut config = common::config(None);
    config.served_model_names = vec![MODEL.to_owned(), "alias-b".to_owned()];
    let app = || {
        candela_server::app(AppState::new(
            Arc::clone(&f) as Arc<dyn Backend>,
            config.clone(),
        ))
    };
    let v = call(app(), get("/v1/models")).await.json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, [MODEL, "alias-b"]);
    let r = call(
        app(),
        post(
            "/v1/completions",
            json!({"model": "alias-b", "prompt": "a", "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["model"], MODEL);
    call(
        app(),
        post(
            "/v1/completions",
            json!({"model": "alias-c", "prompt": "a"}),
        ),
    )
    .await
    .error(StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn parameters_we_do_not_implement_are_refused_naming_them() {
    let f = fake();
    // The legacy `functions` (superseded by `tools`): refused, never silently dropped.
    let functions = json!([{"name": "f", "parameters": {}}]);
    let chat = json!({"messages": [{"role": "user", "content": "a"}], "functions": functions});
    let e = send(&f, post("/v1/chat/completions", chat))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "functions");
    assert_eq!(e["code"], "unsupported_parameter");
    let completion = json!({"prompt": "a", "suffix": "b", "best_of": 2});
    let e = send(&f, post("/v1/completions", completion))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "best_of");
    // Every parameter we take still passes.
    let ok = json!({"prompt": "a", "max_tokens": 1, "top_k": 5, "user": "u", "seed": 1});
    assert_eq!(
        send(&f, post("/v1/completions", ok)).await.status,
        StatusCode::OK
    );
    // What vllm-router adds to each request it forwards asks for what we do: it passes...
    let routed = json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 1,
        "no_stop_trim": false, "skip_special_tokens": true, "return_hidden_states": false,
        "continue_final_message": false, "separate_reasoning": true, "stream_reasoning": true,
        "include_reasoning": true});
    let r = send(&f, post("/v1/chat/completions", routed.clone())).await;
    assert_eq!(r.status, StatusCode::OK);
    // ...and the same field asking for something else is refused.
    let mut trimless = routed;
    trimless["no_stop_trim"] = json!(true);
    let e = send(&f, post("/v1/chat/completions", trimless))
        .await
        .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "no_stop_trim");
}

#[tokio::test]
async fn api_key_is_required_when_set() {
    let f = fake();
    let app = || candela_server::app(state(&f, Some("sekret")));
    let body = json!({"prompt": "a", "max_tokens": 1});
    let e = call(app(), post("/v1/completions", body.clone()))
        .await
        .error(StatusCode::UNAUTHORIZED);
    assert_eq!(e["code"], "invalid_api_key");
    let mut wrong = post("/v1/completions", body.clone());
    wrong.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer nope".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    call(app(), wrong).await.error(StatusCode::UNAUTHORIZED);
    call(app(), get("/v1/models"))
        .await
        .error(StatusCode::UNAUTHORIZED);
    let mut right = post("/v1/completions", body);
    right.headers_mut().insert(
        header::AUTHORIZATION,
        "Bearer sekret".parse().unwrap_or_else(|e| panic!("{e}")),
    );
    assert_eq!(call(app(), right).await.status, StatusCode::OK);
    // Probes stay open for load balancers.
    assert_eq!(call(app(), get("/health")).await.status, StatusCode::OK);
    assert_eq!(call(app(), get("/ready")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn oversized_body_is_413_with_an_openai_body() {
    let f = fake();
    let big = json!({"prompt": "x".repeat(10_000)}).to_string();
    // With a Content-Length (rejected before reading) ...
    let e = send(&f, post_raw("/v1/completions", big.clone()))
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(e["code"], "request_too_large");
    // ... and streamed without one (rejected while reading).
    let chunks: Vec<Result<String, std::io::Error>> = big
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(String::from_utf8_lossy(c).into_owned()))
        .collect();
    let streamed = post_raw(
        "/v1/completions",
        Body::from_stream(futures::stream::iter(chunks)),
    );
    send(&f, streamed)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn full_queue_is_429_with_retry_after() {
    let mut fake = Fake::new();
    fake.running_max = 0;
    let f = Arc::new(fake);
    let r = send(&f, post("/v1/completions", json!({"prompt": "a"}))).await;
    let e = r.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
}

#[tokio::test]
async fn refused_second_prompt_aborts_the_first() {
    let mut fake = Fake::new();
    fake.running_max = 1;
    fake.token_delay = Duration::from_millis(50);
    let f = Arc::new(fake);
    let r = send(
        &f,
        post(
            "/v1/completions",
            json!({"prompt": ["a", "b"], "max_tokens": 50}),
        ),
    )
    .await;
    r.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(f.aborted().len(), 1);
}

#[tokio::test]
async fn client_disconnect_mid_stream_aborts() {
    let f = fake();
    let app = candela_server::app(state(&f, None));
    // 60 tokens, and the fake produces one only when the previous one was read.
    let body = json!({"prompt": "a", "max_tokens": 60, "stream": true, "ignore_eos": true});
    let response = app
        .oneshot(post("/v1/completions", body))
        .await
        .unwrap_or_else(|e| match e {});
    assert_eq!(response.status(), StatusCode::OK);
    let mut data = response.into_body().into_data_stream();
    let mut frames = 0;
    while frames < 3 {
        match tokio::time::timeout(Duration::from_secs(10), data.next()).await {
            Ok(Some(Ok(_))) => frames += 1,
            other => panic!("stream ended early: {other:?}"),
        }
    }
    assert!(f.aborted().is_empty());
    drop(data); // the client goes away
    assert_eq!(
        f.aborted().len(),
        1,
        "dropping the body aborts the request at once"
    );
}

#[tokio::test]
async fn finished_streams_do_not_abort() {
    let f = fake();
    let body = json!({"prompt": "a", "max_tokens": 2, "stream": true, "n": 2});
    let _ = send(&f, post("/v1/completions", body)).await.chunks();
    let _ = send(
        &f,
        post("/v1/completions", json!({"prompt": "a", "max_tokens": 2})),
    )
    .await
    .json();
    assert!(f.aborted().is_empty());
}

#[tokio::test]
async fn tokenize_and_detokenize() {
    let f = fake();
    let v = send(&f, post("/tokenize", json!({"prompt": "ab"})))
        .await
        .json();
    assert_eq!(v["tokens"], json!([1, token_of(b'a'), token_of(b'b')]));
    assert_eq!(v["count"], 3);
    assert_eq!(v["max_model_len"], MODEL_LEN_MAX);
    let v = send(
        &f,
        post(
            "/tokenize",
            json!({"prompt": "ab", "add_special_tokens": false, "return_token_strs": true}),
        ),
    )
    .await
    .json();
    assert_eq!(v["token_strs"], json!(["a", "b"]));
    let v = send(
        &f,
        post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "x"}]}),
        ),
    )
    .await
    .json();
    assert_eq!(v["count"], "<user>x\n<assistant>".len());
    send(&f, post("/tokenize", json!({})))
        .await
        .error(StatusCode::BAD_REQUEST);
    let v = send(
        &f,
        post(
            "/detokenize",
            json!({"tokens": [token_of(b'h'), token_of(b'i')]}),
        ),
    )
    .await
    .json();
    assert_eq!(v["prompt"], "hi");
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut fake = Fake::new();
    fake.token_delay = Duration::from_millis(20);
    let f = Arc::new(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(candela_server::serve(
        listener,
        state(&f, None),
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(30),
    ));
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let body = json!({"prompt": "a", "max_tokens": 10, "stream": true}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut first)).await;
    assert!(matches!(n, Ok(Ok(k)) if k > 0), "no response started");
    let _ = stop_tx.send(());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the in-flight stream did not finish");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("[DONE]"),
        "the in-flight stream was cut: {text}"
    );
    let served = tokio::time::timeout(Duration::from_secs(10), server).await;
    assert!(
        matches!(served, Ok(Ok(Ok(())))),
        "serve did not return cleanly: {served:?}"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
