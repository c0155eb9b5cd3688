//! `POST /v1/embeddings` in OpenAI's shape, over the engine's embedding requests (prefill-only
//! sequences in the same batches as generation, see `candela_engine::api::EmbedRequest`).
//!
//! Off unless the server runs with `--embeddings`: then the route answers 501 and says how to
//! turn it on, as llama.cpp's server does. `--pooling none` starts, and every request gets
//! llama.cpp's 400 ("Pooling type 'none' is not OAI compatible"): OpenAI's shape holds one
//! vector per input, not one per token.
//!
//! `input` is a string, an array of strings, an array of token ids or an array of token-id
//! arrays (OpenAI's four shapes); texts are tokenized as text-completion prompts are (with the
//! model's BOS). `encoding_format` is `float` (the default) or `base64`: the little-endian f32
//! bytes, base64-encoded, which the official Python client asks for by default. `dimensions`
//! is refused: a decoder's hidden size is the only size it has. Every bad input is a 400 naming
//! its parameter, before anything reaches the engine.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use candela_engine::api::{
    EmbedEvent, EmbedRequest, FinishReason, Pooling, RequestId, TokenId, EMBED_INPUTS_MAX,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::app::AppState;
use crate::backend::Backend;
use crate::error::{ApiError, ErrorBody, ErrorDetail};
use crate::params;

/// How `/v1/embeddings` pools each input's final hidden states (`--pooling`, with llama.cpp's
/// names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingPooling {
    /// The last token's hidden state.
    Last,
    /// The mean over every token.
    Mean,
    /// One vector per token, which OpenAI's shape cannot carry: every request is a 400.
    None,
}

/// Most tokens summed over the inputs of one request (OpenAI's limit).
pub const EMBED_TOKENS_MAX: usize = 300_000;

/// The message llama.cpp's server answers without `--embeddings`, our flag's name included.
const NOT_ENABLED: &str = "This server does not support embeddings. Start it with `--embeddings`";

/// `POST /v1/embeddings`, parsed loosely so that each bad field gets a 400 naming it.
#[derive(Debug, Deserialize)]
struct EmbeddingRequest {
    input: Option<Value>,
    model: Option<String>,
    encoding_format: Option<Value>,
    dimensions: Option<Value>,
    /// OpenAI's end-user id: accepted, ignored.
    #[serde(rename = "user")]
    _user: Option<Value>,
    #[serde(flatten)]
    unknown: serde_json::Map<String, Value>,
}

/// The inputs as given: texts still to tokenize, or token ids already checked.
#[derive(Debug, PartialEq)]
enum Inputs {
    Texts(Vec<String>),
    Ids(Vec<Vec<TokenId>>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    Base64,
}

#[derive(Debug, Serialize)]
struct EmbeddingList {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: u32,
    embedding: EmbeddingOut,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum EmbeddingOut {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

/// The handler.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    // Whether the route is on at all comes first, whatever the body holds (as llama.cpp).
    let pooling = match state.config.embeddings {
        None => return Ok(not_enabled()),
        Some(EmbeddingPooling::None) => {
            return Err(ApiError::InvalidRequest {
                message: "Pooling type 'none' is not OAI compatible. Please use a different \
                          pooling type (start the server with --pooling last or --pooling mean)"
                    .to_owned(),
                param: None,
            })
        }
        Some(EmbeddingPooling::Last) => Pooling::Last,
        Some(EmbeddingPooling::Mean) => Pooling::Mean,
    };
    let req: EmbeddingRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::MalformedBody(format!("invalid JSON body: {e}")))?;
    crate::openai::refuse_unknown(&req.unknown)?;
    params::check_model(req.model.as_deref(), &state.config.served_model_names)?;
    let encoding = encoding_format(req.encoding_format.as_ref())?;
    if req.dimensions.as_ref().is_some_and(|d| !d.is_null()) {
        return Err(ApiError::invalid(
            "dimensions",
            "this model does not support `dimensions`: its embeddings have the model's hidden \
             size",
        ));
    }
    let inputs = parse_input(req.input.as_ref(), state.backend.vocab_size())?;
    state.check_ready()?;
    let token_lists = match inputs {
        Inputs::Ids(ids) => ids,
        Inputs::Texts(texts) => {
            let backend = Arc::clone(&state.backend);
            tokio::task::spawn_blocking(move || {
                texts
                    .iter()
                    .map(|text| backend.tokenize(text, true))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await??
        }
    };
    let prompt_tokens = check_lengths(&token_lists, state.backend.model_len_max())?;
    // Shutdown may have begun while the inputs were being tokenized.
    state.check_ready()?;
    let count = token_lists.len();
    let (id, mut events) = state.backend.embed(EmbedRequest {
        inputs: token_lists,
        pooling,
        priority: 0,
        arrival,
    })?;
    let mut guard = AbortGuard {
        backend: Arc::clone(&state.backend),
        id,
        done: false,
    };
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; count];
    let mut answered = 0;
    while answered < count {
        let (index, result) = match events.next().await {
            Some(EmbedEvent::Embedding {
                index, embedding, ..
            }) => (index, Ok(embedding)),
            Some(EmbedEvent::Failed { index, reason }) => (index, Err(reason)),
            None => {
                return Err(ApiError::Internal(
                    "the engine dropped an embedding request".into(),
                ))
            }
        };
        let slot = vectors
            .get_mut(index as usize)
            .filter(|slot| slot.is_none())
            .ok_or_else(|| ApiError::Internal(format!("unexpected embedding index {index}")))?;
        match result {
            Ok(embedding) => *slot = Some(embedding),
            Err(FinishReason::Abort) => {
                return Err(ApiError::Unavailable(
                    "the embedding request was aborted: the server is shutting down".into(),
                ))
            }
            Err(FinishReason::Error(message)) => return Err(ApiError::Engine(message)),
            Err(other) => {
                return Err(ApiError::Internal(format!(
                    "an embedding ended with {other:?}"
                )))
            }
        }
        answered += 1;
    }
    guard.done = true;
    let data = vectors
        .into_iter()
        .zip(0u32..)
        .map(|(vector, index)| EmbeddingData {
            object: "embedding",
            index,
            embedding: match (encoding, vector.unwrap_or_default()) {
                (Encoding::Float, v) => EmbeddingOut::Float(v),
                (Encoding::Base64, v) => EmbeddingOut::Base64(base64_f32_le(&v)),
            },
        })
        .collect();
    let prompt_tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
    Ok(axum::Json(EmbeddingList {
        object: "list",
        data,
        model: state.config.model_name().to_owned(),
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response())
}

/// 501 with llama.cpp's message and error type.
fn not_enabled() -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message: NOT_ENABLED.to_owned(),
            kind: "not_supported_error".to_owned(),
            param: None,
            code: None,
        },
    };
    (StatusCode::NOT_IMPLEMENTED, axum::Json(body)).into_response()
}

/// Aborts the engine request when the handler ends early (an error, or the client gone).
struct AbortGuard {
    backend: Arc<dyn Backend>,
    id: RequestId,
    done: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.done {
            self.backend.abort(self.id);
        }
    }
}

fn encoding_format(format: Option<&Value>) -> Result<Encoding, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(Encoding::Float),
        Some(Value::String(s)) if s == "float" => Ok(Encoding::Float),
        Some(Value::String(s)) if s == "base64" => Ok(Encoding::Base64),
        Some(other) => Err(ApiError::invalid(
            "encoding_format",
            format!("encoding_format must be \"float\" or \"base64\", got {other}"),
        )),
    }
}

/// OpenAI's four shapes of `input`, checked: not empty, no empty string or token list, token
/// ids inside the vocabulary, at most [`EMBED_INPUTS_MAX`] inputs.
fn parse_input(input: Option<&Value>, vocab_size: u32) -> Result<Inputs, ApiError> {
    let bad = |message: String| Err(ApiError::invalid("input", message));
    const SHAPES: &str = "input must be a string, an array of strings, an array of token ids or \
                          an array of token-id arrays";
    let ids_of = |values: &[Value], what: &str| -> Result<Vec<TokenId>, ApiError> {
        if values.is_empty() {
            return Err(ApiError::invalid("input", format!("{what} is empty")));
        }
        let ids = values
            .iter()
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    ApiError::invalid("input", format!("{what} holds {v}, not a token id"))
                })
            })
            .collect::<Result<Vec<i64>, _>>()?;
        params::token_ids(&ids, vocab_size, "input")
    };
    let inputs = match input {
        None | Some(Value::Null) => return bad("input is required".into()),
        Some(Value::String(text)) if text.is_empty() => {
            return bad("input must not be an empty string".into())
        }
        Some(Value::String(text)) => Inputs::Texts(vec![text.clone()]),
        Some(Value::Array(items)) => match items.first() {
            None => return bad("input must not be an empty array".into()),
            Some(Value::String(_)) => {
                let mut texts = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(text) if text.is_empty() => {
                            return bad(format!("input[{i}] is an empty string"))
                        }
                        Value::String(text) => texts.push(text.clone()),
                        _ => return bad(format!("{SHAPES}: input[{i}] is not a string")),
                    }
                }
                Inputs::Texts(texts)
            }
            Some(Value::Number(_)) => Inputs::Ids(vec![ids_of(items, "input")?]),
            Some(Value::Array(_)) => Inputs::Ids(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| match item {
                        Value::Array(ids) => ids_of(ids, &format!("input[{i}]")),
                        _ => Err(ApiError::invalid(
                            "input",
                            format!("{SHAPES}: input[{i}] is not an array of token ids"),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return bad(SHAPES.into()),
        },
        Some(_) => return bad(SHAPES.into()),
    };
    let count = match &inputs {
        Inputs::Texts(texts) => texts.len(),
        Inputs::Ids(ids) => ids.len(),
    };
    if count > EMBED_INPUTS_MAX {
        return bad(format!(
            "give at most {EMBED_INPUTS_MAX} inputs, got {count}"
        ));
    }
    Ok(inputs)
}

/// Each input within the context (an embedding generates nothing, so the whole context is the
/// prompt's), all of them within [`EMBED_TOKENS_MAX`]; returns the total.
fn check_lengths(token_lists: &[Vec<TokenId>], model_len_max: u32) -> Result<usize, ApiError> {
    let model_len_max = model_len_max as usize;
    for (i, ids) in token_lists.iter().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("input {i} has no tokens"),
            ));
        }
        if ids.len() > model_len_max {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input {i} has {} tokens, more than the model's context length of \
                     {model_len_max} tokens",
                    ids.len()
                ),
            ));
        }
    }
    let total: usize = token_lists.iter().map(Vec::len).sum();
    if total > EMBED_TOKENS_MAX {
        return Err(ApiError::invalid(
            "input",
            format!("the inputs hold {total} tokens, more than {EMBED_TOKENS_MAX}"),
        ));
    }
    Ok(total)
}

/// The vector's little-endian f32 bytes in standard base64 with padding (OpenAI's
/// `encoding_format: "base64"`; numpy's `frombuffer(..., dtype="float32")` reads it back).
fn base64_f32_le(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64(&bytes)
}

/// RFC 4648 base64, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_follows_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0xfd]), "//79");
        // 1.0f32 is 00 00 80 3f little-endian.
        assert_eq!(base64_f32_le(&[1.0]), "AACAPw==");
    }

    fn param_of(r: Result<Inputs, ApiError>) -> String {
        match r {
            Err(ApiError::InvalidRequest { param, message }) => {
                format!("{}: {message}", param.unwrap_or("-"))
            }
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn every_shape_of_input_is_read() {
        let parse = |v: Value| parse_input(Some(&v), 100);
        assert_eq!(
            parse(json!("hi")).ok(),
            Some(Inputs::Texts(vec!["hi".into()]))
        );
        assert_eq!(
            parse(json!(["a", "b"])).ok(),
            Some(Inputs::Texts(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            parse(json!([1, 2])).ok(),
            Some(Inputs::Ids(vec![vec![1, 2]]))
        );
        assert_eq!(
            parse(json!([[1], [2, 3]])).ok(),
            Some(Inputs::Ids(vec![vec![1], vec![2, 3]]))
        );
    }

    #[test]
    fn bad_inputs_name_the_input_parameter() {
        let parse = |v: Option<Value>| param_of(parse_input(v.as_ref(), 100));
        for (input, says) in [
            (None, "required"),
            (Some(json!(null)), "required"),
            (Some(json!("")), "empty string"),
            (Some(json!([])), "empty array"),
            (Some(json!(["a", ""])), "input[1] is an empty string"),
            (Some(json!(["a", 1])), "input[1] is not a string"),
            (Some(json!([1, "a"])), "not a token id"),
            (Some(json!([1.5])), "not a token id"),
            (Some(json!([-1])), "outside the vocabulary"),
            (Some(json!([100])), "outside the vocabulary"),
            (Some(json!([[1], []])), "input[1] is empty"),
            (Some(json!([[1], 2])), "input[1] is not an array"),
            (Some(json!([{"a": 1}])), "must be a string"),
            (Some(json!(7)), "must be a string"),
            (Some(json!({"text": "x"})), "must be a string"),
        ] {
            let got = parse(input.clone());
            assert!(
                got.starts_with("input: ") && got.contains(says),
                "{input:?}: {got}"
            );
        }
        let many = json!(vec!["x"; EMBED_INPUTS_MAX + 1]);
        assert!(parse(Some(many)).contains("at most 2048"));
    }

    #[test]
    fn lengths_are_checked_against_the_context_and_the_total() {
        assert_eq!(check_lengths(&[vec![1, 2], vec![3]], 2).ok(), Some(3));
        let too_long = check_lengths(&[vec![1], vec![1, 2, 3]], 2);
        assert!(matches!(
            too_long,
            Err(ApiError::InvalidRequest { param: Some("input"), ref message })
                if message.contains("input 1 has 3 tokens")
        ));
        let many = vec![vec![1; 1000]; EMBED_TOKENS_MAX / 1000 + 1];
        assert!(check_lengths(&many, 4096).is_err());
    }

    #[test]
    fn encoding_formats() {
        assert_eq!(encoding_format(None).ok(), Some(Encoding::Float));
        assert_eq!(
            encoding_format(Some(&json!("base64"))).ok(),
            Some(Encoding::Base64)
        );
        assert!(matches!(
            encoding_format(Some(&json!("int8"))),
            Err(ApiError::InvalidRequest {
                param: Some("encoding_format"),
                ..
            })
        ));
    }
}
