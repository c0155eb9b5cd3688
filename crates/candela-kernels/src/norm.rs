//! The residual add fused with the RMS norm that follows it: `s = x + y`, `n = rms_norm(s)`.
//!
//! Every decoder layer adds a sublayer's output to the residual stream and normalizes the sum
//! for the next sublayer, twice. As two candle ops that is two kernel launches and two passes
//! over the rows; on a GPU at decode sizes the launches, not the bytes, are the cost, so one op
//! does both. A candle custom op has one output, so both results come back as one `[2, T, H]`
//! tensor, and the caller gets two contiguous views of it.
//!
//! On the CPU the arithmetic is candle's own (`x + y` in the dtype, then candle-nn's
//! `rms_norm`: a sequential f32 sum of squares, `sqrt(mean + eps)`, `s / m * w`), so for f32 the
//! result is bit for bit what the two ops gave; f16/bf16 round once from f32.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

const ADD_RMS_NORM: &str = "add_rms_norm";

/// Rows per rayon task: the norm is a few hundred flops a row, so small batches stay on one
/// thread and only prefill-sized ones split.
const CPU_ROWS_PER_TASK: usize = 16;

/// `(x + y, rms_norm(x + y) * weight)` over the last dimension.
///
/// `x`, `y`: `[T, H]`, contiguous, same dtype (f32, f16 or bf16) and device; `weight`: `[H]`,
/// contiguous, same dtype. Both results are contiguous `[T, H]` views of one `[2, T, H]`
/// tensor.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (t, h) = x.dims2()?;
    if y.dims() != [t, h] {
        candle_core::bail!("{ADD_RMS_NORM}: x is [{t}, {h}] but y is {:?}", y.dims());
    }
    if weight.dims() != [h] {
        candle_core::bail!(
            "{ADD_RMS_NORM}: weight is {:?}, expected [{h}]",
            weight.dims()
        );
    }
    if y.dtype() != x.dtype() || weight.dtype() != x.dtype() {
        candle_core::bail!(
            "{ADD_RMS_NORM}: x, y and weight must share a dtype, got {:?}, {:?} and {:?}",
            x.dtype(),
            y.dtype(),
            weight.dtype()
        );
    }
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!(
            "{ADD_RMS_NORM}: dtype must be F32, F16 or BF16, got {:?}",
            x.dtype()
        );
    }
    if !y.device().same_device(x.device()) || !weight.device().same_device(x.device()) {
        candle_core::bail!("{ADD_RMS_NORM}: x, y and weight must be on one device");
    }
    if !(eps.is_finite() && eps >= 0.0) {
        candle_core::bail!("{ADD_RMS_NORM}: eps must be finite and >= 0, got {eps}");
    }
    let both = if t == 0 || h == 0 {
        Tensor::zeros((2, t, h), x.dtype(), x.device())?
    } else {
        x.apply_op3_no_bwd(y, weight, &AddRmsNormOp { eps })?
    };
    Ok((both.get(0)?, both.get(1)?))
}

/// Custom op `(x, y, weight) -> [2, T, H]`: the sum, then its norm.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddRmsNormOp {
    pub(crate) eps: f32,
}

/// The contiguous elements of a layout, or an error naming the tensor.
fn contiguous<'a, T>(tensor: &str, data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{ADD_RMS_NORM}: `{tensor}` must be contiguous"),
    }
}

/// An element type the CPU op runs on: f32 arithmetic for the norm, the dtype's own addition
/// for the sum (as candle's `add`).
trait Element: Copy + Send + Sync + std::ops::Add<Output = Self> {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
}

macro_rules! element {
    ($t:ty, $variant:ident, |$v:ident| $to:expr, |$f:ident| $from:expr) => {
        impl Element for $t {
            fn to_f32(self) -> f32 {
                let $v = self;
                $to
            }
            fn from_f32($f: f32) -> Self {
                $from
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}

element!(f32, F32, |v| v, |f| f);
element!(f16, F16, |v| v.to_f32(), |f| f16::from_f32(f));
element!(bf16, BF16, |v| v.to_f32(), |f| bf16::from_f32(f));

fn cpu_add_rms_norm<T: Element>(x: &[T], y: &[T], weight: &[T], h: usize, eps: f32) -> Vec<T> {
    let n = x.len();
    let mut out = vec![T::from_f32(0.0); 2 * n];
    let (sums, norms) = out.split_at_mut(n);
    sums.par_chunks_mut(h * CPU_ROWS_PER_TASK)
        .zip(norms.par_chunks_mut(h * CPU_ROWS_PER_TASK))
        .zip(x.par_chunks(h * CPU_ROWS_PER_TASK))
        .zip(y.par_chunks(h * CPU_ROWS_PER_TASK))
        .for_each(|(((sums, norms), x), y)| {
            for (((s, nr), x), y) in sums
                .chunks_exact_mut(h)
                .zip(norms.chunks_exact_mut(h))
                .zip(x.chunks_exact(h))
                .zip(y.chunks_exact(h))
            {
                for ((s, &a), &b) in s.iter_mut().zip(x).zip(y) {
                    *s = a + b;
                }
                let sum2 = s
                    .iter()
                    .map(|&v| {
                        let v = v.to_f32();
                        v * v
                    })
                    .sum::<f32>();
                let m = (sum2 / h as f32 + eps).sqrt();
                for ((d, &v), &w) in nr.iter_mut().zip(s.iter()).zip(weight) {
                    *d = T::from_f32(v.to_f32() / m * w.to_f32());
                }
            }
        });
    out
}

impl CustomOp3 for AddRmsNormOp {
    fn name(&self) -> &'static str {
        ADD_RMS_NORM
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (t, h) = x_layout.shape().dims2()?;
        let eps = self.eps;
        fn run<T: Element + candle_core::WithDType>(
            (x, x_layout): (&CpuStorage, &Layout),
            (y, y_layout): (&CpuStorage, &Layout),
            (w, w_layout): (&CpuStorage, &Layout),
            h: usize,
            eps: f32,
        ) -> Result<CpuStorage> {
            let x = contiguous("x", x.as_slice::<T>()?, x_layout)?;
            let y = contiguous("y", y.as_slice::<T>()?, y_layout)?;
            let w = contiguous("weight", w.as_slice::<T>()?, w_layout)?;
            Ok(T::wrap(cpu_add_rms_norm(x, y, w, h, eps)))
        }
        let args = ((x, x_layout), (y, y_layout), (w, w_layout));
        let out = match x.dtype() {
            DType::F32 => run::<f32>(args.0, args.1, args.2, h, eps)?,
            DType::F16 => run::<f16>(args.0, args.1, args.2, h, eps)?,
            DType::BF16 => run::<bf16>(args.0, args.1, args.2, h, eps)?,
            other => candle_core::bail!("{ADD_RMS_NORM}: dtype {other:?} is not supported"),
        };
        Ok((out, Shape::from((2, t, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        y: &candle_core::CudaStorage,
        y_layout: &Layout,
        w: &candle_core::CudaStorage,
        w_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::norm::add_rms_norm(self.eps, x, x_layout, y, y_layout, w, w_layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The two ops the fused one replaces: candle's add, then candle-nn's rms_norm, written
    /// out (candle-nn is not a dependency of this crate) in candle-nn's order of operations.
    fn reference(x: &[f32], y: &[f32], w: &[f32], h: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
        let s: Vec<f32> = x.iter().zip(y).map(|(a, b)| a + b).collect();
        let mut n = Vec::with_capacity(s.len());
        for row in s.chunks_exact(h) {
            let sum2 = row.iter().map(|v| v * v).sum::<f32>();
            let m = (sum2 / h as f32 + eps).sqrt();
            n.extend(row.iter().zip(w).map(|(v, w)| v / m * w));
        }
        (s, n)
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        // A deterministic spread of signs and magnitudes (no rand in unit tests).
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 500.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn f32_matches_add_then_rms_norm_bit_for_bit() {
        for (t, h) in [(1, 576), (3, 64), (40, 96), (1, 1)] {
            let (x, y, w) = (data(t * h, 1), data(t * h, 7), data(h, 3));
            let dev = Device::Cpu;
            let (s, n) = add_rms_norm(
                &Tensor::from_slice(&x, (t, h), &dev).unwrap(),
                &Tensor::from_slice(&y, (t, h), &dev).unwrap(),
                &Tensor::from_slice(&w, h, &dev).unwrap(),
                1e-5,
            )
            .unwrap();
            let (es, en) = reference(&x, &y, &w, h, 1e-5);
            assert_eq!(s.dims(), [t, h]);
            assert!(s.is_contiguous() && n.is_contiguous());
            assert_eq!(s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), es);
            assert_eq!(n.flatten_all().unwrap().to_vec1::<f32>().unwrap(), en);
        }
    }

    #[test]
    fn half_types_round_once_from_f32() {
        let (t, h) = (5, 48);
        let (x, y, w) = (data(t * h, 2), data(t * h, 5), data(h, 9));
        let dev = Device::Cpu;
        for dtype in [DType::F16, DType::BF16] {
            let to = |v: &[f32], shape: &[usize]| {
                Tensor::from_slice(v, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (xs, ys, ws) = (to(&x, &[t, h]), to(&y, &[t, h]), to(&w, &[h]));
            let (_, n) = add_rms_norm(&xs, &ys, &ws, 1e-6).unwrap();
            let back = |t: &Tensor| -> Vec<f32> {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (_, en) = reference(&back(&xs), &back(&ys), &back(&ws), h, 1e-6);
            let tol = if dtype == DType::F16 { 2e-3 } else { 1.6e-2 };
            for (got, want) in back(&n).iter().zip(&en) {
                assert!(
                    (got - want).abs() <= tol * want.abs().max(1.0),
                    "{dtype:?} {got} {want}"
                );
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(4, DType::F32, &dev).unwrap();
        assert!(add_rms_norm(
            &x,
            &Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            &w,
            1e-5
        )
        .is_err());
        assert!(add_rms_norm(&x, &x, &Tensor::ones(3, DType::F32, &dev).unwrap(), 1e-5).is_err());
        assert!(add_rms_norm(&x, &x.to_dtype(DType::F16).unwrap(), &w, 1e-5).is_err());
        assert!(add_rms_norm(&x, &x, &w, f32::NAN).is_err());
        assert!(add_rms_norm(
            &x.t().unwrap(),
            &x.t().unwrap(),
            &Tensor::ones(2, DType::F32, &dev).unwrap(),
            1e-5
        )
        .is_err());
        let (s, n) = add_rms_norm(
            &Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
            &Tensor::zeros((0, 4), DType::F32, &dev).unwrap(),
            &w,
            1e-5,
        )
        .unwrap();
        assert_eq!((s.dims(), n.dims()), ([0, 4].as_slice(), [0, 4].as_slice()));
    }
}
