//! Loading: GGUF metadata, bad files, the hub cache layout, and safetensors checkpoints.
//!
//! A tiny random llama is written by the test itself, once as a Hugging Face checkpoint
//! (f16 safetensors + config.json) and once as a GGUF file with llama.cpp's conventions
//! (f32, q/k rows permuted for interleaved rope): both must give the same logits.

#[path = "model_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candela_models::gguf::GgufFile;
use candela_models::hub::{resolve_with_cache, ModelFiles};
use candela_models::{
    load_files, load_model, Architecture, BatchInputs, Error, Model, RopeStyle, SeqChunk,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use support::{log_softmax_rows, max_abs_diff, new_cache, seeded_normal, DEFAULT_MODEL};

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const INTER: usize = 96;
const LAYERS: usize = 2;
const VOCAB: usize = 80;
const CONTEXT: usize = 64;
/// Seed of the tiny model's weights.
const TINY_SEED: u64 = 0x7111;

/// The tiny model's weights in Hugging Face naming, `[out, in]` matrices, f32 values that
/// are exactly representable in f16.
fn tiny_weights() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let rng = std::cell::RefCell::new(StdRng::seed_from_u64(TINY_SEED));
    let rand = |shape: &[usize], scale: f64| {
        let n = shape.iter().product();
        Tensor::from_vec(seeded_normal(&mut rng.borrow_mut(), n), shape, &dev)
            .and_then(|t| t.affine(scale, 0.0))
            .and_then(|t| t.to_dtype(DType::F16))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("random tensor")
    };
    let norm = |shape: &[usize]| {
        rand(shape, 0.1)
            .affine(1.0, 1.0)
            .and_then(|t| t.to_dtype(DType::F16))
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("norm")
    };
    let mut w = vec![
        (
            "model.embed_tokens.weight".to_string(),
            rand(&[VOCAB, HIDDEN], 1.0),
        ),
        ("model.norm.weight".to_string(), norm(&[HIDDEN])),
    ];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let s = 0.15;
        w.push((format!("{p}.input_layernorm.weight"), norm(&[HIDDEN])));
        w.push((
            format!("{p}.post_attention_layernorm.weight"),
            norm(&[HIDDEN]),
        ));
        w.push((
            format!("{p}.self_attn.q_proj.weight"),
            rand(&[HEADS * HEAD_DIM, HIDDEN], s),
        ));
        w.push((
            format!("{p}.self_attn.k_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN], s),
        ));
        w.push((
            format!("{p}.self_attn.v_proj.weight"),
            rand(&[KV_HEADS * HEAD_DIM, HIDDEN], s),
        ));
        w.push((
            format!("{p}.self_attn.o_proj.weight"),
            rand(&[HIDDEN, HEADS * HEAD_DIM], s),
        ));
        w.push((
            format!("{p}.mlp.gate_proj.weight"),
            rand(&[INTER, HIDDEN], s),
        ));
        w.push((format!("{p}.mlp.up_proj.weight"), rand(&[INTER, HIDDEN], s)));
        w.push((
            format!("{p}.mlp.down_proj.weight"),
            rand(&[HIDDEN, INTER], s),
        ));
    }
    w
}

fn tiny_config_json() -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": CONTEXT,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": true,
        "torch_dtype": "float16"
    })
    .to_string()
}

/// Writes the checkpoint directory (config.json + f16 model.safetensors).
fn write_safetensors_dir(dir: &Path, weights: &[(String, Tensor)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("config.json"), tiny_config_json()).expect("config");
    let map: HashMap<String, Tensor> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::F16).expect("f16")))
        .collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).expect("safetensors");
}

/// llama.cpp's `permute` of q/k rows: within each head, row `2j` takes row `j` and row
/// `2j+1` takes row `j + d/2`, so interleaved rope on the result equals half-split rope
/// on the original.
fn permute_for_interleaved(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().expect("matrix");
    w.reshape((heads, 2, out / heads / 2, inp))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((out, inp)))
        .expect("permute")
}

fn gguf_name(hf: &str) -> String {
    let simple = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ];
    for (h, g) in simple {
        if hf == h {
            return g.to_string();
        }
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let role = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{role}")
}

fn write_gguf(path: &Path, architecture: &str, weights: &[(String, Tensor)]) {
    write_gguf_without(path, architecture, weights, None);
}

/// [`write_gguf`] with the metadata key `omit` left out.
fn write_gguf_without(
    path: &Path,
    architecture: &str,
    weights: &[(String, Tensor)],
    omit: Option<&str>,
) {
    let u = |x: usize| Value::U32(x as u32);
    let a = architecture;
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.embedding_length"), u(HIDDEN)),
        (format!("{a}.feed_forward_length"), u(INTER)),
        (format!("{a}.block_count"), u(LAYERS)),
        (format!("{a}.attention.head_count"), u(HEADS)),
        (format!("{a}.attention.head_count_kv"), u(KV_HEADS)),
        (format!("{a}.context_length"), u(CONTEXT)),
        (format!("{a}.rope.dimension_count"), u(HEAD_DIM)),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
    ];
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(n, t)| {
            let t = if n.ends_with("q_proj.weight") {
                permute_for_interleaved(t, HEADS)
            } else if n.ends_with("k_proj.weight") {
                permute_for_interleaved(t, KV_HEADS)
            } else {
                t.clone()
            };
            (
                gguf_name(n),
                QTensor::quantize(&t, GgmlDType::F32).expect("qtensor"),
            )
        })
        .collect();
    let md: Vec<(&str, &Value)> = metadata
        .iter()
        .filter(|(k, _)| Some(k.as_str()) != omit)
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).expect("create gguf");
    gguf_file::write(&mut file, &md, &ts).expect("write gguf");
}

fn tiny_forward(model: &dyn Model) -> Vec<Vec<f32>> {
    let mut kv = new_cache(model, 16, 4);
    let a: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % VOCAB as u32).collect();
    let b: Vec<u32> = vec![5, 9, 77, 1];
    let seqs = [
        SeqChunk {
            token_ids: &a,
            tokens_cached: 0,
            block_table: &[3, 0, 9],
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        },
        SeqChunk {
            token_ids: &b,
            tokens_cached: 0,
            block_table: &[6],
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        },
    ];
    let input = BatchInputs::from_seqs(&seqs, 4, model.device()).expect("batch");
    let logits = model.forward(&input, &mut kv).expect("forward");
    assert_eq!(logits.dims(), &[2, VOCAB]);
    log_softmax_rows(&logits).expect("rows")
}

#[test]
fn default_model_config_from_gguf_metadata() -> candela_models::Result<()> {
    let gguf = GgufFile::open(DEFAULT_MODEL)?;
    assert_eq!(gguf.architecture()?, "llama");
    let c = gguf.model_config()?;
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (30, 9, 3, 64)
    );
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.vocab_size),
        (576, 1536, 49152)
    );
    assert_eq!(c.max_position, 8192);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.rope_style, RopeStyle::Interleaved);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.eos_token_ids, vec![2]);
    assert!(!c.attention_bias);
    assert!(gguf.metadata().contains_key("tokenizer.ggml.tokens"));
    Ok(())
}

#[test]
fn missing_model_is_an_error() {
    let err = load_model("/nonexistent/dir/model.gguf", &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    let empty = tempfile::tempdir().expect("tempdir");
    let err = load_model(empty.path().to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::NoWeights { .. }), "{err}");
}

#[test]
fn truncated_or_corrupt_gguf_is_an_error() {
    let bytes = std::fs::read(DEFAULT_MODEL).expect("default model");
    let dir = tempfile::tempdir().expect("tempdir");
    for n in [0, 3, 24, 4096, 1 << 20, bytes.len() / 2, bytes.len() - 1] {
        let path = dir.path().join(format!("cut-{n}.gguf"));
        std::fs::write(&path, &bytes[..n]).expect("write");
        let err = load_model(path.to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
        match err {
            Error::Truncated { .. } => assert!(n > 4096, "cut at {n}: {err}"),
            Error::InvalidGguf { .. } => {}
            other => panic!("cut at {n}: unexpected error {other}"),
        }
    }
    let path = dir.path().join("text.gguf");
    std::fs::write(&path, "this is not a model").expect("write");
    let err = load_model(path.to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::InvalidGguf { .. }), "{err}");
}

#[test]
fn unsupported_architecture_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    let path = dir.path().join("gpt2.gguf");
    write_gguf(&path, "gpt2", &weights);
    let err = load_model(path.to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { ref name, .. } if name == "gpt2"),
        "{err}"
    );

    let st = dir.path().join("bert");
    write_safetensors_dir(&st, &weights);
    let config = tiny_config_json().replace("\"llama\"", "\"bert\"");
    std::fs::write(st.join("config.json"), config).expect("config");
    let err = load_model(st.to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedArchitecture { ref name, .. } if name == "bert"),
        "{err}"
    );
}

#[test]
fn a_gguf_missing_needed_metadata_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    for key in [
        "llama.block_count",
        "llama.attention.head_count",
        "llama.embedding_length",
    ] {
        let path = dir.path().join("partial.gguf");
        write_gguf_without(&path, "llama", &weights, Some(key));
        let err = load_model(path.to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, Error::MissingMetadata { key: k } if k == key),
            "{key}: {err}"
        );
    }
}

#[test]
fn missing_tensor_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weights = tiny_weights();
    weights.retain(|(n, _)| n != "model.layers.1.mlp.up_proj.weight");
    write_safetensors_dir(dir.path(), &weights);
    let err = load_model(dir.path().to_str().expect("utf-8"), &Device::Cpu).unwrap_err();
    assert!(
        matches!(err, Error::MissingTensor { ref name } if name == "model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );
}

#[test]
fn safetensors_and_gguf_of_the_same_weights_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    let st_dir = dir.path().join("hf");
    write_safetensors_dir(&st_dir, &weights);
    let gguf_path = dir.path().join("tiny.gguf");
    write_gguf(&gguf_path, "llama", &weights);

    let st = load_model(st_dir.to_str().expect("utf-8"), &Device::Cpu).expect("safetensors");
    assert_eq!(st.config().rope_style, RopeStyle::Half);
    assert_eq!(st.config().eos_token_ids, vec![2]);
    assert_eq!(
        st.files,
        ModelFiles::Safetensors {
            dir: st_dir.clone()
        }
    );
    assert!(st.gguf_metadata.is_none());
    let gg = load_model(gguf_path.to_str().expect("utf-8"), &Device::Cpu).expect("gguf");
    assert_eq!(gg.config().rope_style, RopeStyle::Interleaved);

    let a = tiny_forward(st.model.as_ref());
    let b = tiny_forward(gg.model.as_ref());
    for (ra, rb) in a.iter().zip(&b) {
        // Same f32 weights, same ops up to float summation order (f32 matmul vs candle's
        // f32 QMatMul path): differences stay at rounding level.
        let d = max_abs_diff(ra, rb);
        assert!(d < 1e-4, "log-softmax differs by {d}");
    }
    // The model is not degenerate: the two sequences get different distributions.
    let d01 = max_abs_diff(&a[0], &a[1]);
    assert!(d01 > 1e-2);
}

#[test]
fn a_gguf_exported_as_safetensors_computes_the_same_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    let gguf_path = dir.path().join("tiny.gguf");
    write_gguf(&gguf_path, "llama", &weights);
    let out = dir.path().join("exported");
    candela_models::export::gguf_to_safetensors(&gguf_path, &out).expect("export");

    let gg = load_model(gguf_path.to_str().expect("utf-8"), &Device::Cpu).expect("gguf");
    let ex = load_model(out.to_str().expect("utf-8"), &Device::Cpu).expect("exported");
    // q/k rows are back in transformers' order, for rotate-half rope.
    assert_eq!(ex.config().rope_style, RopeStyle::Half);
    assert_eq!(ex.config().num_kv_heads, KV_HEADS);
    let a = tiny_forward(gg.model.as_ref());
    let b = tiny_forward(ex.model.as_ref());
    for (ra, rb) in a.iter().zip(&b) {
        let d = max_abs_diff(ra, rb);
        assert!(d < 1e-4, "log-softmax differs by {d}");
    }
    // No vocabulary in the file: no tokenizer files either.
    assert!(!out.join("tokenizer.json").exists());
}

#[test]
fn quantize_packs_float_weights_and_keeps_the_tiny_model_close() {
    use candela_models::{load_model_with, LoadOptions, QuantBits, Quantize};
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    write_safetensors_dir(dir.path(), &weights);
    let path = dir.path().to_str().expect("utf-8");
    let float = load_model(path, &Device::Cpu).expect("float");
    assert!(float
        .model
        .weight_paths()
        .iter()
        .all(|(_, p)| p.starts_with("dense F32")));
    let a = tiny_forward(float.model.as_ref());
    // Random Gaussian weights are hard on 4 bits (a sixteenth of each group's range per
    // step): int4 only has to stay recognisably the same model here; tests/quantize.rs
    // measures the quality that matters, on the real model.
    for (bits, tol) in [(QuantBits::Int8, 0.1f32), (QuantBits::Int4, 0.9)] {
        let options = LoadOptions {
            quantize: Some(Quantize::new(bits, 32).expect("group size")),
        };
        let q = load_model_with(path, &Device::Cpu, &options).expect("quantized");
        let paths = q.model.weight_paths();
        // 7 matrices per layer packed; the tied LM head stays dense.
        let packed = paths
            .iter()
            .filter(|(_, p)| p.contains("--quantize"))
            .count();
        assert_eq!(packed, 7 * LAYERS, "{paths:?}");
        assert!(paths
            .last()
            .is_some_and(|(n, p)| n.contains("tied") && p.starts_with("dense")));
        let b = tiny_forward(q.model.as_ref());
        for (ra, rb) in a.iter().zip(&b) {
            // Probabilities, not log-probabilities: the random model's logits span tens of
            // nats, and the far tail's log-probabilities move with any rounding.
            let d = ra
                .iter()
                .zip(rb)
                .map(|(x, y)| (x.exp() - y.exp()).abs())
                .fold(0f32, f32::max);
            eprintln!("{bits:?}: probabilities differ by up to {d} (bound {tol})");
            assert!(d < tol, "{bits:?}: probabilities differ by {d}");
        }
    }
}

/// Lays out `models--test-org--tiny-llama` the way hf-hub / huggingface-cli do.
fn hub_cache(root: &Path, weights: &[(String, Tensor)]) -> (PathBuf, PathBuf) {
    let hash = "0123456789abcdef0123456789abcdef01234567";
    let repo = root.join("models--test-org--tiny-llama");
    let snapshot = repo.join("snapshots").join(hash);
    write_safetensors_dir(&snapshot, weights);
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    // huggingface-cli writes the hash without a newline; tolerate one anyway.
    std::fs::write(repo.join("refs").join("main"), format!("{hash}\n")).expect("ref");
    (root.to_path_buf(), snapshot)
}

#[test]
fn model_id_resolves_through_the_hub_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weights = tiny_weights();
    let (cache, snapshot) = hub_cache(&dir.path().join("hub"), &weights);

    let files = resolve_with_cache("test-org/tiny-llama", &cache).expect("resolve");
    assert_eq!(
        files,
        ModelFiles::Safetensors {
            dir: snapshot.clone()
        }
    );
    let pinned = resolve_with_cache(
        "test-org/tiny-llama@0123456789abcdef0123456789abcdef01234567",
        &cache,
    )
    .expect("resolve pinned");
    assert_eq!(pinned, files);
    for missing in [
        "test-org/other",
        "test-org/tiny-llama@v9",
        "not-an-id",
        "a/../b",
    ] {
        let err = resolve_with_cache(missing, &cache).unwrap_err();
        assert!(
            matches!(err, Error::ModelNotFound { .. }),
            "{missing}: {err}"
        );
    }

    let loaded = load_files(files, &Device::Cpu).expect("load from cache");
    let rows = tiny_forward(loaded.model.as_ref());
    assert!(rows.iter().flatten().all(|x| x.is_finite()));

    // Through the environment, as the server resolves `--model org/name`.
    std::env::set_var("HF_HUB_CACHE", &cache);
    let loaded = load_model("test-org/tiny-llama", &Device::Cpu).expect("load by id");
    assert_eq!(loaded.config().num_layers, LAYERS);
}
