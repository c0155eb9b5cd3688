//! Token sampling for one choice: logit processing (bias, penalties), greedy or seeded random
//! selection with temperature, top-k, top-p and min-p, and log-probabilities.
//!
//! Sampling runs on a host row of the step's logits (`&mut [f32]`, one vocabulary row), which the
//! engine copies from the device once per step. Each choice owns its RNG (ChaCha12 seeded from
//! `seed + choice_index`) and draws exactly one number per sampled token, so its output does not
//! depend on what else is in the batch. Scratch buffers live in [`SamplerScratch`], shared by all
//! choices of a step, so steady-state sampling does not allocate.
//!
//! Order of operations (as vLLM): log-probabilities from the raw logits (temperature 1, before
//! any processing, as the OpenAI API reports them); then logit bias; repetition penalty (prompt
//! and output tokens); frequency and presence penalties (output tokens); then greedy argmax when
//! the temperature is 0, else temperature, top-k, top-p, min-p and a draw.
//!
//! Speculative decoding verifies a proposed token with [`ChoiceSampler::verify_draft`]: the
//! same processing and distribution p, then the rejection rule for a deterministic proposal
//! (accept with probability p(draft), else draw from p without the draft), so every emitted
//! token is distributed exactly as [`ChoiceSampler::sample`] would draw it. A verification
//! takes one or two numbers from the RNG, so a speculative run is not the same sample as a
//! plain one with the same seed (greedy output is the same token for token).

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;

use candela_kernels::sampling::softmax_weights;

use crate::api::{SamplingParams, TokenId, TokenLogprob};

/// Below this temperature sampling is greedy: dividing by it would overflow, and every client
/// means argmax by it.
const TEMPERATURE_GREEDY_MAX: f32 = 1e-5;

/// Buffers reused across sampling calls (one per engine).
#[derive(Debug, Default)]
pub struct SamplerScratch {
    /// Candidate tokens after truncation.
    candidates: Vec<RankKey>,
    /// Probabilities, indexed like the vocabulary row.
    probs: Vec<f32>,
    /// The candidates' weights, in candidate order.
    weights: Vec<f32>,
}

/// The sampling state of one choice: its parameters, RNG and the token counts penalties need.
#[derive(Debug)]
pub struct ChoiceSampler {
    params: SamplingParams,
    rng: ChaCha12Rng,
    /// Distinct prompt tokens, sorted; only filled when a repetition penalty is set.
    prompt_tokens_distinct: Vec<TokenId>,
    /// How often each token occurs in this choice's output (frequency/presence penalties and the
    /// output half of the repetition penalty).
    output_counts: HashMap<TokenId, u32>,
}

impl ChoiceSampler {
    /// A sampler for one choice. `seed` is the choice's own seed (the request's seed plus the
    /// choice index); `prompt` is read only when a repetition penalty is set.
    pub fn new(params: SamplingParams, seed: u64, prompt: &[TokenId]) -> Self {
        let mut prompt_tokens_distinct = Vec::new();
        if params.repetition_penalty != 1.0 {
            prompt_tokens_distinct.extend_from_slice(prompt);
            prompt_tokens_distinct.sort_unstable();
            prompt_tokens_distinct.dedup();
        }
        Self {
            params,
            rng: ChaCha12Rng::seed_from_u64(seed),
            prompt_tokens_distinct,
            output_counts: HashMap::new(),
        }
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether sampling is greedy (argmax).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature < TEMPERATURE_GREEDY_MAX
    }

    /// Whether the next token is the argmax of the raw logits, whatever they are: greedy, with
    /// no logprobs to report and no bias or penalty to apply. Such a row can be reduced on the
    /// device; [`Self::sample`] would pick the same token from the host row.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy()
            && self.params.logprobs.is_none()
            && self.params.logit_bias.is_empty()
            && !self.has_penalties()
    }

    /// Whether a repetition, frequency or presence penalty is set (they need the output counts).
    fn has_penalties(&self) -> bool {
        self.params.frequency_penalty != 0.0
            || self.params.presence_penalty != 0.0
            || self.params.repetition_penalty != 1.0
    }

    /// Records a token appended to this choice's output (for the penalties). Tokens that were
    /// generated before a preemption stay recorded: the output continues seamlessly.
    pub fn record_output(&mut self, token: TokenId) {
        if self.has_penalties() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Picks the next token from one row of raw logits, which it overwrites with the processed
    /// logits. Returns the token and, when requested, its log-probability entry.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        scratch: &mut SamplerScratch,
    ) -> (TokenId, Option<TokenLogprob>) {
        self.sample_masked(logits, scratch, |_| {})
    }

    /// [`Self::sample`] with `mask` run on the processed logits just before the choice (a
    /// structured output's constraint sets the logits of disallowed tokens to -inf there). The
    /// reported log-probabilities stay those of the raw logits, as vLLM reports them.
    pub fn sample_masked(
        &mut self,
        logits: &mut [f32],
        scratch: &mut SamplerScratch,
        mask: impl FnOnce(&mut [f32]),
    ) -> (TokenId, Option<TokenLogprob>) {
        assert!(!logits.is_empty(), "an empty logits row");
        let raw = self.params.logprobs.map(|k| {
            let normalizer = log_sum_exp(logits);
            (normalizer, top_k_logprobs(logits, k as usize, normalizer))
        });
        // Processing changes only the logits of biased and penalized tokens: remember their raw
        // values so the chosen token's raw logprob can be recovered without copying the row.
        // (`Vec::new` does not allocate until a push.)
        let mut changed: Vec<(TokenId, f32)> = Vec::new();
        self.apply_processors(logits, raw.is_some().then_some(&mut changed));
        // The mask only ever lowers logits to -inf, and never the chosen token's (it is
        // allowed), so the chosen token's raw logit is still recovered below.
        mask(logits);
        let token = if self.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits, scratch)
        };
        let logprob = raw.map(|(normalizer, top)| {
            let raw_logit = changed
                .iter()
                .find(|(t, _)| *t == token)
                .map_or(logits[token as usize], |(_, raw)| *raw);
            TokenLogprob {
                token_id: token,
                logprob: raw_logit - normalizer,
                top,
            }
        });
        (token, logprob)
    }

    /// Verifies the speculative `draft` against one row of raw logits, which it overwrites with
    /// the processed logits: returns the token this row emits and whether it is the draft.
    /// Greedy: the argmax, so the draft is accepted exactly when plain sampling would pick it.
    /// Otherwise the draft is accepted with probability p(draft), p the distribution
    /// [`Self::sample`] draws from (after bias, penalties, temperature, top-k, top-p, min-p),
    /// and on rejection the token is drawn from p with the draft removed and renormalised
    /// (the residual (p - q)+ of a one-hot proposal q): the token is distributed exactly as p.
    /// No logprobs: the engine does not speculate for choices that want them.
    pub fn verify_draft(
        &mut self,
        logits: &mut [f32],
        draft: TokenId,
        scratch: &mut SamplerScratch,
    ) -> (TokenId, bool) {
        assert!(!logits.is_empty(), "an empty logits row");
        self.apply_processors(logits, None);
        if self.is_greedy() {
            let token = argmax(logits);
            (token, token == draft)
        } else {
            self.draw_verified(logits, scratch, Some(draft))
        }
    }

    /// Logit bias, then the repetition, frequency and presence penalties, in place. When
    /// `changed` is given, the first raw value of every modified logit is pushed to it.
    fn apply_processors(&self, logits: &mut [f32], mut changed: Option<&mut Vec<(TokenId, f32)>>) {
        let vocab_size = logits.len();
        let mut remember = |token: TokenId, raw: f32| {
            if let Some(changed) = changed.as_deref_mut() {
                if !changed.iter().any(|(t, _)| *t == token) {
                    changed.push((token, raw));
                }
            }
        };
        for &(token, bias) in &self.params.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                remember(token, *logit);
                *logit += bias;
            }
        }
        let repetition = self.params.repetition_penalty;
        if repetition != 1.0 {
            // Prompt and output tokens, each penalized once (the CTRL rule vLLM uses: divide
            // positive logits, multiply negative ones).
            let output_only = self
                .output_counts
                .keys()
                .filter(|t| self.prompt_tokens_distinct.binary_search(t).is_err());
            for &token in self.prompt_tokens_distinct.iter().chain(output_only) {
                if (token as usize) < vocab_size {
                    let logit = &mut logits[token as usize];
                    remember(token, *logit);
                    *logit = if *logit > 0.0 {
                        *logit / repetition
                    } else {
                        *logit * repetition
                    };
                }
            }
        }
        let frequency = self.params.frequency_penalty;
        let presence = self.params.presence_penalty;
        if frequency != 0.0 || presence != 0.0 {
            for (&token, &count) in &self.output_counts {
                if (token as usize) < vocab_size {
                    let logit = &mut logits[token as usize];
                    remember(token, *logit);
                    *logit -= frequency * count as f32 + presence;
                }
            }
        }
    }

    /// Temperature, top-k, top-p and min-p, then one draw from the RNG.
    fn draw(&mut self, logits: &[f32], scratch: &mut SamplerScratch) -> TokenId {
        self.draw_verified(logits, scratch, None).0
    }

    /// [`Self::draw`], or with a `draft` its verification (see [`Self::verify_draft`]): the
    /// token and whether it is the accepted draft.
    fn draw_verified(
        &mut self,
        logits: &[f32],
        scratch: &mut SamplerScratch,
        draft: Option<TokenId>,
    ) -> (TokenId, bool) {
        let inv_temperature = 1.0 / self.params.temperature;
        let max = row_max(logits);
        if !max.is_finite() {
            // Every token masked (or NaN logits): nothing to draw from; fall back to argmax so
            // the choice still ends (on length) rather than failing the batch.
            let token = argmax(logits);
            return (token, Some(token) == draft);
        }
        let probs = &mut scratch.probs;
        // Masked (-inf) and NaN logits weigh exactly 0: they can never be drawn.
        softmax_weights(logits, max, inv_temperature, probs);
        let min_p = self.params.min_p;
        if min_p > 0.0 {
            // The top token weighs exactly exp(0) = 1 before normalization, so min-p compares
            // unnormalized weights with min_p directly; it always keeps the top token.
            for p in probs.iter_mut() {
                *p = if *p >= min_p { *p } else { 0.0 };
            }
        }
        let top_k = self.params.top_k.map(|k| k.get() as usize);
        let top_p = self.params.top_p;
        // One uniform draw per token, taken up front so the RNG stream does not depend on the
        // path below.
        let u: f32 = self.rng.random::<f32>();

        if !(top_k.is_some_and(|k| k < probs.len()) || top_p < 1.0) {
            let x = draft.map(|d| d as usize).filter(|&d| d < probs.len());
            let (index, accepted) = accept_or_residual(probs, x, u, &mut self.rng);
            let token = index.map_or_else(|| argmax(logits), |i| i as TokenId);
            return (token, accepted);
        }

        // Rank-based truncation over the candidates ordered by weight (descending, then by id,
        // a total order, so ties are deterministic): top-k, then top-p. Candidates are
        // `RankKey`s, so selection compares plain integers.
        let candidates = &mut scratch.candidates;
        candidates.clear();
        // Top-p alone keeps the heaviest tokens holding `needed` of the mass: only tokens at or
        // above a weight cutoff that already holds it can be among them (everything lighter
        // ranks after all of those), so only those become candidates. The cutoff starts high
        // and comes down until it holds the mass; each try is one vectorised pass.
        let mut needed = None;
        let mut cutoff = f32::MIN_POSITIVE;
        if top_k.is_none() && top_p < 1.0 {
            let mass_needed = top_p * slice_sum(probs);
            let mut c = 1e-2f32;
            while c > f32::MIN_POSITIVE {
                if mass_at_least(probs, c) >= mass_needed {
                    cutoff = c;
                    break;
                }
                c *= 1e-3;
            }
            needed = Some(mass_needed);
        }
        candidates.extend(
            probs
                .iter()
                .zip(0u32..)
                .filter(|(&p, _)| p > 0.0 && p >= cutoff)
                .map(|(&p, id)| RankKey::new(p, id)),
        );
        if let Some(k) = top_k {
            if k < candidates.len() {
                candidates.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.cmp(a));
                candidates.truncate(k);
            }
        }
        if top_p < 1.0 {
            // With top-k, the mass is the top k's.
            let needed =
                needed.unwrap_or_else(|| top_p * weight_sum(candidates.iter().map(|c| c.weight())));
            let keep = nucleus_len(candidates, needed);
            candidates.truncate(keep.max(1));
        }
        let weights = &mut scratch.weights;
        weights.clear();
        weights.extend(candidates.iter().map(|c| c.weight()));
        // A draft that is not a candidate has probability 0: always rejected.
        let x = draft.and_then(|d| candidates.iter().position(|c| c.id() == d));
        let (index, accepted) = accept_or_residual(weights, x, u, &mut self.rng);
        let token = index
            .and_then(|j| candidates.get(j).map(|c| c.id()))
            .unwrap_or_else(|| argmax(logits));
        (token, accepted)
    }
}

/// One draw from `weights` with the uniform `u`; with a draft at index `x` (a candidate),
/// its verification instead: accepted when `u < w[x] / total` (probability p(x)), else `w[x]`
/// is zeroed and the token drawn from the rest with a second uniform from `rng`. Returns the
/// index (`None` when nothing can be drawn) and whether it is the accepted draft.
fn accept_or_residual(
    weights: &mut [f32],
    x: Option<usize>,
    u: f32,
    rng: &mut ChaCha12Rng,
) -> (Option<usize>, bool) {
    let Some(x) = x else {
        return (draw_weighted(weights, u), false);
    };
    let total = slice_sum(weights);
    if u * total < weights[x] {
        return (Some(x), true);
    }
    weights[x] = 0.0;
    (draw_weighted(weights, rng.random::<f32>()), false)
}

/// Elements in a block of [`draw_weighted`]'s scan, [`argmax`]'s search and of the part of a
/// nucleus [`nucleus_len`] sorts.
const BLOCK: usize = 256;
/// Independent partial sums (maxima) of the row reductions, so that they vectorise.
const LANES: usize = 16;

/// Sum of `weights` in [`LANES`] partial sums.
fn weight_sum(weights: impl Iterator<Item = f32>) -> f32 {
    let mut lanes = [0f32; LANES];
    for (j, w) in weights.enumerate() {
        lanes[j % LANES] += w;
    }
    lanes.iter().sum()
}

/// Sum of the weights that are at least `cutoff`, in [`LANES`] partial sums.
fn mass_at_least(weights: &[f32], cutoff: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = weights.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().filter(|&&w| w >= cutoff).sum();
    for c in chunks {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l += if w >= cutoff { w } else { 0.0 };
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Sum of a slice in [`LANES`] partial sums.
fn slice_sum(weights: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = weights.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l += w;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Draws an index with probability proportional to its weight, `u` uniform in [0, 1): the
/// first index whose cumulative weight passes `u` times the total (the last positive weight
/// on rounding). Block sums first, then one block scanned: the cumulative sum is a chain of
/// dependent adds, 4 cycles each, which over a whole vocabulary would dominate sampling.
/// `None` when no weight is positive.
fn draw_weighted(weights: &[f32], u: f32) -> Option<usize> {
    let total = slice_sum(weights);
    let target = u * total;
    let mut cumulative = 0.0f32;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let block_sum = slice_sum(block);
        if cumulative + block_sum > target {
            let mut running = cumulative;
            for (j, &w) in block.iter().enumerate() {
                running += w;
                if running > target && w > 0.0 {
                    return Some(b * BLOCK + j);
                }
            }
            // Rounding: the element-wise adds fell just short of the block's sum; go on.
        }
        cumulative += block_sum;
    }
    weights.iter().rposition(|&w| w > 0.0)
}

/// A candidate token as one integer that orders like (weight, then lower id): a positive
/// f32's bits order like its value, and the complemented id puts lower ids higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RankKey(u64);

impl RankKey {
    fn new(weight: f32, id: TokenId) -> Self {
        Self((u64::from(weight.to_bits()) << 32) | u64::from(!id))
    }

    fn weight(self) -> f32 {
        f32::from_bits((self.0 >> 32) as u32)
    }

    fn id(self) -> TokenId {
        !(self.0 as u32)
    }
}

/// Moves the nucleus of `candidates` to their front and returns its length: the fewest
/// highest-ranked candidates whose weights add up to `needed`. Repeated selection (expected
/// linear time) instead of sorting a whole vocabulary; the nucleus stays unordered, which a
/// draw does not need.
fn nucleus_len(candidates: &mut [RankKey], needed: f32) -> usize {
    let by_weight_desc = |a: &RankKey, b: &RankKey| b.cmp(a);
    // Invariant: candidates[..lo] are in the nucleus and precede everything after them in the
    // order; `need` is the weight the nucleus needs beyond theirs; it ends at or before `hi`.
    let (mut lo, mut hi, mut need) = (0, candidates.len(), needed);
    while hi - lo > BLOCK {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, by_weight_desc);
        let upper = weight_sum(candidates[lo..mid].iter().map(|c| c.weight()));
        if upper >= need {
            hi = mid;
        } else {
            need -= upper;
            lo = mid;
        }
    }
    let rest = &mut candidates[lo..hi];
    rest.sort_unstable_by(by_weight_desc);
    let mut mass = 0.0f32;
    for (j, c) in rest.iter().enumerate() {
        mass += c.weight();
        if mass >= need {
            return lo + j + 1;
        }
    }
    hi
}

/// The largest value, NaNs ignored; -inf when there is none.
fn row_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            // `v > l` is false for NaN: NaNs never win. (A select, so it vectorises.)
            *l = if v > *l { v } else { *l };
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Index of the largest value, the first one on ties; NaNs are never chosen unless everything is
/// NaN (then 0).
pub fn argmax(values: &[f32]) -> TokenId {
    let max = row_max(values);
    // The first block holding the maximum (a branch-free test per block), then its position.
    let index = values
        .chunks(BLOCK)
        .enumerate()
        .find(|(_, block)| block.iter().fold(false, |found, &v| found | (v == max)))
        .and_then(|(b, block)| Some(b * BLOCK + block.iter().position(|&v| v == max)?))
        .unwrap_or(0);
    index as TokenId
}

/// `log(sum(exp(x)))`, computed stably.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    max + sum.ln()
}

/// The `k` largest raw logits as `(token, logprob)`, most likely first (lower id first on ties).
fn top_k_logprobs(logits: &[f32], k: usize, log_normalizer: f32) -> Vec<(TokenId, f32)> {
    let k = k.min(logits.len());
    let mut top: Vec<(TokenId, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || (top.len() == k && l <= top[k - 1].1) {
            continue;
        }
        // Insertion keeps `top` sorted descending; ties keep the earlier (lower) id first.
        let position = top.iter().position(|&(_, v)| l > v).unwrap_or(top.len());
        top.insert(position, (i as TokenId, l));
        top.truncate(k);
    }
    for entry in &mut top {
        entry.1 -= log_normalizer;
    }
    top
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    /// Draws `draws` tokens from fresh copies of `logits` and counts each token.
    fn histogram(sampler: &mut ChoiceSampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut scratch = SamplerScratch::default();
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            let mut row = logits.to_vec();
            let (token, _) = sampler.sample(&mut row, &mut scratch);
            counts[token as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut sampler = ChoiceSampler::new(params(0.0), 7, &[]);
        let mut scratch = SamplerScratch::default();
        let mut row = vec![0.5, 2.0, -1.0, 2.0, 1.9];
        assert_eq!(sampler.sample(&mut row, &mut scratch).0, 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-3.0, -2.0, -2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut sampler = ChoiceSampler::new(params(1.0), seed, &[]);
            let mut scratch = SamplerScratch::default();
            (0..64)
                .map(|_| sampler.sample(&mut logits.clone(), &mut scratch).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits = [1.0, 3.0, 2.0, 0.0, 2.5];
        let mut p = params(1.0);
        p.top_k = NonZeroU32::new(2);
        let counts = histogram(&mut ChoiceSampler::new(p, 1, &[]), &logits, 400);
        assert_eq!(counts[0] + counts[2] + counts[3], 0, "{counts:?}");
        assert!(counts[1] > 0 && counts[4] > 0, "{counts:?}");
    }

    /// The nucleus of `logits` at `top_p` by the definition: sort everything, keep the
    /// smallest prefix reaching the mass (sums in f64).
    fn nucleus(logits: &[f32], top_p: f64) -> Vec<usize> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let needed = top_p * weights.iter().sum::<f64>();
        let mut mass = 0.0;
        let keep = order
            .iter()
            .position(|&i| {
                mass += weights[i];
                mass >= needed
            })
            .map_or(order.len(), |p| p + 1);
        order.truncate(keep);
        order
    }

    #[test]
    fn top_p_over_a_large_vocabulary_draws_only_from_the_nucleus() {
        // Peaked rows (the nucleus is a few tokens) and flat ones (thousands: the weight cutoff
        // has to come down several times before it holds the mass).
        let mut rng = ChaCha12Rng::seed_from_u64(7);
        for (case, spread) in [8.0f32, 2.0, 0.05, 0.0].into_iter().enumerate() {
            let logits: Vec<f32> = (0..50_000).map(|_| rng.random::<f32>() * spread).collect();
            for top_p in [0.5f32, 0.9, 0.99] {
                let inside = nucleus(&logits, f64::from(top_p));
                let mut allowed = vec![false; logits.len()];
                for &i in &inside {
                    allowed[i] = true;
                }
                let mut p = params(1.0);
                p.top_p = top_p;
                let mut sampler = ChoiceSampler::new(p, case as u64, &[]);
                let mut scratch = SamplerScratch::default();
                let mut drawn = std::collections::HashSet::new();
                for _ in 0..200 {
                    let token = sampler.sample(&mut logits.clone(), &mut scratch).0 as usize;
                    assert!(
                        allowed[token],
                        "spread {spread} top_p {top_p}: {token} is outside the nucleus of {}",
                        inside.len()
                    );
                    drawn.insert(token);
                }
                // Draws spread over the nucleus, not just its head.
                assert!(
                    drawn.len() >= inside.len().min(40),
                    "{} of {}",
                    drawn.len(),
                    inside.len()
                );
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_the_mass() {
        // Probabilities ~ [0.665, 0.245, 0.090]: top_p 0.8 keeps the first two.
        let logits = [2.0, 1.0, 0.0];
        let mut p = params(1.0);
        p.top_p = 0.8;
        let counts = histogram(&mut ChoiceSampler::new(p.clone(), 3, &[]), &logits, 500);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > counts[1] && counts[1] > 0, "{counts:?}");
        p.top_p = 0.5;
        let counts = histogram(&mut ChoiceSampler::new(p, 3, &[]), &logits, 100);
        assert_eq!(counts, vec![100, 0, 0]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_top() {
        // Relative weights: 1, e^-1 = 0.37, e^-3 = 0.05.
        let logits = [5.0, 4.0, 2.0];
        let mut p = params(1.0);
        p.min_p = 0.2;
        let counts = histogram(&mut ChoiceSampler::new(p.clone(), 5, &[]), &logits, 500);
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[1] > 0);
        // Through the rank path too (top_k set).
        p.top_k = NonZeroU32::new(3);
        let counts = histogram(&mut ChoiceSampler::new(p, 5, &[]), &logits, 500);
        assert_eq!(counts[2], 0, "{counts:?}");
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [1.0, 0.0];
        let cold = histogram(&mut ChoiceSampler::new(params(0.1), 9, &[]), &logits, 1000);
        let hot = histogram(&mut ChoiceSampler::new(params(10.0), 9, &[]), &logits, 1000);
        // At T=0.1 token 1 has probability e^-10; at T=10 it has ~0.475.
        assert!(cold[1] < 5, "{cold:?}");
        assert!(hot[1] > 350, "{hot:?}");
    }

    #[test]
    fn logit_bias_can_force_and_ban() {
        let mut p = params(0.0);
        p.logit_bias = vec![(2, 100.0), (99, 5.0)];
        let mut scratch = SamplerScratch::default();
        let mut sampler = ChoiceSampler::new(p.clone(), 0, &[]);
        assert_eq!(sampler.sample(&mut [3.0, 1.0, 0.0], &mut scratch).0, 2);
        p.logit_bias = vec![(0, -100.0)];
        p.temperature = 1.0;
        let counts = histogram(&mut ChoiceSampler::new(p, 0, &[]), &[3.0, 1.0, 0.0], 200);
        assert_eq!(counts[0], 0);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut p = params(0.0);
        p.repetition_penalty = 2.0;
        let sampler = ChoiceSampler::new(p, 0, &[0, 1]);
        let mut row = vec![4.0, -1.0, 3.0];
        sampler.apply_processors(&mut row, None);
        assert_eq!(row, vec![2.0, -2.0, 3.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_count_output_tokens_only() {
        let mut p = params(0.0);
        p.frequency_penalty = 0.5;
        p.presence_penalty = 1.0;
        let mut sampler = ChoiceSampler::new(p, 0, &[2]);
        sampler.record_output(0);
        sampler.record_output(0);
        sampler.record_output(1);
        let mut row = vec![5.0, 5.0, 5.0];
        sampler.apply_processors(&mut row, None);
        assert_eq!(row, vec![3.0, 3.5, 5.0]);
        let mut scratch = SamplerScratch::default();
        assert_eq!(sampler.sample(&mut [5.0, 5.0, 4.9], &mut scratch).0, 2);
    }

    #[test]
    fn logprobs_come_from_the_raw_logits() {
        let mut p = params(0.0);
        p.logprobs = Some(2);
        p.logit_bias = vec![(2, 10.0)];
        let mut sampler = ChoiceSampler::new(p, 0, &[]);
        let mut scratch = SamplerScratch::default();
        let raw = [2.0f32, 1.0, 0.0, 1.0];
        let (token, logprob) = sampler.sample(&mut raw.to_vec(), &mut scratch);
        assert_eq!(token, 2);
        let logprob = logprob.expect("logprobs requested");
        let lse = raw.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((logprob.logprob - (0.0 - lse)).abs() < 1e-5);
        assert_eq!(logprob.top.len(), 2);
        assert_eq!(logprob.top[0].0, 0);
        // Tie between ids 1 and 3: the lower id first.
        assert_eq!(logprob.top[1].0, 1);
        assert!((logprob.top[0].1 - (2.0 - lse)).abs() < 1e-5);
    }

    #[test]
    fn a_mask_runs_after_the_processors_and_leaves_logprobs_raw() {
        let mut p = params(0.0);
        p.logprobs = Some(1);
        p.logit_bias = vec![(0, 5.0)];
        let mut sampler = ChoiceSampler::new(p, 0, &[]);
        let mut scratch = SamplerScratch::default();
        let raw = [1.0f32, 3.0, 2.0];
        let mut row = raw.to_vec();
        // Bias makes 0 the argmax (6.0); the mask then removes 0 and 1: 2 is chosen.
        let (token, logprob) = sampler.sample_masked(&mut row, &mut scratch, |logits| {
            assert_eq!(logits[0], 6.0, "the bias was applied before the mask");
            logits[0] = f32::NEG_INFINITY;
            logits[1] = f32::NEG_INFINITY;
        });
        assert_eq!(token, 2);
        let lse = raw.iter().map(|l| l.exp()).sum::<f32>().ln();
        let logprob = logprob.expect("logprobs requested");
        assert!((logprob.logprob - (2.0 - lse)).abs() < 1e-5);
        assert_eq!(logprob.top[0].0, 1, "the top alternative is the raw one");
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // Probabilities ~ [0.09, 0.24, 0.67].
        let logits = [0.0, 1.0, 2.0];
        let counts = histogram(&mut ChoiceSampler::new(params(1.0), 11, &[]), &logits, 3000);
        assert!((150..400).contains(&counts[0]), "{counts:?}");
        assert!((550..900).contains(&counts[1]), "{counts:?}");
        assert!((1800..2250).contains(&counts[2]), "{counts:?}");
    }

    /// The exact distribution `sample` draws from for a row of 5 logits (temperature 0.8),
    /// with an optional top-k that leaves token 4 out.
    fn target(top_k: Option<u32>) -> Vec<f64> {
        let logits = [1.0f64, 2.0, 0.5, 1.5, -1.0];
        let mut w: Vec<f64> = logits.iter().map(|l| (l / 0.8).exp()).collect();
        if top_k == Some(4) {
            w[4] = 0.0;
        }
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    }

    /// Total variation distance between counts and a distribution.
    fn total_variation(counts: &[usize], p: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(p)
            .map(|(&c, &q)| (c as f64 / n as f64 - q).abs())
            .sum::<f64>()
            / 2.0
    }

    #[test]
    fn verified_drafts_keep_the_sampling_distribution() {
        // For every draft (one outside top-k included), the emitted token must follow p: the
        // rejection rule accepts x with p(x) and otherwise draws from p without x. 40k draws
        // of a 5-token distribution put the empirical TV distance near 0.005; a wrong residual
        // (drawing from p itself on rejection, say) moves it by more than 0.05.
        let logits = [1.0f32, 2.0, 0.5, 1.5, -1.0];
        for top_k in [None, Some(4)] {
            let p = target(top_k);
            for draft in 0..5u32 {
                let mut params = params(0.8);
                params.top_k = top_k.and_then(NonZeroU32::new);
                let mut sampler = ChoiceSampler::new(params, 1234 + u64::from(draft), &[]);
                let mut scratch = SamplerScratch::default();
                let (mut counts, mut accepted) = (vec![0usize; 5], 0usize);
                let draws = 40_000;
                for _ in 0..draws {
                    let mut row = logits.to_vec();
                    let (token, ok) = sampler.verify_draft(&mut row, draft, &mut scratch);
                    assert_eq!(ok, token == draft, "accepted means the draft is emitted");
                    counts[token as usize] += 1;
                    accepted += usize::from(ok);
                }
                let tv = total_variation(&counts, &p);
                assert!(
                    tv < 0.015,
                    "top_k {top_k:?} draft {draft}: TV {tv} {counts:?}"
                );
                // Acceptance happens with probability p(draft).
                let rate = accepted as f64 / draws as f64;
                let expected = p[draft as usize];
                assert!((rate - expected).abs() < 0.015, "{rate} vs {expected}");
            }
            // Plain sampling from the same sampler settings meets the same bound.
            let mut params = params(0.8);
            params.top_k = top_k.and_then(NonZeroU32::new);
            let counts = histogram(&mut ChoiceSampler::new(params, 99, &[]), &logits, 40_000);
            assert!(total_variation(&counts, &p) < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn greedy_verification_accepts_exactly_the_argmax() {
        let mut sampler = ChoiceSampler::new(params(0.0), 7, &[]);
        let mut scratch = SamplerScratch::default();
        let row = [0.5f32, 2.0, -1.0, 1.9];
        assert_eq!(
            sampler.verify_draft(&mut row.to_vec(), 1, &mut scratch),
            (1, true)
        );
        assert_eq!(
            sampler.verify_draft(&mut row.to_vec(), 3, &mut scratch),
            (1, false)
        );
        // Processing applies: a bias moves the argmax onto the draft.
        let mut p = params(0.0);
        p.logit_bias = vec![(3, 1.0)];
        let mut biased = ChoiceSampler::new(p, 7, &[]);
        assert_eq!(
            biased.verify_draft(&mut row.to_vec(), 3, &mut scratch),
            (3, true)
        );
    }
}
