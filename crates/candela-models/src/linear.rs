//! Weights of a linear layer `y = x W^T`, in whichever form runs fastest on the device.
//!
//! One enum so the model code never cares how a weight is stored: GGUF weights
//! stay quantized in candle's `QMatMul`, safetensors weights are dense tensors,
//! and faster repacked forms (candela-kernels' `PackedWeight`) slot in as new
//! variants built in [`Linear::from_qtensor`] without touching the model.

use candela_kernels::quant::{PackedWeight, QuantError};
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
    /// GGML blocks repacked losslessly into candela-kernels' int4/int8 layout: its SIMD CPU
    /// matmul, or its fused CUDA GEMV (uploaded to the device by the first forward).
    Packed(PackedWeight),
}

impl Linear {
    /// Wraps a tensor read from a GGUF file.
    ///
    /// Honours candle's `CANDLE_DEQUANTIZE_ALL=1` (f32 dense weights instead of quantized):
    /// `tests/model.rs` relies on it to compare with candle-transformers without 8-bit
    /// activation rounding, so a faster variant chosen here must respect it too.
    ///
    /// On the CPU, GGML types that candle runs without SIMD or without its tiled paths at
    /// our shapes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are repacked losslessly into
    /// [`PackedWeight`]: measured in `benches/qmatmul.rs`, 5x to 200x faster than candle's
    /// `QMatMul` at SmolLM2's shapes. k-quants stay with candle, whose Q4K path is fast.
    /// `CANDELA_CPU_QMATMUL=candle` keeps candle's path for every type (to compare).
    pub fn from_qtensor(weight: QTensor) -> Result<Self> {
        let dequantize_all = std::env::var("CANDLE_DEQUANTIZE_ALL").is_ok_and(|v| v == "1");
        let candle_only = std::env::var("CANDELA_CPU_QMATMUL").is_ok_and(|v| v == "candle");
        if weight.device().is_cpu() && !dequantize_all && !candle_only {
            if let Some(packed) = Self::packed(&weight)? {
                return Ok(packed);
            }
        }
        Ok(Self::Quantized(QMatMul::from_qtensor(weight)?))
    }

    /// `weight` repacked into a [`PackedWeight`] when its GGML type repacks losslessly,
    /// `None` for the other types.
    fn packed(weight: &QTensor) -> Result<Option<Self>> {
        let (n, k) = weight.shape().dims2()?;
        match PackedWeight::from_ggml(weight.dtype(), &weight.data()?, n, k) {
            Ok(w) => {
                tracing::debug!(dtype = ?weight.dtype(), n, k, "weight repacked for candela's quantized matmul");
                Ok(Some(Self::Packed(w)))
            }
            Err(QuantError::UnsupportedGgml { .. }) => Ok(None),
            Err(e) => Err(candle_core::Error::Msg(e.to_string()).into()),
        }
    }

    /// For a CUDA device: `weight` (read on the CPU) repacked into a [`PackedWeight`] when
    /// its GGML type repacks losslessly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); `None` otherwise, or
    /// when `CANDELA_CUDA_QMATMUL=candle` asks for candle's CUDA quantized matmul (to compare
    /// the two).
    pub fn packed_for_cuda(weight: &QTensor) -> Result<Option<Self>> {
        if std::env::var("CANDELA_CUDA_QMATMUL").is_ok_and(|v| v == "candle") {
            return Ok(None);
        }
        Self::packed(weight)
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
            Self::Packed(w) => w.matmul(x)?,
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
