//! OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.
//!
//! Client errors (4xx) are answered as they are and not logged; internal errors are logged
//! with their detail and answered with a generic 500, so no internals leak to clients.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use candela_engine::api::SubmitError;
use serde::Serialize;

use crate::backend::BackendError;

/// Seconds a client is asked to wait after a 429.
pub const RETRY_AFTER_S: u32 = 1;

/// An error answered to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: a parameter is missing, malformed or out of range.
    #[error("{message}")]
    InvalidRequest {
        /// Human-readable explanation.
        message: String,
        /// The offending parameter, when there is one.
        param: Option<&'static str>,
    },
    /// 400: the body is not valid JSON or not the expected shape.
    #[error("{0}")]
    MalformedBody(String),
    /// 400: a parameter this server does not support (never silently dropped).
    #[error("unsupported parameter `{0}`: this server does not implement it")]
    UnsupportedParam(String),
    /// 401: missing or wrong API key.
    #[error("invalid or missing API key")]
    Unauthorized,
    /// 404: the requested model is not served here.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// 404: no such route.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// 405: the route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 404: no stored object (file, batch) has this id.
    #[error("{message}")]
    NotFound {
        /// Human-readable explanation.
        message: String,
        /// The parameter naming the id.
        param: Option<&'static str>,
    },
    /// 413: the request body is over the limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// 413: an uploaded file is over the server's limit.
    #[error("the file is larger than this server's limit of {bytes_max} bytes")]
    FileTooLarge {
        /// The limit.
        bytes_max: u64,
    },
    /// 429: the waiting queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// 503: not ready yet, or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the engine could not run the request; its message is meant for users.
    #[error("{0}")]
    Engine(String),
    /// 500: something broke; the detail is logged, the client gets a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 about one parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::MalformedBody(_) | Self::UnsupportedParam(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) | Self::NotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge | Self::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Engine(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The body as the OpenAI API shapes it.
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param) = match self {
            Self::InvalidRequest { param, .. } => ("invalid_request_error", None, *param),
            Self::UnsupportedParam(name) => {
                return ErrorBody {
                    error: ErrorDetail {
                        message: self.to_string(),
                        kind: "invalid_request_error".to_owned(),
                        param: Some(name.clone()),
                        code: Some("unsupported_parameter".to_owned()),
                    },
                }
            }
            Self::MalformedBody(_) => ("invalid_request_error", None, None),
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key"), None),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
            ),
            Self::RouteNotFound(_) => ("invalid_request_error", Some("not_found"), None),
            Self::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed"), None),
            Self::NotFound { param, .. } => ("invalid_request_error", None, *param),
            Self::PayloadTooLarge => ("invalid_request_error", Some("request_too_large"), None),
            Self::FileTooLarge { .. } => (
                "invalid_request_error",
                Some("file_too_large"),
                Some("file"),
            ),
            Self::Overloaded(_) => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            Self::Unavailable(_) => ("service_unavailable_error", None, None),
            Self::Engine(_) | Self::Internal(_) => ("server_error", None, None),
        };
        let message = match self {
            Self::Internal(_) => "internal server error".to_owned(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.to_owned(),
                param: param.map(str::to_owned),
                code: code.map(str::to_owned),
            },
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// The fields of an OpenAI error.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorDetail {
    /// What went wrong, for humans.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error`, `server_error`...
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending parameter, or null.
    pub param: Option<String>,
    /// A machine-readable code, or null.
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && !matches!(self, Self::Unavailable(_)) {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self::Overloaded(e.to_string()),
            SubmitError::PromptTooLong { .. } => Self::invalid("max_tokens", e.to_string()),
            SubmitError::Invalid(m) => Self::InvalidRequest {
                message: m,
                param: None,
            },
            SubmitError::InvalidParam(e) => Self::invalid(e.param, e.message),
            SubmitError::NotReady | SubmitError::ShuttingDown | SubmitError::EngineDead(_) => {
                Self::Unavailable(e.to_string())
            }
        }
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match &e {
            BackendError::Invalid(m) => Self::InvalidRequest {
                message: m.clone(),
                param: None,
            },
            BackendError::NotReady => Self::Unavailable(e.to_string()),
            BackendError::Internal(m) => Self::Internal(m.clone()),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Internal(format!("blocking task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_detail() {
        let body = ApiError::Internal("secret path /x".into()).body();
        assert_eq!(body.error.message, "internal server error");
        assert_eq!(body.error.kind, "server_error");
    }

    #[test]
    fn submit_errors_map_to_statuses() {
        let full: ApiError = SubmitError::QueueFull {
            queue_waiting_max: 3,
        }
        .into();
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        let long: ApiError = SubmitError::PromptTooLong {
            prompt_tokens: 9,
            max_tokens: 9,
            model_len_max: 10,
        }
        .into();
        assert_eq!(long.status(), StatusCode::BAD_REQUEST);
        assert_eq!(long.body().error.param.as_deref(), Some("max_tokens"));
        let busy: ApiError = SubmitError::NotReady.into();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn too_many_requests_carries_retry_after() {
        let response = ApiError::Overloaded("full".into()).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
