//! Every family against an independent implementation: a tiny random checkpoint written by the
//! test (config.json + safetensors, seeded), run through our paged decoder as one flattened
//! batch of three sequences (a full prefill, a prefill split into two chunks across steps, and
//! a third prefill, then decode steps for all), against candle-transformers' own model of that
//! family run one sequence at a time with its contiguous KV cache.
//!
//! Tolerance: 1e-4 on log-softmax rows. Both sides compute in f32 from the same f32 weights;
//! the only differences are summation order (our attention's online softmax over blocks, our
//! fused norms) and rope tables built in f64 here and f32 there, each a few ulps on values of
//! order 1, so 1e-4 is two orders above that noise and far below any real mistake (a wrong
//! norm offset or rope base moves logits by tenths).
//!
//! Where candle is wrong we test the rule another way: candle-transformers' `gemma3.rs` lets a
//! windowed prefill see one key too many (`j + window < i` masks, so window + 1 keys), so the
//! Gemma 3 comparison keeps prompts within the window and exercises the window in decode,
//! where candle's rotating cache holds exactly `window` keys; a second test checks that our
//! windowed prefill past the window equals token-by-token decoding.

#[path = "model_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;

use candela_models::{load_model, Architecture, BatchInputs, Model, SeqChunk};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use support::{log_softmax_rows, max_abs_diff, new_cache, seeded_normal};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const HEAD_DIM: usize = 32;
const INTER: usize = 96;
const LAYERS: usize = 4;
const VOCAB: usize = 96;
const CONTEXT: usize = 128;
const BLOCK: usize = 4;
const TOLERANCE: f32 = 1e-4;
const GEMMA_KV_HEADS: usize = 1;

/// Which optional tensors a family's checkpoint holds.
struct Layout {
    kv_heads: usize,
    qk_norm: bool,
    sandwich: bool,
    /// Norm weights stored as `w` around 0 (Gemma's `1 + w`) rather than around 1.
    norm_around_zero: bool,
}

fn weights(layout: &Layout, seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rand = |shape: &[usize], scale: f64, shift: f64| {
        let n = shape.iter().product();
        Tensor::from_vec(seeded_normal(&mut rng, n), shape, &dev)
            .and_then(|t| t.affine(scale, shift))
            .expect("random tensor")
    };
    let norm_shift = if layout.norm_around_zero { 0.0 } else { 1.0 };
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        rand(&[VOCAB, HIDDEN], 1.0, 0.0),
    );
    w.insert("model.norm.weight".into(), rand(&[HIDDEN], 0.1, norm_shift));
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let s = 0.15;
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if layout.sandwich {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for norm in norms {
            w.insert(
                format!("{p}.{norm}.weight"),
                rand(&[HIDDEN], 0.1, norm_shift),
            );
        }
        if layout.qk_norm {
            for norm in ["q_norm", "k_norm"] {
                w.insert(
                    format!("{p}.self_attn.{norm}.weight"),
                    rand(&[HEAD_DIM], 0.1, norm_shift),
                );
            }
        }
        for (name, shape) in [
            ("self_attn.q_proj", [HEADS * HEAD_DIM, HIDDEN]),
            ("self_attn.k_proj", [layout.kv_heads * HEAD_DIM, HIDDEN]),
            ("self_attn.v_proj", [layout.kv_heads * HEAD_DIM, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HEADS * HEAD_DIM]),
            ("mlp.gate_proj", [INTER, HIDDEN]),
            ("mlp.up_proj", [INTER, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTER]),
        ] {
            w.insert(format!("{p}.{name}.weight"), rand(&shape, s, 0.0));
        }
    }
    w
}

fn write_checkpoint(dir: &Path, config: &serde_json::Value, weights: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).expect("safetensors");
}

/// A sequence of the test batch: its prompt, how its prefill is split, and the tokens fed
/// after it (teacher-forced, so both implementations see the same inputs).
struct Seq {
    prompt: Vec<u32>,
    /// Prefill chunk lengths, one per step.
    chunks: Vec<usize>,
    decode: Vec<u32>,
}

fn test_seqs(prompt_lens: [usize; 3]) -> Vec<Seq> {
    let tokens = |seed: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 7 + seed * 13 + 3) % VOCAB) as u32)
            .collect()
    };
    let [a, b, c] = prompt_lens;
    vec![
        Seq {
            prompt: tokens(1, a),
            chunks: vec![a],
            decode: tokens(4, 8),
        },
        Seq {
            prompt: tokens(2, b),
            chunks: vec![b / 2, b - b / 2],
            decode: tokens(5, 7),
        },
        Seq {
            prompt: tokens(3, c),
            chunks: vec![c],
            decode: tokens(6, 8),
        },
    ]
}

/// Log-softmax rows of every sampled position, per sequence (prefill end, then each decode),
/// from our decoder running all sequences in one flattened batch per step.
fn ours(model: &dyn Model, seqs: &[Seq]) -> Vec<Vec<Vec<f32>>> {
    let blocks_per_seq = CONTEXT / BLOCK;
    let mut kv = new_cache(model, blocks_per_seq * seqs.len(), BLOCK);
    // Each sequence's blocks in a scrambled order, to catch any assumption of contiguity.
    let tables: Vec<Vec<u32>> = (0..seqs.len())
        .map(|s| {
            (0..blocks_per_seq)
                .map(|j| (((j * 5) % blocks_per_seq) + s * blocks_per_seq) as u32)
                .collect()
        })
        .collect();
    // The whole token stream of each sequence and how it is cut into steps.
    let streams: Vec<Vec<u32>> = seqs
        .iter()
        .map(|s| s.prompt.iter().chain(&s.decode).copied().collect())
        .collect();
    let cuts: Vec<Vec<usize>> = seqs
        .iter()
        .map(|s| {
            s.chunks
                .iter()
                .copied()
                .chain(s.decode.iter().map(|_| 1))
                .collect()
        })
        .collect();
    let steps = cuts.iter().map(Vec::len).max().unwrap_or(0);
    let mut done = vec![0usize; seqs.len()];
    let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); seqs.len()];
    for step in 0..steps {
        let mut chunks = Vec::new();
        let mut owners = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            let Some(&len) = cuts[i].get(step) else {
                continue;
            };
            let start = done[i];
            // A chunk is sampled when it reaches the end of the prompt or is a decode token.
            let sample = start + len >= seq.prompt.len();
            chunks.push(SeqChunk {
                token_ids: &streams[i][start..start + len],
                tokens_cached: start,
                block_table: &tables[i],
                window_block_table: None,
                sample,
            });
            if sample {
                owners.push(i);
            }
        }
        let input = BatchInputs::from_seqs(&chunks, BLOCK, model.device()).expect("batch");
        let logits = model.forward(&input, &mut kv).expect("forward");
        for (row, owner) in log_softmax_rows(&logits)
            .expect("rows")
            .into_iter()
            .zip(&owners)
        {
            out[*owner].push(row);
        }
        for (i, len) in cuts
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, *c.get(step)?)))
        {
            done[i] += len;
        }
    }
    out
}

/// Compares our rows with the reference's, sequence by sequence, position by position.
fn assert_close(what: &str, ours: &[Vec<Vec<f32>>], reference: &[Vec<Vec<f32>>]) {
    assert_eq!(ours.len(), reference.len());
    for (s, (o, r)) in ours.iter().zip(reference).enumerate() {
        assert_eq!(o.len(), r.len(), "{what}: sequence {s} rows");
        assert!(o.len() > 1);
        for (p, (a, b)) in o.iter().zip(r).enumerate() {
            let d = max_abs_diff(a, b);
            assert!(
                d < TOLERANCE,
                "{what}: sequence {s}, row {p}: log-softmax differs by {d}"
            );
        }
    }
    // Not a degenerate model: rows differ from one another.
    assert!(
        max_abs_diff(&ours[0][0], &ours[0][1]) > 1e-2,
        "{what}: degenerate model"
    );
}

/// One candle-transformers model per sequence: prefill, then one decode call per token.
fn reference<M>(
    seqs: &[Seq],
    mut new_model: impl FnMut() -> M,
    forward: impl Fn(&mut M, &[u32], usize) -> Tensor,
) -> Vec<Vec<Vec<f32>>> {
    seqs.iter()
        .map(|seq| {
            let mut model = new_model();
            let mut rows = Vec::new();
            let last = |logits: Tensor| {
                let row = logits
                    .flatten_all()
                    .expect("flatten")
                    .unsqueeze(0)
                    .expect("row");
                log_softmax_rows(&row).expect("rows").remove(0)
            };
            rows.push(last(forward(&mut model, &seq.prompt, 0)));
            for (j, &token) in seq.decode.iter().enumerate() {
                rows.push(last(forward(&mut model, &[token], seq.prompt.len() + j)));
            }
            rows
        })
        .collect()
}

fn ids(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids")
}

fn var_builder(dir: &Path) -> candle_nn::VarBuilder<'static> {
    // SAFETY: the file was written by this test and is not modified while mapped.
    unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .expect("var builder")
}

#[test]
fn qwen3_matches_candle_transformers() {
    use candle_transformers::models::qwen3;
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout {
        kv_heads: 2,
        qk_norm: true,
        sandwich: false,
        norm_around_zero: false,
    };
    let mut w = weights(&layout, 0x9e3);
    w.insert(
        "lm_head.weight".into(),
        w["model.embed_tokens.weight"]
            .affine(0.5, 0.0)
            .expect("head"),
    );
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        // Not hidden / heads (16): Qwen3 states its head size.
        "head_dim": HEAD_DIM,
        "attention_bias": false,
        "num_key_value_heads": layout.kv_heads,
        "max_position_embeddings": CONTEXT,
        "sliding_window": null,
        "max_window_layers": LAYERS,
        "tie_word_embeddings": false,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    write_checkpoint(dir.path(), &config, &w);
    let loaded = load_model(dir.path().to_str().expect("utf-8"), &Device::Cpu).expect("loads");
    let c = loaded.config();
    assert_eq!(c.architecture, Architecture::Qwen3);
    assert!(c.switches.qk_norm && !c.attention_bias && c.head_dim == HEAD_DIM);
    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    let cfg: qwen3::Config = serde_json::from_value(config).expect("candle's config");
    let want = reference(
        &seqs,
        || qwen3::ModelForCausalLM::new(&cfg, var_builder(dir.path())).expect("candle's qwen3"),
        |m, tokens, offset| m.forward(&ids(tokens), offset).expect("forward"),
    );
    assert_close("qwen3", &got, &want);
}

fn gemma3_config(window: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "attention_bias": false,
        "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        // One KV head, as Gemma 3 270M and 1B have: candle's gemma3.rs appends a
        // non-contiguous v to its KV cache, which fails with more than one.
        "num_key_value_heads": GEMMA_KV_HEADS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "vocab_size": VOCAB,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": null,
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": window,
        // Layers 0 and 2 windowed, 1 and 3 global.
        "sliding_window_pattern": 2,
        "max_position_embeddings": CONTEXT,
        "bos_token_id": 2,
        "eos_token_id": 1
    })
}

fn gemma3_checkpoint(dir: &Path, window: usize) {
    let layout = Layout {
        kv_heads: GEMMA_KV_HEADS,
        qk_norm: true,
        sandwich: true,
        norm_around_zero: true,
    };
    write_checkpoint(dir, &gemma3_config(window), &weights(&layout, 0x6e3));
}

#[test]
fn gemma3_matches_candle_transformers() {
    use candle_transformers::models::gemma3;
    let dir = tempfile::tempdir().expect("tempdir");
    let window = 10;
    gemma3_checkpoint(dir.path(), window);
    let loaded = load_model(dir.path().to_str().expect("utf-8"), &Device::Cpu).expect("loads");
    let c = loaded.config();
    assert_eq!(c.architecture, Architecture::Gemma3);
    assert_eq!(c.layer_window(0), Some(window));
    assert_eq!(c.layer_window(1), None);
    assert_eq!(c.layer_rope_theta(0), 10_000.0);
    assert_eq!(c.layer_rope_theta(1), 1_000_000.0);
    // Prompts within the window (candle's windowed prefill is one key too wide), decodes far
    // past it (its rotating cache is exact there): 8 decode steps after a prompt of 10 reach
    // position 17, so local layers drop keys from position 8 on.
    let seqs = test_seqs([10, 9, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    let cfg: gemma3::Config =
        serde_json::from_value(gemma3_config(window)).expect("candle's config");
    let want = reference(
        &seqs,
        || gemma3::Model::new(false, &cfg, var_builder(dir.path())).expect("candle's gemma3"),
        |m, tokens, offset| m.forward(&ids(tokens), offset).expect("forward"),
    );
    assert_close("gemma3", &got, &want);
}

#[test]
fn gemma3_windowed_prefill_equals_token_by_token_decode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let window = 5;
    gemma3_checkpoint(dir.path(), window);
    let loaded = load_model(dir.path().to_str().expect("utf-8"), &Device::Cpu).expect("loads");
    let model = loaded.model.as_ref();
    let prompt: Vec<u32> = (0..23).map(|i| ((i * 11 + 5) % VOCAB) as u32).collect();
    // The last rows of a prefill of 23 tokens (3 chunks of the same sequence: 9, 9, 5)...
    let chunked = ours(
        model,
        &[Seq {
            prompt: prompt[..18].to_vec(),
            chunks: vec![9, 9],
            decode: prompt[18..].to_vec(),
        }],
    );
    // ...equal one token at a time from the start.
    let one_by_one = ours(
        model,
        &[Seq {
            prompt: prompt[..1].to_vec(),
            chunks: vec![1],
            decode: prompt[1..].to_vec(),
        }],
    );
    let tail = &one_by_one[0][one_by_one[0].len() - chunked[0].len()..];
    for (p, (a, b)) in chunked[0].iter().zip(tail).enumerate() {
        let d = max_abs_diff(a, b);
        assert!(d < TOLERANCE, "row {p}: {d}");
    }
    // And the window matters: the same model with a window wider than the prompt differs.
    let wide = tempfile::tempdir().expect("tempdir");
    gemma3_checkpoint(wide.path(), CONTEXT);
    let wide = load_model(wide.path().to_str().expect("utf-8"), &Device::Cpu).expect("loads");
    let unwindowed = ours(
        wide.model.as_ref(),
        &[Seq {
            prompt: prompt[..18].to_vec(),
            chunks: vec![9, 9],
            decode: prompt[18..].to_vec(),
        }],
    );
    let last = chunked[0].len() - 1;
    assert!(max_abs_diff(&chunked[0][last], &unwindowed[0][last]) > 1e-3);
}
