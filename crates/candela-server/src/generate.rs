//! From a validated request to the client: submit to the backend, then either collect every
//! event into one JSON body or turn events into SSE chunks as they come.
//!
//! A request with several prompts (text completions) is one engine request per prompt, each
//! with `n` choices; choice `i` of prompt `p` is answered as index `p * n + i`, as OpenAI does.
//!
//! **Abort on disconnect:** the event streams are owned by an [`AbortGuard`] that lives inside
//! the response future (non-streaming) or the SSE body (streaming). When the client goes away,
//! hyper drops either one, and the guard aborts every engine request that had not finished, so
//! the engine frees its KV blocks at once rather than generating for nobody.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use candela_engine::api::{
    FinishReason, GenerateEvent, GenerateRequest, RequestId, Timings, TokenId, TokenLogprob,
    ToolCallDelta, Usage,
};
use futures::stream::{self, BoxStream, StreamExt};

use crate::backend::Backend;
use crate::error::ApiError;
use crate::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatTokenLogprob, ChunkUsage, CompletionChoice, Envelope, FunctionCallOut, FunctionChunk,
    LegacyLogprobs, TimingsOut, ToolCallChunk, ToolCallOut, TopLogprob, UsageOut,
};
use crate::params::Plan;

/// Which API answers: the shapes of chunks, bodies and logprobs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// A request ready to submit.
#[derive(Debug, Clone)]
pub struct Job {
    /// Chat or text completion.
    pub flavor: Flavor,
    /// `chatcmpl-...` / `cmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's name.
    pub model: String,
    /// Tokenized prompts (chat: exactly one).
    pub prompts: Vec<Vec<TokenId>>,
    /// Per prompt, text to put in front of the output (`echo`); empty otherwise.
    pub echo: Vec<String>,
    /// Validated parameters.
    pub plan: Plan,
    /// When the request arrived.
    pub arrival: std::time::Instant,
}

impl Job {
    fn n(&self) -> usize {
        self.plan.n.get() as usize
    }

    fn choices(&self) -> usize {
        self.prompts.len() * self.n()
    }

    fn prompt_of(&self, choice: usize) -> usize {
        choice / self.n()
    }

    fn logprobs(&self) -> bool {
        self.plan.sampling.logprobs.is_some()
    }

    fn echo_of(&self, choice: usize) -> &str {
        self.echo
            .get(self.prompt_of(choice))
            .map_or("", String::as_str)
    }
}

/// Aborts, when dropped, every submitted request that has not finished all its choices.
pub struct AbortGuard {
    backend: Arc<dyn Backend>,
    /// Per prompt: the engine's id and how many choices are still running.
    requests: Vec<(RequestId, u32)>,
}

impl AbortGuard {
    fn choice_finished(&mut self, prompt: usize) {
        if let Some((_, running)) = self.requests.get_mut(prompt) {
            *running = running.saturating_sub(1);
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        for &(id, running) in &self.requests {
            if running > 0 {
                tracing::debug!(request = id.0, "client gone: aborting");
                self.backend.abort(id);
            }
        }
    }
}

/// The merged events of all prompts, tagged with the global choice index.
type Events = BoxStream<'static, (usize, GenerateEvent)>;

/// Submits one engine request per prompt. If one is refused, the ones already submitted are
/// aborted (by the guard) and the refusal is answered.
pub fn submit(backend: &Arc<dyn Backend>, job: &Job) -> Result<(Events, AbortGuard), ApiError> {
    let mut guard = AbortGuard {
        backend: Arc::clone(backend),
        requests: Vec::with_capacity(job.prompts.len()),
    };
    let mut streams = Vec::with_capacity(job.prompts.len());
    let n = job.n();
    for (p, prompt) in job.prompts.iter().enumerate() {
        let request = GenerateRequest {
            prompt_token_ids: prompt.clone(),
            sampling: job.plan.sampling.clone(),
            n: job.plan.n,
            priority: job.plan.priority,
            arrival: job.arrival,
        };
        let (id, events) = backend.submit(request)?;
        guard.requests.push((id, job.plan.n.get()));
        streams.push(
            events
                .map(move |e| (p * n + event_index(&e) as usize, e))
                .boxed(),
        );
    }
    Ok((stream::select_all(streams).boxed(), guard))
}

fn event_index(e: &GenerateEvent) -> u32 {
    match e {
        GenerateEvent::Delta { index, .. } | GenerateEvent::Finished { index, .. } => *index,
    }
}

/// How one choice ended.
#[derive(Debug, Clone)]
pub(crate) struct Finish {
    pub(crate) reason: FinishReason,
    pub(crate) usage: Usage,
    pub(crate) timings: Timings,
}

/// Everything received for one choice.
#[derive(Debug, Default)]
pub(crate) struct ChoiceState {
    /// Output text (without the echo).
    pub(crate) text: String,
    token_ids: Vec<TokenId>,
    chat_logprobs: Vec<ChatTokenLogprob>,
    legacy_logprobs: LegacyLogprobs,
    /// Tool calls, assembled from their pieces.
    pub(crate) tool_calls: Vec<ToolCallOut>,
    pub(crate) finish: Option<Finish>,
}

impl ChoiceState {
    /// Adds the pieces of tool calls to the calls they belong to.
    fn add_tool_calls(&mut self, deltas: &[ToolCallDelta]) {
        for delta in deltas {
            let index = delta.index as usize;
            if index >= self.tool_calls.len() {
                self.tool_calls.resize(
                    index + 1,
                    ToolCallOut {
                        id: String::new(),
                        kind: "function",
                        function: FunctionCallOut {
                            name: String::new(),
                            arguments: String::new(),
                        },
                    },
                );
            }
            let Some(call) = self.tool_calls.get_mut(index) else {
                continue;
            };
            if let Some(id) = &delta.id {
                call.id.clone_from(id);
            }
            if let Some(name) = &delta.name {
                call.function.name.clone_from(name);
            }
            call.function.arguments.push_str(&delta.arguments);
        }
    }

    /// The response message: content null when the answer is only tool calls.
    fn message(&self) -> AssistantMessage {
        let calls = !self.tool_calls.is_empty();
        AssistantMessage {
            role: "assistant",
            content: (!calls || !self.text.is_empty()).then(|| self.text.clone()),
            tool_calls: calls.then(|| self.tool_calls.clone()),
        }
    }
}

/// Tool-call pieces as a streamed delta carries them.
fn tool_call_chunks(deltas: Vec<ToolCallDelta>) -> Option<Vec<ToolCallChunk>> {
    (!deltas.is_empty()).then(|| {
        deltas
            .into_iter()
            .map(|d| ToolCallChunk {
                index: d.index,
                kind: d.id.is_some().then_some("function"),
                id: d.id,
                function: FunctionChunk {
                    name: d.name,
                    arguments: d.arguments,
                },
            })
            .collect()
    })
}

fn finish_reason_str(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop(_) => "stop",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
        FinishReason::Error(_) => "error",
    }
}

/// The text of a token for logprobs; a lone byte of a multi-byte character shows as U+FFFD.
fn token_text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Fetches the bytes of every token named in `logprobs` (off the core threads).
async fn token_bytes(
    backend: &Arc<dyn Backend>,
    logprobs: &[TokenLogprob],
) -> Result<HashMap<TokenId, Vec<u8>>, ApiError> {
    let mut ids: Vec<TokenId> = logprobs
        .iter()
        .flat_map(|lp| std::iter::once(lp.token_id).chain(lp.top.iter().map(|&(id, _)| id)))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let backend = Arc::clone(backend);
    let bytes =
        tokio::task::spawn_blocking(move || backend.token_bytes(&ids).map(|b| (ids, b))).await??;
    Ok(bytes.0.into_iter().zip(bytes.1).collect())
}

fn chat_entries(
    logprobs: &[TokenLogprob],
    bytes: &HashMap<TokenId, Vec<u8>>,
) -> Vec<ChatTokenLogprob> {
    let get = |id: TokenId| bytes.get(&id).cloned().unwrap_or_default();
    logprobs
        .iter()
        .map(|lp| {
            let b = get(lp.token_id);
            ChatTokenLogprob {
                token: token_text(&b),
                logprob: lp.logprob,
                bytes: b,
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        let b = get(id);
                        TopLogprob {
                            token: token_text(&b),
                            logprob,
                            bytes: b,
                        }
                    })
                    .collect(),
            }
        })
        .collect()
}

/// Legacy logprobs of some tokens whose text starts at character `offset` of the output.
fn legacy_entries(
    logprobs: &[TokenLogprob],
    bytes: &HashMap<TokenId, Vec<u8>>,
    mut offset: u32,
) -> LegacyLogprobs {
    let text = |id: TokenId| token_text(bytes.get(&id).map_or(&[][..], Vec::as_slice));
    let mut out = LegacyLogprobs::default();
    for lp in logprobs {
        let token = text(lp.token_id);
        let mut top = serde_json::Map::new();
        for &(id, logprob) in &lp.top {
            top.insert(text(id), serde_json::Value::from(logprob));
        }
        // OpenAI's legacy format always lists the sampled token among the alternatives.
        top.entry(token.clone())
            .or_insert_with(|| serde_json::Value::from(lp.logprob));
        out.text_offset.push(offset);
        offset = offset.saturating_add(token.chars().count() as u32);
        out.tokens.push(token);
        out.token_logprobs.push(lp.logprob);
        out.top_logprobs.push(top);
    }
    out
}

fn append_legacy(into: &mut LegacyLogprobs, from: LegacyLogprobs) {
    into.tokens.extend(from.tokens);
    into.token_logprobs.extend(from.token_logprobs);
    into.top_logprobs.extend(from.top_logprobs);
    into.text_offset.extend(from.text_offset);
}

/// Sums usage over prompts and choices, and combines their timings: earliest queue time and
/// first token, latest finish, mean prefill rate, and the sum of the choices' decode rates
/// (choices decode side by side in the same steps, so their rates add up). With one choice
/// these are exactly the engine's numbers.
pub(crate) fn totals(job: &Job, choices: &[ChoiceState]) -> (UsageOut, TimingsOut) {
    let mut usage = UsageOut::default();
    let finishes: Vec<&Finish> = choices.iter().filter_map(|c| c.finish.as_ref()).collect();
    for (p, prompt) in job.prompts.iter().enumerate() {
        usage.prompt_tokens += prompt.len() as u32;
        if let Some(f) = choices.get(p * job.n()).and_then(|c| c.finish.as_ref()) {
            usage.prompt_tokens_details.cached_tokens += f.usage.cached_prompt_tokens;
        }
    }
    usage.completion_tokens = finishes.iter().map(|f| f.usage.completion_tokens).sum();
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    let mut t = TimingsOut::default();
    if let Some(first) = finishes.first() {
        t.queue_ms = first.timings.queue_ms;
        t.ttft_ms = first.timings.ttft_ms;
    }
    for f in &finishes {
        t.queue_ms = t.queue_ms.min(f.timings.queue_ms);
        t.ttft_ms = t.ttft_ms.min(f.timings.ttft_ms);
        t.total_ms = t.total_ms.max(f.timings.total_ms);
        t.prompt_tokens_per_s += f.timings.prompt_tokens_per_s / finishes.len() as f64;
        t.generation_tokens_per_s += f.timings.generation_tokens_per_s;
    }
    (usage, t)
}

/// Applies one event to the choices' state. A delta comes back with the tokens' logprob
/// entries in both shapes (only the one matching the flavor is filled) for streaming; a
/// finish comes back as `None`.
async fn apply(
    backend: &Arc<dyn Backend>,
    job: &Job,
    choices: &mut [ChoiceState],
    choice: usize,
    event: GenerateEvent,
) -> Result<Option<Delta>, ApiError> {
    let Some(state) = choices.get_mut(choice) else {
        return Err(ApiError::Internal(format!(
            "event for choice {choice}, which does not exist"
        )));
    };
    match event {
        GenerateEvent::Delta {
            token_ids,
            text,
            logprobs,
            tool_calls,
            ..
        } => {
            let mut chat = None;
            let mut legacy = None;
            if job.logprobs() && !logprobs.is_empty() {
                let bytes = token_bytes(backend, &logprobs).await?;
                match job.flavor {
                    Flavor::Chat => {
                        let entries = chat_entries(&logprobs, &bytes);
                        state.chat_logprobs.extend(entries.iter().cloned());
                        chat = Some(ChatLogprobs { content: entries });
                    }
                    Flavor::Completion => {
                        let offset = (job.echo_of(choice).chars().count()
                            + state.text.chars().count())
                            as u32;
                        let entries = legacy_entries(&logprobs, &bytes, offset);
                        append_legacy(&mut state.legacy_logprobs, entries.clone());
                        legacy = Some(entries);
                    }
                }
            }
            state.text.push_str(&text);
            state.token_ids.extend_from_slice(&token_ids);
            state.add_tool_calls(&tool_calls);
            Ok(Some(Delta {
                text,
                token_ids,
                chat,
                legacy,
                tool_calls,
            }))
        }
        GenerateEvent::Finished {
            reason,
            usage,
            timings,
            ..
        } => {
            if state.finish.is_some() {
                return Err(ApiError::Internal(format!(
                    "choice {choice} finished twice"
                )));
            }
            state.finish = Some(Finish {
                reason,
                usage,
                timings,
            });
            Ok(None)
        }
    }
}

/// New output of one choice, as one engine delta brought it.
pub(crate) struct Delta {
    /// Text released by this delta.
    pub(crate) text: String,
    token_ids: Vec<TokenId>,
    chat: Option<ChatLogprobs>,
    legacy: Option<LegacyLogprobs>,
    /// Pieces of tool calls (the first piece of a call has its id and name).
    pub(crate) tool_calls: Vec<ToolCallDelta>,
}

#[cfg(test)]
impl Delta {
    /// A delta with this text and these tool-call pieces, and nothing else.
    pub(crate) fn for_test(text: &str, tool_calls: Vec<ToolCallDelta>) -> Self {
        Self {
            text: text.to_owned(),
            token_ids: Vec::new(),
            chat: None,
            legacy: None,
            tool_calls,
        }
    }
}

/// What one engine event did to a [`Run`].
pub(crate) enum Step {
    /// New output for the choice with this index.
    Delta(usize, Delta),
    /// The choice with this index finished (its state now has `finish`).
    Finished(usize),
}

/// A submitted job and the state of its choices: the one event loop that every way of
/// answering drives (a JSON body, chat and completion SSE chunks, the Responses API's events).
/// Owning the guard ties the engine requests to whatever owns the run.
pub(crate) struct Run {
    backend: Arc<dyn Backend>,
    pub(crate) job: Job,
    events: Events,
    guard: AbortGuard,
    pub(crate) choices: Vec<ChoiceState>,
}

impl Run {
    /// Submits the job.
    pub(crate) fn start(backend: Arc<dyn Backend>, job: Job) -> Result<Self, ApiError> {
        let (events, guard) = submit(&backend, &job)?;
        let choices = (0..job.choices()).map(|_| ChoiceState::default()).collect();
        Ok(Self {
            backend,
            job,
            events,
            guard,
            choices,
        })
    }

    /// Applies the next engine event; `None` once the engine has closed every stream.
    pub(crate) async fn next(&mut self) -> Option<Result<Step, ApiError>> {
        let (i, event) = self.events.next().await?;
        let applied = apply(&self.backend, &self.job, &mut self.choices, i, event).await;
        Some(match applied {
            Ok(Some(delta)) => Ok(Step::Delta(i, delta)),
            Ok(None) => {
                self.guard.choice_finished(self.job.prompt_of(i));
                Ok(Step::Finished(i))
            }
            Err(e) => Err(e),
        })
    }

    /// Whether every choice has finished.
    pub(crate) fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// After the last event: an error when a choice never finished or the engine failed one.
    pub(crate) fn check_finished(&self) -> Result<(), ApiError> {
        if let Some(i) = self.choices.iter().position(|c| c.finish.is_none()) {
            return Err(ApiError::Internal(format!(
                "the engine dropped choice {i} without finishing it"
            )));
        }
        match self
            .choices
            .iter()
            .filter_map(|c| c.finish.as_ref())
            .find_map(|f| match &f.reason {
                FinishReason::Error(message) => Some(message),
                _ => None,
            }) {
            Some(message) => Err(ApiError::Engine(message.clone())),
            None => Ok(()),
        }
    }

    /// Runs to the end and checks that every choice finished without an engine error.
    pub(crate) async fn finish(mut self) -> Result<(Job, Vec<ChoiceState>), ApiError> {
        while let Some(step) = self.next().await {
            step?;
        }
        self.check_finished()?;
        Ok((self.job, self.choices))
    }
}

/// Runs a non-streaming request to the end and answers one JSON body.
pub async fn respond_once(backend: Arc<dyn Backend>, job: Job) -> Result<Response, ApiError> {
    let (job, choices) = Run::start(backend, job)?.finish().await?;
    let (usage, timings) = totals(&job, &choices);
    let reason = |c: &ChoiceState| c.finish.as_ref().map(|f| finish_reason_str(&f.reason));
    let ids = |c: &ChoiceState| job.plan.return_token_ids.then(|| c.token_ids.clone());
    let response = match job.flavor {
        Flavor::Chat => axum::Json(ChatCompletion {
            id: job.id.clone(),
            object: "chat.completion",
            created: job.created,
            model: job.model.clone(),
            choices: choices
                .iter()
                .enumerate()
                .map(|(i, c)| ChatChoice {
                    index: i as u32,
                    message: c.message(),
                    logprobs: job.logprobs().then(|| ChatLogprobs {
                        content: c.chat_logprobs.clone(),
                    }),
                    finish_reason: reason(c),
                    token_ids: ids(c),
                })
                .collect(),
            usage,
            timings,
            prompt_token_ids: job
                .plan
                .return_token_ids
                .then(|| job.prompts.first().cloned().unwrap_or_default()),
        })
        .into_response(),
        Flavor::Completion => axum::Json(Envelope {
            id: job.id.clone(),
            object: "text_completion",
            created: job.created,
            model: job.model.clone(),
            choices: choices
                .iter()
                .enumerate()
                .map(|(i, c)| CompletionChoice {
                    index: i as u32,
                    text: format!("{}{}", job.echo_of(i), c.text),
                    logprobs: job.logprobs().then(|| c.legacy_logprobs.clone()),
                    finish_reason: reason(c),
                    prompt_token_ids: job.plan.return_token_ids.then(|| {
                        job.prompts
                            .get(job.prompt_of(i))
                            .cloned()
                            .unwrap_or_default()
                    }),
                    token_ids: ids(c),
                })
                .collect(),
            usage: ChunkUsage::Final(usage),
            timings: Some(timings),
            prompt_token_ids: None,
        })
        .into_response(),
    };
    Ok(response)
}

/// The state of one SSE response; owning the run ties the engine requests to the body.
struct Streamer {
    run: Run,
    /// Encoded `data:` payloads waiting to be sent.
    pending: VecDeque<String>,
    done: bool,
}

impl Streamer {
    fn envelope<C>(&self, choices: Vec<C>) -> Envelope<C> {
        Envelope {
            id: self.run.job.id.clone(),
            object: match self.run.job.flavor {
                Flavor::Chat => "chat.completion.chunk",
                Flavor::Completion => "text_completion",
            },
            created: self.run.job.created,
            model: self.run.job.model.clone(),
            choices,
            usage: if self.run.job.plan.include_usage {
                ChunkUsage::Null
            } else {
                ChunkUsage::Absent
            },
            timings: None,
            prompt_token_ids: None,
        }
    }

    fn push<T: serde::Serialize>(&mut self, value: &T) {
        match serde_json::to_string(value) {
            Ok(json) => self.pending.push_back(json),
            Err(e) => tracing::error!(error = %e, "could not encode a chunk"),
        }
    }

    /// Chat: one chunk per choice with the role (vLLM and OpenAI send it before any text).
    /// Completions: a first chunk per choice only when it has something to say (echo, ids).
    fn opening(&mut self) {
        let ids = self.run.job.plan.return_token_ids;
        for i in 0..self.run.job.choices() {
            let prompt_ids = || {
                self.run
                    .job
                    .prompts
                    .get(self.run.job.prompt_of(i))
                    .cloned()
                    .unwrap_or_default()
            };
            match self.run.job.flavor {
                Flavor::Chat => {
                    let mut env = self.envelope(vec![ChatChunkChoice {
                        index: i as u32,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                            tool_calls: None,
                        },
                        logprobs: None,
                        finish_reason: None,
                        token_ids: None,
                    }]);
                    if ids && i == 0 {
                        env.prompt_token_ids = Some(prompt_ids());
                    }
                    self.push(&env);
                }
                Flavor::Completion => {
                    let echo = self.run.job.echo_of(i).to_owned();
                    if echo.is_empty() && !ids {
                        continue;
                    }
                    let env = self.envelope(vec![CompletionChoice {
                        index: i as u32,
                        text: echo,
                        logprobs: None,
                        finish_reason: None,
                        prompt_token_ids: ids.then(prompt_ids),
                        token_ids: None,
                    }]);
                    self.push(&env);
                }
            }
        }
    }

    fn delta_chunk(&mut self, i: usize, delta: Delta) {
        let Delta {
            text,
            token_ids,
            chat,
            legacy,
            tool_calls,
        } = delta;
        if text.is_empty()
            && tool_calls.is_empty()
            && chat.is_none()
            && legacy.is_none()
            && !self.run.job.plan.return_token_ids
        {
            return; // nothing a client could see: a stop string may still match, or a character is split
        }
        let token_ids = self.run.job.plan.return_token_ids.then_some(token_ids);
        match self.run.job.flavor {
            Flavor::Chat => {
                let env = self.envelope(vec![ChatChunkChoice {
                    index: i as u32,
                    delta: ChatDelta {
                        role: None,
                        // A piece of a tool call only: no content field (as OpenAI).
                        content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                        tool_calls: tool_call_chunks(tool_calls),
                    },
                    logprobs: chat,
                    finish_reason: None,
                    token_ids,
                }]);
                self.push(&env);
            }
            Flavor::Completion => {
                let env = self.envelope(vec![CompletionChoice {
                    index: i as u32,
                    text,
                    logprobs: legacy,
                    finish_reason: None,
                    prompt_token_ids: None,
                    token_ids,
                }]);
                self.push(&env);
            }
        }
    }

    fn finish_chunk(&mut self, i: usize) {
        let Some(finish) = self.run.choices.get(i).and_then(|c| c.finish.clone()) else {
            return;
        };
        if let FinishReason::Error(message) = &finish.reason {
            self.push(&ApiError::Engine(message.clone()).body());
        }
        let reason = Some(finish_reason_str(&finish.reason));
        let all_done = self.run.all_finished();
        let timings = all_done.then(|| totals(&self.run.job, &self.run.choices).1);
        match self.run.job.flavor {
            Flavor::Chat => {
                let mut env = self.envelope(vec![ChatChunkChoice {
                    index: i as u32,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: reason,
                    token_ids: None,
                }]);
                env.timings = timings;
                self.push(&env);
            }
            Flavor::Completion => {
                let mut env = self.envelope(vec![CompletionChoice {
                    index: i as u32,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: reason,
                    prompt_token_ids: None,
                    token_ids: None,
                }]);
                env.timings = timings;
                self.push(&env);
            }
        }
    }

    fn closing(&mut self) {
        if self.run.job.plan.include_usage {
            let (usage, timings) = totals(&self.run.job, &self.run.choices);
            match self.run.job.flavor {
                Flavor::Chat => {
                    let mut env = self.envelope(Vec::<ChatChunkChoice>::new());
                    env.usage = ChunkUsage::Final(usage);
                    env.timings = Some(timings);
                    self.push(&env);
                }
                Flavor::Completion => {
                    let mut env = self.envelope(Vec::<CompletionChoice>::new());
                    env.usage = ChunkUsage::Final(usage);
                    env.timings = Some(timings);
                    self.push(&env);
                }
            }
        }
        self.pending.push_back("[DONE]".to_owned());
        self.done = true;
    }

    /// The next `data:` payload, or `None` after `[DONE]`.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(data) = self.pending.pop_front() {
                return Some(data);
            }
            if self.done {
                return None;
            }
            match self.run.next().await {
                Some(Ok(Step::Delta(i, delta))) => self.delta_chunk(i, delta),
                Some(Ok(Step::Finished(i))) => {
                    self.finish_chunk(i);
                    if self.run.all_finished() {
                        self.closing();
                    }
                }
                Some(Err(e)) => {
                    // Headers are gone: the error travels as a data line, then the stream ends.
                    tracing::error!(error = %e, "streaming request failed");
                    self.push(&e.body());
                    self.closing();
                }
                None => {
                    let e = ApiError::Internal(
                        "the engine ended a stream before finishing it".to_owned(),
                    );
                    tracing::error!(error = %e, "streaming request failed");
                    self.push(&e.body());
                    self.closing();
                }
            }
        }
    }
}

/// Submits a streaming request and answers with its SSE body.
pub fn respond_stream(backend: Arc<dyn Backend>, job: Job) -> Result<Response, ApiError> {
    let mut streamer = Streamer {
        run: Run::start(backend, job)?,
        pending: VecDeque::new(),
        done: false,
    };
    streamer.opening();
    let body = stream::unfold(streamer, |mut s| async move {
        let data = s.next().await?;
        Some((Ok::<_, Infallible>(Event::default().data(data)), s))
    });
    Ok(Sse::new(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(id: TokenId, logprob: f32, top: &[(TokenId, f32)]) -> TokenLogprob {
        TokenLogprob {
            token_id: id,
            logprob,
            top: top.to_vec(),
        }
    }

    #[test]
    fn legacy_offsets_advance_by_token_text() {
        let bytes: HashMap<TokenId, Vec<u8>> = [
            (1, b"ab".to_vec()),
            (2, "é".as_bytes().to_vec()),
            (3, b"x".to_vec()),
        ]
        .into_iter()
        .collect();
        let out = legacy_entries(
            &[lp(1, -0.5, &[(1, -0.5), (3, -1.0)]), lp(2, -0.1, &[])],
            &bytes,
            4,
        );
        assert_eq!(out.tokens, vec!["ab".to_owned(), "é".to_owned()]);
        assert_eq!(out.text_offset, vec![4, 6]);
        assert_eq!(out.top_logprobs[0].len(), 2);
        // The sampled token is listed even when no alternatives were asked for.
        assert_eq!(
            out.top_logprobs[1].get("é"),
            Some(&serde_json::Value::from(-0.1f32))
        );
    }

    #[test]
    fn chat_entries_carry_bytes_of_split_characters() {
        let bytes: HashMap<TokenId, Vec<u8>> = [(7, vec![0xC3])].into_iter().collect();
        let out = chat_entries(&[lp(7, -2.0, &[(7, -2.0)])], &bytes);
        assert_eq!(out[0].bytes, vec![0xC3]);
        assert_eq!(out[0].token, "\u{FFFD}");
        assert_eq!(out[0].top_logprobs.len(), 1);
    }
}
