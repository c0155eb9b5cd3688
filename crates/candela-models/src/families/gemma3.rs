//! Gemma 3 (text): embeddings scaled by sqrt(hidden); RMSNorm that multiplies by `1 + w`
//! (Hugging Face stores `w`, GGUF stores `1 + w`); per-head q/k norm before rope; four norms a
//! block (before and after attention, before and after the MLP); GeGLU with tanh GELU;
//! half-split (NEOX) rope; the head size from the file; tied embeddings; 5 of every 6 layers
//! attend through a sliding window with rope base 10,000 while every 6th is global with the
//! file's base; final-logit soft-capping when the file has it.
//!
//! llama.cpp's `src/models/gemma3.cpp` is the reference (candle-transformers'
//! `quantized_gemma3.rs` uses SiLU and no window at decode; its `gemma3.rs` sees one key too
//! many in a windowed prefill).

use serde_json::Value;

use crate::config::{
    invalid, Activation, Architecture, ModelConfig, RopeStyle, SlidingWindow, WindowLayers,
};
use crate::error::{Error, Result};
use crate::families::{hf_f64, hf_field, hf_usize, Family};
use crate::gguf::GgufFile;

/// Every 6th layer is global (llama.cpp hard-codes it for `gemma3` GGUF files, which do not
/// store the pattern; transformers' default `sliding_window_pattern`).
const GLOBAL_EVERY: usize = 6;
/// Rope base of the windowed layers (llama.cpp's `rope_freq_base_train_swa` for Gemma 3,
/// transformers' default `rope_local_base_freq`).
const LOCAL_ROPE_THETA: f32 = 10_000.0;

pub(super) const GEMMA3: Family = Family {
    architecture: Architecture::Gemma3,
    gguf_names: &["gemma3"],
    hf_names: &["gemma3_text", "Gemma3ForCausalLM"],
    from_gguf,
    from_hf,
};

fn common(config: &mut ModelConfig) {
    config.rope_style = RopeStyle::Half;
    config.switches.qk_norm = true;
    config.switches.sandwich_norms = true;
    config.switches.activation = Activation::GeluTanh;
    config.switches.scale_embeddings = true;
}

fn from_gguf(gguf: &GgufFile, arch: &str, config: &mut ModelConfig) -> Result<()> {
    common(config);
    let key = format!("{arch}.attention.sliding_window");
    let size = gguf.uint_opt(&key)?.ok_or(Error::MissingMetadata { key })?;
    config.switches.sliding_window = Some(SlidingWindow {
        size,
        layers: WindowLayers::GlobalEvery(GLOBAL_EVERY),
        rope_theta: Some(LOCAL_ROPE_THETA),
    });
    config.switches.final_logit_softcap = gguf
        .float_opt(&format!("{arch}.final_logit_softcapping"))?
        .map(|cap| cap as f32);
    Ok(())
}

fn from_hf(json: &Value, config: &mut ModelConfig) -> Result<()> {
    common(config);
    config.switches.norm_weights_offset = true;
    let activation = hf_field(json, "hidden_activation")
        .or_else(|| hf_field(json, "hidden_act"))
        .and_then(Value::as_str)
        .unwrap_or("gelu_pytorch_tanh");
    if activation != "gelu_pytorch_tanh" {
        return Err(Error::UnsupportedFeature(format!(
            "Gemma 3 with hidden_activation `{activation}`"
        )));
    }
    if let Some(scalar) = hf_f64(json, "query_pre_attn_scalar")? {
        if scalar <= 0.0 {
            return Err(invalid("query_pre_attn_scalar", "must be positive"));
        }
        config.switches.attention_scale = Some((1.0 / scalar.sqrt()) as f32);
    }
    if hf_f64(json, "attn_logit_softcapping")?.is_some() {
        return Err(Error::UnsupportedFeature(
            "attention logit soft-capping (Gemma 2)".into(),
        ));
    }
    let size = hf_usize(json, "sliding_window")?.ok_or(Error::MissingMetadata {
        key: "sliding_window".into(),
    })?;
    let layers = window_layers(json, config.num_layers)?;
    config.switches.sliding_window = Some(SlidingWindow {
        size,
        layers,
        rope_theta: Some(
            hf_f64(json, "rope_local_base_freq")?.map_or(LOCAL_ROPE_THETA, |x| x as f32),
        ),
    });
    config.switches.final_logit_softcap =
        hf_f64(json, "final_logit_softcapping")?.map(|cap| cap as f32);
    Ok(())
}

/// The windowed layers from `layer_types` (newer configs) or `sliding_window_pattern`.
fn window_layers(json: &Value, num_layers: usize) -> Result<WindowLayers> {
    let Some(types) = hf_field(json, "layer_types") else {
        let every = hf_usize(json, "sliding_window_pattern")?.unwrap_or(GLOBAL_EVERY);
        return Ok(WindowLayers::GlobalEvery(every));
    };
    let types: Vec<&str> = types
        .as_array()
        .and_then(|items| items.iter().map(Value::as_str).collect())
        .ok_or_else(|| invalid("layer_types", "must be a list of strings"))?;
    if types.len() != num_layers {
        return Err(invalid(
            "layer_types",
            format!("{} entries for {num_layers} layers", types.len()),
        ));
    }
    let global: Vec<bool> = types
        .iter()
        .map(|t| match *t {
            "full_attention" => Ok(true),
            "sliding_attention" => Ok(false),
            other => Err(invalid(
                "layer_types",
                format!("unknown layer type `{other}`"),
            )),
        })
        .collect::<Result<_>>()?;
    // Find the period n with layer i global iff (i + 1) % n == 0.
    let every = global
        .iter()
        .position(|&g| g)
        .map_or(num_layers + 1, |first| first + 1);
    if global
        .iter()
        .enumerate()
        .all(|(i, &g)| g == (i + 1).is_multiple_of(every))
    {
        Ok(WindowLayers::GlobalEvery(every))
    } else {
        Err(Error::UnsupportedFeature(
            "layer_types that are not every n-th layer global".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_types_give_the_period() {
        let mut types = vec!["sliding_attention"; 12];
        types[5] = "full_attention";
        types[11] = "full_attention";
        let json = serde_json::json!({ "layer_types": types });
        assert_eq!(
            window_layers(&json, 12).ok(),
            Some(WindowLayers::GlobalEvery(6))
        );
        let mut odd = types.clone();
        odd[2] = "full_attention";
        let json = serde_json::json!({ "layer_types": odd });
        assert!(window_layers(&json, 12).is_err());
        let json = serde_json::json!({ "sliding_window_pattern": 4 });
        assert_eq!(
            window_layers(&json, 12).ok(),
            Some(WindowLayers::GlobalEvery(4))
        );
    }
}
