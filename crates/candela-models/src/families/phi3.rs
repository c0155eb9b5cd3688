//! Phi-3, Phi-3.5 and Phi-4-mini (`phi3` in GGUF, `Phi3ForCausalLM`): llama with q/k/v stored
//! as one matrix (`qkv_proj`; GGUF `attn_qkv`, or split) and gate/up as one (`gate_up_proj`;
//! GGUF `ffn_up` with twice the intermediate rows, gate first), half-split rope on the first
//! `partial_rotary_factor` of each head, and LongRoPE for the 128k-context variants (read with
//! the other rope scalings, in `crate::safetensors` and `crate::gguf`).
//!
//! `sliding_window` is read and not applied: Phi-3 mini's configs carry 2047, but vLLM (whose
//! llama-based Phi-3 windows only the layers `layer_types` marks sliding) and llama.cpp
//! ("Phi SWA is currently disabled", llama.cpp#13676) both attend to the whole context.

use serde_json::Value;

use crate::config::{invalid, Architecture, ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::families::{hf_f64, hf_field, Family};
use crate::gguf::GgufFile;

pub(super) const PHI3: Family = Family {
    architecture: Architecture::Phi3,
    gguf_names: &["phi3"],
    hf_names: &["phi3", "Phi3ForCausalLM"],
    from_gguf,
    from_hf,
};

fn from_gguf(gguf: &GgufFile, _: &str, config: &mut ModelConfig) -> Result<()> {
    // llama.cpp's phi3 graph uses NEOX (half-split) rope, on rows the converter leaves as
    // transformers has them.
    config.rope_style = RopeStyle::Half;
    // llama.cpp accepts q/k/v fused or split; its converter writes them fused.
    config.switches.fused_qkv = gguf.tensor_names().any(|n| n == "blk.0.attn_qkv.weight");
    config.switches.fused_gate_up = true;
    Ok(())
}

fn from_hf(json: &Value, config: &mut ModelConfig) -> Result<()> {
    config.rope_style = RopeStyle::Half;
    config.switches.fused_qkv = true;
    config.switches.fused_gate_up = true;
    if let Some(act) = hf_field(json, "hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(Error::UnsupportedFeature(format!(
                "Phi-3 with hidden_act {act} (only \"silu\")"
            )));
        }
    }
    if let Some(factor) = hf_f64(json, "partial_rotary_factor")? {
        config.switches.rotary_dim = Some(rotary_dim(factor, config.head_dim)?);
    }
    // A window vLLM would apply: refuse it rather than attend past it.
    if let Some(types) = hf_field(json, "layer_types") {
        let sliding = types
            .as_array()
            .ok_or_else(|| invalid("layer_types", "must be a list of strings"))?
            .iter()
            .any(|t| t.as_str() == Some("sliding_attention"));
        if sliding {
            return Err(Error::UnsupportedFeature(
                "Phi-3 with sliding_attention layers in layer_types".into(),
            ));
        }
    }
    Ok(())
}

/// Dimensions rotated per head: `int(head_dim * partial_rotary_factor)`, as transformers and
/// llama.cpp's converter compute it.
fn rotary_dim(factor: f64, head_dim: usize) -> Result<usize> {
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(invalid(
            "partial_rotary_factor",
            format!("must be in (0, 1], got {factor}"),
        ));
    }
    let dim = (head_dim as f64 * factor) as usize;
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(invalid(
            "partial_rotary_factor",
            format!("rotates {dim} of {head_dim} dimensions; rope needs a positive even count"),
        ));
    }
    Ok(dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_dim_floors_like_transformers() {
        assert_eq!(rotary_dim(1.0, 96).ok(), Some(96));
        // Phi-4-mini: 0.75 of 128.
        assert_eq!(rotary_dim(0.75, 128).ok(), Some(96));
        assert_eq!(rotary_dim(0.3, 16).ok(), Some(4));
        for bad in [0.0, -0.5, 1.5, f64::NAN, 0.05] {
            assert!(
                matches!(rotary_dim(bad, 16), Err(Error::InvalidMetadata { ref key, .. }) if key == "partial_rotary_factor"),
                "{bad}"
            );
        }
        // 16 * 0.375 = 6 is even; 16 * 0.3125 = 5 is not.
        assert!(rotary_dim(0.3125, 16).is_err());
    }
}
