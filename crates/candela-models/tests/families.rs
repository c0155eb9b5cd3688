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
//! windowed prefill past the window equals token-by-token decoding. Its `mistral.rs` has the
//! same one-key-too-many mask and applies it only within one forward call, so Mistral is
//! compared against it with `window - 1`, recomputing each sequence from its start at every
//! step. Its `phi3.rs` gets partial rotation right but not LongRoPE (it multiplies by the
//! factors, switches sets by position, and has no attention factor), so LongRoPE is compared
//! on an equivalent model that undoes each difference (see that test), and the LongRoPE
//! formulas themselves are checked by hand in `config.rs`'s unit tests. Its `qwen2.rs` masks
//! prefill with `sliding_window` even when `use_sliding_window` is off, so Qwen2 is given a
//! window as long as the context.

#[path = "model_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::Path;

use candela_models::{load_model, Architecture, BatchInputs, Error, LoadedModel, Model, SeqChunk};
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
/// Head size of the families whose config.json states none (Qwen2, Llama): candle's models
/// derive it as hidden / heads, as transformers and our loader do.
const DERIVED_HEAD_DIM: usize = HIDDEN / HEADS;

/// Which optional tensors a family's checkpoint holds.
struct Layout {
    kv_heads: usize,
    /// Size of a head (Phi-3's is hidden / heads, as candle's phi3.rs derives it).
    head_dim: usize,
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
                    rand(&[layout.head_dim], 0.1, norm_shift),
                );
            }
        }
        for (name, shape) in [
            ("self_attn.q_proj", [HEADS * layout.head_dim, HIDDEN]),
            (
                "self_attn.k_proj",
                [layout.kv_heads * layout.head_dim, HIDDEN],
            ),
            (
                "self_attn.v_proj",
                [layout.kv_heads * layout.head_dim, HIDDEN],
            ),
            ("self_attn.o_proj", [HIDDEN, HEADS * layout.head_dim]),
            ("mlp.gate_proj", [INTER, HIDDEN]),
            ("mlp.up_proj", [INTER, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTER]),
        ] {
            w.insert(format!("{p}.{name}.weight"), rand(&shape, s, 0.0));
        }
    }
    w
}

/// Loads the checkpoint in `dir` on the CPU.
fn load_dir(dir: &Path) -> LoadedModel {
    load_model(dir.to_str().expect("utf-8"), &Device::Cpu).expect("loads")
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
                extra_logit_rows: 0,
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
        head_dim: HEAD_DIM,
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
    let loaded = load_dir(dir.path());
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

#[test]
fn qwen2_matches_candle_transformers() {
    use candle_transformers::models::qwen2;
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout {
        kv_heads: 2,
        head_dim: DERIVED_HEAD_DIM,
        qk_norm: false,
        sandwich: false,
        norm_around_zero: false,
    };
    let mut w = weights(&layout, 0x9e2);
    // Biases of the order of the projections' outputs, so that dropping one shows.
    let mut rng = StdRng::seed_from_u64(0x9e2b);
    for i in 0..LAYERS {
        for (proj, heads) in [
            ("q_proj", HEADS),
            ("k_proj", layout.kv_heads),
            ("v_proj", layout.kv_heads),
        ] {
            let len = heads * layout.head_dim;
            let bias = Tensor::from_vec(seeded_normal(&mut rng, len), len, &Device::Cpu)
                .and_then(|t| t.affine(0.5, 0.0))
                .expect("bias");
            w.insert(format!("model.layers.{i}.self_attn.{proj}.bias"), bias);
        }
    }
    // No `lm_head.weight`: the head is tied to the embedding, as in Qwen2.5 0.5B to 3B.
    let config = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": layout.kv_heads,
        "max_position_embeddings": CONTEXT,
        // candle's qwen2.rs masks every prefill with `sliding_window` whether or not
        // `use_sliding_window` is set (transformers ignores it then, as we do): the whole
        // context makes its mask the causal one.
        "sliding_window": CONTEXT,
        "max_window_layers": LAYERS,
        "use_sliding_window": false,
        "tie_word_embeddings": true,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    write_checkpoint(dir.path(), &config, &w);
    let loaded = load_dir(dir.path());
    let c = loaded.config();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.attention_bias && c.head_dim == DERIVED_HEAD_DIM);
    assert_eq!(c.layer_window(0), None);
    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    let cfg: qwen2::Config = serde_json::from_value(config).expect("candle's config");
    let want = reference(
        &seqs,
        || qwen2::ModelForCausalLM::new(&cfg, var_builder(dir.path())).expect("candle's qwen2"),
        |m, tokens, offset| m.forward(&ids(tokens), offset).expect("forward"),
    );
    assert_close("qwen2", &got, &want);
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
        head_dim: HEAD_DIM,
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
    let loaded = load_dir(dir.path());
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
    let loaded = load_dir(dir.path());
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
    let wide = load_dir(wide.path());
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

#[test]
fn mistral_matches_candle_transformers() {
    use candle_transformers::models::mistral;
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = Layout {
        kv_heads: 2,
        head_dim: HEAD_DIM,
        qk_norm: false,
        sandwich: false,
        norm_around_zero: false,
    };
    let mut w = weights(&layout, 0x3157);
    w.insert(
        "lm_head.weight".into(),
        w["model.embed_tokens.weight"]
            .affine(0.5, 0.0)
            .expect("head"),
    );
    // Every prompt (9, 13, 6) is longer than the window, so prefill and decode both drop keys.
    let window = 5;
    let config = |window: Option<usize>| {
        serde_json::json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": layout.kv_heads,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "max_position_embeddings": CONTEXT,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000.0,
            "sliding_window": window,
            "tie_word_embeddings": false,
            "bos_token_id": 1,
            "eos_token_id": 2
        })
    };
    write_checkpoint(dir.path(), &config(Some(window)), &w);
    let loaded = load_dir(dir.path());
    let c = loaded.config();
    assert_eq!(c.architecture, Architecture::Mistral);
    assert!((0..LAYERS).all(|i| c.layer_window(i) == Some(window)));
    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);

    // candle's mistral.rs differs from transformers and llama.cpp in two ways, so it is run
    // where it agrees with them: its mask hides key j from query i iff `j + window < i`, so
    // it shows `window + 1` keys (transformers and we show `window`: `i - j < window`), and
    // only within one forward call (a decode step, or a prefill after cached tokens, sees
    // every cached key). So it gets `window - 1` and recomputes each sequence from its first
    // token at every step, with no cache.
    let cfg: mistral::Config =
        serde_json::from_value(config(Some(window - 1))).expect("candle's config");
    let want = reference(
        &seqs,
        || {
            let model =
                mistral::Model::new(&cfg, var_builder(dir.path())).expect("candle's mistral");
            (model, Vec::new())
        },
        |(model, history): &mut (mistral::Model, Vec<u32>), tokens, _offset| {
            history.extend_from_slice(tokens);
            model.clear_kv_cache();
            model.forward(&ids(history), 0).expect("forward")
        },
    );
    assert_close("mistral", &got, &want);

    // And the window matters: without it the last rows differ.
    let wide = tempfile::tempdir().expect("tempdir");
    write_checkpoint(wide.path(), &config(None), &w);
    let wide = load_dir(wide.path());
    assert_eq!(wide.config().layer_window(0), None);
    let unwindowed = ours(wide.model.as_ref(), &seqs);
    let last = got[1].len() - 1;
    assert!(max_abs_diff(&got[1][last], &unwindowed[1][last]) > 1e-3);
}

/// Llama 3.1's rope scaling with its own factors (8, 1, 4) and base (500000), the pre-training
/// length scaled down with the head: the 8 wavelengths of a 16-dimension head are
/// 2π·500000^(i/8) ≈ 6.3, 32, 167, 862, ...; an original length of 64 puts the thresholds at
/// 64 / 4 = 16 and 64 / 1 = 64, so the first pair is kept, the second is blended and the
/// other six are divided by the factor: every branch of the formula is taken.
const LLAMA3_FACTOR: f64 = 8.0;
const LLAMA3_ORIGINAL_CONTEXT: usize = CONTEXT / 2;

/// A Llama 3.1-shaped config.json with `rope_scaling` as given.
fn llama_config(rope_scaling: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500_000.0,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": [2, 3]
    })
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    use candle_transformers::models::llama;
    let layout = Layout {
        kv_heads: 2,
        head_dim: DERIVED_HEAD_DIM,
        qk_norm: false,
        sandwich: false,
        norm_around_zero: false,
    };
    let mut w = weights(&layout, 0x113);
    w.insert(
        "lm_head.weight".into(),
        w["model.embed_tokens.weight"]
            .affine(0.5, 0.0)
            .expect("head"),
    );
    let config = llama_config(serde_json::json!({
        "rope_type": "llama3",
        "factor": LLAMA3_FACTOR,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(dir.path(), &config, &w);
    let loaded = load_dir(dir.path());
    assert_eq!(loaded.config().architecture, Architecture::Llama);
    let plain_dir = tempfile::tempdir().expect("tempdir");
    write_checkpoint(plain_dir.path(), &llama_config(serde_json::Value::Null), &w);
    let plain = load_dir(plain_dir.path());

    // The three branches, on the frequencies themselves.
    let scaled = loaded.config().rope_inv_freqs();
    let unscaled = plain.config().rope_inv_freqs();
    assert_eq!(scaled.len(), DERIVED_HEAD_DIM / 2);
    assert_eq!(scaled[0], unscaled[0], "short wavelength kept");
    assert!(
        unscaled[1] / LLAMA3_FACTOR < scaled[1] && scaled[1] < unscaled[1],
        "blended"
    );
    for (s, u) in scaled.iter().zip(&unscaled).skip(2) {
        assert_eq!(*s, u / LLAMA3_FACTOR, "long wavelength divided");
    }

    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    // candle's llama.rs returns the last position's logits only, which is what `reference`
    // samples: the prompt's last row after a prefill, then each decode step's row.
    let cfg = serde_json::from_value::<llama::LlamaConfig>(config)
        .expect("candle's config")
        .into_config(false);
    let want = reference(
        &seqs,
        || {
            let model = llama::Llama::load(var_builder(dir.path()), &cfg).expect("candle's llama");
            let cache =
                llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu).expect("candle's cache");
            (model, cache)
        },
        |(model, cache): &mut (llama::Llama, llama::Cache), tokens, offset| {
            model.forward(&ids(tokens), offset, cache).expect("forward")
        },
    );
    // The module's tolerance holds: candle scales the frequencies in f32 where we do in f64,
    // a relative error of about 1e-7 that moves angles by about 1e-6 at these positions.
    assert_close("llama3 rope scaling", &got, &want);

    // And the scaling matters: without it each sequence's last row moves by tenths at least,
    // three orders above the tolerance (by 4 to 5 with these weights: the blended pair alone
    // turns by about 2 radians at position 20).
    let unscaled_rows = ours(plain.model.as_ref(), &seqs);
    for (s, (a, b)) in got.iter().zip(&unscaled_rows).enumerate() {
        let last = a.len() - 1;
        let d = max_abs_diff(&a[last], &b[last]);
        assert!(
            d > 0.1,
            "sequence {s}: rope scaling changes the last row by only {d}"
        );
    }
}

/// Phi-3's test shape: candle's phi3.rs derives the head size as hidden / heads.
const PHI3_HEAD_DIM: usize = HIDDEN / HEADS;
const PHI3_KV_HEADS: usize = 2;
/// 12 of 16 dimensions rotated (Phi-4-mini rotates 0.75 of its heads too).
const PHI3_PARTIAL_ROTARY: f64 = 0.75;
const PHI3_ROTARY_DIM: usize = 12;
/// A window shorter than every prompt, which Phi-3 must not apply (see `families/phi3.rs`).
const PHI3_SLIDING_WINDOW: usize = 5;
/// LongRoPE's pre-training length: a quarter of `CONTEXT`, so the long factors apply.
const PHI3_ORIGINAL_CONTEXT: usize = CONTEXT / 4;

/// A Phi-3 config.json; `rope_scaling` and `original_max_position_embeddings` as given.
fn phi3_config(rope_scaling: serde_json::Value, original: Option<usize>) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": PHI3_KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT,
        "original_max_position_embeddings": original,
        "partial_rotary_factor": PHI3_PARTIAL_ROTARY,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10_000.0,
        "rope_scaling": rope_scaling,
        "sliding_window": PHI3_SLIDING_WINDOW,
        "tie_word_embeddings": false,
        "bos_token_id": 1,
        "eos_token_id": 2
    })
}

/// The LongRoPE factors of the tests, one per rotated pair: (short, long).
fn phi3_rope_factors() -> (Vec<f32>, Vec<f32>) {
    let pairs = PHI3_ROTARY_DIM / 2;
    let short = (0..pairs).map(|i| 1.0 + i as f32 / 4.0).collect();
    let long = (0..pairs).map(|i| 1.5 + (i * i) as f32).collect();
    (short, long)
}

/// Random Phi-3 weights: llama's, with q/k/v and gate/up fused as Phi-3 stores them.
fn phi3_weights(seed: u64) -> HashMap<String, Tensor> {
    let layout = Layout {
        kv_heads: PHI3_KV_HEADS,
        head_dim: PHI3_HEAD_DIM,
        qk_norm: false,
        sandwich: false,
        norm_around_zero: false,
    };
    let mut w = weights(&layout, seed);
    w.insert(
        "lm_head.weight".into(),
        w["model.embed_tokens.weight"]
            .affine(0.5, 0.0)
            .expect("head"),
    );
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let mut fuse = |parts: &[&str], fused: &str| {
            let parts: Vec<Tensor> = parts
                .iter()
                .map(|name| w.remove(&format!("{p}.{name}.weight")).expect("part"))
                .collect();
            let t = Tensor::cat(&parts, 0).expect("fuse");
            w.insert(format!("{p}.{fused}.weight"), t);
        };
        fuse(
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "self_attn.qkv_proj",
        );
        fuse(&["mlp.gate_proj", "mlp.up_proj"], "mlp.gate_up_proj");
    }
    w
}

/// Builds candle-transformers' Phi-3 over the checkpoint in `dir`, for [`reference`].
fn candle_phi3(
    dir: &Path,
    config: serde_json::Value,
) -> impl FnMut() -> candle_transformers::models::phi3::Model + '_ {
    use candle_transformers::models::phi3;
    let cfg: phi3::Config = serde_json::from_value(config).expect("candle's config");
    move || phi3::Model::new(&cfg, var_builder(dir)).expect("candle's phi3")
}

#[test]
fn phi3_matches_candle_transformers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = phi3_config(serde_json::Value::Null, None);
    write_checkpoint(dir.path(), &config, &phi3_weights(0x9431));
    let loaded = load_dir(dir.path());
    let c = loaded.config();
    assert_eq!(c.architecture, Architecture::Phi3);
    assert!(c.switches.fused_qkv && c.switches.fused_gate_up);
    assert_eq!(c.rotary_dim(), PHI3_ROTARY_DIM);
    assert_eq!(
        c.layer_window(0),
        None,
        "Phi-3's sliding_window is not applied"
    );
    // Prompts longer than the config's sliding window: candle attends to all of them too.
    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    let want = reference(
        &seqs,
        candle_phi3(dir.path(), config),
        |m, tokens, offset| m.forward(&ids(tokens), offset).expect("forward"),
    );
    assert_close("phi3", &got, &want);
}

/// Writes the LongRoPE Phi-3 checkpoint (seeded weights `seed`) to `dir`; returns its weights.
fn phi3_longrope_checkpoint(dir: &Path, seed: u64) -> HashMap<String, Tensor> {
    let (short, long) = phi3_rope_factors();
    let config = phi3_config(
        serde_json::json!({ "type": "longrope", "short_factor": short, "long_factor": long }),
        Some(PHI3_ORIGINAL_CONTEXT),
    );
    let w = phi3_weights(seed);
    write_checkpoint(dir, &config, &w);
    w
}

/// LongRoPE against candle-transformers' phi3.rs, on an equivalent model: candle's LongRoPE
/// differs from transformers' (and ours) in three ways, each undone by what it is given.
/// 1. It multiplies the inverse frequencies by the factors where transformers divides: it
///    gets the reciprocals of our long factors.
/// 2. It rotates positions below `original_max_position_embeddings` with the short factors
///    and those above with the long ones: it gets no original length, so it uses the factors
///    it has (our long ones) everywhere, as we do for a context longer than the original.
/// 3. It has no attention factor (transformers multiplies cos and sin by
///    `sqrt(1 + ln(s) / ln(original))`): its checkpoint has the rotated rows of q and k
///    multiplied by it instead, which is the same since rope is linear.
#[test]
fn phi3_longrope_matches_candle_transformers_on_an_equivalent_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = phi3_longrope_checkpoint(dir.path(), 0x10e6);
    let (_, long) = phi3_rope_factors();
    let loaded = load_dir(dir.path());
    let c = loaded.config();
    let scale = CONTEXT as f64 / PHI3_ORIGINAL_CONTEXT as f64;
    let factor = (1.0 + scale.ln() / (PHI3_ORIGINAL_CONTEXT as f64).ln()).sqrt();
    assert!((c.rope_attention_factor() - factor).abs() < 1e-12);

    let reciprocal: Vec<f32> = long.iter().map(|f| 1.0 / f).collect();
    let candle_config = phi3_config(
        serde_json::json!({ "type": "longrope", "short_factor": reciprocal, "long_factor": long }),
        None,
    );
    let scaled_dir = tempfile::tempdir().expect("tempdir");
    let mut scaled = w.clone();
    let q_rows = HEADS * PHI3_HEAD_DIM;
    let k_rows = PHI3_KV_HEADS * PHI3_HEAD_DIM;
    let row_scale: Vec<f32> = (0..q_rows + 2 * k_rows)
        .map(|row| {
            let rotated = row < q_rows + k_rows && row % PHI3_HEAD_DIM < PHI3_ROTARY_DIM;
            if rotated {
                factor as f32
            } else {
                1.0
            }
        })
        .collect();
    let row_scale =
        Tensor::from_vec(row_scale, (q_rows + 2 * k_rows, 1), &Device::Cpu).expect("row scale");
    for i in 0..LAYERS {
        let name = format!("model.layers.{i}.self_attn.qkv_proj.weight");
        let t = scaled[&name].broadcast_mul(&row_scale).expect("scale rows");
        scaled.insert(name, t);
    }
    write_checkpoint(scaled_dir.path(), &candle_config, &scaled);

    let seqs = test_seqs([9, 13, 6]);
    let got = ours(loaded.model.as_ref(), &seqs);
    let want = reference(
        &seqs,
        candle_phi3(scaled_dir.path(), candle_config),
        |m, tokens, offset| m.forward(&ids(tokens), offset).expect("forward"),
    );
    assert_close("phi3 longrope", &got, &want);

    // The factors matter: the same weights without LongRoPE give other logits.
    let plain = tempfile::tempdir().expect("tempdir");
    write_checkpoint(
        plain.path(),
        &phi3_config(serde_json::Value::Null, None),
        &w,
    );
    let plain = load_dir(plain.path());
    let plain = ours(plain.model.as_ref(), &seqs);
    assert!(max_abs_diff(&got[0][1], &plain[0][1]) > 1e-3);
}

/// llama.cpp's GGUF form of the LongRoPE checkpoint: `attn_qkv` (or split q/k/v), `ffn_up`
/// holding gate and up, the factors as `rope_factors_{long,short}.weight` and the lengths in
/// the metadata. Both must compute what the safetensors checkpoint computes.
#[test]
fn phi3_gguf_matches_its_safetensors_checkpoint() {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};

    let dir = tempfile::tempdir().expect("tempdir");
    let w = phi3_longrope_checkpoint(dir.path(), 0x99f);
    let (short, long) = phi3_rope_factors();
    let st = load_dir(dir.path());
    let seqs = test_seqs([9, 13, 6]);
    let want = ours(st.model.as_ref(), &seqs);

    let u = |x: usize| Value::U32(x as u32);
    let a = "phi3";
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.embedding_length"), u(HIDDEN)),
        (format!("{a}.feed_forward_length"), u(INTER)),
        (format!("{a}.block_count"), u(LAYERS)),
        (format!("{a}.attention.head_count"), u(HEADS)),
        (format!("{a}.attention.head_count_kv"), u(PHI3_KV_HEADS)),
        (format!("{a}.context_length"), u(CONTEXT)),
        (format!("{a}.rope.dimension_count"), u(PHI3_ROTARY_DIM)),
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{a}.rope.scaling.original_context_length"),
            u(PHI3_ORIGINAL_CONTEXT),
        ),
        (
            format!("{a}.attention.sliding_window"),
            u(PHI3_SLIDING_WINDOW),
        ),
        // What llama.cpp's converter writes: transformers' default attention factor.
        (
            format!("{a}.rope.scaling.attn_factor"),
            Value::F32(st.config().rope_attention_factor() as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
    ];
    let gguf_name = |hf: &str| -> String {
        match hf {
            "model.embed_tokens.weight" => return "token_embd.weight".into(),
            "model.norm.weight" => return "output_norm.weight".into(),
            "lm_head.weight" => return "output.weight".into(),
            _ => {}
        }
        let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
        let (layer, role) = rest.split_once('.').expect("layer index");
        let role = match role {
            "input_layernorm.weight" => "attn_norm",
            "post_attention_layernorm.weight" => "ffn_norm",
            "self_attn.qkv_proj.weight" => "attn_qkv",
            "self_attn.o_proj.weight" => "attn_output",
            "mlp.gate_up_proj.weight" => "ffn_up",
            "mlp.down_proj.weight" => "ffn_down",
            other => panic!("unexpected tensor {other}"),
        };
        format!("blk.{layer}.{role}.weight")
    };
    let f32_tensor = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).expect("qtensor");
    for fused_qkv in [true, false] {
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for (name, t) in &w {
            let g = gguf_name(name);
            if g.ends_with("attn_qkv.weight") && !fused_qkv {
                let q = HEADS * PHI3_HEAD_DIM;
                let kv = PHI3_KV_HEADS * PHI3_HEAD_DIM;
                for (part, start, len) in [("q", 0, q), ("k", q, kv), ("v", q + kv, kv)] {
                    // Through a Vec: candle's `QTensor::quantize` reads a narrowed tensor's
                    // storage from its start.
                    let rows = t.narrow(0, start, len).and_then(|t| t.to_vec2::<f32>());
                    let split = rows
                        .and_then(|rows| Tensor::new(rows, &Device::Cpu))
                        .expect("split");
                    let split_name = g.replace("attn_qkv", &format!("attn_{part}"));
                    tensors.push((split_name, f32_tensor(&split)));
                }
            } else {
                tensors.push((g, f32_tensor(t)));
            }
        }
        for (name, factors) in [
            ("rope_factors_long.weight", &long),
            ("rope_factors_short.weight", &short),
        ] {
            let t = Tensor::new(factors.as_slice(), &Device::Cpu).expect("factors");
            tensors.push((name.into(), f32_tensor(&t)));
        }
        let path = dir.path().join(format!("phi3-fused-{fused_qkv}.gguf"));
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(&path).expect("create gguf");
        gguf_file::write(&mut file, &md, &ts).expect("write gguf");

        let gg = load_dir(&path);
        let c = gg.config();
        assert_eq!(c.architecture, Architecture::Phi3);
        assert_eq!(c.switches.fused_qkv, fused_qkv);
        assert_eq!(c.rotary_dim(), PHI3_ROTARY_DIM);
        assert_eq!(c.layer_window(0), None);
        assert_eq!(c.rope_inv_freqs(), st.config().rope_inv_freqs());
        let stated = c.rope_attention_factor();
        assert!((stated - st.config().rope_attention_factor()).abs() < 1e-6);
        assert!(stated > 1.1, "the long context's factor: {stated}");
        let got = ours(gg.model.as_ref(), &seqs);
        assert_close(
            &format!("phi3 gguf (fused q/k/v: {fused_qkv})"),
            &got,
            &want,
        );
    }
}

#[test]
fn phi3_config_missing_a_needed_field_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (short, long) = phi3_rope_factors();
    let longrope =
        serde_json::json!({ "type": "longrope", "short_factor": short, "long_factor": long });
    let w = phi3_weights(0x51);
    let load = |config: &serde_json::Value, weights: &HashMap<String, Tensor>| {
        write_checkpoint(dir.path(), config, weights);
        match load_model(dir.path().to_str().expect("utf-8"), &Device::Cpu) {
            Ok(_) => panic!("{config} loads"),
            Err(e) => e,
        }
    };
    let missing = |e: Error| match e {
        Error::MissingMetadata { key } => key,
        other => panic!("expected a missing field, got {other}"),
    };
    let invalid = |e: Error| match e {
        Error::InvalidMetadata { key, .. } => key,
        other => panic!("expected an invalid field, got {other}"),
    };

    // LongRoPE without its pre-training length.
    let e = load(&phi3_config(longrope.clone(), None), &w);
    assert_eq!(missing(e), "original_max_position_embeddings");
    // LongRoPE without one of its factor lists.
    let mut no_long = longrope.clone();
    no_long["long_factor"] = serde_json::Value::Null;
    let e = load(&phi3_config(no_long, Some(PHI3_ORIGINAL_CONTEXT)), &w);
    assert_eq!(missing(e), "rope_scaling.long_factor");
    // Factors for the whole head rather than the rotated part of it.
    let mut whole_head = longrope.clone();
    whole_head["short_factor"] = serde_json::json!(vec![1.0; PHI3_HEAD_DIM / 2]);
    let e = load(&phi3_config(whole_head, Some(PHI3_ORIGINAL_CONTEXT)), &w);
    assert_eq!(invalid(e), "rope_scaling.short_factor");
    // A rotary fraction out of range.
    let mut config = phi3_config(serde_json::Value::Null, None);
    config["partial_rotary_factor"] = serde_json::json!(1.5);
    assert_eq!(invalid(load(&config, &w)), "partial_rotary_factor");
    // A scaling type we do not implement is named.
    let mut yarn = longrope.clone();
    yarn["type"] = serde_json::json!("yarn");
    let e = load(&phi3_config(yarn, Some(PHI3_ORIGINAL_CONTEXT)), &w);
    assert!(
        matches!(&e, Error::UnsupportedFeature(what) if what.contains("`yarn`")),
        "{e}"
    );
    // A checkpoint with llama's split gate and up instead of Phi-3's fused matrix.
    let mut split = w.clone();
    let gate_up = split
        .remove("model.layers.0.mlp.gate_up_proj.weight")
        .expect("gate_up");
    split.insert(
        "model.layers.0.mlp.gate_proj.weight".into(),
        gate_up.narrow(0, 0, INTER).expect("gate"),
    );
    let e = load(&phi3_config(serde_json::Value::Null, None), &split);
    assert!(
        matches!(&e, Error::MissingTensor { name } if name == "model.layers.0.mlp.gate_up_proj.weight"),
        "{e}"
    );
}
