//! Embedding requests on the engine thread: each input is a prefill-only sequence in the same
//! batches as generation, whose final hidden states are pooled instead of sampled.
//!
//! ```text
//! add_embed          one scheduler sequence per input, max_tokens 1 (never sampled);
//!                    Mean pooling: no prefix-cache hits (`add_without_prefix_hits`)
//! plan_pools         after schedule(): which rows of each embedding chunk the forward pools
//!                    (Mean: every position not pooled yet; Last: the last prompt position, in
//!                    the last chunk), and clear `sample` on last chunks: they have no logits
//! run_model          forward_pooled -> [pools, hidden] sums, copied to the host
//! finish_embeddings  add each pool to its input; an input whose last chunk ran is divided
//!                    (Mean), L2-normalised and sent, and reported `finished`: the scheduler
//!                    frees its blocks in the same update
//! ```
//!
//! A Mean input counts positions, not chunks: `pooled_upto` is how many leading positions its
//! sum holds. After a preemption the scheduler recomputes the prompt from position 0 (no prefix
//! hits), and the rows already in the sum are not pooled again. A Last input may start from
//! cached blocks: the scheduler always leaves at least the last position to compute, and only
//! that position's hidden state is read.

use candela_models::PoolChunk;

use super::*;
use crate::api::{EmbedEvent, Pooling};
use crate::handle::AdmittedEmbed;

/// Everything the engine thread holds for embedding requests.
#[derive(Default)]
pub(super) struct Embeddings {
    requests: HashMap<RequestId, EmbedState>,
    /// Which request and input each scheduler sequence belongs to.
    owner: HashMap<SeqId, (RequestId, usize)>,
    /// This step's pools in output order, for `BatchBuilder::build_pooled`.
    pub(super) pools: Vec<PoolChunk>,
    /// Per pool: its sequence and the positions its sum covers once added (`pooled_upto`).
    pool_targets: Vec<(SeqId, u32)>,
    /// Sequences whose last prompt chunk runs this step.
    ending: Vec<SeqId>,
    /// The last forward's pooled rows, `[pools, hidden]`.
    pub(super) host: Vec<f32>,
}

impl Embeddings {
    /// Requests held (waiting or running).
    pub(super) fn len(&self) -> usize {
        self.requests.len()
    }
}

/// One embedding request.
struct EmbedState {
    events: tokio::sync::mpsc::UnboundedSender<EmbedEvent>,
    arrival: Instant,
    pooling: Pooling,
    /// Still counted in `SharedState::waiting_requests` (no input scheduled yet).
    counted_waiting: bool,
    inputs: Vec<EmbedInput>,
    inputs_unfinished: usize,
}

/// One input of an embedding request: one scheduler sequence.
struct EmbedInput {
    seq_id: SeqId,
    prompt_tokens: u32,
    /// Mean: the sum of the final hidden states of positions `0..pooled_upto`. Last: the last
    /// position's, once pooled. Empty until the first pool.
    sum: Vec<f32>,
    pooled_upto: u32,
    cached_prompt_tokens: u32,
    finished: bool,
}

impl EmbedState {
    fn uncount_waiting(&mut self, shared: &SharedState) {
        if self.counted_waiting {
            self.counted_waiting = false;
            shared.waiting_requests.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Sends `Failed` for every unfinished input.
    fn fail_all(&mut self, reason: &FinishReason) {
        for (index, input) in self.inputs.iter_mut().enumerate() {
            if !input.finished {
                input.finished = true;
                self.inputs_unfinished -= 1;
                // A send fails only when the receiver is gone: nobody to tell.
                let _ = self.events.send(EmbedEvent::Failed {
                    index: index as u32,
                    reason: reason.clone(),
                });
            }
        }
    }
}

impl EngineCore {
    pub(super) fn add_embed(&mut self, admitted: AdmittedEmbed) {
        let AdmittedEmbed {
            id,
            request,
            events,
        } = admitted;
        let mut state = EmbedState {
            events,
            arrival: request.arrival,
            pooling: request.pooling,
            counted_waiting: true,
            inputs: Vec::with_capacity(request.inputs.len()),
            inputs_unfinished: 0,
        };
        if self.shutdown_deadline.is_some() {
            // Accepted just before shutdown began; it would never be scheduled in time.
            state.uncount_waiting(&self.shared);
            for index in 0..request.inputs.len() {
                let _ = state.events.send(EmbedEvent::Failed {
                    index: index as u32,
                    reason: FinishReason::Abort,
                });
            }
            return;
        }
        for (index, prompt) in request.inputs.into_iter().enumerate() {
            let seq_id = SeqId(self.next_seq_id);
            self.next_seq_id += 1;
            let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
            // One "output" token that is never sampled: the sequence ends with its prompt.
            let added = match request.pooling {
                Pooling::Last => self.scheduler.add(seq_id, prompt, 1, request.priority),
                Pooling::Mean => {
                    self.scheduler
                        .add_without_prefix_hits(seq_id, prompt, 1, request.priority)
                }
            };
            let mut input = EmbedInput {
                seq_id,
                prompt_tokens,
                sum: Vec::new(),
                pooled_upto: 0,
                cached_prompt_tokens: 0,
                finished: false,
            };
            match added {
                Ok(()) => {
                    self.shared
                        .metrics
                        .prompt_tokens_total
                        .inc_by(u64::from(prompt_tokens));
                    self.embeddings.owner.insert(seq_id, (id, index));
                    state.inputs_unfinished += 1;
                }
                Err(error) => {
                    input.finished = true;
                    let _ = state.events.send(EmbedEvent::Failed {
                        index: index as u32,
                        reason: FinishReason::Error(error.to_string()),
                    });
                }
            }
            state.inputs.push(input);
        }
        if state.inputs_unfinished == 0 {
            state.uncount_waiting(&self.shared);
            return;
        }
        self.embeddings.requests.insert(id, state);
    }

    /// Aborts embedding request `id` if it is one (false otherwise): its unfinished inputs
    /// leave the scheduler, their blocks freed now. With `notify` each gets `Failed { Abort }`.
    pub(super) fn abort_embed(&mut self, id: RequestId, notify: bool) -> bool {
        let Some(mut state) = self.embeddings.requests.remove(&id) else {
            return false;
        };
        for input in &state.inputs {
            self.embeddings.owner.remove(&input.seq_id);
            if !input.finished {
                self.scheduler.abort(input.seq_id);
            }
        }
        state.uncount_waiting(&self.shared);
        if notify {
            state.fail_all(&FinishReason::Abort);
        }
        true
    }

    /// Embedding requests whose receiver is gone.
    pub(super) fn closed_embeds(&self) -> Vec<RequestId> {
        self.embeddings
            .requests
            .iter()
            .filter(|(_, state)| state.events.is_closed())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Every embedding request's id.
    pub(super) fn embed_ids(&self) -> Vec<RequestId> {
        self.embeddings.requests.keys().copied().collect()
    }

    /// The engine failed: every embedding request ends with `reason` (no scheduler calls: a
    /// panic may have left it half-updated; `die` frees the sequences after).
    pub(super) fn fail_embeds(&mut self, reason: &FinishReason) {
        for state in self.embeddings.requests.values_mut() {
            state.uncount_waiting(&self.shared);
            state.fail_all(reason);
        }
    }

    /// Ends one input whose sequence already left the scheduler (it can never fit) with
    /// `reason`; false if `seq_id` is not an embedding input.
    pub(super) fn fail_embed_seq(&mut self, seq_id: SeqId, reason: FinishReason) -> bool {
        let Some((request_id, index)) = self.embeddings.owner.remove(&seq_id) else {
            return false;
        };
        if let Some(state) = self.embeddings.requests.get_mut(&request_id) {
            let input = &mut state.inputs[index];
            if !input.finished {
                input.finished = true;
                state.inputs_unfinished -= 1;
                let _ = state.events.send(EmbedEvent::Failed {
                    index: index as u32,
                    reason,
                });
            }
            self.end_embed_if_done(request_id);
        }
        true
    }

    fn end_embed_if_done(&mut self, request_id: RequestId) {
        let done = self
            .embeddings
            .requests
            .get(&request_id)
            .is_some_and(|state| state.inputs_unfinished == 0);
        if let Some(mut state) = done
            .then(|| self.embeddings.requests.remove(&request_id))
            .flatten()
        {
            state.uncount_waiting(&self.shared);
            self.shared
                .metrics
                .e2e_request_latency_seconds
                .observe(state.arrival.elapsed().as_secs_f64());
        }
    }

    /// After `schedule()`: this step's pools of the embedding sequences in `batch`, and their
    /// last chunks un-sampled (they report their output in [`Self::finish_embeddings`]).
    pub(super) fn plan_pools(&mut self, batch: &mut ScheduledBatch, now: Instant) {
        let embeddings = &mut self.embeddings;
        embeddings.pools.clear();
        embeddings.pool_targets.clear();
        embeddings.ending.clear();
        if embeddings.requests.is_empty() {
            return;
        }
        for (chunk, seq) in batch.seqs.iter_mut().enumerate() {
            let Some(&(request_id, index)) = embeddings.owner.get(&seq.seq_id) else {
                continue;
            };
            let Some(state) = embeddings.requests.get_mut(&request_id) else {
                continue;
            };
            if state.counted_waiting {
                self.shared
                    .metrics
                    .request_queue_time_seconds
                    .observe(now.saturating_duration_since(state.arrival).as_secs_f64());
                state.uncount_waiting(&self.shared);
            }
            let input = &mut state.inputs[index];
            let (start, end) = (seq.positions.start, seq.positions.end);
            // An embedding never outgrows its prompt: it is sampled (and ends) with it.
            assert!(end <= input.prompt_tokens, "an embedding past its prompt");
            // The latest admission's hit (a preempted input is admitted again).
            input.cached_prompt_tokens = seq.num_cached_tokens.min(input.prompt_tokens);
            let from = match state.pooling {
                Pooling::Last => (end == input.prompt_tokens).then_some(end - 1),
                Pooling::Mean => {
                    // Positions before `start` must already be in the sum: a Mean input has no
                    // prefix hits, so it never skips one.
                    assert!(
                        start <= input.pooled_upto,
                        "a mean-pooled embedding would skip positions {}..{start}",
                        input.pooled_upto
                    );
                    (input.pooled_upto < end).then_some(input.pooled_upto)
                }
            };
            if let Some(from) = from {
                embeddings.pools.push(PoolChunk {
                    chunk,
                    rows: (from - start) as usize..(end - start) as usize,
                });
                embeddings.pool_targets.push((seq.seq_id, end));
            }
            if seq.sample {
                seq.sample = false;
                embeddings.ending.push(seq.seq_id);
            }
        }
    }

    /// After the forward: adds each pool to its input, and finishes the inputs whose last
    /// chunk ran (an output with `finished` for each, so the scheduler frees their blocks).
    pub(super) fn finish_embeddings(&mut self, outputs: &mut Vec<StepOutput>) {
        let hidden = self.model.config().hidden_size;
        let embeddings = &mut self.embeddings;
        for (pool, &(seq_id, upto)) in embeddings.pool_targets.iter().enumerate() {
            let Some(&(request_id, index)) = embeddings.owner.get(&seq_id) else {
                continue;
            };
            let Some(state) = embeddings.requests.get_mut(&request_id) else {
                continue;
            };
            let row = &embeddings.host[pool * hidden..(pool + 1) * hidden];
            let input = &mut state.inputs[index];
            if input.sum.is_empty() {
                input.sum = row.to_vec();
            } else {
                for (sum, x) in input.sum.iter_mut().zip(row) {
                    *sum += x;
                }
            }
            input.pooled_upto = upto;
        }
        let ending = std::mem::take(&mut self.embeddings.ending);
        for &seq_id in &ending {
            outputs.push(StepOutput {
                seq_id,
                new_token: None,
                finished: true,
                accepted_drafts: 0,
            });
            let Some((request_id, index)) = self.embeddings.owner.remove(&seq_id) else {
                continue;
            };
            let Some(state) = self.embeddings.requests.get_mut(&request_id) else {
                continue;
            };
            let pooling = state.pooling;
            let input = &mut state.inputs[index];
            input.finished = true;
            state.inputs_unfinished -= 1;
            let event = match finish_vector(std::mem::take(&mut input.sum), pooling, input) {
                Ok(embedding) => EmbedEvent::Embedding {
                    index: index as u32,
                    embedding,
                    usage: Usage {
                        prompt_tokens: input.prompt_tokens,
                        completion_tokens: 0,
                        cached_prompt_tokens: input.cached_prompt_tokens,
                    },
                },
                Err(error) => EmbedEvent::Failed {
                    index: index as u32,
                    reason: FinishReason::Error(error),
                },
            };
            let _ = state.events.send(event);
            self.end_embed_if_done(request_id);
        }
        self.embeddings.ending = ending;
    }
}

/// The pooled sum of a finished input as its embedding: divided by the prompt length (Mean)
/// and L2-normalised.
fn finish_vector(
    mut sum: Vec<f32>,
    pooling: Pooling,
    input: &EmbedInput,
) -> Result<Vec<f32>, String> {
    // Both poolings end with the last position pooled (Mean with every one before it).
    if sum.is_empty() || input.pooled_upto != input.prompt_tokens {
        return Err(format!(
            "pooled {} of {} positions",
            input.pooled_upto, input.prompt_tokens
        ));
    }
    if pooling == Pooling::Mean {
        let n = input.prompt_tokens as f32;
        for x in &mut sum {
            *x /= n;
        }
    }
    l2_normalize(&mut sum)?;
    Ok(sum)
}

/// Scales `v` to unit length (a zero vector stays zero, as llama.cpp leaves it); a non-finite
/// component is an error, never a silently wrong embedding.
pub(super) fn l2_normalize(v: &mut [f32]) -> Result<(), String> {
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() {
        return Err("the pooled hidden state is not finite".into());
    }
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l2_normalize_gives_unit_length_and_refuses_non_finite() {
        let mut v = vec![3.0f32, 4.0];
        l2_normalize(&mut v).expect("finite");
        assert_eq!(v, [0.6, 0.8]);
        let mut zero = vec![0.0f32; 3];
        l2_normalize(&mut zero).expect("finite");
        assert_eq!(zero, [0.0; 3]);
        assert!(l2_normalize(&mut [1.0, f32::NAN]).is_err());
        assert!(l2_normalize(&mut [f32::INFINITY, 0.0]).is_err());
    }
}
