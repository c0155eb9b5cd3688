//! Qwen2 / Qwen2.5: llama with a bias on the q, k and v projections, half-split rope pairs
//! in GGUF too. Qwen2's optional sliding window (`use_sliding_window`, off in every released
//! checkpoint) is refused rather than ignored.

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::error::Error;
use crate::families::{hf_field, Family};

pub(super) const QWEN2: Family = Family {
    architecture: Architecture::Qwen2,
    gguf_names: &["qwen2"],
    hf_names: &["qwen2", "Qwen2ForCausalLM"],
    from_gguf: |_, _, config: &mut ModelConfig| {
        config.rope_style = RopeStyle::Half;
        config.attention_bias = true;
        Ok(())
    },
    from_hf: |json, config: &mut ModelConfig| {
        config.attention_bias = hf_field(json, "attention_bias")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        if hf_field(json, "use_sliding_window").and_then(serde_json::Value::as_bool) == Some(true) {
            return Err(Error::UnsupportedFeature(
                "Qwen2's use_sliding_window (a window on layers past max_window_layers)".into(),
            ));
        }
        Ok(())
    },
};
