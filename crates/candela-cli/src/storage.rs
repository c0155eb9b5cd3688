//! How a loaded model is stored: `--quantize` / `--quant-group-size` for the weights and
//! `--kv-cache-dtype` for the KV cache, shared by every subcommand that loads a model.

use candela_engine::KvCacheDtype;
use candela_models::{QuantBits, Quantize};

/// How float weights are stored at load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeBits {
    /// Symmetric int8 per group.
    Int8,
    /// int4 with a per-group min.
    Int4,
}

/// The KV cache's element type.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    /// f16 on the CPU (llama.cpp's default), the model's activation dtype on a GPU.
    Auto,
    /// 4 bytes an element.
    F32,
    /// 2 bytes an element: twice the tokens in the same memory, as llama.cpp's default.
    F16,
    /// 2 bytes an element, f32's range with 8 mantissa bits.
    Bf16,
}

/// Quantization of float (safetensors, or F32/F16/BF16 GGUF) linear weights at load, and the
/// KV cache's element type.
#[derive(clap::Args, Clone, Debug)]
pub struct StorageArgs {
    /// Pack float linear weights into int8 or int4 at load (embeddings, norms and the LM
    /// head stay as stored; GGUF-quantized weights keep their own type).
    #[arg(long, value_enum)]
    quantize: Option<QuantizeBits>,
    /// Weights per scale with --quantize: 32, 64 or 128 (a layer whose input size it does
    /// not divide uses the largest of these that does).
    #[arg(long, default_value = "32", requires = "quantize",
          value_parser = clap::builder::PossibleValuesParser::new(["32", "64", "128"]))]
    quant_group_size: String,
    /// Element type of the KV cache (vLLM's --kv-cache-dtype): f16 or bf16 hold twice the
    /// tokens of f32 in the same memory, and attention reads half the bytes.
    #[arg(long, value_enum, default_value = "auto")]
    kv_cache_dtype: KvDtype,
}

impl StorageArgs {
    /// The engine's `kv_cache_dtype` setting.
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        match self.kv_cache_dtype {
            KvDtype::Auto => KvCacheDtype::Auto,
            KvDtype::F32 => KvCacheDtype::F32,
            KvDtype::F16 => KvCacheDtype::F16,
            KvDtype::Bf16 => KvCacheDtype::Bf16,
        }
    }

    /// The engine's `quantize` setting.
    pub fn to_quantize(&self) -> anyhow::Result<Option<Quantize>> {
        let Some(bits) = self.quantize else {
            return Ok(None);
        };
        let bits = match bits {
            QuantizeBits::Int8 => QuantBits::Int8,
            QuantizeBits::Int4 => QuantBits::Int4,
        };
        let group_size: usize = self.quant_group_size.parse()?;
        Ok(Some(Quantize::new(bits, group_size)?))
    }
}
