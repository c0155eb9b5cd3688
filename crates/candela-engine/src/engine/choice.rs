//! Per-request and per-choice state on the engine thread, and what happens to one choice in a
//! step: sample, detokenize, check stops, split tool calls from content, send its delta,
//! finish.

use super::*;

/// Per-choice state on the engine thread.
pub(super) struct Choice {
    pub(super) index: u32,
    pub(super) seq_id: SeqId,
    pub(super) sampler: ChoiceSampler,
    /// The structured-output constraint at this choice's output so far.
    pub(super) constraint: Option<ChoiceConstraint>,
    /// With tools: the lazy constraint's trigger and the tool-call parser.
    pub(super) tools: Option<ChoiceTools>,
    pub(super) decoder: IncrementalDecoder,
    pub(super) stop: StopMatcher,
    /// Most tokens this choice may generate (clamped to the context at admission).
    pub(super) tokens_max: u32,
    pub(super) tokens_generated: u32,
    pub(super) cached_prompt_tokens: u32,
    pub(super) first_scheduled: Option<Instant>,
    pub(super) first_token: Option<Instant>,
    pub(super) last_token: Option<Instant>,
    pub(super) finished: bool,
    /// Recent acceptance of this choice's speculative drafts, and its back-off.
    pub(super) acceptance: Acceptance,
}

impl Choice {
    /// Whether this choice may verify speculative drafts. Not with a structured-output or
    /// tool-call constraint (each draft would need the grammar advanced and rolled back), nor
    /// with logprobs (a verified token would need its raw logprob row): those decode one token
    /// a step as before.
    pub(super) fn may_speculate(&self) -> bool {
        !self.finished
            && self.constraint.is_none()
            && self.tools.is_none()
            && self.sampler.params().logprobs.is_none()
    }
}

/// Per-request state on the engine thread.
pub(super) struct RequestState {
    pub(super) events: tokio::sync::mpsc::UnboundedSender<GenerateEvent>,
    pub(super) arrival: Instant,
    pub(super) prompt_tokens: u32,
    pub(super) stop_token_ids: Vec<TokenId>,
    pub(super) ignore_eos: bool,
    /// Still counted in `SharedState::waiting_requests` (not yet scheduled).
    pub(super) counted_waiting: bool,
    pub(super) choices: Vec<Choice>,
    pub(super) choices_unfinished: u32,
}

impl RequestState {
    /// Leaves the waiting count once: when first scheduled, or when it ends before that.
    pub(super) fn uncount_waiting(&mut self, shared: &SharedState) {
        if self.counted_waiting {
            self.counted_waiting = false;
            shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// How one choice's token is chosen this step.
pub(super) enum Pick<'a> {
    /// Sample from this raw logits row (overwritten with the processed logits).
    Logits(&'a mut [f32]),
    /// The device already took the argmax of a plain greedy row.
    Token(TokenId),
}

/// The outcome of sampling one choice in one step.
pub(super) struct ChoiceStep {
    pub(super) token: TokenId,
    pub(super) finished: Option<FinishReason>,
}

/// Samples, detokenizes and checks the stop conditions of one choice, and sends its `Delta`.
#[allow(clippy::too_many_arguments)]
pub(super) fn step_choice(
    state: &mut RequestState,
    index: usize,
    pick: Pick<'_>,
    mask: Option<Result<TokenMask, String>>,
    scratch: &mut SamplerScratch,
    eos_token_ids: &[TokenId],
    now: Instant,
    shared: &SharedState,
) -> ChoiceStep {
    let choice = &mut state.choices[index];
    let mut constraint_error = None;
    let (token, logprob) = match pick {
        Pick::Logits(logits) => match choice.constraint.as_mut() {
            None => choice.sampler.sample(logits, scratch),
            Some(constraint) => match mask.unwrap_or_else(|| constraint.compute_mask()) {
                Ok(mask) => choice
                    .sampler
                    .sample_masked(logits, scratch, |row| mask.apply(row)),
                Err(error) => {
                    constraint_error = Some(error);
                    choice.sampler.sample(logits, scratch)
                }
            },
        },
        Pick::Token(token) => (token, None),
    };
    choice.sampler.record_output(token);
    choice.tokens_generated += 1;
    let metrics = &shared.metrics;
    metrics.generation_tokens_total.inc();
    match choice.last_token {
        None => {
            choice.first_token = Some(now);
            metrics
                .time_to_first_token_seconds
                .observe(now.saturating_duration_since(state.arrival).as_secs_f64());
        }
        Some(last) => metrics
            .inter_token_latency_seconds
            .observe(now.saturating_duration_since(last).as_secs_f64()),
    }
    choice.last_token = Some(now);

    // Token stops first: their text is never emitted (as vLLM without
    // `include_stop_str_in_output`).
    let mut finished = if !state.ignore_eos && eos_token_ids.contains(&token) {
        Some(FinishReason::Stop(StopCause::Eos(token)))
    } else if state.stop_token_ids.contains(&token) {
        Some(FinishReason::Stop(StopCause::StopToken(token)))
    } else {
        None
    };
    // A structured output ends where its constraint allows nothing more (an EOS token the
    // mask allowed included, under `ignore_eos` too); the token's text is still emitted.
    let mut constraint_complete = false;
    if let Some(error) = constraint_error {
        finished = Some(FinishReason::Error(format!("structured output: {error}")));
    } else if let (None, Some(constraint)) = (&finished, choice.constraint.as_mut()) {
        match constraint.advance(token, eos_token_ids.contains(&token)) {
            Ok(Advance::Continue) => {}
            Ok(Advance::Complete) => constraint_complete = true,
            Err(error) => {
                finished = Some(FinishReason::Error(format!("structured output: {error}")));
            }
        }
    }
    let mut text = String::new();
    if finished.is_none() {
        match choice.decoder.push(token) {
            Ok(piece) => {
                match start_lazy_tool_constraint(choice, &piece) {
                    Ok(Advance::Continue) => {}
                    Ok(Advance::Complete) => constraint_complete = true,
                    Err(error) => {
                        finished = Some(FinishReason::Error(format!("tool call: {error}")));
                    }
                }
                match choice.stop.push(&piece) {
                    StopOutcome::Continue(released) => text = released,
                    StopOutcome::Stopped {
                        text: released,
                        stop,
                    } => {
                        text = released;
                        finished = Some(FinishReason::Stop(StopCause::StopString(stop)));
                    }
                }
            }
            Err(error) => finished = Some(FinishReason::Error(format!("detokenizing: {error}"))),
        }
    }
    if finished.is_none() && constraint_complete {
        finished = Some(FinishReason::Stop(StopCause::Constraint));
    }
    if finished.is_none() && choice.tokens_generated >= choice.tokens_max {
        finished = Some(FinishReason::Length);
    }
    if matches!(
        finished,
        Some(
            FinishReason::Length
                | FinishReason::Stop(
                    StopCause::Eos(_) | StopCause::StopToken(_) | StopCause::Constraint
                )
        )
    ) {
        // Release what the decoder and the stop matcher held back; a stop string may still
        // complete inside the decoder's tail.
        let tail = choice.decoder.flush().unwrap_or_default();
        match choice.stop.push(&tail) {
            StopOutcome::Continue(released) => {
                text.push_str(&released);
                text.push_str(&choice.stop.flush());
            }
            StopOutcome::Stopped {
                text: released,
                stop,
            } => {
                text.push_str(&released);
                finished = Some(FinishReason::Stop(StopCause::StopString(stop)));
            }
        }
    }
    let mut tool_calls = Vec::new();
    if let Some(tools) = choice.tools.as_mut() {
        let mut released = tools.parser.push(&text);
        if finished.is_some() {
            released.extend(tools.parser.finish());
        }
        text = released.content;
        tool_calls = released.calls;
        // OpenAI's `tool_calls` finish: the answer ended on its own after calling a tool.
        if matches!(finished, Some(FinishReason::Stop(_))) && tools.parser.calls() > 0 {
            finished = Some(FinishReason::ToolCalls);
        }
    }
    let logprobs: Vec<TokenLogprob> = logprob.into_iter().collect();
    // A send fails only when the receiver is gone; the request is dropped next step.
    let _ = state.events.send(GenerateEvent::Delta {
        index: choice.index,
        token_ids: vec![token],
        text,
        logprobs,
        tool_calls,
    });
    ChoiceStep { token, finished }
}

/// Switches a tool choice's lazy constraint on once `piece` completes the format's marker
/// (`Complete` when the text after the marker already completes the call); `Err` when that
/// text does not fit the call's grammar.
fn start_lazy_tool_constraint(choice: &mut Choice, piece: &str) -> Result<Advance, String> {
    let Some(started) = choice.tools.as_mut().and_then(|t| t.observe(piece)) else {
        return Ok(Advance::Continue);
    };
    let (constraint, advance) = started?;
    choice.constraint = Some(constraint);
    Ok(advance)
}

/// Sends `Finished` for one choice and counts it.
pub(super) fn finish_choice(
    state: &mut RequestState,
    index: usize,
    reason: &FinishReason,
    shared: &SharedState,
) {
    let now = Instant::now();
    let arrival = state.arrival;
    let prompt_tokens = state.prompt_tokens;
    let choice = &mut state.choices[index];
    if choice.finished {
        return;
    }
    choice.finished = true;
    state.choices_unfinished -= 1;
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    let first_token = choice.first_token;
    let timings = Timings {
        queue_ms: choice.first_scheduled.map_or(0.0, |t| ms(arrival, t)),
        ttft_ms: first_token.map_or(0.0, |t| ms(arrival, t)),
        prompt_tokens_per_s: match (choice.first_scheduled, first_token) {
            (Some(scheduled), Some(first)) if first > scheduled => {
                f64::from(prompt_tokens) / first.duration_since(scheduled).as_secs_f64()
            }
            _ => 0.0,
        },
        generation_tokens_per_s: match (first_token, choice.last_token) {
            (Some(first), Some(last)) if last > first && choice.tokens_generated > 1 => {
                f64::from(choice.tokens_generated - 1) / last.duration_since(first).as_secs_f64()
            }
            _ => 0.0,
        },
        total_ms: ms(arrival, now),
    };
    let usage = Usage {
        prompt_tokens,
        completion_tokens: choice.tokens_generated,
        cached_prompt_tokens: choice.cached_prompt_tokens,
    };
    shared.metrics.count_finished(reason);
    shared
        .metrics
        .e2e_request_latency_seconds
        .observe(timings.total_ms / 1e3);
    let _ = state.events.send(GenerateEvent::Finished {
        index: choice.index,
        reason: reason.clone(),
        usage,
        timings,
    });
}

/// Finishes every unfinished choice of a request with `reason`.
pub(super) fn finish_all(state: &mut RequestState, reason: &FinishReason, shared: &SharedState) {
    for index in 0..state.choices.len() {
        finish_choice(state, index, reason, shared);
    }
}
