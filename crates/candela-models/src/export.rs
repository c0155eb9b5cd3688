//! A llama-family GGUF written out as a Hugging Face checkpoint: `config.json`, f32
//! `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (BOS/EOS, chat template).
//!
//! Why: `--quantize` starts from float weights, and the default model ships only as a
//! quantized GGUF. Dequantizing it gives a float checkpoint whose values are exactly the
//! GGUF's, so the quality of `--quantize int8|int4` can be measured against the float model
//! (and the float model against llama.cpp's reference) on the reference prompts.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};
use serde_json::json;

use crate::config::{Architecture, RopeScaling, RopeStyle};
use crate::decoder::Role;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::model::TensorNames;
use crate::tokenizer::Tokenizer;

/// Writes the GGUF model at `gguf` as a checkpoint directory `out_dir` (created if missing).
pub fn gguf_to_safetensors(gguf: &Path, out_dir: &Path) -> Result<()> {
    let file = GgufFile::open(gguf)?;
    let config = file.model_config()?;
    if config.architecture != Architecture::Llama || config.attention_bias {
        return Err(Error::UnsupportedFeature(format!(
            "export of {:?} (only llama-style models without attention bias)",
            config.architecture
        )));
    }
    if let Some(rotary_dim) = config.switches.rotary_dim {
        return Err(Error::UnsupportedFeature(format!(
            "export of partial rotation ({rotary_dim} of {} dimensions a head)",
            config.head_dim
        )));
    }
    let io = |source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out_dir).map_err(io)?;

    let (g, h) = (TensorNames::Gguf, TensorNames::HuggingFace);
    let mut names: Vec<(String, String)> = vec![
        (g.embedding().into(), h.embedding().into()),
        (g.final_norm().into(), h.final_norm().into()),
    ];
    let tied = !file.tensor_names().any(|n| n == g.head());
    if !tied {
        names.push((g.head().into(), h.head().into()));
    }
    for i in 0..config.num_layers {
        for role in Role::LLAMA {
            names.push((
                format!("{}.weight", g.layer(i, role)),
                format!("{}.weight", h.layer(i, role)),
            ));
        }
    }
    let mut tensors = HashMap::with_capacity(names.len());
    for (gguf_name, hf_name) in names {
        let mut t = file
            .read_qtensor(&gguf_name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        // llama.cpp's converter permutes q and k rows for interleaved rope; transformers'
        // rotate-half rope wants them back in their original order.
        if config.rope_style == RopeStyle::Interleaved {
            if gguf_name.ends_with("attn_q.weight") {
                t = unpermute(&t, config.num_heads)?;
            } else if gguf_name.ends_with("attn_k.weight") {
                t = unpermute(&t, config.num_kv_heads)?;
            }
        }
        tensors.insert(hf_name, t);
    }
    candle_core::safetensors::save(&tensors, out_dir.join("model.safetensors"))?;

    let mut hf = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    });
    match config.rope_scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => {
            hf["rope_scaling"] = json!({"rope_type": "linear", "factor": factor});
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => {
            hf["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position,
            });
        }
        Some(RopeScaling::LongRope { .. }) => {
            return Err(Error::UnsupportedFeature(
                "export of LongRoPE factors (rope_factors_long/short.weight)".into(),
            ));
        }
        Some(RopeScaling::FreqFactors(_)) => {
            return Err(Error::UnsupportedFeature(
                "export of GGUF rope frequency factors (rope_freqs.weight)".into(),
            ));
        }
    }
    write_json(&out_dir.join("config.json"), &hf)?;

    // The tokenizer and chat template come from the GGUF header, as the engine reads them;
    // a file without a vocabulary (a test model) exports its weights only.
    let content = file.content();
    if !content.metadata.contains_key("tokenizer.ggml.tokens") {
        return Ok(());
    }
    let tokenizer = Tokenizer::from_gguf(content)?;
    let json_text = tokenizer.to_json()?;
    std::fs::write(out_dir.join("tokenizer.json"), json_text).map_err(io)?;
    let template = match content.metadata.get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let tokenizer_config = json!({
        "bos_token": tokenizer.bos_token().map(|t| t.text.clone()),
        "eos_token": tokenizer.eos_token().map(|t| t.text.clone()),
        "chat_template": template,
    });
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)
}

/// [`gguf_to_safetensors`] unless `out_dir` already holds a finished export. The export is
/// written beside `out_dir` and renamed into place, so an interrupted run never leaves half a
/// checkpoint there.
pub fn gguf_to_safetensors_once(gguf: &Path, out_dir: &Path) -> Result<()> {
    if out_dir.join("model.safetensors").is_file() {
        return Ok(());
    }
    let io = |source| Error::Io {
        path: out_dir.to_path_buf(),
        source,
    };
    let partial = out_dir.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    gguf_to_safetensors(gguf, &partial)?;
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::rename(&partial, out_dir).map_err(io)
}

/// Undoes llama.cpp's `permute`: rows `[heads, 2, d/2]` became `[heads, d/2, 2]`.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
