//! GGUF k-quants (Q2_K .. Q6_K) on the CPU: a tiny llama stored in k-quants loads with every
//! matrix on candela's packed matmul (named so in the load report) and computes what the same
//! weights dequantized to f32 compute; and, when `scripts/fetch-model gemma3-270m` has put
//! Gemma 3 270M Q4_K_M in models/, its real k-quant tensors multiply like candle's
//! dequantized matmul.

#[path = "model_support/mod.rs"]
mod support;

use std::path::Path;

use candela_models::gguf::GgufFile;
use candela_models::linear::Linear;
use candela_models::{load_model, BatchInputs, Model, SeqChunk};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{log_softmax_rows, new_cache};

// Every matrix dimension a multiple of 256, as k-quant rows must be.
const HIDDEN: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 512;
const VOCAB: usize = 48;

/// GGUF name, shape `[out, in]` and storage type of each layer matrix: every k-quant once.
const MATRICES: [(&str, [usize; 2], GgmlDType); 7] = [
    ("attn_q", [HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q4K),
    ("attn_k", [KV_HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q5K),
    ("attn_v", [KV_HEADS * HEAD_DIM, HIDDEN], GgmlDType::Q6K),
    ("attn_output", [HIDDEN, HEADS * HEAD_DIM], GgmlDType::Q3K),
    ("ffn_gate", [INTER, HIDDEN], GgmlDType::Q2K),
    ("ffn_up", [INTER, HIDDEN], GgmlDType::Q4K),
    ("ffn_down", [HIDDEN, INTER], GgmlDType::Q6K),
];

fn random(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Tensor {
    let len = shape.iter().product();
    let v: Vec<f32> = (0..len)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale + offset)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// The tiny model's tensors: matrices in their k-quant, or (`dequantized`) as candle
/// dequantizes that k-quant, in f32; embeddings and norms in f32.
fn tiny_tensors(dequantized: bool) -> Vec<(String, QTensor)> {
    let mut rng = StdRng::seed_from_u64(0x4b51);
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).expect("f32");
    let mut out = vec![
        (
            "token_embd.weight".to_string(),
            // Small, so the tied head's logits stay within a few nats and the probabilities
            // compared below are spread over many tokens, not one-hot.
            f32(&random(&mut rng, &[VOCAB, HIDDEN], 0.1, 0.0)),
        ),
        (
            "output_norm.weight".to_string(),
            f32(&random(&mut rng, &[HIDDEN], 0.1, 1.0)),
        ),
    ];
    for norm in ["attn_norm", "ffn_norm"] {
        let t = random(&mut rng, &[HIDDEN], 0.1, 1.0);
        out.push((format!("blk.0.{norm}.weight"), f32(&t)));
    }
    for (name, shape, dtype) in MATRICES {
        let scale = 1.0 / (shape[1] as f32).sqrt() * 1.7;
        let q = QTensor::quantize(&random(&mut rng, &shape, scale, 0.0), dtype).expect("quantize");
        let q = if dequantized {
            f32(&q.dequantize(&Device::Cpu).expect("dequantize"))
        } else {
            q
        };
        out.push((format!("blk.0.{name}.weight"), q));
    }
    out
}

fn write_gguf(path: &Path, tensors: &[(String, QTensor)]) {
    let u = |x: usize| Value::U32(x as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(HIDDEN)),
        ("llama.feed_forward_length", u(INTER)),
        ("llama.block_count", u(1)),
        ("llama.attention.head_count", u(HEADS)),
        ("llama.attention.head_count_kv", u(KV_HEADS)),
        ("llama.context_length", u(64)),
        ("llama.rope.dimension_count", u(HEAD_DIM)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut file, &md, &ts).expect("write gguf");
}

/// Log-probabilities after a 9-token prompt (a 9-row prefill) and after a 1-token sequence.
fn forward(model: &dyn Model) -> Vec<Vec<f32>> {
    let mut kv = new_cache(model, 8, 16);
    let a: Vec<u32> = (0..9).map(|i| (i * 5 + 3) % VOCAB as u32).collect();
    let b: Vec<u32> = vec![7];
    let seqs = [
        SeqChunk {
            token_ids: &a,
            tokens_cached: 0,
            block_table: &[2],
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        },
        SeqChunk {
            token_ids: &b,
            tokens_cached: 0,
            block_table: &[5],
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        },
    ];
    let input = BatchInputs::from_seqs(&seqs, 16, model.device()).expect("batch");
    let logits = model.forward(&input, &mut kv).expect("forward");
    log_softmax_rows(&logits).expect("rows")
}

#[test]
fn kquant_gguf_loads_onto_the_packed_matmul_and_matches_f32() {
    if std::env::var("CANDELA_CPU_QMATMUL").is_ok_and(|v| v == "candle")
        || std::env::var("CANDLE_DEQUANTIZE_ALL").is_ok_and(|v| v == "1")
    {
        eprintln!(
            "skipped: CANDELA_CPU_QMATMUL=candle or CANDLE_DEQUANTIZE_ALL=1 keeps candle's path"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let quantized = dir.path().join("tiny-kquants.gguf");
    let float = dir.path().join("tiny-dequantized.gguf");
    write_gguf(&quantized, &tiny_tensors(false));
    write_gguf(&float, &tiny_tensors(true));

    let q = load_model(quantized.to_str().expect("utf-8"), &Device::Cpu).expect("k-quant model");
    let paths = q.model.weight_paths();
    for (name, _, dtype) in MATRICES {
        let name = format!("blk.0.{name}.weight");
        let (_, path) = paths
            .iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} missing from the load report {paths:?}"));
        let (bits, group) = match dtype {
            GgmlDType::Q4K => ("int4", 32),
            GgmlDType::Q5K => ("int8", 32),
            GgmlDType::Q6K => ("int8", 16),
            _ => ("int4", 16),
        };
        let want =
            format!("packed {bits} g{group} f32-scales ({dtype:?}, lossless), candela matmul");
        assert!(
            path.starts_with(&want),
            "{name}: `{path}`, expected `{want} ..`"
        );
    }

    let f = load_model(float.to_str().expect("utf-8"), &Device::Cpu).expect("f32 model");
    assert!(f
        .model
        .weight_paths()
        .iter()
        .all(|(_, p)| p.starts_with("candle matmul F32")));
    let (a, b) = (forward(q.model.as_ref()), forward(f.model.as_ref()));
    for (ra, rb) in a.iter().zip(&b) {
        // Same weight values: only the int8 rounding of the activations differs (per group of
        // 16 or 32, about 0.4% of each group's largest magnitude).
        let d = ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (x.exp() - y.exp()).abs())
            .fold(0f32, f32::max);
        eprintln!("k-quants vs f32: probabilities differ by up to {d}");
        assert!(d < 0.02, "probabilities differ by {d}");
    }
    // The comparison means something: no row is one-hot (the top token leaves at least 10%
    // to the others), and the two sequences get different distributions.
    for row in &a {
        let top = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)).exp();
        assert!(top < 0.9, "top probability {top}");
    }
    let spread = a[0]
        .iter()
        .zip(&a[1])
        .map(|(x, y)| (x.exp() - y.exp()).abs())
        .fold(0f32, f32::max);
    assert!(spread > 1e-3, "{spread}");
}

/// Path of Gemma 3 270M Q4_K_M, as `scripts/fetch-model gemma3-270m` writes it.
const GEMMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../models/gemma-3-270m-q4_k_m.gguf"
);

/// Real k-quant tensors (Q4_K attn_output and ffn_down, Q6_K ffn_down): our packed matmul
/// against candle's dequantize-then-matmul at decode and prefill row counts.
#[test]
fn gemma_kquant_tensors_match_candle_dequantized_matmul() -> candela_models::Result<()> {
    if !Path::new(GEMMA).exists() {
        eprintln!("skipped: {GEMMA} is missing (scripts/fetch-model gemma3-270m fetches it)");
        return Ok(());
    }
    let gguf = GgufFile::open(GEMMA)?;
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0x6e6d);
    let mut seen = Vec::new();
    for name in [
        "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight",
        "blk.9.ffn_down.weight",
        "blk.17.ffn_down.weight",
    ] {
        let q = gguf.read_qtensor(name, &dev)?;
        let dtype = q.dtype();
        let (n, k) = q.shape().dims2()?;
        let wd = q.dequantize(&dev)?;
        let linear = Linear::from_qtensor(q)?;
        let path = linear.describe();
        assert!(
            path.starts_with("packed") && path.contains(&format!("({dtype:?}, lossless)")),
            "{name}: {path}"
        );
        let wd_rows = wd.to_vec2::<f32>()?;
        for m in [1, 7, 64] {
            let x = random(&mut rng, &[m, k], 1.0, 0.0);
            let ours = linear.forward(&x)?.to_vec2::<f32>()?;
            let theirs = x.matmul(&wd.t()?)?.to_vec2::<f32>()?;
            let xs = x.to_vec2::<f32>()?;
            for r in 0..m {
                for j in 0..n {
                    // Per output, int8 activations (groups of 16 or 32) err by at most half a
                    // step per element: sum |w| * amax(group) / 254, bounded by the row's.
                    let amax = xs[r].iter().fold(0f32, |a, v| a.max(v.abs()));
                    let wsum: f32 = wd_rows[j].iter().map(|v| v.abs()).sum();
                    let tol = wsum * amax / 254.0 * 1.01 + 1e-4;
                    let (a, b) = (ours[r][j], theirs[r][j]);
                    assert!(
                        (a - b).abs() <= tol,
                        "{name} ({dtype:?}) m{m} row {r} col {j}: {a} vs {b} (tol {tol})"
                    );
                }
            }
        }
        seen.push((name, dtype, n, k));
    }
    eprintln!("checked {seen:?}");
    assert!(seen.iter().any(|s| s.1 == GgmlDType::Q4K));
    assert!(seen.iter().any(|s| s.1 == GgmlDType::Q6K));
    Ok(())
}
