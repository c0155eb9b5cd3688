//! A JSON body extractor whose rejections are OpenAI-style errors.
//!
//! axum's own `Json` answers malformed bodies with plain text and insists on a
//! `Content-Type: application/json` header; OpenAI clients expect `{"error": {...}}`, and
//! `curl -d` sends a form content type. So the body is read as bytes (which honours the body
//! limit) and parsed whatever the content type says.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request body parsed as JSON into `T`.
pub struct Json<T>(pub T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::MalformedBody(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| ApiError::MalformedBody(format!("invalid JSON body: {e}")))
    }
}
