//! `--quantize int8|int4` on the real model: the default GGUF exported as an f32 checkpoint
//! (its exact dequantized values), then loaded float and quantized, and compared on the 42
//! reference prompts.
//!
//! Two measures, both against the float model:
//! - greedy agreement: the quantized model's greedy output equals the float model's up to the
//!   float model's first near-tie (top-2 within 0.1 nats: past it, any rounding may choose);
//! - mean |delta logprob|: both models read the float model's greedy continuation (teacher
//!   forcing) and we average the absolute difference of the log-probability each gives the
//!   chosen token, over every generated position.
//!
//! `quality_table` (ignored by default; `scripts/quantize-quality`) measures every group size
//! and writes bench/results/quantize-quality.md, the table in the README.

#[path = "model_support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candela_models::tokenizer::Tokenizer;
use candela_models::{
    load_model_with, BatchInputs, LoadOptions, Model, QuantBits, Quantize, SeqChunk,
};
use candle_core::{Device, Tensor};
use serde_json::Value;
use support::{greedy, log_softmax_rows, new_cache, Blocks, GreedySeq, DEFAULT_MODEL};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/reference/smollm2-greedy.jsonl"
);
/// Tokens generated per prompt (the reference's max_tokens).
const MAX_NEW: usize = 48;
const NEAR_TIE_NATS: f32 = 0.1;
const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 512;

/// The exported float checkpoint, written once per build directory.
fn float_checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-135m-f32");
        candela_models::export::gguf_to_safetensors_once(Path::new(DEFAULT_MODEL), &dir)
            .expect("export the default model");
        dir
    })
}

struct Prompt {
    id: String,
    text: String,
    ids: Vec<u32>,
}

fn prompts() -> Vec<Prompt> {
    let text = std::fs::read_to_string(REFERENCE).expect("reference file");
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("JSON line");
            let ids = v["prompt_token_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|x| x.as_u64().expect("id") as u32)
                .collect();
            let text = match v["formatted_prompt"].as_str() {
                Some(s) => s.to_string(),
                None => v["prompt"].as_str().expect("prompt").to_string(),
            };
            Prompt {
                id: v["id"].as_str().expect("id").to_string(),
                text,
                ids,
            }
        })
        .collect()
}

fn load(dir: &Path, quantize: Option<Quantize>) -> Box<dyn Model> {
    let options = LoadOptions { quantize };
    let path = dir.to_str().expect("utf-8 path");
    load_model_with(path, &Device::Cpu, &options)
        .expect("load the checkpoint")
        .model
}

/// Greedy continuations of every prompt, all decoded in one batch.
fn greedy_all(model: &dyn Model, prompts: &[Prompt]) -> Vec<Vec<u32>> {
    let mut seqs: Vec<GreedySeq> = prompts
        .iter()
        .map(|p| GreedySeq::new(p.ids.clone(), MAX_NEW))
        .collect();
    let mut kv = new_cache(model, NUM_BLOCKS, BLOCK_SIZE);
    let mut blocks = Blocks::new(NUM_BLOCKS, BLOCK_SIZE);
    greedy(model, &mut kv, &mut blocks, &mut seqs, 512).expect("greedy");
    seqs.into_iter().map(|s| s.generated).collect()
}

/// Per generated position of `output`: the log-softmax row that predicted it, read by one
/// prefill of `prompt + output` (teacher forcing).
fn forced_logprobs(model: &dyn Model, prompt: &[u32], output: &[u32]) -> Vec<Vec<f32>> {
    let tokens: Vec<u32> = prompt.iter().chain(output).copied().collect();
    let table: Vec<u32> = (0..tokens.len().div_ceil(BLOCK_SIZE) as u32).collect();
    let chunk = SeqChunk {
        token_ids: &tokens,
        tokens_cached: 0,
        block_table: &table,
        window_block_table: None,
        sample: true,
        extra_logit_rows: 0,
    };
    let mut input = BatchInputs::from_seqs(&[chunk], BLOCK_SIZE, model.device()).expect("batch");
    // Row p - 1 predicts token p: the rows that predicted each generated token.
    let rows: Vec<u32> = (0..output.len())
        .map(|t| (prompt.len() - 1 + t) as u32)
        .collect();
    input.sample_rows = Tensor::new(rows.as_slice(), model.device()).expect("rows");
    let mut kv = new_cache(model, NUM_BLOCKS, BLOCK_SIZE);
    let logits = model.forward(&input, &mut kv).expect("forward");
    log_softmax_rows(&logits).expect("log-softmax")
}

/// The float model's view of each prompt: its greedy output, the log-probability of each
/// chosen token and the index of its first near-tie.
struct Baseline {
    outputs: Vec<Vec<u32>>,
    chosen_lp: Vec<Vec<f32>>,
    first_tie: Vec<usize>,
}

fn baseline(float: &dyn Model, prompts: &[Prompt]) -> Baseline {
    let outputs = greedy_all(float, prompts);
    let mut chosen_lp = Vec::new();
    let mut first_tie = Vec::new();
    for (p, out) in prompts.iter().zip(&outputs) {
        let rows = forced_logprobs(float, &p.ids, out);
        let mut tie = out.len();
        let mut lps = Vec::new();
        for (t, (row, &tok)) in rows.iter().zip(out).enumerate() {
            let mut sorted = row.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if tie == out.len() && sorted[0] - sorted[1] < NEAR_TIE_NATS {
                tie = t;
            }
            lps.push(row[tok as usize]);
        }
        chosen_lp.push(lps);
        first_tie.push(tie);
    }
    Baseline {
        outputs,
        chosen_lp,
        first_tie,
    }
}

struct Quality {
    agree: usize,
    records: usize,
    mean_abs_dlogprob: f64,
}

fn quality(model: &dyn Model, prompts: &[Prompt], base: &Baseline) -> Quality {
    let outputs = greedy_all(model, prompts);
    let mut agree = 0;
    let (mut sum, mut count) = (0f64, 0usize);
    for (i, p) in prompts.iter().enumerate() {
        let n = base.first_tie[i];
        if outputs[i].get(..n) == base.outputs[i].get(..n) {
            agree += 1;
        }
        let rows = forced_logprobs(model, &p.ids, &base.outputs[i]);
        for ((row, &tok), &lp) in rows.iter().zip(&base.outputs[i]).zip(&base.chosen_lp[i]) {
            sum += f64::from((row[tok as usize] - lp).abs());
            count += 1;
        }
    }
    Quality {
        agree,
        records: prompts.len(),
        mean_abs_dlogprob: sum / count.max(1) as f64,
    }
}

fn q(bits: QuantBits, group_size: usize) -> Option<Quantize> {
    Some(Quantize::new(bits, group_size).expect("group size"))
}

#[test]
fn the_exported_checkpoint_tokenizes_like_the_gguf() {
    let dir = float_checkpoint();
    let tokenizer = Tokenizer::from_file(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )
    .expect("exported tokenizer");
    for p in prompts() {
        let ids = tokenizer.encode(&p.text, false).expect("encode");
        assert_eq!(ids, p.ids, "{}", p.id);
    }
    assert_eq!(tokenizer.eos_token().map(|t| t.id), Some(2));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("config"),
    )
    .expect("JSON");
    assert!(config["chat_template"]
        .as_str()
        .is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn int8_and_int4_stay_close_to_the_float_model() {
    let dir = float_checkpoint();
    let prompts = prompts();
    let float = load(dir, None);
    let base = baseline(float.as_ref(), &prompts);
    drop(float);
    // Measured (bench/results/quantize-quality.md): int8 g32 agrees on 39/42 with a mean
    // |delta logprob| of 0.032 nats; int4 g32 on 39/42 at 0.028 (the float weights lie on
    // Q4_1's grid, which int4 g32 finds again). The floor is the 8-bit rounding of the
    // activations, not the weights: the GGUF itself, repacked losslessly, gives 37/42 and
    // 0.032. The bounds leave room for another CPU's kernel while failing on a broken packing
    // (several nats, almost no agreement).
    for (quantize, min_agree, max_dlp) in [
        (q(QuantBits::Int8, 32), 34, 0.06),
        (q(QuantBits::Int4, 32), 34, 0.06),
    ] {
        let model = load(dir, quantize);
        let got = quality(model.as_ref(), &prompts, &base);
        eprintln!(
            "{quantize:?}: {}/{} agree, mean |delta logprob| {:.4}",
            got.agree, got.records, got.mean_abs_dlogprob
        );
        assert!(got.agree >= min_agree, "{quantize:?}: {} agree", got.agree);
        assert!(
            got.mean_abs_dlogprob < max_dlp,
            "{quantize:?}: {}",
            got.mean_abs_dlogprob
        );
    }
}

/// Every `--quantize` setting, and the default GGUF itself, against the float model; writes
/// bench/results/quantize-quality.md (`scripts/quantize-quality`).
#[test]
#[ignore = "about two minutes; run by scripts/quantize-quality"]
fn quality_table() {
    let dir = float_checkpoint();
    let prompts = prompts();
    let float = load(dir, None);
    let base = baseline(float.as_ref(), &prompts);
    drop(float);
    let mut rows = Vec::new();
    let gguf = load(Path::new(DEFAULT_MODEL), None);
    rows.push((
        "the Q4_1 GGUF itself (repacked losslessly)".to_string(),
        quality(gguf.as_ref(), &prompts, &base),
    ));
    drop(gguf);
    for bits in [QuantBits::Int8, QuantBits::Int4] {
        for group_size in Quantize::GROUP_SIZES {
            let model = load(dir, q(bits, group_size));
            let name =
                format!("--quantize {bits:?} --quant-group-size {group_size}").to_lowercase();
            rows.push((name, quality(model.as_ref(), &prompts, &base)));
        }
    }
    let mut md = String::from(
        "# `--quantize` quality against the float model\n\n\
         Produced by `scripts/quantize-quality` (crates/candela-models/tests/quantize.rs, \
         `quality_table`). The float model is the default GGUF (SmolLM2-135M-Instruct Q4_1) \
         dequantized to an f32 checkpoint by `candela_models::export`, so its weights already lie \
         on Q4_1's grid: int4 with groups of 32 finds that grid again almost exactly, and the \
         larger groups show what 4 bits cost. Embeddings, norms and the tied LM head stay f32. \
         SmolLM2's k = 576 is not a multiple of 128, so `--quant-group-size 128` uses 64 for the \
         layers whose input is the hidden state and 128 for the MLP down projection (k = 1536).\n\n\
         Greedy agreement: the output equals the float model's up to its first near-tie (top-2 \
         within 0.1 nats), 48 tokens, 42 reference prompts. Mean |delta logprob|: both models read \
         the float model's greedy output; the mean absolute difference of the log-probability \
         of each chosen token.\n\n\
         | weights | greedy agreement | mean abs delta logprob (nats) |\n|---|---:|---:|\n",
    );
    for (name, r) in &rows {
        md.push_str(&format!(
            "| {name} | {}/{} | {:.4} |\n",
            r.agree, r.records, r.mean_abs_dlogprob
        ));
    }
    print!("{md}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/results/quantize-quality.md");
    std::fs::write(&out, md).expect("write the table");
}
