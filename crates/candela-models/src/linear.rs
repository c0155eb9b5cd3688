//! Weights of a linear layer `y = x W^T`, in whichever form runs fastest on the device.
//!
//! One enum so the model code never cares how a weight is stored: GGUF weights
//! stay quantized in candle's `QMatMul`, safetensors weights are dense tensors,
//! and faster repacked forms (candela-kernels' `PackedWeight`) slot in as new
//! variants built in [`Linear::from_qtensor`] without touching the model.

use candela_kernels::quant::{
    Kernel, PackedWeight, QuantBits, QuantError, ScaleDType, CUDA_GEMV_ROWS_MAX as GEMV_ROWS_MAX,
};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{Error, Result};

/// `--quantize`: float weights of linear layers packed into candela-kernels' int8 or int4
/// format at load (embeddings, norms and a tied LM head stay as stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantize {
    /// int8 (symmetric) or int4 (with a per-group min).
    pub bits: QuantBits,
    /// Weights per scale along the input dimension: 32, 64 or 128.
    pub group_size: usize,
}

impl Quantize {
    /// The group sizes `--quant-group-size` accepts.
    pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

    /// Checks the group size.
    pub fn new(bits: QuantBits, group_size: usize) -> Result<Self> {
        if !Self::GROUP_SIZES.contains(&group_size) {
            return Err(Error::UnsupportedFeature(format!(
                "quantization group size {group_size} (expected one of 32, 64, 128)"
            )));
        }
        Ok(Self { bits, group_size })
    }

    /// The group size used for a weight with `k` inputs: the requested one when it divides
    /// `k`, else the largest smaller one that does (SmolLM2's k = 576 is not a multiple of
    /// 128), `None` when not even 32 does.
    pub fn group_size_for(&self, k: usize) -> Option<usize> {
        Self::GROUP_SIZES
            .into_iter()
            .rev()
            .find(|&g| g <= self.group_size && k.is_multiple_of(g))
    }
}

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
    /// On a CUDA device, a GGUF weight kept in both forms, each where it measured faster
    /// (kernels/NOTES.md): our fused dequantize-GEMV for decode-sized inputs (batch-1 decode
    /// 165 vs 147 tokens/s on the H100), candle's quantized matmul above that (prefill 39.6k
    /// vs 14.0k tokens/s: it dequantizes to f16 for cuBLAS, ours to f32).
    Hybrid {
        /// Inputs of at most [`GEMV_ROWS_MAX`] rows.
        gemv: PackedWeight,
        /// Larger inputs.
        gemm: QMatMul,
    },
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
    /// `QMatMul` at SmolLM2's shapes. So are the k-quants (Q2_K .. Q6_K, with f32 group
    /// scales) at every shape and row count: ours is faster at each one measured, Gemma 3
    /// 270M's `[640, 1024]` and `[640, 2048]` at m = 1, 7, 64 (`examples/kquant_timing`, AMD
    /// EPYC Zen 1 with AVX2, best of many calls, in us, candle vs ours):
    ///
    /// | one thread | m = 1 | m = 7 | m = 64 |
    /// |---|---|---|---|
    /// | Q4_K [640, 1024] | 44 vs 29 | 281 vs 178 | 2607 vs 1600 |
    /// | Q4_K [640, 2048] | 87 vs 57 | 559 vs 353 | 5243 vs 3192 |
    /// | Q6_K [640, 2048] | 152 vs 69 | 594 vs 476 | 5533 vs 4393 |
    /// | Q5_K [640, 2048] | 160 vs 53 | 1123 vs 350 | 10397 vs 3211 |
    ///
    /// Q2_K and Q3_K: 1.5x to 3x. With two threads on this shared 2-core machine the best
    /// calls are within noise of each other at the smallest shape (Q4_K [640, 1024], m = 1:
    /// 30 vs 34 us: ours stays on one thread below 2^20 multiply-adds, candle's spinning pool
    /// sometimes gets the second core), and ours is ahead elsewhere; the typical call
    /// (criterion, `benches/qmatmul.rs`) is 2 to 40x faster with ours, as candle's pool stalls
    /// when the cores are shared (Q4_K [640, 1024] m = 1: 2240 vs 54 us). So no shape is
    /// left to candle.
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

    /// For a CUDA `device`: `weight` (read on the CPU) as [`Linear::Hybrid`] when its GGML
    /// type repacks losslessly with f16 scales (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else candle's
    /// CUDA quantized
    /// matmul. `CANDELA_CUDA_QMATMUL=candle` or `=ours` keeps one of the two forms for every
    /// shape (to compare them).
    pub fn for_cuda(weight: QTensor, device: &Device) -> Result<Self> {
        let choice = std::env::var("CANDELA_CUDA_QMATMUL").unwrap_or_default();
        let on_device = |w: &QTensor| qmatmul_on(w.dtype(), &w.data()?, w.shape().dims2()?, device);
        if choice == "candle" {
            return Ok(Self::Quantized(on_device(&weight)?));
        }
        // The k-quant repacks (f32 scales, groups of 16) have no CUDA kernel: candle runs them.
        if is_kquant(weight.dtype()) {
            return Ok(Self::Quantized(on_device(&weight)?));
        }
        match Self::packed(&weight)? {
            Some(Self::Packed(gemv)) if choice == "ours" => Ok(Self::Packed(gemv)),
            Some(Self::Packed(gemv)) => Ok(Self::Hybrid {
                gemv,
                gemm: on_device(&weight)?,
            }),
            _ => Ok(Self::Quantized(on_device(&weight)?)),
        }
    }

    /// Wraps a dense `[out, in]` weight, converted to `dtype` once here.
    pub fn from_dense(weight: Tensor, dtype: DType) -> Result<Self> {
        Ok(Self::Dense(weight.to_dtype(dtype)?.contiguous()?))
    }

    /// A float `[out, in]` weight: packed as `quantize` asks (on any device: a CUDA forward
    /// uploads the packed bytes), else dense in `dtype`. A weight whose `in` is not a
    /// multiple of 32 cannot be grouped and stays dense.
    pub fn from_float(weight: Tensor, dtype: DType, quantize: Option<Quantize>) -> Result<Self> {
        let Some(q) = quantize else {
            return Self::from_dense(weight, dtype);
        };
        let (n, k) = weight.dims2()?;
        let Some(group_size) = q.group_size_for(k) else {
            return Self::from_dense(weight, dtype);
        };
        let w = weight
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let packed = PackedWeight::quantize_f32(&w, n, k, q.bits, group_size)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self::Packed(packed))
    }

    /// `parts` (weights applied to the same input) stacked into one weight when all are
    /// packed alike, else `None`: one matmul instead of several, one parallel region per
    /// projection group on the CPU and one launch on the GPU.
    pub fn stack(parts: &[&Linear]) -> Result<Option<Self>> {
        let gemvs: Option<Vec<&PackedWeight>> = parts
            .iter()
            .map(|l| match l {
                Self::Packed(w) | Self::Hybrid { gemv: w, .. } => Some(w),
                _ => None,
            })
            .collect();
        let Some(gemvs) = gemvs else {
            return Ok(None);
        };
        let gemv = match PackedWeight::concat_rows(&gemvs) {
            Ok(w) => w,
            Err(QuantError::Incompatible) => return Ok(None),
            Err(e) => return Err(candle_core::Error::Msg(e.to_string()).into()),
        };
        let gemms: Option<Vec<&QTensor>> = parts
            .iter()
            .map(|l| match l {
                Self::Hybrid {
                    gemm: QMatMul::QTensor(q),
                    ..
                } => Some(q.as_ref()),
                _ => None,
            })
            .collect();
        match gemms {
            None if parts.iter().all(|l| matches!(l, Self::Packed(_))) => {
                Ok(Some(Self::Packed(gemv)))
            }
            Some(qs) if qs.iter().all(|q| q.dtype() == qs[0].dtype()) => {
                // GGML blocks run along k inside each output row, so stacking output rows is
                // concatenating the bytes.
                let mut bytes = Vec::new();
                let mut n = 0;
                for q in &qs {
                    bytes.extend_from_slice(&q.data()?);
                    n += q.shape().dims2()?.0;
                }
                let gemm = qmatmul_on(qs[0].dtype(), &bytes, (n, gemv.k()), &qs[0].device())?;
                Ok(Some(Self::Hybrid { gemv, gemm }))
            }
            _ => Ok(None),
        }
    }

    /// How this weight is stored and which matmul runs it, as printed at load.
    pub fn describe(&self) -> String {
        match self {
            Self::Quantized(QMatMul::QTensor(q)) => format!("candle QMatMul {:?}", q.dtype()),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                format!("candle matmul {:?}", t.dtype())
            }
            Self::Dense(t) => format!("dense {:?} matmul", t.dtype()),
            Self::Hybrid { gemv, gemm } => {
                let big = match gemm {
                    QMatMul::QTensor(q) => format!("{:?}", q.dtype()),
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => format!("{:?}", t.dtype()),
                };
                format!(
                    "packed {} g{} GEMV for <= {GEMV_ROWS_MAX} rows, candle QMatMul {big} above",
                    bits_name(gemv.bits()),
                    gemv.group_size()
                )
            }
            Self::Packed(w) => {
                let bits = bits_name(w.bits());
                let from = match w.source_ggml() {
                    Some(t) => format!("{t:?}, lossless"),
                    None => "--quantize".to_string(),
                };
                let scales = match w.scale_dtype() {
                    ScaleDType::F16 => "",
                    ScaleDType::F32 => " f32-scales",
                };
                // AMX (only when forced) runs batches of AMX_ROWS_MIN rows or more; fewer go to
                // AVX-512 VNNI.
                let kernel = match Kernel::detect() {
                    Kernel::Amx => format!(
                        "amx from {} rows, avx512vnni below",
                        candela_kernels::quant::AMX_ROWS_MIN
                    ),
                    k => k.name().to_string(),
                };
                format!(
                    "packed {bits} g{}{scales} ({from}), candela matmul [{kernel} on CPU]",
                    w.group_size(),
                )
            }
        }
    }

    /// `x: [m, in]` -> `[m, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self {
            Self::Quantized(w) => w.forward(x)?,
            Self::Dense(w) => x.matmul(&w.t()?)?,
            Self::Packed(w) => w.matmul(x)?,
            Self::Hybrid { gemv, gemm } => {
                let k = x.dim(candle_core::D::Minus1)?;
                if x.elem_count() <= GEMV_ROWS_MAX * k {
                    gemv.matmul(x)?
                } else {
                    gemm.forward(x)?
                }
            }
        };
        Ok(y)
    }
}

/// candle's quantized matmul over raw GGML blocks of an `[n, k]` weight, on `device`.
fn qmatmul_on(
    dtype: candle_core::quantized::GgmlDType,
    bytes: &[u8],
    (n, k): (usize, usize),
    device: &Device,
) -> Result<QMatMul> {
    let q = qtensor_from_ggml(dtype, bytes, vec![n, k], device)?;
    Ok(QMatMul::from_qtensor(q)?)
}

/// The GGUF k-quants, which repack with f32 group scales (CPU kernels only).
fn is_kquant(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    )
}

fn bits_name(bits: QuantBits) -> &'static str {
    match bits {
        QuantBits::Int8 => "int8",
        QuantBits::Int4 => "int4",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn group_size_falls_back_to_one_that_divides_k() -> Result<()> {
        let q = Quantize::new(QuantBits::Int4, 128)?;
        assert_eq!(q.group_size_for(1536), Some(128));
        assert_eq!(q.group_size_for(576), Some(64));
        assert_eq!(q.group_size_for(96), Some(32));
        assert_eq!(q.group_size_for(100), None);
        assert!(Quantize::new(QuantBits::Int8, 48).is_err());
        Ok(())
    }

    #[test]
    fn float_weights_quantize_on_request() -> Result<()> {
        let dev = Device::Cpu;
        // Deterministic pseudo-random values in [-1, 1), so the error bounds cannot flake.
        let values = |len: usize, seed: u64| -> Vec<f32> {
            let mut state = seed;
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect()
        };
        let w = Tensor::from_vec(values(16 * 128, 1), (16, 128), &dev)?;
        let x = Tensor::from_vec(values(3 * 128, 2), (3, 128), &dev)?;
        let dense = Linear::from_float(w.clone(), DType::F32, None)?;
        assert!(matches!(dense, Linear::Dense(_)));
        let reference = dense.forward(&x)?;
        let norm = reference.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
        // Relative error of the whole output: int8 keeps ~1/254 of each group's range per
        // weight (and per activation), int4 1/30.
        for (bits, group, tol) in [(QuantBits::Int8, 32, 0.02f32), (QuantBits::Int4, 64, 0.15)] {
            let packed =
                Linear::from_float(w.clone(), DType::F32, Some(Quantize::new(bits, group)?))?;
            let Linear::Packed(p) = &packed else {
                panic!("expected a packed weight, got {}", packed.describe());
            };
            assert_eq!(
                (p.bits(), p.group_size(), p.source_ggml()),
                (bits, group, None)
            );
            assert!(
                packed.describe().contains("--quantize"),
                "{}",
                packed.describe()
            );
            let err = (packed.forward(&x)? - &reference)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_scalar::<f32>()?;
            assert!(
                err / norm < tol,
                "{bits:?} g{group}: relative error {}",
                err / norm
            );
        }
        // An input size no group divides stays dense.
        let odd = Tensor::randn(0f32, 1.0, (4, 40), &dev)?;
        let q = Some(Quantize::new(QuantBits::Int8, 32)?);
        assert!(matches!(
            Linear::from_float(odd, DType::F32, q)?,
            Linear::Dense(_)
        ));
        Ok(())
    }
}
