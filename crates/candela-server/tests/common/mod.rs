//! A small deterministic backend for the route tests, so that every HTTP path (framing, error
//! bodies, abort on disconnect) is checked without loading a model. The end-to-end tests in
//! `tests/e2e/` drive the real engine.
//!
//! Its "model": one token per byte (id = byte + 3), ids 0..3 are `<pad>`, `<bos>`, `<eos>`.
//! Choice `i` of a request with seed `s` emits bytes of `ALPHABET` starting at `(s + i) % 10`,
//! one per step, until `max_tokens` (default 8) or a stop string. A request whose tool choice
//! forces a call (`required`, or a named function) instead calls the named (or first) tool
//! with the arguments `{"x":1}`, in three pieces, and finishes with `ToolCalls`.

#![allow(dead_code)] // each test binary uses a different part of it

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candela_engine::api::{
    EmbedEvent, EmbedRequest, EngineHealth, FinishReason, GenerateEvent, GenerateRequest,
    RequestId, StopCause, SubmitError, Timings, TokenId, TokenLogprob, ToolCallDelta, ToolCalling,
    ToolChoice, Usage,
};
use candela_server::{
    AppState, Backend, BackendError, ChatMessage, EmbedStream, EventStream, ServerConfig,
};
use futures::StreamExt;

pub const ALPHABET: &[u8] = b"abcdefghij";
pub const VOCAB_SIZE: u32 = 259;
pub const MODEL_LEN_MAX: u32 = 64;
pub const MODEL: &str = "fake-model";
pub const TIMINGS: Timings = Timings {
    queue_ms: 1.5,
    ttft_ms: 4.0,
    prompt_tokens_per_s: 1000.0,
    generation_tokens_per_s: 50.0,
    total_ms: 20.0,
};

/// What a test can set and observe.
pub struct Fake {
    pub ready: AtomicBool,
    /// Requests with more running than this are refused with `QueueFull`.
    pub running_max: usize,
    pub running: Arc<AtomicUsize>,
    pub aborted: Mutex<Vec<RequestId>>,
    pub submitted: Mutex<Vec<GenerateRequest>>,
    pub embedded: Mutex<Vec<EmbedRequest>>,
    next_id: AtomicU64,
    /// Delay between tokens: lets a test hold a stream open.
    pub token_delay: Duration,
    /// What `health` reports once ready (`Starting` before).
    pub health: Mutex<EngineHealth>,
    /// Every chat the template rendered, with its tools.
    pub templated: Mutex<Vec<(Vec<ChatMessage>, Option<ToolCalling>)>>,
}

impl Fake {
    pub fn new() -> Self {
        Self {
            ready: AtomicBool::new(true),
            running_max: 64,
            running: Arc::new(AtomicUsize::new(0)),
            aborted: Mutex::new(Vec::new()),
            submitted: Mutex::new(Vec::new()),
            embedded: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            token_delay: Duration::ZERO,
            health: Mutex::new(EngineHealth::Healthy),
            templated: Mutex::new(Vec::new()),
        }
    }

    pub fn templated(&self) -> Vec<(Vec<ChatMessage>, Option<ToolCalling>)> {
        self.templated.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn set_health(&self, health: EngineHealth) {
        if let Ok(mut slot) = self.health.lock() {
            *slot = health;
        }
    }

    pub fn aborted(&self) -> Vec<RequestId> {
        self.aborted.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn submitted(&self) -> Vec<GenerateRequest> {
        self.submitted.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn embedded(&self) -> Vec<EmbedRequest> {
        self.embedded.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// The fake's embedding of a token list: `[len, sum, first, last]`, L2-normalised. An input
/// holding "FAIL" fails.
pub fn fake_embedding(ids: &[TokenId]) -> Vec<f32> {
    let raw = [
        ids.len() as f32,
        ids.iter().map(|&t| t as f32).sum(),
        ids.first().map_or(0.0, |&t| t as f32),
        ids.last().map_or(0.0, |&t| t as f32),
    ];
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt();
    raw.iter().map(|x| x / norm).collect()
}

fn holds_fail(ids: &[TokenId]) -> bool {
    ids.windows(4).any(|w| {
        w == [
            token_of(b'F'),
            token_of(b'A'),
            token_of(b'I'),
            token_of(b'L'),
        ]
    })
}

/// The text choice `index` of a request produces (before stop strings), for assertions.
pub fn expected_text(seed: u64, index: u32, max_tokens: u32) -> String {
    (0..max_tokens as u64)
        .map(|k| ALPHABET[((seed + u64::from(index) + k) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

pub fn token_of(byte: u8) -> TokenId {
    TokenId::from(byte) + 3
}

/// The pieces of the one call the fake makes when the tool choice forces a call.
pub const CALL_PIECES: [&str; 3] = ["", "{\"x\":", "1}"];

/// The tool the fake calls: the named one, or the first under `required`.
fn forced_call(tools: Option<&ToolCalling>) -> Option<String> {
    let tools = tools?;
    match &tools.choice {
        ToolChoice::Function(name) => Some(name.clone()),
        ToolChoice::Required => tools.tools.first().map(|t| t.name.clone()),
        ToolChoice::None | ToolChoice::Auto => None,
    }
}

impl Backend for Fake {
    fn submit(&self, request: GenerateRequest) -> Result<(RequestId, EventStream), SubmitError> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err(SubmitError::NotReady);
        }
        if self.running.load(Ordering::Relaxed) >= self.running_max {
            return Err(SubmitError::QueueFull {
                queue_waiting_max: self.running_max,
            });
        }
        if let Ok(mut s) = self.submitted.lock() {
            s.push(request.clone());
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        // Capacity 1: the producer runs only as fast as the client reads, so a test can hold a
        // stream open and then drop it.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::Relaxed);
        let delay = self.token_delay;
        let fail = request.prompt_token_ids.windows(4).any(|w| {
            w == [
                token_of(b'F'),
                token_of(b'A'),
                token_of(b'I'),
                token_of(b'L'),
            ]
        });
        tokio::spawn(async move {
            let s = &request.sampling;
            let max_tokens = s.max_tokens.map_or(8, |m| m.get());
            let seed = s.seed.unwrap_or(0);
            let call = forced_call(s.tools.as_ref());
            'choices: for index in 0..request.n.get() {
                let usage = |completion_tokens| Usage {
                    prompt_tokens: request.prompt_token_ids.len() as u32,
                    completion_tokens,
                    cached_prompt_tokens: 0,
                };
                if let Some(name) = &call {
                    for (k, piece) in CALL_PIECES.iter().enumerate() {
                        let delta = GenerateEvent::Delta {
                            index,
                            token_ids: vec![token_of(b'{')],
                            text: String::new(),
                            logprobs: Vec::new(),
                            tool_calls: vec![ToolCallDelta {
                                index: 0,
                                id: (k == 0).then(|| format!("call_fake{index}")),
                                name: (k == 0).then(|| name.clone()),
                                arguments: (*piece).to_owned(),
                            }],
                        };
                        if tx.send(delta).await.is_err() {
                            break 'choices;
                        }
                    }
                    let finished = GenerateEvent::Finished {
                        index,
                        reason: FinishReason::ToolCalls,
                        usage: usage(CALL_PIECES.len() as u32),
                        timings: TIMINGS,
                    };
                    if tx.send(finished).await.is_err() {
                        break;
                    }
                    continue;
                }
                if fail {
                    let finished = GenerateEvent::Finished {
                        index,
                        reason: FinishReason::Error("the fake model failed".into()),
                        usage: usage(0),
                        timings: TIMINGS,
                    };
                    if tx.send(finished).await.is_err() {
                        break;
                    }
                    continue;
                }
                let full = expected_text(seed, index, max_tokens);
                let mut text = String::new();
                let mut reason = FinishReason::Length;
                let mut emitted = 0;
                for (k, byte) in full.bytes().enumerate() {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    text.push(byte as char);
                    emitted = k as u32 + 1;
                    if let Some(stop) = s.stop.iter().find(|st| text.ends_with(st.as_str())) {
                        reason = FinishReason::Stop(StopCause::StopString(stop.clone()));
                        break;
                    }
                    let token = token_of(byte);
                    let logprobs = match s.logprobs {
                        None => Vec::new(),
                        Some(k) => vec![TokenLogprob {
                            token_id: token,
                            logprob: -0.25,
                            top: (0..k).map(|j| (token + j, -0.25 - j as f32)).collect(),
                        }],
                    };
                    // Holding back the text while a stop string could still match is the
                    // engine's job; the fake keeps it simple and emits stop-free text only.
                    let delta = GenerateEvent::Delta {
                        index,
                        token_ids: vec![token],
                        text: (byte as char).to_string(),
                        logprobs,
                        tool_calls: Vec::new(),
                    };
                    if tx.send(delta).await.is_err() {
                        break 'choices;
                    }
                }
                let finished = GenerateEvent::Finished {
                    index,
                    reason,
                    usage: usage(emitted),
                    timings: TIMINGS,
                };
                if tx.send(finished).await.is_err() {
                    break;
                }
            }
            running.fetch_sub(1, Ordering::Relaxed);
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        Ok((id, stream))
    }

    fn embed(&self, request: EmbedRequest) -> Result<(RequestId, EmbedStream), SubmitError> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err(SubmitError::NotReady);
        }
        if let Ok(mut e) = self.embedded.lock() {
            e.push(request.clone());
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        // Last input first: the handler must put them back in order.
        let events: Vec<EmbedEvent> = request
            .inputs
            .iter()
            .enumerate()
            .rev()
            .map(|(index, ids)| {
                let index = index as u32;
                if holds_fail(ids) {
                    EmbedEvent::Failed {
                        index,
                        reason: FinishReason::Error("the fake model failed".into()),
                    }
                } else {
                    EmbedEvent::Embedding {
                        index,
                        embedding: fake_embedding(ids),
                        usage: Usage {
                            prompt_tokens: ids.len() as u32,
                            completion_tokens: 0,
                            cached_prompt_tokens: 0,
                        },
                    }
                }
            })
            .collect();
        Ok((id, futures::stream::iter(events).boxed()))
    }

    fn abort(&self, id: RequestId) {
        if let Ok(mut a) = self.aborted.lock() {
            a.push(id);
        }
    }

    fn tokenize(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, BackendError> {
        let bos = add_special_tokens.then_some(1);
        Ok(bos.into_iter().chain(text.bytes().map(token_of)).collect())
    }

    fn detokenize(&self, ids: &[TokenId]) -> Result<String, BackendError> {
        let bytes: Vec<u8> = self.token_bytes(ids)?.concat();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn token_bytes(&self, ids: &[TokenId]) -> Result<Vec<Vec<u8>>, BackendError> {
        ids.iter()
            .map(|&id| match id {
                0 => Ok(b"<pad>".to_vec()),
                1 => Ok(b"<bos>".to_vec()),
                2 => Ok(b"<eos>".to_vec()),
                3..=258 => Ok(vec![(id - 3) as u8]),
                _ => Err(BackendError::Invalid(format!("unknown token {id}"))),
            })
            .collect()
    }

    fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: Option<&ToolCalling>,
        add_generation_prompt: bool,
    ) -> Result<String, BackendError> {
        if let Ok(mut t) = self.templated.lock() {
            t.push((messages.to_vec(), tools.cloned()));
        }
        let mut out = String::new();
        for m in messages {
            // A string-only template: parts joined by newlines, as the real engine does.
            let content = m.content.joined_text();
            if content.contains("RAISE") {
                return Err(BackendError::Invalid(
                    "the template raised: RAISE is not allowed".into(),
                ));
            }
            out.push_str(&format!("<{}>{}\n", m.role, content));
        }
        if add_generation_prompt {
            out.push_str("<assistant>");
        }
        Ok(out)
    }

    fn model_len_max(&self) -> u32 {
        MODEL_LEN_MAX
    }

    fn vocab_size(&self) -> u32 {
        VOCAB_SIZE
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn requests_in_flight(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    fn health(&self) -> EngineHealth {
        if !self.ready.load(Ordering::Relaxed) {
            return EngineHealth::Starting;
        }
        self.health
            .lock()
            .map(|h| h.clone())
            .unwrap_or(EngineHealth::Dead("poisoned".into()))
    }

    fn metrics_text(&self) -> String {
        format!(
            "candela:num_requests_running {}\n",
            self.running.load(Ordering::Relaxed)
        )
    }
}

pub fn config(api_key: Option<&str>) -> ServerConfig {
    ServerConfig {
        served_model_names: vec![MODEL.to_owned()],
        api_key: api_key.map(str::to_owned),
        body_limit_bytes: 4096,
        embeddings: None,
    }
}

pub fn state(fake: &Arc<Fake>, api_key: Option<&str>) -> AppState {
    AppState::new(Arc::clone(fake) as Arc<dyn Backend>, config(api_key))
}
