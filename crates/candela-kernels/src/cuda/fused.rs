//! Launchers of `kernels/fused.cu`: `rope_qkv` and `silu_mul`, one launch each.
//!
//! The public functions in `crate::fused` checked shapes, dtypes, devices and layouts; these
//! check again what the kernels index with (the row extent against the storage included), so
//! a launch never reads or writes out of bounds.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

use super::{arg_i32, arg_i64, contiguous_view, dim_u32, kernel, KernelDType, FUSED_PTX};
use crate::fused::{check_row_bounds, Glu, RopeQkvOp, RopeStyle, SiluMulDims};

const ROPE_QKV: &str = "rope_qkv";
const SILU_MUL: &str = "silu_mul";

/// Most threads of a `rope_qkv` cta: one per pair of a head, so 64 covers head_dim 128.
const ROPE_CTA_THREADS_MAX: usize = 128;
/// Threads of a `silu_mul` cta.
const SILU_CTA_THREADS: u32 = 256;
/// Most `silu_mul` ctas: 8 per multiprocessor of an H100 (132); larger inputs loop.
const SILU_CTAS_MAX: usize = 132 * 8;
/// Most heads in one launch (the grid's y dimension).
const GRID_Y_MAX: usize = 65_535;

/// Rope of q and k, copy of v: `[T, (H + 2 KVH) * D] -> [T, H + 2 KVH, D]`.
pub(crate) fn rope_qkv(
    op: &RopeQkvOp,
    qkv: &CudaStorage,
    qkv_layout: &Layout,
    cos: &CudaStorage,
    cos_layout: &Layout,
    sin: &CudaStorage,
    sin_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match (qkv.dtype(), cos.dtype(), sin.dtype()) {
        (DType::F32, DType::F32, DType::F32) => {
            rope_qkv_t::<f32>(op, qkv, qkv_layout, cos, cos_layout, sin, sin_layout)
        }
        (DType::F16, DType::F16, DType::F16) => {
            rope_qkv_t::<f16>(op, qkv, qkv_layout, cos, cos_layout, sin, sin_layout)
        }
        (DType::BF16, DType::BF16, DType::BF16) => {
            rope_qkv_t::<bf16>(op, qkv, qkv_layout, cos, cos_layout, sin, sin_layout)
        }
        (a, b, c) => candle_core::bail!(
            "{ROPE_QKV}: qkv, cos, sin must share one of F32, F16, BF16, got {a:?}, {b:?}, {c:?}"
        ),
    }
}

fn rope_qkv_t<T: KernelDType>(
    op: &RopeQkvOp,
    qkv: &CudaStorage,
    qkv_layout: &Layout,
    cos: &CudaStorage,
    cos_layout: &Layout,
    sin: &CudaStorage,
    sin_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dims = op.dims;
    let (num_tokens, width, half) = (dims.num_tokens, dims.width(), dims.head_dim / 2);
    if qkv_layout.dims() != [num_tokens, width] || (width > 1 && qkv_layout.stride()[1] != 1) {
        candle_core::bail!(
            "{ROPE_QKV}: qkv must be [{num_tokens}, {width}] with a contiguous last dimension, got shape {:?} strides {:?}",
            qkv_layout.dims(),
            qkv_layout.stride()
        );
    }
    if dims.head_dim == 0 || !dims.head_dim.is_multiple_of(2) {
        candle_core::bail!(
            "{ROPE_QKV}: head_dim {} must be even and > 0",
            dims.head_dim
        );
    }
    let shape = Shape::from((num_tokens, dims.heads_total(), dims.head_dim));
    let dev = qkv.device.clone();
    if num_tokens == 0 {
        let out = dev.alloc_zeros::<T>(0)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let cos = contiguous_view::<T>(ROPE_QKV, "cos", cos, cos_layout)?;
    let sin = contiguous_view::<T>(ROPE_QKV, "sin", sin, sin_layout)?;
    if cos.len() != num_tokens * half || sin.len() != cos.len() {
        candle_core::bail!("{ROPE_QKV}: cos/sin do not hold [T, head_dim / 2] elements");
    }
    let qkv = qkv.as_cuda_slice::<T>()?;
    let (offset, stride) =
        check_row_bounds(ROPE_QKV, "qkv", qkv_layout, num_tokens, width, qkv.len())?;
    let qkv = qkv.slice(offset..);
    let stride = arg_i64(ROPE_QKV, "qkv row stride", stride)?;
    if dims.heads_total() > GRID_Y_MAX {
        candle_core::bail!(
            "{ROPE_QKV}: {} heads exceed the {GRID_Y_MAX} of one launch",
            dims.heads_total()
        );
    }
    // SAFETY: every element of [T, H + 2 KVH, D] is written: cta (t, h) writes head h of
    // token t, all D elements (pairs p < D / 2 cover them, as does the v copy).
    let mut out = unsafe { dev.alloc::<T>(num_tokens * width)? };
    let style = match op.style {
        RopeStyle::Interleaved => "interleaved",
        RopeStyle::Half => "half",
    };
    let func = kernel(&dev, FUSED_PTX, &format!("rope_qkv_{style}_{}", T::SUFFIX))?;
    let cfg = LaunchConfig {
        grid_dim: (
            dim_u32(ROPE_QKV, "num_tokens", num_tokens)?,
            dim_u32(ROPE_QKV, "heads", dims.heads_total())?,
            1,
        ),
        block_dim: (
            half.next_multiple_of(32).min(ROPE_CTA_THREADS_MAX) as u32,
            1,
            1,
        ),
        shared_mem_bytes: 0,
    };
    let rotated_heads = arg_i32(
        ROPE_QKV,
        "num_heads + num_kv_heads",
        dims.num_heads + dims.num_kv_heads,
    )?;
    let heads_total = arg_i32(ROPE_QKV, "heads", dims.heads_total())?;
    let head_dim = arg_i32(ROPE_QKV, "head_dim", dims.head_dim)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&qkv);
    b.arg(&stride);
    b.arg(&cos);
    b.arg(&sin);
    b.arg(&mut out);
    b.arg(&rotated_heads);
    b.arg(&heads_total);
    b.arg(&head_dim);
    // SAFETY: the argument list matches `rope_qkv_*` in kernels/fused.cu; qkv is read within
    // the T rows of `width` elements checked against its storage above, cos/sin within their
    // [T, D / 2] views, and the output is [T, H + 2 KVH, D].
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// `act(gate) * up`: `[T, 2 W] -> [T, W]`.
pub(crate) fn silu_mul(
    dims: SiluMulDims,
    act: Glu,
    gate_up: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match gate_up.dtype() {
        DType::F32 => silu_mul_t::<f32>(dims, act, gate_up, layout),
        DType::F16 => silu_mul_t::<f16>(dims, act, gate_up, layout),
        DType::BF16 => silu_mul_t::<bf16>(dims, act, gate_up, layout),
        other => candle_core::bail!("{SILU_MUL}: gate_up must be F32, F16 or BF16, got {other:?}"),
    }
}

fn silu_mul_t<T: KernelDType>(
    dims: SiluMulDims,
    act: Glu,
    gate_up: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let SiluMulDims { num_tokens, width } = dims;
    if layout.dims() != [num_tokens, 2 * width] || (2 * width > 1 && layout.stride()[1] != 1) {
        candle_core::bail!(
            "{SILU_MUL}: gate_up must be [{num_tokens}, {}] with a contiguous last dimension, got shape {:?} strides {:?}",
            2 * width,
            layout.dims(),
            layout.stride()
        );
    }
    let shape = Shape::from((num_tokens, width));
    let dev = gate_up.device.clone();
    let n = num_tokens * width;
    if n == 0 {
        let out = dev.alloc_zeros::<T>(0)?;
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }
    let src = gate_up.as_cuda_slice::<T>()?;
    let (offset, stride) = check_row_bounds(
        SILU_MUL,
        "gate_up",
        layout,
        num_tokens,
        2 * width,
        src.len(),
    )?;
    let src = src.slice(offset..);
    let stride = arg_i64(SILU_MUL, "gate_up row stride", stride)?;
    // SAFETY: the grid-stride loop writes every one of the n output elements.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    let name = match act {
        Glu::Silu => "silu_mul",
        Glu::GeluTanh => "gelu_tanh_mul",
    };
    let func = kernel(&dev, FUSED_PTX, &format!("{name}_{}", T::SUFFIX))?;
    let ctas = n.div_ceil(SILU_CTA_THREADS as usize).min(SILU_CTAS_MAX);
    let cfg = LaunchConfig {
        grid_dim: (dim_u32(SILU_MUL, "ctas", ctas)?, 1, 1),
        block_dim: (SILU_CTA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_a = arg_i64(SILU_MUL, "elements", n)?;
    let width_a = arg_i64(SILU_MUL, "width", width)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&src);
    b.arg(&stride);
    b.arg(&mut out);
    b.arg(&n_a);
    b.arg(&width_a);
    // SAFETY: the argument list matches `silu_mul_*` in kernels/fused.cu; gate_up is read
    // within the T rows of 2 W elements checked against its storage above, and the output
    // is [T, W].
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}
