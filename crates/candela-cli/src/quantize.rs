//! `--quantize` / `--quant-group-size`, shared by every subcommand that loads a model.

use candela_models::{QuantBits, Quantize};

/// How float weights are stored at load.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantizeBits {
    /// Symmetric int8 per group.
    Int8,
    /// int4 with a per-group min.
    Int4,
}

/// Quantization of float (safetensors, or F32/F16/BF16 GGUF) linear weights at load.
#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeArgs {
    /// Pack float linear weights into int8 or int4 at load (embeddings, norms and the LM
    /// head stay as stored; GGUF-quantized weights keep their own type).
    #[arg(long, value_enum)]
    quantize: Option<QuantizeBits>,
    /// Weights per scale with --quantize: 32, 64 or 128 (a layer whose input size it does
    /// not divide uses the largest of these that does).
    #[arg(long, default_value = "32", requires = "quantize",
          value_parser = clap::builder::PossibleValuesParser::new(["32", "64", "128"]))]
    quant_group_size: String,
}

impl QuantizeArgs {
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
