//! Greedy decoding of the default model against llama.cpp's output for the same file
//! (`testdata/reference/smollm2-greedy.jsonl`, see its README).
//!
//! Prompts are fed as the reference's token ids (no tokenizer involved), all 42 records
//! decoded together in one batch. Output ids must equal the reference's up to the first
//! near-tie, where two correct implementations of the same quantized model may part ways;
//! a reference that stops at EOS with no near-tie on the way must stop at the same place.
//!
//! Near-tie: top-1 and top-2 reference logprobs within 0.25 nats, not the README's 0.1.
//! Why: the 0.1-nat rule holds only for llama.cpp's exact default numerics. Activations are
//! rounded to 8 bits per block of 32 before every quantized matmul, so a change in the last
//! float bit anywhere upstream can flip a rounding step, and SmolLM2's outlier activations make
//! one flip worth tenths of a nat. `scripts/reference-agreement` measures it
//! (bench/results/reference-agreement.md): llama.cpp itself, on this file with flash attention
//! off and an f32 KV cache, leaves its own reference at 5 of 42 records (gaps up to 0.195 nats);
//! we leave it at 3 (q02-chat, q03-chat, a01-chat; gaps 0.119-0.208). With 0.25 all 42 agree,
//! with every CPU kernel (`CANDELA_CPU_KERNEL=avx512vnni|avx2|portable`).

#[path = "model_support/mod.rs"]
mod support;

use candela_models::load_model;
use candle_core::Device;
use serde_json::Value;
use support::{greedy, new_cache, Blocks, GreedySeq, DEFAULT_MODEL};

const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../testdata/reference/smollm2-greedy.jsonl"
);
const NEAR_TIE_NATS: f64 = 0.25;
const EOS: u32 = 2;

struct Record {
    id: String,
    prompt: Vec<u32>,
    output: Vec<u32>,
    finish_reason: String,
    /// Index of the first generated position whose top-2 logprobs are a near-tie.
    first_tie: Option<usize>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn parse(line: &str) -> Record {
    let v: Value = serde_json::from_str(line).expect("reference line is JSON");
    let output = ids(&v["output_token_ids"]);
    // `output_top_logprobs` may skip positions (incomplete UTF-8 pieces): align by id.
    let tops = v["output_top_logprobs"].as_array().expect("top logprobs");
    let mut first_tie = None;
    let mut j = 0;
    for (i, &tok) in output.iter().enumerate() {
        let Some(entry) = tops.get(j) else { break };
        if entry["id"].as_u64() != Some(tok as u64) {
            continue;
        }
        j += 1;
        let top = entry["top"].as_array().expect("top list");
        if top.len() >= 2 {
            let lp = |k: usize| top[k][1].as_f64().expect("logprob");
            if lp(0) - lp(1) < NEAR_TIE_NATS {
                first_tie = Some(i);
                break;
            }
        }
    }
    Record {
        id: v["id"].as_str().expect("id").to_string(),
        prompt: ids(&v["prompt_token_ids"]),
        output,
        finish_reason: v["finish_reason"].as_str().expect("finish").to_string(),
        first_tie,
    }
}

#[test]
fn greedy_matches_llama_cpp_reference() -> candela_models::Result<()> {
    let text = std::fs::read_to_string(REFERENCE).expect("reference file");
    let records: Vec<Record> = text.lines().filter(|l| !l.is_empty()).map(parse).collect();
    assert_eq!(records.len(), 42);

    let device = Device::Cpu;
    let loaded = load_model(DEFAULT_MODEL, &device)?;
    let model = loaded.model.as_ref();
    assert_eq!(model.config().eos_token_ids, vec![EOS]);

    // Generate only what can be compared: up to the first near-tie, else the whole output.
    let mut seqs: Vec<GreedySeq> = records
        .iter()
        .map(|r| GreedySeq::new(r.prompt.clone(), r.first_tie.unwrap_or(r.output.len())))
        .collect();
    let block_size = 16;
    let num_blocks = 512;
    let mut kv = new_cache(model, num_blocks, block_size);
    let mut blocks = Blocks::new(num_blocks, block_size);
    greedy(model, &mut kv, &mut blocks, &mut seqs, 512)?;

    let mut failures = Vec::new();
    let mut compared_tokens = 0;
    for (r, s) in records.iter().zip(&seqs) {
        let n = s.max_new;
        compared_tokens += n;
        if s.generated[..] != r.output[..n] {
            failures.push(format!(
                "{}: expected {:?}, got {:?} (first tie at {:?})",
                r.id,
                &r.output[..n],
                s.generated,
                r.first_tie
            ));
        }
        let stopped = s.generated.last() == Some(&EOS);
        if r.first_tie.is_none() && stopped != (r.finish_reason == "stop") {
            failures.push(format!(
                "{}: stopped at EOS: {stopped}, reference finish: {}",
                r.id, r.finish_reason
            ));
        }
    }
    eprintln!(
        "compared {compared_tokens} generated tokens over {} records ({} cut at a near-tie)",
        records.len(),
        records.iter().filter(|r| r.first_tie.is_some()).count()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
