//! Mistral: llama with sliding-window attention in every layer (`sliding_window` in
//! config.json; null in later Mistral releases, which attend to the whole context). llama.cpp
//! converts Mistral to a `llama` GGUF, which that family serves.

use crate::config::{Architecture, ModelConfig, SlidingWindow, WindowLayers};
use crate::families::{hf_usize, Family};

pub(super) const MISTRAL: Family = Family {
    architecture: Architecture::Mistral,
    gguf_names: &[],
    hf_names: &["mistral", "MistralForCausalLM"],
    from_gguf: |_, _, _| Ok(()),
    from_hf: |json, config: &mut ModelConfig| {
        config.switches.sliding_window = hf_usize(json, "sliding_window")?
            .filter(|&size| size > 0 && size < config.max_position)
            .map(|size| SlidingWindow {
                size,
                layers: WindowLayers::All,
                rope_theta: None,
            });
        Ok(())
    },
};
