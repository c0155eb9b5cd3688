//! Weights of a linear layer `y = x W^T`, in whichever form runs fastest on the device.
//!
//! One enum so the model code never cares how a weight is stored: GGUF weights
//! stay quantized in candle's `QMatMul`, safetensors weights are dense tensors,
//! and faster repacked forms (candela-kernels' `PackedWeight`) slot in as new
//! variants built in [`Linear::from_qtensor`] without touching the model.

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::Result;

/// A linear layer's weight `W: [out_features, in_features]` (no bias).
#[derive(Debug, Clone)]
pub enum Linear {
    /// GGML-quantized (or f32/f16 from a GGUF), run by candle's quantized matmul.
    Quantized(QMatMul),
    /// A dense `[out, in]` tensor in the activation dtype.
    Dense(Tensor),
}

impl Linear {
    /// Wraps a tensor read from a GGUF file.
    ///
    /// Honours candle's `CANDLE_DEQUANTIZE_ALL=1` (f32 dense weights instead of quantized):
    /// `tests/model.rs` relies on it to compare with candle-transformers without 8-bit
    /// activation rounding, so a faster variant chosen here must respect it too.
    pub fn from_qtensor(weight: QTensor) -> Result<Self> {
        Ok(Self::Quantized(QMatMul::from_qtensor(weight)?))
    }

    /// Wraps a dense `[out, in]` weight, converted to `dtype` once here.
    pub fn from_dense(weight: Tensor, dtype: DType) -> Result<Self> {
        Ok(Self::Dense(weight.to_dtype(dtype)?.contiguous()?))
    }

    /// `x: [m, in]` -> `[m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self {
            Self::Quantized(w) => w.forward(x)?,
            Self::Dense(w) => x.matmul(&w.t()?)?,
        };
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Device;

    #[test]
    fn dense_and_quantized_agree() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 64), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev)?;
        let dense = Linear::from_dense(w.clone(), DType::F32)?.forward(&x)?;
        let q = Linear::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?.forward(&x)?;
        assert_eq!(dense.dims(), &[3, 8]);
        let diff = (dense - q)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Q8_0 keeps ~2 significant digits per weight; sums of 64 products of N(0,1) values.
        assert!(diff < 0.5, "diff {diff}");
        Ok(())
    }
}
