//! Qwen3: llama with a per-head RMSNorm of q and k before rope, no q/k/v bias, and a head
//! size the file states (`attention.key_length`, `head_dim`), not hidden / heads.

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::families::{hf_field, Family};

pub(super) const QWEN3: Family = Family {
    architecture: Architecture::Qwen3,
    gguf_names: &["qwen3"],
    hf_names: &["qwen3", "Qwen3ForCausalLM"],
    from_gguf: |_, _, config: &mut ModelConfig| {
        config.rope_style = RopeStyle::Half;
        config.switches.qk_norm = true;
        Ok(())
    },
    from_hf: |json, config: &mut ModelConfig| {
        config.switches.qk_norm = true;
        config.attention_bias = hf_field(json, "attention_bias")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        Ok(())
    },
};
