//! Launcher of `kernels/norm.cu`: the residual add fused with the RMS norm.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::{arg_i32, contiguous_view, dim_u32, kernel, KernelDType, NORM_PTX};

const OP: &str = "add_rms_norm";

/// Most threads per cta (one cta per row; a row of a few thousand elements needs no more).
const CTA_THREADS_MAX: usize = 256;

/// `[2, T, H]`: `x + y`, then its RMS norm times `w`.
pub(crate) fn add_rms_norm(
    eps: f32,
    x: &CudaStorage,
    x_layout: &Layout,
    y: &CudaStorage,
    y_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match x.dtype() {
        DType::F32 => run::<f32>(eps, x, x_layout, y, y_layout, w, w_layout),
        DType::F16 => run::<f16>(eps, x, x_layout, y, y_layout, w, w_layout),
        DType::BF16 => run::<bf16>(eps, x, x_layout, y, y_layout, w, w_layout),
        other => candle_core::bail!("{OP}: dtype must be F32, F16 or BF16, got {other:?}"),
    }
}

fn run<T: KernelDType>(
    eps: f32,
    x: &CudaStorage,
    x_layout: &Layout,
    y: &CudaStorage,
    y_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device.clone();
    let (t, h) = x_layout.shape().dims2()?;
    if y_layout.dims() != [t, h] || w_layout.dims() != [h] {
        candle_core::bail!(
            "{OP}: shapes x {:?}, y {:?}, weight {:?}",
            x_layout.dims(),
            y_layout.dims(),
            w_layout.dims()
        );
    }
    let xs = contiguous_view::<T>(OP, "x", x, x_layout)?;
    let ys = contiguous_view::<T>(OP, "y", y, y_layout)?;
    let ws = contiguous_view::<T>(OP, "weight", w, w_layout)?;
    // SAFETY: one cta per row writes every element of both halves of its row.
    let mut out = unsafe { dev.alloc::<T>(2 * t * h)? };
    if t > 0 && h > 0 {
        let func = kernel(&dev, NORM_PTX, &format!("add_rms_norm_{}", T::SUFFIX))?;
        let threads = h.next_multiple_of(32).min(CTA_THREADS_MAX);
        let cfg = LaunchConfig {
            grid_dim: (dim_u32(OP, "rows", t)?, 1, 1),
            block_dim: (dim_u32(OP, "threads", threads)?, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols) = (arg_i32(OP, "rows", t)?, arg_i32(OP, "h", h)?);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&xs);
        b.arg(&ys);
        b.arg(&ws);
        b.arg(&mut out);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&eps);
        // SAFETY: argument list matches `add_rms_norm_*` in kernels/norm.cu; x, y are [t, h]
        // contiguous, w [h], out [2, t, h].
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((2, t, h)),
    ))
}
