//! The router: routes, auth, body limit, JSON error fallbacks, and graceful serving.
//!
//! [`app`] builds the `Router` from an [`AppState`] and nothing else, so tests drive it with
//! `tower::ServiceExt::oneshot` over a fake backend; [`serve`] adds the listener and the
//! shutdown drain.

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use candela_engine::api::{EngineHealth, TokenId};
use tower_http::limit::RequestBodyLimitLayer;

use crate::backend::Backend;
use crate::error::ApiError;
use crate::extract::Json;
use crate::generate::{respond_once, respond_stream, Flavor, Job};
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard,
    ModelList, PromptIn, TokenizeRequest, TokenizeResponse,
};
use crate::params::{self, PROMPTS_MAX};
use crate::responses::wire::ResponsesRequest;

/// Default request body limit: a full context of text several times over, far below memory.
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 4 * 1024 * 1024;

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The names clients may pass as `model` (all listed by `/v1/models`; vLLM's
    /// `--served-model-name` with several values). The first is the one responses report.
    /// Never empty.
    pub served_model_names: Vec<String>,
    /// When set, `/v1/*`, `/tokenize` and `/detokenize` need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Requests with larger bodies get 413.
    pub body_limit_bytes: usize,
    /// `--embeddings [--pooling ...]`: serve `/v1/embeddings` with this pooling; `None`
    /// answers it with 501 and how to turn it on.
    pub embeddings: Option<crate::embeddings::EmbeddingPooling>,
}

impl ServerConfig {
    /// The name responses report: the first served name.
    pub fn model_name(&self) -> &str {
        self.served_model_names.first().map_or("", String::as_str)
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: Arc<ServerConfig>,
    /// Unix seconds at start (`created` of the model card).
    started_unix_s: u64,
    /// Set when shutdown begins: `/ready` answers 503 and no new generation starts.
    draining: Arc<AtomicBool>,
    /// The Files and Batch APIs, when the server has a data directory.
    batches: Option<Arc<crate::batch::BatchService>>,
}

impl AppState {
    /// State over a backend.
    pub fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Self {
        Self {
            backend,
            config: Arc::new(config),
            started_unix_s: unix_now_s(),
            draining: Arc::new(AtomicBool::new(false)),
            batches: None,
        }
    }

    /// This state with the Files and Batch APIs on.
    pub fn with_batches(mut self, batches: Arc<crate::batch::BatchService>) -> Self {
        self.batches = Some(batches);
        self
    }

    pub(crate) fn batches(&self) -> Option<&Arc<crate::batch::BatchService>> {
        self.batches.as_ref()
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The state behind the router that batch requests go through: the same backend and
    /// drain flag, no API key (those requests never cross the network), no batch API.
    pub(crate) fn for_dispatch(&self) -> Self {
        let mut config = ServerConfig::clone(&self.config);
        config.api_key = None;
        Self {
            config: Arc::new(config),
            batches: None,
            ..self.clone()
        }
    }

    pub(crate) fn check_ready(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable(
                "the server is shutting down".to_owned(),
            ));
        }
        if let Some(message) = health_problem(self.backend.health()) {
            return Err(ApiError::Unavailable(message));
        }
        if !self.backend.is_ready() {
            return Err(ApiError::Unavailable(
                "the model is not loaded yet".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole HTTP API over `state`.
pub fn app(state: AppState) -> Router {
    let limit = state.config.body_limit_bytes;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(crate::embeddings::embeddings))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    // Merged after the body limits below, so that uploads get their own (larger) limit.
    let upload_bytes_max = state
        .batches
        .as_ref()
        .map_or(limit as u64, |b| b.file_bytes_max());
    let batch_api = crate::batch::routes::routes(limit, upload_bytes_max)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyLimitLayer::new(limit))
        .merge(batch_api)
        // Outermost: RequestBodyLimitLayer answers an oversized Content-Length itself with a
        // plain-text 413; clients get the JSON error body instead.
        .layer(middleware::map_response(json_payload_too_large))
        .with_state(state)
}

async fn json_payload_too_large(response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        ApiError::PayloadTooLarge.into_response()
    } else {
        response
    }
}

/// Compares without an early exit, so the time taken does not reveal a matching prefix.
fn keys_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| keys_equal(g.as_bytes(), key.as_bytes())) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

async fn route_not_found(uri: Uri) -> ApiError {
    ApiError::RouteNotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Liveness: 200 only while the engine can serve. 503 with an OpenAI-style body while the
/// model loads and warms up, while draining after SIGTERM, and when the engine has failed or
/// has finished no step for `step_stall_max` with work pending (vLLM #36960, #39863: a
/// `/health` that says 200 over a dead engine keeps a broken replica in rotation).
async fn health(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable(
            "the server is shutting down".to_owned(),
        ));
    }
    match health_problem(state.backend.health()) {
        None => Ok(axum::Json(serde_json::json!({ "status": "ok" }))),
        Some(message) => Err(ApiError::Unavailable(message)),
    }
}

/// Why the engine cannot serve, or `None` when it can.
fn health_problem(health: EngineHealth) -> Option<String> {
    match health {
        EngineHealth::Healthy => None,
        EngineHealth::Starting => Some("the model is loading or warming up".to_owned()),
        EngineHealth::Draining => Some("the server is shutting down".to_owned()),
        EngineHealth::Stalled { stalled_ms } => Some(format!(
            "the engine has made no progress for {stalled_ms} ms with requests pending"
        )),
        EngineHealth::Dead(reason) => Some(format!("the engine has failed: {reason}")),
    }
}

async fn ready(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    state.check_ready()?;
    Ok(axum::Json(serde_json::json!({ "status": "ready" })))
}

async fn metrics(State(state): State<AppState>) -> Response {
    let backend = Arc::clone(&state.backend);
    match tokio::task::spawn_blocking(move || backend.metrics_text()).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn models(State(state): State<AppState>) -> impl IntoResponse {
    axum::Json(ModelList {
        object: "list",
        data: state
            .config
            .served_model_names
            .iter()
            .map(|name| ModelCard {
                id: name.clone(),
                object: "model",
                created: state.started_unix_s,
                owned_by: "candela",
                max_model_len: state.backend.model_len_max(),
            })
            .collect(),
    })
}

/// Runs a tokenizer/template closure on the blocking pool.
async fn blocking<T, F>(state: &AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&dyn Backend) -> Result<T, ApiError> + Send + 'static,
{
    let backend = Arc::clone(&state.backend);
    tokio::task::spawn_blocking(move || f(backend.as_ref())).await?
}

fn new_job(
    state: &AppState,
    flavor: Flavor,
    prompts: Vec<Vec<TokenId>>,
    echo: Vec<String>,
    plan: params::Plan,
) -> Job {
    let prefix = match flavor {
        Flavor::Chat => "chatcmpl",
        Flavor::Completion => "cmpl",
    };
    Job {
        flavor,
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now_s(),
        model: state.config.model_name().to_owned(),
        prompts,
        echo,
        plan,
        arrival: Instant::now(),
    }
}

async fn run(state: &AppState, job: Job) -> Result<Response, ApiError> {
    // Shutdown may have begun while the prompt was being tokenized.
    state.check_ready()?;
    if job.plan.stream {
        respond_stream(Arc::clone(&state.backend), job)
    } else {
        respond_once(Arc::clone(&state.backend), job).await
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    Json(req): Json<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    crate::openai::refuse_unknown(&req.unknown)?;
    params::check_model(
        req.common.model.as_deref(),
        &state.config.served_model_names,
    )?;
    state.check_ready()?;
    let logprobs = params::chat_logprobs(req.logprobs, req.top_logprobs)?;
    let max_tokens = req.max_completion_tokens.or(req.common.max_tokens);
    let mut plan = params::plan(
        &req.common,
        max_tokens,
        logprobs,
        state.backend.vocab_size(),
    )?;
    let tools = crate::tools::tool_calling(
        crate::tools::Shape::Nested,
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    plan.sampling.tools.clone_from(&tools);
    let messages = params::chat_messages(&req.messages)?;
    let prompt = chat_prompt(&state, messages, tools).await?;
    params::check_context(
        prompt.len(),
        plan.sampling.max_tokens,
        state.backend.model_len_max(),
        "messages",
    )?;
    let mut job = new_job(&state, Flavor::Chat, vec![prompt], Vec::new(), plan);
    job.arrival = arrival;
    run(&state, job).await
}

/// Renders the chat template (with the tools, for the model to see) and tokenizes the result.
async fn chat_prompt(
    state: &AppState,
    messages: Vec<candela_engine::ChatMessage>,
    tools: Option<candela_engine::api::ToolCalling>,
) -> Result<Vec<TokenId>, ApiError> {
    blocking(state, move |b| {
        let text = b.apply_chat_template(&messages, tools.as_ref(), true)?;
        Ok(b.tokenize(&text, false)?)
    })
    .await
}

/// The Responses API: the request translated to a chat job ([`crate::responses`]).
async fn responses(
    State(state): State<AppState>,
    Json(req): Json<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    params::check_model(req.model.as_deref(), &state.config.served_model_names)?;
    let checked = crate::responses::check(req, state.backend.vocab_size())?;
    state.check_ready()?;
    let prompt = chat_prompt(&state, checked.messages, checked.tools).await?;
    params::check_context(
        prompt.len(),
        checked.plan.sampling.max_tokens,
        state.backend.model_len_max(),
        "input",
    )
    .map_err(crate::responses::output_tokens_param)?;
    // A chat job under a Responses id: only the answer's shape differs.
    let mut job = new_job(&state, Flavor::Chat, vec![prompt], Vec::new(), checked.plan);
    job.id = crate::responses::output::new_id("resp");
    job.arrival = arrival;
    // Shutdown may have begun while the prompt was being tokenized.
    state.check_ready()?;
    crate::responses::respond(Arc::clone(&state.backend), job, checked.skeleton).await
}

async fn completions(
    State(state): State<AppState>,
    Json(req): Json<CompletionRequest>,
) -> Result<Response, ApiError> {
    let arrival = Instant::now();
    crate::openai::refuse_unknown(&req.unknown)?;
    params::check_model(
        req.common.model.as_deref(),
        &state.config.served_model_names,
    )?;
    state.check_ready()?;
    let logprobs = params::completion_logprobs(req.logprobs)?;
    let plan = params::plan(
        &req.common,
        req.common.max_tokens,
        logprobs,
        state.backend.vocab_size(),
    )?;
    let echo = req.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "echo together with logprobs is not supported",
        ));
    }
    let vocab_size = state.backend.vocab_size();
    enum Prompts {
        Texts(Vec<String>),
        Ids(Vec<Vec<TokenId>>),
    }
    let prompts = match req.prompt {
        PromptIn::Text(t) => Prompts::Texts(vec![t]),
        PromptIn::Texts(v) => Prompts::Texts(v),
        PromptIn::Ids(ids) => Prompts::Ids(vec![params::token_ids(&ids, vocab_size, "prompt")?]),
        PromptIn::IdsList(lists) => Prompts::Ids(
            lists
                .iter()
                .map(|ids| params::token_ids(ids, vocab_size, "prompt"))
                .collect::<Result<_, _>>()?,
        ),
    };
    let count = match &prompts {
        Prompts::Texts(v) => v.len(),
        Prompts::Ids(v) => v.len(),
    };
    if count == 0 || count > PROMPTS_MAX {
        return Err(ApiError::invalid(
            "prompt",
            format!("give between 1 and {PROMPTS_MAX} prompts, got {count}"),
        ));
    }
    if let Prompts::Texts(texts) = &prompts {
        if texts.iter().any(String::is_empty) {
            return Err(ApiError::invalid("prompt", "prompts must not be empty"));
        }
    }
    let (token_lists, echo_texts) = blocking(&state, move |b| match prompts {
        Prompts::Texts(texts) => {
            let ids = texts
                .iter()
                .map(|t| b.tokenize(t, true))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((ids, if echo { texts } else { Vec::new() }))
        }
        Prompts::Ids(ids) => {
            let texts = if echo {
                ids.iter()
                    .map(|i| b.detokenize(i))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            Ok((ids, texts))
        }
    })
    .await?;
    for ids in &token_lists {
        params::check_context(
            ids.len(),
            plan.sampling.max_tokens,
            state.backend.model_len_max(),
            "prompt",
        )?;
    }
    let mut job = new_job(&state, Flavor::Completion, token_lists, echo_texts, plan);
    job.arrival = arrival;
    run(&state, job).await
}

async fn tokenize(
    State(state): State<AppState>,
    Json(req): Json<TokenizeRequest>,
) -> Result<Response, ApiError> {
    params::check_model(req.model.as_deref(), &state.config.served_model_names)?;
    let strs = req.return_token_strs.unwrap_or(false);
    let (tokens, token_strs) = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let special = req.add_special_tokens.unwrap_or(true);
            blocking(&state, move |b| {
                let ids = b.tokenize(&prompt, special)?;
                let strs = if strs { Some(pieces(b, &ids)?) } else { None };
                Ok((ids, strs))
            })
            .await?
        }
        (None, Some(messages)) => {
            let messages = params::chat_messages(&messages)?;
            let generation = req.add_generation_prompt.unwrap_or(true);
            let special = req.add_special_tokens.unwrap_or(false);
            blocking(&state, move |b| {
                let text = b.apply_chat_template(&messages, None, generation)?;
                let ids = b.tokenize(&text, special)?;
                let strs = if strs { Some(pieces(b, &ids)?) } else { None };
                Ok((ids, strs))
            })
            .await?
        }
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    Ok(axum::Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.backend.model_len_max(),
        tokens,
        token_strs,
    })
    .into_response())
}

fn pieces(b: &dyn Backend, ids: &[TokenId]) -> Result<Vec<String>, ApiError> {
    Ok(b.token_bytes(ids)?
        .iter()
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        .collect())
}

async fn detokenize(
    State(state): State<AppState>,
    Json(req): Json<DetokenizeRequest>,
) -> Result<Response, ApiError> {
    params::check_model(req.model.as_deref(), &state.config.served_model_names)?;
    let ids = params::token_ids(&req.tokens, state.backend.vocab_size(), "tokens")?;
    let prompt = blocking(&state, move |b| Ok(b.detokenize(&ids)?)).await?;
    Ok(axum::Json(DetokenizeResponse { prompt }).into_response())
}

/// How often the drain checks whether in-flight requests have finished.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Serves `state` on `listener` until `shutdown` resolves, then drains and returns.
///
/// Draining, in two phases within `drain_timeout`:
/// 1. The server keeps accepting connections but answers `/health`, `/ready` and every new
///    generation with 503, so a load balancer or Kubernetes takes the replica out of rotation
///    while in-flight requests run to the end.
/// 2. Once the backend holds no request (or the deadline passed), it stops accepting and
///    waits for open connections (the last SSE chunks) to close.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain_timeout: Duration,
) -> std::io::Result<()> {
    let draining = Arc::clone(&state.draining);
    let backend = Arc::clone(&state.backend);
    let (began_tx, mut began_rx) = tokio::sync::watch::channel(None::<Instant>);
    let signal = async move {
        shutdown.await;
        draining.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + drain_timeout;
        let _ = began_tx.send(Some(deadline));
        tracing::info!(
            drain_timeout_s = drain_timeout.as_secs_f64(),
            in_flight = backend.requests_in_flight(),
            "shutting down: draining in-flight requests"
        );
        while backend.requests_in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::info!("in-flight requests done: closing the listener");
    };
    let server = axum::serve(listener, app(state))
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        match began_rx.wait_for(Option::is_some).await.map(|d| *d) {
            Ok(Some(deadline)) => {
                tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
            }
            _ => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        result = server => result,
        () = deadline => {
            tracing::warn!("drain deadline passed: closing the remaining connections");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        assert!(keys_equal(b"abc", b"abc"));
        assert!(!keys_equal(b"abc", b"abd"));
        assert!(!keys_equal(b"abc", b"abcd"));
    }
}
