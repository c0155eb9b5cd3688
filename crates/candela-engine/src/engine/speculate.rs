//! Speculative decoding on the engine thread: proposing each decoding choice's n-gram drafts
//! before the step, and verifying them from the step's logits after it (the rule is in
//! `step.rs`'s module doc; the proposer and the back-off in `crate::speculative`).

use candela_scheduler::{ScheduledSeq, SeqStatus};

use super::choice::{step_choice, Pick};
use super::*;

impl EngineCore {
    /// Hands the scheduler drafts for every choice that decodes this step and may speculate:
    /// not backed off, at least two tokens left before `max_tokens` (a step emits drafts + 1),
    /// and an n-gram match found.
    pub(super) fn propose_drafts(&mut self) {
        let Some(cfg) = self.speculative else {
            return;
        };
        for state in self.requests.values_mut() {
            for choice in state.choices.iter_mut().filter(|c| c.may_speculate()) {
                let Some(seq) = self.scheduler.sequence(choice.seq_id) else {
                    continue;
                };
                if seq.status() != SeqStatus::Running
                    || seq.num_tokens() != seq.num_computed_tokens() + 1
                {
                    continue;
                }
                let left = choice.tokens_max.saturating_sub(choice.tokens_generated);
                let k = choice
                    .acceptance
                    .draft_len(cfg.num_speculative_tokens)
                    .min(left.saturating_sub(1));
                if k == 0 || !choice.acceptance.may_propose() {
                    continue;
                }
                propose_ngram(
                    seq.tokens(),
                    cfg.ngram_min as usize,
                    cfg.ngram_max as usize,
                    k as usize,
                    &mut self.drafts,
                );
                if !self.drafts.is_empty() {
                    self.scheduler.set_draft_tokens(choice.seq_id, &self.drafts);
                }
            }
        }
    }

    /// Verifies `seq`'s drafts with its logit rows (from `row` in the step's sampled rows; its
    /// host rows from `host_row`), emits the accepted tokens and the correction or bonus token
    /// through the choice's usual path, and returns the scheduler's output (`None` for a
    /// sequence aborted since scheduling).
    pub(super) fn verify_drafts(
        &mut self,
        batch: &ScheduledBatch,
        seq: &ScheduledSeq,
        row: usize,
        mut host_row: usize,
    ) -> Option<StepOutput> {
        let vocab_size = self.info.vocab_size;
        let &(request_id, index) = self.seq_owner.get(&seq.seq_id)?;
        let state = self.requests.get_mut(&request_id)?;
        let input = batch.input_ids(seq);
        let drafts = &input[input.len() - seq.num_draft_tokens as usize..];
        let now = Instant::now();
        let (mut accepted, mut new_token, mut finished) = (0u32, None, None);
        for (i, r) in (row..=row + drafts.len()).enumerate() {
            let draft = drafts.get(i).copied();
            let (token, ok) = match self.device_tokens.get(r).copied().flatten() {
                // A plain greedy row: the device's argmax is the sampler's choice.
                Some(token) => (token, Some(token) == draft),
                None => {
                    let logits =
                        &mut self.logits_host[host_row * vocab_size..(host_row + 1) * vocab_size];
                    host_row += 1;
                    let sampler = &mut state.choices[index].sampler;
                    match draft {
                        Some(draft) => sampler.verify_draft(logits, draft, &mut self.scratch),
                        None => (sampler.sample(logits, &mut self.scratch).0, false),
                    }
                }
            };
            let decision = step_choice(
                state,
                index,
                Pick::Token(token),
                None,
                &mut self.scratch,
                &self.info.eos_token_ids,
                now,
                &self.shared,
            );
            if ok {
                accepted += 1;
            } else {
                new_token = Some(token);
            }
            if decision.finished.is_some() || !ok {
                finished = decision.finished;
                break;
            }
        }
        let metrics = &self.shared.metrics;
        metrics.spec_decode_num_drafts_total.inc();
        metrics
            .spec_decode_num_draft_tokens_total
            .inc_by(drafts.len() as u64);
        metrics
            .spec_decode_num_accepted_tokens_total
            .inc_by(u64::from(accepted));
        for position in 0..accepted {
            metrics
                .spec_decode_num_accepted_tokens_per_pos_total
                .with_label_values(&[position.to_string().as_str()])
                .inc();
        }
        state.choices[index]
            .acceptance
            .record(drafts.len() as u32, accepted);
        // A choice that ended on an accepted draft reports no token after it (allowed for a
        // finished sequence); otherwise `new_token` is the correction or the bonus.
        let output = StepOutput {
            seq_id: seq.seq_id,
            new_token,
            finished: finished.is_some(),
            accepted_drafts: accepted,
        };
        if let Some(reason) = finished {
            finish_choice(state, index, &reason, &self.shared);
            self.seq_owner.remove(&seq.seq_id);
            if state.choices_unfinished == 0 {
                self.requests.remove(&request_id);
            }
        }
        Some(output)
    }
}
