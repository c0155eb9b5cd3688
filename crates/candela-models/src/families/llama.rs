//! Llama 2/3, SmolLM2, TinyLlama, and Mistral files that llama.cpp converts as `llama`: the
//! shared decoder with no switches. llama.cpp's converter permutes q/k rows for interleaved
//! rope pairs; Hugging Face checkpoints keep transformers' half-split pairs.

use crate::config::{Architecture, ModelConfig, RopeStyle};
use crate::families::Family;

pub(super) const LLAMA: Family = Family {
    architecture: Architecture::Llama,
    gguf_names: &["llama"],
    hf_names: &["llama", "LlamaForCausalLM"],
    from_gguf: |_, _, config: &mut ModelConfig| {
        config.rope_style = RopeStyle::Interleaved;
        Ok(())
    },
    from_hf: |_, _| Ok(()),
};
