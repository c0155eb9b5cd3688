//! One engine step: propose speculative drafts, schedule, build the inputs, run the model,
//! bring the sampled rows (and the pooled rows of embeddings) to the host, sample every choice
//! (verifying its drafts), finish embeddings, update the scheduler.
//!
//! Verification of a sequence with k drafts d1..dk (fed as `last d1 .. dk`, logits rows
//! r0..rk): row ri decides the token after d1..di. For i = 0.. the sampler verifies d(i+1)
//! against ri ([`ChoiceSampler::verify_draft`]); an accepted draft is emitted as a token and
//! the next row is tried; the first rejection emits the sampler's correction instead and ends
//! the step, and if all k are accepted rk gives a bonus token. Each emitted token goes through
//! the choice's usual stop checks, so EOS, stop strings and max_tokens end the choice at the
//! exact token, and tokens after it are dropped. The scheduler is told how many drafts were
//! accepted and rolls the rest back (their KV is never visible).

use super::choice::{step_choice, Pick};
use super::*;

impl EngineCore {
    /// Runs one step: schedule, forward, sample, emit, update. An error is a failed forward
    /// pass: the engine cannot trust its device or cache any more (vLLM's EngineDeadError).
    pub(super) fn step(&mut self) -> Result<(), String> {
        let start = Instant::now();
        self.propose_drafts();
        let mut batch = self.scheduler.schedule();
        let now = Instant::now();
        for (seq_id, error) in &batch.failed {
            self.finish_seq(*seq_id, FinishReason::Error(error.to_string()));
        }
        self.mark_scheduled(&batch, now);
        self.plan_pools(&mut batch, now);
        if batch.is_empty() {
            if let Err(error) = self.scheduler.update_after_step(&[]) {
                tracing::error!(%error, "scheduler rejected an empty step");
            }
            return Ok(());
        }
        self.run_model(&batch)
            .map_err(|message| format!("a forward pass failed: {message}"))?;
        let mut outputs = std::mem::take(&mut self.step_outputs);
        outputs.clear();
        let sampling = Instant::now();
        self.sample_batch(&batch, &mut outputs);
        self.finish_embeddings(&mut outputs);
        self.step_times.schedule = now - start;
        self.step_times.sample = sampling.elapsed();
        if let Err(error) = self.scheduler.update_after_step(&outputs) {
            // A bug in this loop: the outputs do not match the batch. Fail the batch's
            // sequences rather than leave the scheduler with a step in flight.
            tracing::error!(%error, "scheduler rejected the step outputs");
            for output in outputs.iter_mut() {
                output.new_token = None;
                output.finished = true;
                output.accepted_drafts = 0;
            }
            let _ = self.scheduler.update_after_step(&outputs);
            for output in &outputs {
                self.finish_seq(output.seq_id, FinishReason::Error(error.to_string()));
            }
        }
        self.step_outputs = outputs;
        let t = &self.step_times;
        tracing::trace!(
            target: STEP_TRACE,
            seqs = batch.seqs.len(),
            tokens = batch.seqs.iter().map(|s| s.positions.len()).sum::<usize>(),
            schedule_us = t.schedule.as_micros() as u64,
            inputs_us = t.inputs.as_micros() as u64,
            forward_us = t.forward.as_micros() as u64,
            to_host_us = t.to_host.as_micros() as u64,
            sample_us = t.sample.as_micros() as u64,
            step_us = start.elapsed().as_micros() as u64,
            "step"
        );
        Ok(())
    }

    /// First-schedule bookkeeping: queue time, cached prompt tokens, the waiting count.
    pub(super) fn mark_scheduled(&mut self, batch: &ScheduledBatch, now: Instant) {
        for seq in &batch.seqs {
            let Some(&(request_id, index)) = self.seq_owner.get(&seq.seq_id) else {
                continue;
            };
            let Some(state) = self.requests.get_mut(&request_id) else {
                continue;
            };
            state.uncount_waiting(&self.shared);
            let choice = &mut state.choices[index];
            if choice.first_scheduled.is_none() {
                choice.first_scheduled = Some(now);
                choice.cached_prompt_tokens = seq.num_cached_tokens.min(state.prompt_tokens);
                self.shared
                    .metrics
                    .request_queue_time_seconds
                    .observe(now.saturating_duration_since(state.arrival).as_secs_f64());
            }
        }
    }

    /// Builds the step's inputs, runs the forward pass and brings the sampled rows to the
    /// host: `device_tokens` for rows the device reduced, `logits_host` for the others.
    pub(super) fn run_model(&mut self, batch: &ScheduledBatch) -> Result<(), String> {
        let start = Instant::now();
        // Block tables as u32, one after another; chunks borrow slices of these buffers. A
        // released window block keeps its id (`u32::MAX`), which no kernel reads.
        self.block_tables_host.clear();
        self.window_tables_host.clear();
        let mut table_ranges = Vec::with_capacity(batch.seqs.len());
        for seq in &batch.seqs {
            let start = self.block_tables_host.len();
            self.block_tables_host
                .extend(batch.block_table(seq).iter().map(|block| block.0));
            if let Some(table) = batch.window_block_table(seq) {
                self.window_tables_host
                    .extend(table.iter().map(|block| block.0));
            }
            table_ranges.push(start..self.block_tables_host.len());
        }
        let windowed = !self.window_tables_host.is_empty();
        let chunks: Vec<SeqChunk<'_>> = batch
            .seqs
            .iter()
            .zip(&table_ranges)
            .map(|(seq, range)| SeqChunk {
                token_ids: batch.input_ids(seq),
                tokens_cached: seq.positions.start as usize,
                block_table: &self.block_tables_host[range.clone()],
                window_block_table: windowed.then(|| &self.window_tables_host[range.clone()]),
                sample: seq.sample,
                extra_logit_rows: seq.num_draft_tokens as usize,
            })
            .collect();
        let inputs = self
            .batch_builder
            .build_pooled(
                &chunks,
                &self.embeddings.pools,
                self.block_size,
                &self.device,
            )
            .map_err(|e| e.to_string())?;
        let num_sampled = inputs.num_sampled();
        #[cfg(feature = "fault-injection")]
        self.faults.before_forward()?;
        let built = Instant::now();
        self.step_times = StepTimes {
            inputs: built - start,
            ..StepTimes::default()
        };
        let logits = if inputs.num_pools > 0 {
            let (logits, pooled) = self
                .model
                .forward_pooled(&inputs, &mut self.kv)
                .map_err(|e| e.to_string())?;
            let hidden = self.model.config().hidden_size;
            if pooled.dims() != [inputs.num_pools, hidden] {
                return Err(format!(
                    "the model pooled hidden states of shape {:?}, expected [{}, {hidden}]",
                    pooled.dims(),
                    inputs.num_pools
                ));
            }
            copy_logits_to_host(&pooled, &mut self.embeddings.host).map_err(|e| e.to_string())?;
            logits
        } else {
            self.model
                .forward(&inputs, &mut self.kv)
                .map_err(|e| e.to_string())?
        };
        let forwarded = Instant::now();
        self.step_times.forward = forwarded - built;
        if num_sampled == 0 {
            // Only non-final prefill chunks and embeddings: nothing to sample.
            self.device_tokens.clear();
            self.logits_host.clear();
            return Ok(());
        }
        let dims = logits.dims();
        if dims != [num_sampled, self.info.vocab_size] {
            return Err(format!(
                "the model returned logits of shape {dims:?}, expected [{num_sampled}, {}]",
                self.info.vocab_size
            ));
        }
        self.rows_on_device.clear();
        if self.greedy_on_device {
            for seq in batch.seqs.iter().filter(|s| s.sample) {
                let plain = match self.seq_owner.get(&seq.seq_id) {
                    Some((request_id, index)) => self
                        .requests
                        .get(request_id)
                        .and_then(|state| state.choices.get(*index))
                        .is_none_or(|choice| {
                            choice.constraint.is_none() && choice.sampler.is_plain_greedy()
                        }),
                    // Aborted after scheduling: its output is dropped, any token will do.
                    None => true,
                };
                for _ in 0..seq.num_logit_rows() {
                    self.rows_on_device.push(plain);
                }
            }
        }
        let copied = logits_to_host(
            &logits,
            &self.rows_on_device,
            &mut self.device_tokens,
            &mut self.logits_host,
        )
        .map_err(|e| e.to_string());
        self.step_times.to_host = forwarded.elapsed();
        copied
    }

    /// Samples every sampled sequence of the batch, emits its events and fills `outputs`.
    pub(super) fn sample_batch(&mut self, batch: &ScheduledBatch, outputs: &mut Vec<StepOutput>) {
        let vocab_size = self.info.vocab_size;
        let mut masks = self.constraint_masks(batch);
        // Sampled rows follow the sampled sequences in batch order (one per draft plus one
        // each); host logit rows follow the rows the device did not reduce, in the same order.
        let mut host_row = 0;
        let mut row = 0;
        for seq in batch.seqs.iter().filter(|s| s.sample) {
            if seq.num_draft_tokens > 0 {
                let rows = seq.num_logit_rows() as usize;
                let host_rows = (row..row + rows)
                    .filter(|&r| self.device_tokens.get(r).copied().flatten().is_none())
                    .count();
                let output = self.verify_drafts(batch, seq, row, host_row);
                row += rows;
                host_row += host_rows;
                outputs.extend(output);
                continue;
            }
            let pick = match self.device_tokens.get(row).copied().flatten() {
                Some(token) => Pick::Token(token),
                None => {
                    host_row += 1;
                    Pick::Logits(
                        &mut self.logits_host[(host_row - 1) * vocab_size..host_row * vocab_size],
                    )
                }
            };
            row += 1;
            let Some(&(request_id, index)) = self.seq_owner.get(&seq.seq_id) else {
                // Aborted after scheduling: the scheduler ignores outputs of unknown sequences.
                continue;
            };
            let Some(state) = self.requests.get_mut(&request_id) else {
                continue;
            };
            let now = Instant::now();
            let decision = step_choice(
                state,
                index,
                pick,
                masks.remove(&seq.seq_id),
                &mut self.scratch,
                &self.info.eos_token_ids,
                now,
                &self.shared,
            );
            outputs.push(StepOutput {
                seq_id: seq.seq_id,
                new_token: Some(decision.token),
                finished: decision.finished.is_some(),
                accepted_drafts: 0,
            });
            if let Some(reason) = decision.finished {
                finish_choice(state, index, &reason, &self.shared);
                self.seq_owner.remove(&seq.seq_id);
                if state.choices_unfinished == 0 {
                    self.requests.remove(&request_id);
                }
            }
        }
    }

    /// The token masks of this step's constrained rows, computed in parallel (llguidance
    /// takes tenths of a millisecond a row, which one thread would add up over a batch).
    pub(super) fn constraint_masks(
        &mut self,
        batch: &ScheduledBatch,
    ) -> HashMap<SeqId, Result<TokenMask, String>> {
        let any_constrained = self
            .requests
            .values()
            .any(|state| state.choices.iter().any(|c| c.constraint.is_some()));
        if !any_constrained {
            return HashMap::new();
        }
        let sampled: HashSet<SeqId> = batch
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.seq_id)
            .collect();
        // Every unfinished constrained choice sampled this step, each borrowed on its own.
        let constrained: Vec<(SeqId, &mut ChoiceConstraint)> = self
            .requests
            .values_mut()
            .flat_map(|state| state.choices.iter_mut())
            .filter(|choice| !choice.finished && sampled.contains(&choice.seq_id))
            .filter_map(|choice| Some((choice.seq_id, choice.constraint.as_mut()?)))
            .collect();
        if constrained.len() < 2 {
            // One row: computed where it is sampled, without waking the pool.
            return HashMap::new();
        }
        constrained
            .into_par_iter()
            .map(|(seq_id, constraint)| (seq_id, constraint.compute_mask()))
            .collect()
    }
}

/// The tracing target of the per-step timings (`RUST_LOG=candela_engine::step=trace`).
pub(super) const STEP_TRACE: &str = "candela_engine::step";

/// Where one step spent its time (what is left of `step_us` is the scheduler's update and
/// finishing requests). On a GPU the forward only enqueues kernels
/// (the host's launch cost) and the copy to the host waits for them, so a `forward` close to
/// the whole step means the step is bound by the host, a large `to_host` by the GPU.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct StepTimes {
    /// `Scheduler::schedule` and the first-schedule bookkeeping.
    pub(super) schedule: std::time::Duration,
    /// Building and uploading the step's inputs.
    pub(super) inputs: std::time::Duration,
    /// `Model::forward`.
    pub(super) forward: std::time::Duration,
    /// The argmax and/or logits copy (the first synchronization with the device).
    pub(super) to_host: std::time::Duration,
    /// Sampling, detokenizing, stop checks and events of every sampled row.
    pub(super) sample: std::time::Duration,
}

/// Brings a step's `[rows, vocab]` logits to the host. Rows marked in `on_device` are reduced
/// to their argmax where the logits are (one `u32` per row crosses to the host) and their ids
/// go to `tokens`; the other rows' logits go to `host`, in order, and get `None` in `tokens`.
/// An empty `on_device` means every row goes to `host`.
pub(super) fn logits_to_host(
    logits: &Tensor,
    on_device: &[bool],
    tokens: &mut Vec<Option<TokenId>>,
    host: &mut Vec<f32>,
) -> candle_core::Result<()> {
    let rows = logits.dim(0)?;
    tokens.clear();
    if !on_device.contains(&true) {
        tokens.resize(rows, None);
        return copy_logits_to_host(logits, host);
    }
    if on_device.len() != rows {
        candle_core::bail!("{} row flags for {rows} logit rows", on_device.len());
    }
    if cpu_rows_to_host(logits, on_device, tokens, host)? {
        return Ok(());
    }
    // On a GPU candle's reduction may pick another of exactly equal maxima than the host
    // sampler's first one (a tie of f32 logits, rare).
    let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    let mut to_host = Vec::new();
    for (row, (&device, &id)) in on_device.iter().zip(&ids).enumerate() {
        if device {
            tokens.push(Some(id));
        } else {
            tokens.push(None);
            to_host.push(
                u32::try_from(row).map_err(|_| candle_core::Error::Msg(format!("row {row}")))?,
            );
        }
    }
    if to_host.is_empty() {
        host.clear();
        return Ok(());
    }
    let index = Tensor::new(to_host.as_slice(), logits.device())?;
    copy_logits_to_host(&logits.index_select(&index, 0)?, host)
}

/// [`logits_to_host`] for f32 logits in CPU memory: rows are read in place, the argmax rows
/// with the sampler's vectorised [`argmax`] (in parallel over rows; candle's reduction is one
/// scalar loop, 2 ms a step at batch 48). `false` when the logits are elsewhere.
pub(super) fn cpu_rows_to_host(
    logits: &Tensor,
    on_device: &[bool],
    tokens: &mut Vec<Option<TokenId>>,
    host: &mut Vec<f32>,
) -> candle_core::Result<bool> {
    if logits.dtype() != DType::F32 {
        return Ok(false);
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(false);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(false);
    };
    let data = &cpu.as_slice::<f32>()?[start..end];
    let vocab = logits.dim(1)?;
    if vocab == 0 {
        candle_core::bail!("logits of an empty vocabulary");
    }
    let rows: Vec<&[f32]> = data.chunks_exact(vocab).collect();
    // A few rows are not worth waking the pool for (~15 us each).
    let argmaxes: Vec<Option<TokenId>> = if rows.len() >= 4 {
        rows.par_iter()
            .zip(on_device)
            .map(|(row, &device)| device.then(|| argmax(row)))
            .collect()
    } else {
        rows.iter()
            .zip(on_device)
            .map(|(row, &device)| device.then(|| argmax(row)))
            .collect()
    };
    host.clear();
    for ((row, &device), id) in rows.iter().zip(on_device).zip(argmaxes) {
        tokens.push(id);
        if !device {
            host.extend_from_slice(row);
        }
    }
    Ok(true)
}

/// Copies `[rows, vocab]` f32 logits into `host` (resized), reusing its allocation on CPU.
pub(super) fn copy_logits_to_host(logits: &Tensor, host: &mut Vec<f32>) -> candle_core::Result<()> {
    let logits = if logits.dtype() == DType::F32 {
        logits.clone()
    } else {
        logits.to_dtype(DType::F32)?
    };
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let data = cpu.as_slice::<f32>()?;
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("logits are not contiguous".into()))?;
            host.clear();
            host.extend_from_slice(&data[start..end]);
        }
        _ => {
            drop(storage);
            *host = logits.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn logits_to_host_splits_device_rows_from_host_rows() {
        let logits = Tensor::new(
            &[
                [0.0f32, 3.0, 1.0, 3.0],
                [5.0, 1.0, 2.0, 0.0],
                [-1.0, -2.0, -0.5, -3.0],
            ],
            &Device::Cpu,
        )
        .expect("tensor");
        let (mut tokens, mut host) = (Vec::new(), Vec::new());
        logits_to_host(&logits, &[true, false, true], &mut tokens, &mut host).expect("splits");
        assert_eq!(tokens, [Some(1), None, Some(2)]);
        assert_eq!(host, [5.0, 1.0, 2.0, 0.0]);

        logits_to_host(&logits, &[], &mut tokens, &mut host).expect("copies");
        assert_eq!(tokens, [None, None, None]);
        assert_eq!(host.len(), 12);

        logits_to_host(&logits, &[true; 3], &mut tokens, &mut host).expect("reduces");
        assert_eq!(tokens, [Some(1), Some(0), Some(2)]);
        assert!(host.is_empty());

        assert!(logits_to_host(&logits, &[true, false], &mut tokens, &mut host).is_err());

        // Enough rows for the parallel path; NaN never wins, the first of equal maxima does.
        let rows: Vec<f32> = (0..5 * 300)
            .map(|i| match (i / 300, i % 300) {
                (r, c) if c == 17 + 40 * r => 9.0,
                (r, c) if c == 200 + r => 9.0,
                (_, 3) => f32::NAN,
                (_, c) => (c as f32 * 0.1).sin(),
            })
            .collect();
        let logits = Tensor::from_vec(rows.clone(), (5, 300), &Device::Cpu).expect("tensor");
        let flags = [true, true, false, true, true];
        logits_to_host(&logits, &flags, &mut tokens, &mut host).expect("splits");
        assert_eq!(tokens, [Some(17), Some(57), None, Some(137), Some(177)]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&host),
            bits(&rows[600..900]),
            "the host row, NaN included"
        );
    }
}
