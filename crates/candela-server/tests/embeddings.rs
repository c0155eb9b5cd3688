//! `/v1/embeddings` through `app().oneshot(..)` over the fake backend: off by default, every
//! input shape and both encodings, what reaches the backend, and each bad input a 4xx naming
//! its parameter. `tests/e2e/test_embeddings.py` drives the real engine with the official
//! client.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use candela_engine::api::Pooling;
use candela_server::{AppState, Backend, EmbeddingPooling, ServerConfig};
use common::{fake_embedding, token_of, Fake, MODEL, MODEL_LEN_MAX};
use serde_json::{json, Value};
use tower::ServiceExt;

async fn embed_with(
    fake: &Arc<Fake>,
    pooling: Option<EmbeddingPooling>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let state = AppState::new(
        Arc::clone(fake) as Arc<dyn Backend>,
        ServerConfig {
            embeddings: pooling,
            ..common::config(None)
        },
    );
    let request = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap_or_else(|e| panic!("{e}"));
    let response = candela_server::app(state)
        .oneshot(request)
        .await
        .unwrap_or_else(|e| match e {});
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

async fn embed(fake: &Arc<Fake>, body: Value) -> (StatusCode, Value) {
    embed_with(fake, Some(EmbeddingPooling::Last), body.to_string()).await
}

/// The fake's tokens of `text` with its BOS, as the handler tokenizes inputs.
fn tokens(text: &str) -> Vec<u32> {
    std::iter::once(1)
        .chain(text.bytes().map(token_of))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap_or_else(|| panic!("not a number: {x}")) as f32)
        .collect()
}

/// Checks the OpenAI error shape and returns `(type, param)`.
fn error_of(status: StatusCode, body: &Value, want: StatusCode) -> (String, Option<String>) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (
        e["type"].as_str().unwrap_or_default().to_owned(),
        e["param"].as_str().map(str::to_owned),
    )
}

#[tokio::test]
async fn without_the_flag_the_route_says_how_to_turn_it_on() {
    let f = Arc::new(Fake::new());
    // Even a malformed body: whether the route is on comes first.
    for body in [json!({"input": "hi"}).to_string(), "{not json".to_owned()] {
        let (status, v) = embed_with(&f, None, body).await;
        let (kind, _) = error_of(status, &v, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(kind, "not_supported_error");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("--embeddings"), "{message}");
    }
    assert!(f.embedded().is_empty());
}

#[tokio::test]
async fn pooling_none_is_refused_as_llama_cpp_refuses_it() {
    let f = Arc::new(Fake::new());
    let (status, v) = embed_with(
        &f,
        Some(EmbeddingPooling::None),
        json!({"input": "hi"}).to_string(),
    )
    .await;
    let (kind, _) = error_of(status, &v, StatusCode::BAD_REQUEST);
    assert_eq!(kind, "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Pooling type 'none' is not OAI compatible"),
        "{message}"
    );
    assert!(f.embedded().is_empty());
}

#[tokio::test]
async fn a_string_is_tokenized_with_bos_and_embedded() {
    let f = Arc::new(Fake::new());
    let (status, v) = embed(&f, json!({"input": "hello", "model": MODEL})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], MODEL);
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["object"], "embedding");
    assert_eq!(data[0]["index"], 0);
    assert_eq!(
        floats(&data[0]["embedding"]),
        fake_embedding(&tokens("hello"))
    );
    assert_eq!(v["usage"], json!({"prompt_tokens": 6, "total_tokens": 6}));
    let sent = f.embedded();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].inputs, vec![tokens("hello")]);
    assert_eq!(sent[0].pooling, Pooling::Last);
}

#[tokio::test]
async fn a_list_comes_back_in_input_order_with_the_configured_pooling() {
    let f = Arc::new(Fake::new());
    let texts = ["a", "bb", "ccc"];
    let (status, v) = embed_with(
        &f,
        Some(EmbeddingPooling::Mean),
        json!({"input": texts, "encoding_format": "float"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    // The fake answers the last input first.
    for (i, text) in texts.iter().enumerate() {
        let item = &v["data"][i];
        assert_eq!(item["index"], i);
        assert_eq!(floats(&item["embedding"]), fake_embedding(&tokens(text)));
    }
    assert_eq!(v["usage"]["prompt_tokens"], 2 + 3 + 4);
    assert_eq!(f.embedded()[0].pooling, Pooling::Mean);
}

#[tokio::test]
async fn token_ids_reach_the_backend_as_they_are() {
    let f = Arc::new(Fake::new());
    let (status, v) = embed(&f, json!({"input": [5, 6, 7]})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        floats(&v["data"][0]["embedding"]),
        fake_embedding(&[5, 6, 7])
    );
    let (status, v) = embed(&f, json!({"input": [[5], [6, 7]]})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["usage"]["total_tokens"], 3);
    let sent = f.embedded();
    assert_eq!(sent[0].inputs, vec![vec![5, 6, 7]]);
    assert_eq!(sent[1].inputs, vec![vec![5], vec![6, 7]]);
}

#[tokio::test]
async fn base64_is_the_little_endian_f32_bytes() {
    let f = Arc::new(Fake::new());
    let (status, v) = embed(
        &f,
        json!({"input": ["x", "yz"], "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for (i, text) in ["x", "yz"].iter().enumerate() {
        let encoded = v["data"][i]["embedding"].as_str().expect("a base64 string");
        let bytes = decode_base64(encoded);
        let decoded: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(decoded, fake_embedding(&tokens(text)));
    }
}

/// A decoder written apart from the server's encoder.
fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for quad in s.as_bytes().chunks(4) {
        let data: Vec<u8> = quad
            .iter()
            .filter(|&&c| c != b'=')
            .map(|&c| value(c))
            .collect();
        let n = data
            .iter()
            .enumerate()
            .fold(0u32, |n, (k, &v)| n | u32::from(v) << (18 - 6 * k));
        out.extend((0..data.len() - 1).map(|k| (n >> (16 - 8 * k)) as u8));
    }
    out
}

#[tokio::test]
async fn bad_requests_name_their_parameter_and_reach_nothing() {
    let f = Arc::new(Fake::new());
    let too_long = "x".repeat(MODEL_LEN_MAX as usize); // plus BOS: one over
    for (body, want, param) in [
        (json!({}), StatusCode::BAD_REQUEST, Some("input")),
        (json!({"input": ""}), StatusCode::BAD_REQUEST, Some("input")),
        (json!({"input": []}), StatusCode::BAD_REQUEST, Some("input")),
        (
            json!({"input": [[]]}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            json!({"input": [1, "a"]}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (json!({"input": 3}), StatusCode::BAD_REQUEST, Some("input")),
        (
            json!({"input": [1_000_000]}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            json!({"input": too_long}),
            StatusCode::BAD_REQUEST,
            Some("input"),
        ),
        (
            json!({"input": "a", "dimensions": 8}),
            StatusCode::BAD_REQUEST,
            Some("dimensions"),
        ),
        (
            json!({"input": "a", "encoding_format": "int8"}),
            StatusCode::BAD_REQUEST,
            Some("encoding_format"),
        ),
        (
            json!({"input": "a", "model": "other"}),
            StatusCode::NOT_FOUND,
            Some("model"),
        ),
        (
            json!({"input": "a", "truncate_prompt_tokens": 8}),
            StatusCode::BAD_REQUEST,
            Some("truncate_prompt_tokens"),
        ),
    ] {
        let (status, v) = embed(&f, body.clone()).await;
        let (_, got) = error_of(status, &v, want);
        assert_eq!(got.as_deref(), param, "{body}: {v}");
    }
    let (status, v) = embed_with(&f, Some(EmbeddingPooling::Last), "{\"input\": ").await;
    error_of(status, &v, StatusCode::BAD_REQUEST);
    assert!(f.embedded().is_empty(), "nothing reached the backend");
    // `dimensions: null` and `user` are accepted.
    let (status, v) = embed(&f, json!({"input": "a", "dimensions": null, "user": "u"})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_failed_input_is_a_500_with_its_message_and_not_ready_is_a_503() {
    let f = Arc::new(Fake::new());
    let (status, v) = embed(&f, json!({"input": ["fine", "FAIL"]})).await;
    error_of(status, &v, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("the fake model failed")));
    f.ready.store(false, Ordering::Relaxed);
    let (status, v) = embed(&f, json!({"input": "a"})).await;
    error_of(status, &v, StatusCode::SERVICE_UNAVAILABLE);
}
