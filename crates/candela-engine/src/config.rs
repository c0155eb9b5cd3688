//! Engine configuration: the model to load, the device, and a limit on everything (KV memory,
//! running sequences, tokens per step, waiting requests, context length).

use std::time::Duration;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineDevice {
    /// The host CPU.
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

/// The KV cache's element type (vLLM's `--kv-cache-dtype`, llama.cpp's `-ctk`/`-ctv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// On the CPU f16, llama.cpp's default: twice the tokens of f32 in the same memory, read
    /// in place (F16C) at the speed of an f32 cache. On a GPU the model's activation dtype: a
    /// narrower cache costs two casts a layer there, and a GPU decode step is launch bound.
    #[default]
    Auto,
    /// 4 bytes an element.
    F32,
    /// 2 bytes an element: twice the tokens in the same memory, half the bytes attention
    /// reads; q and the cache meet in f16 (attention itself accumulates in f32).
    F16,
    /// 2 bytes an element, f32's range with 8 bits of mantissa.
    Bf16,
}

impl KvCacheDtype {
    /// The cache dtype for a model whose activations are `model`, on `device`.
    pub fn resolve(
        self,
        model: candle_core::DType,
        device: &candle_core::Device,
    ) -> candle_core::DType {
        match self {
            Self::Auto if device.is_cpu() => candle_core::DType::F16,
            Self::Auto => model,
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// How to build an engine. `Default` gives the CLI's defaults for the default model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// A path (GGUF file, or a directory with safetensors) or a Hugging Face model id.
    pub model: String,
    /// The name reported by `model_name()`; `None` uses the file stem or model id.
    pub served_model_name: Option<String>,
    /// Where to run.
    pub device: EngineDevice,
    /// Memory for the paged KV cache (K and V, all layers), in bytes.
    pub kv_cache_memory_bytes: u64,
    /// On a CUDA device: the fraction of the GPU's total memory the engine may use; the KV
    /// cache gets what is free of it after the weights load and a warm-up step (vLLM's
    /// `--gpu-memory-utilization`), and `kv_cache_memory_bytes` is ignored. `None`, or a CPU
    /// device: `kv_cache_memory_bytes` sizes the cache.
    pub gpu_memory_utilization: Option<f64>,
    /// Tokens per KV block.
    pub kv_block_size_tokens: usize,
    /// Most sequences (choices) in one step.
    pub seqs_running_max: usize,
    /// Most tokens (prefill chunks plus decode tokens) in one step.
    pub batch_tokens_max: usize,
    /// Most requests submitted but not yet scheduled; beyond it `submit` answers `QueueFull`.
    pub queue_waiting_max: usize,
    /// Context length (prompt plus output); `None` uses the model's own.
    pub model_len_max: Option<usize>,
    /// Reuse KV blocks of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// Give the sliding-window layers of a model that has them (Gemma 3, Mistral) a KV pool of
    /// their own whose blocks are released once out of the window (vLLM's hybrid KV cache
    /// manager; `false` is its `--disable-hybrid-kv-cache-manager`: every layer keeps the
    /// whole context).
    pub hybrid_kv_cache: bool,
    /// Seed of the engine's RNG, which draws seeds for requests that carry none.
    pub seed: u64,
    /// A Jinja chat template that replaces the model's own (vLLM's `--chat-template`).
    pub chat_template: Option<String>,
    /// `--quantize`: pack float linear weights into int8/int4 at load.
    pub quantize: Option<candela_models::Quantize>,
    /// Pick the tokens of plain greedy rows (no logprobs, bias or penalties) with an argmax on
    /// the model's device and copy only those ids to the host, instead of every row's logits.
    /// `None` means on: on a GPU it saves a `[64, 49152]` f32 copy and host scan per step at
    /// batch 64; on the CPU, the copy (at batch 64: 5.5 -> 3.0 ms of a ~70 ms step).
    /// `Some(false)` samples every row on the host (the path the tests compare against).
    pub greedy_on_device: Option<bool>,
    /// The KV cache's element type.
    pub kv_cache_dtype: KvCacheDtype,
    /// With work pending, how long the engine may go without finishing a step before
    /// [`crate::EngineHandle::health`] calls it stalled. Longer than the slowest legitimate
    /// step (a full prefill chunk on a slow CPU takes seconds).
    pub step_stall_max: Duration,
    /// Speculative decoding by n-gram lookup (`None`: off). Choices with structured outputs,
    /// tools or logprobs never speculate.
    pub speculative: Option<crate::SpeculativeConfig>,
    /// Test-only: make a forward pass fail on purpose (`fault-injection` feature).
    #[cfg(feature = "fault-injection")]
    pub fault: Option<crate::fault::Fault>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            served_model_name: None,
            device: EngineDevice::Cpu,
            kv_cache_memory_bytes: 512 << 20,
            gpu_memory_utilization: None,
            kv_block_size_tokens: 16,
            seqs_running_max: 64,
            batch_tokens_max: 2048,
            queue_waiting_max: 256,
            model_len_max: None,
            enable_prefix_caching: true,
            hybrid_kv_cache: true,
            seed: 0,
            chat_template: None,
            quantize: None,
            greedy_on_device: None,
            kv_cache_dtype: KvCacheDtype::Auto,
            step_stall_max: Duration::from_secs(60),
            speculative: None,
            #[cfg(feature = "fault-injection")]
            fault: None,
        }
    }
}

impl EngineConfig {
    /// Checks the limits that do not depend on the model.
    pub fn validate(&self) -> Result<(), crate::EngineError> {
        let positive = [
            ("kv_block_size_tokens", self.kv_block_size_tokens),
            ("seqs_running_max", self.seqs_running_max),
            ("batch_tokens_max", self.batch_tokens_max),
            ("queue_waiting_max", self.queue_waiting_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(crate::EngineError::Config(format!(
                    "{name} must be positive"
                )));
            }
        }
        if self.model_len_max == Some(0) {
            return Err(crate::EngineError::Config(
                "model_len_max must be positive".into(),
            ));
        }
        if let Some(fraction) = self.gpu_memory_utilization {
            if fraction.is_nan() || fraction <= 0.0 || fraction > 1.0 {
                return Err(crate::EngineError::Config(format!(
                    "gpu_memory_utilization must be in (0, 1], got {fraction}"
                )));
            }
        }
        if let Some(speculative) = &self.speculative {
            speculative.validate()?;
        }
        if self.kv_cache_memory_bytes == 0 {
            return Err(crate::EngineError::Config(
                "kv_cache_memory_bytes must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_memory_utilization_must_be_a_fraction() {
        for bad in [0.0, -0.5, 1.5, f64::NAN] {
            let config = EngineConfig {
                gpu_memory_utilization: Some(bad),
                ..EngineConfig::default()
            };
            assert!(config.validate().is_err(), "{bad} was accepted");
        }
        for good in [None, Some(0.05), Some(0.9), Some(1.0)] {
            let config = EngineConfig {
                gpu_memory_utilization: good,
                ..EngineConfig::default()
            };
            assert!(config.validate().is_ok(), "{good:?} was refused");
        }
    }
}
