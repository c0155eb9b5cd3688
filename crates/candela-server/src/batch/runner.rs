//! Runs a batch's requests through the server's own router, a bounded number at a time.
//!
//! Every request goes through [`crate::app`] driven with `tower::ServiceExt::oneshot`, in
//! process: parsing, validation, error bodies and response shapes are exactly what the HTTP
//! routes answer, and cannot drift. `candela batch` (offline) and the HTTP Batch API
//! ([`super::service`]) both run on [`Dispatch::run`].
//!
//! In flight: at most as many requests as the `slots` semaphore has permits. The server shares
//! one semaphore among all its batches, so batch work never holds more than that many of the
//! engine's running slots whatever the number of batches; each request also carries a priority
//! below interactive ones ([`BATCH_PRIORITY`]).
//!
//! Stopping (cancel, shutdown, Ctrl-C) drops the in-flight set: each dropped request's abort
//! guard aborts it in the engine, which frees its KV blocks at the next step. A stopped
//! request is never answered, so a resume runs it again.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::jsonl::BatchRequest;

/// The scheduling priority of HTTP batch work: the lowest there is. The engine's scheduler
/// runs by priority (higher first; interactive requests default to 0), admits waiting
/// interactive requests before waiting batch ones, and preempts the lowest priority first
/// when KV blocks run out.
pub const BATCH_PRIORITY: i32 = i32::MIN;

/// Largest response body read back from the router (a full context of text with logprobs
/// fits many times over).
const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// With [`Patience::Bounded`]: how often a 429 (waiting queue full) is retried before the
/// request is recorded as failed.
const QUEUE_FULL_RETRIES_MAX: u32 = 600;
/// Wait between retries of a 429.
const QUEUE_FULL_BACKOFF: Duration = Duration::from_millis(100);
/// Wait between retries of a 503 (model loading, engine restarting, server draining).
const UNAVAILABLE_BACKOFF: Duration = Duration::from_millis(500);

/// What the runner does when the server cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// `candela batch`: the engine is its own and already warm, so a 503 means it died and
    /// is recorded; a 429 is retried for up to a minute.
    Bounded,
    /// The server: 429 and 503 are retried until the request is answered or the run is
    /// stopped. A batch outlives a loading model, a full queue and a restart.
    UntilStopped,
}

/// How requests reach the router.
#[derive(Clone)]
pub struct Dispatch {
    /// The server's router (without auth: these requests never cross the network).
    pub router: Router,
    /// Replaces each line's `priority` when set.
    pub priority: Option<i32>,
    /// Drops each line's `model`: `candela batch` runs the one model it loaded, whatever the
    /// file names. The server keeps it, so a wrong model is a 404 record as on its routes.
    pub strip_model: bool,
    /// What a 429 or a 503 leads to.
    pub patience: Patience,
}

/// The router's answer to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The request's custom_id.
    pub custom_id: String,
    /// The HTTP status the route answered.
    pub status: StatusCode,
    /// The JSON body the route answered.
    pub body: Value,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Every request was answered.
    Finished,
    /// `stop` resolved first; requests in flight were aborted and are not answered.
    Stopped,
}

impl Dispatch {
    /// The body sent for a line: never streamed (one record per line), and with the
    /// priority and model settings applied.
    fn body_of(&self, request: &BatchRequest) -> Value {
        let mut body = request.body.clone();
        if let Value::Object(map) = &mut body {
            map.insert("stream".into(), Value::Bool(false));
            map.remove("stream_options");
            if self.strip_model {
                map.remove("model");
            }
            if let Some(priority) = self.priority {
                map.insert("priority".into(), json!(priority));
            }
        }
        body
    }

    /// Sends one request through the router, waiting out a full queue (and, with
    /// [`Patience::UntilStopped`], an unavailable engine).
    pub async fn call(&self, request: &BatchRequest) -> (StatusCode, Value) {
        let bytes = self.body_of(request).to_string();
        let mut queue_full_retries = 0u32;
        loop {
            let http_request = Request::post(request.endpoint.path())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(bytes.clone()));
            let http_request = match http_request {
                Ok(r) => r,
                Err(e) => return internal_error(format!("building the request: {e}")),
            };
            let response = match self.router.clone().oneshot(http_request).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let status = response.status();
            let wait = match (status, self.patience) {
                (StatusCode::TOO_MANY_REQUESTS, Patience::UntilStopped) => Some(QUEUE_FULL_BACKOFF),
                (StatusCode::TOO_MANY_REQUESTS, Patience::Bounded) => {
                    queue_full_retries += 1;
                    if queue_full_retries > QUEUE_FULL_RETRIES_MAX {
                        return internal_error("the engine's waiting queue stayed full".into());
                    }
                    Some(QUEUE_FULL_BACKOFF)
                }
                (StatusCode::SERVICE_UNAVAILABLE, Patience::UntilStopped) => {
                    Some(UNAVAILABLE_BACKOFF)
                }
                _ => None,
            };
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
                continue;
            }
            let body = match axum::body::to_bytes(response.into_body(), RESPONSE_BYTES_MAX).await {
                Ok(b) => b,
                Err(e) => return internal_error(format!("reading the response: {e}")),
            };
            let value = serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
            return (status, value);
        }
    }

    /// Runs `pending` with at most `slots` permits' worth in flight, handing each answer to
    /// `on_answer` as it comes (in completion order), until all are answered or `stop`
    /// resolves. An error from `on_answer` ends the run with that error (in-flight requests
    /// are aborted).
    pub async fn run<F, Fut>(
        &self,
        pending: Vec<BatchRequest>,
        slots: Arc<Semaphore>,
        mut on_answer: F,
        stop: impl Future<Output = ()>,
    ) -> io::Result<RunEnd>
    where
        F: FnMut(Answer) -> Fut,
        Fut: Future<Output = io::Result<()>>,
    {
        let mut pending = pending.into_iter();
        let mut next = pending.next();
        // Dropped on every return: that aborts whatever is still in flight.
        let mut in_flight: JoinSet<Answer> = JoinSet::new();
        tokio::pin!(stop);
        loop {
            if next.is_none() && in_flight.is_empty() {
                return Ok(RunEnd::Finished);
            }
            tokio::select! {
                biased;
                () = &mut stop => return Ok(RunEnd::Stopped),
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    let answer = joined.map_err(|e| {
                        io::Error::other(format!("a batch request task failed: {e}"))
                    })?;
                    on_answer(answer).await?;
                }
                permit = Arc::clone(&slots).acquire_owned(), if next.is_some() => {
                    let Ok(permit) = permit else {
                        // The semaphore is never closed while a run holds it.
                        return Ok(RunEnd::Stopped);
                    };
                    let Some(request) = next.take() else { continue };
                    next = pending.next();
                    let dispatch = self.clone();
                    in_flight.spawn(async move {
                        let (status, body) = dispatch.call(&request).await;
                        drop(permit);
                        Answer { custom_id: request.custom_id, status, body }
                    });
                }
            }
        }
    }
}

fn internal_error(message: String) -> (StatusCode, Value) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        json!({"error": {"message": message, "type": "internal_error", "param": null, "code": null}}),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use axum::routing::post;

    use super::super::jsonl::Endpoint;
    use super::*;

    /// A router whose completions route echoes the body after a short wait, counting how
    /// many calls are in flight at once; it answers 429 to the first `busy` calls.
    fn echo_router(in_flight_max_seen: Arc<AtomicUsize>, busy: usize) -> Router {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        Router::new().route(
            "/v1/completions",
            post(move |body: String| {
                let in_flight = Arc::clone(&in_flight);
                let seen = Arc::clone(&in_flight_max_seen);
                let calls = Arc::clone(&calls);
                async move {
                    if calls.fetch_add(1, Ordering::SeqCst) < busy {
                        return (StatusCode::TOO_MANY_REQUESTS, String::new());
                    }
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    (StatusCode::OK, body)
                }
            }),
        )
    }

    fn request(i: usize) -> BatchRequest {
        BatchRequest {
            custom_id: format!("r{i}"),
            endpoint: Endpoint::Completions,
            body: json!({"prompt": "x", "model": "m", "stream": true, "priority": 5}),
        }
    }

    #[tokio::test]
    async fn every_request_is_answered_once_within_the_bound() {
        let seen = Arc::new(AtomicUsize::new(0));
        let dispatch = Dispatch {
            router: echo_router(Arc::clone(&seen), 2),
            priority: Some(BATCH_PRIORITY),
            strip_model: true,
            patience: Patience::Bounded,
        };
        let answers = Mutex::new(Vec::new());
        let end = dispatch
            .run(
                (0..20).map(request).collect(),
                Arc::new(Semaphore::new(3)),
                |a: Answer| {
                    answers.lock().expect("lock").push(a);
                    std::future::ready(Ok(()))
                },
                std::future::pending(),
            )
            .await
            .expect("run");
        assert_eq!(end, RunEnd::Finished);
        let answers = answers.into_inner().expect("lock");
        let mut ids: Vec<_> = answers.iter().map(|a| a.custom_id.clone()).collect();
        ids.sort();
        let mut expected: Vec<_> = (0..20).map(|i| format!("r{i}")).collect();
        expected.sort();
        assert_eq!(ids, expected);
        let in_flight_max = seen.load(Ordering::SeqCst);
        assert!((1..=3).contains(&in_flight_max), "{in_flight_max}");
        for a in &answers {
            assert_eq!(a.status, StatusCode::OK);
            // The router saw the body as prepared: not streamed, no model, batch priority.
            assert_eq!(a.body["stream"], false);
            assert!(a.body.get("model").is_none());
            assert_eq!(a.body["priority"], BATCH_PRIORITY);
        }
    }

    #[tokio::test]
    async fn a_stop_ends_the_run_without_more_answers() {
        let dispatch = Dispatch {
            router: echo_router(Arc::new(AtomicUsize::new(0)), 0),
            priority: None,
            strip_model: false,
            patience: Patience::UntilStopped,
        };
        let mut count = 0;
        let end = dispatch
            .run(
                (0..1000).map(request).collect(),
                Arc::new(Semaphore::new(1)),
                |_| {
                    count += 1;
                    std::future::ready(Ok(()))
                },
                tokio::time::sleep(Duration::from_millis(30)),
            )
            .await
            .expect("run");
        assert_eq!(end, RunEnd::Stopped);
        assert!(count < 1000, "{count}");
    }

    #[tokio::test]
    async fn a_failing_sink_ends_the_run_with_its_error() {
        let dispatch = Dispatch {
            router: echo_router(Arc::new(AtomicUsize::new(0)), 0),
            priority: None,
            strip_model: false,
            patience: Patience::Bounded,
        };
        let result = dispatch
            .run(
                (0..5).map(request).collect(),
                Arc::new(Semaphore::new(2)),
                |_| std::future::ready(Err(io::Error::other("disk full"))),
                std::future::pending(),
            )
            .await;
        assert!(result.is_err_and(|e| e.to_string() == "disk full"));
    }
}
