//! Fused elementwise ops of the decoder layer, as candle custom ops: the rotary embedding of a
//! fused QKV projection ([`rope_qkv`]) and the gated activations of the MLP: SwiGLU
//! ([`silu_mul`]) and GeGLU with the tanh GELU ([`gelu_tanh_mul`], Gemma's).
//!
//! On a GPU a decode step is launch bound: each op of a layer is a kernel launch whatever its
//! size. `rope_qkv` does in one launch what took five (copy q, rope q, copy k, rope k, copy v),
//! and `silu_mul` in one what took two (silu of a strided view, then the product).
//!
//! ```text
//! qkv row t (width (H + 2 KVH) * D; last stride 1, any row stride, e.g. a narrow):
//!   | q head 0 | .. | q head H-1 | k head 0 | .. | k head KVH-1 | v head 0 | .. | v head KVH-1 |
//!     rotated by (cos[t], sin[t])  rotated by (cos[t], sin[t])   copied unchanged
//! out: [T, H + 2 KVH, D], contiguous, heads in the same order.
//!
//! gate_up row t (width 2 W; last stride 1, any row stride):
//!   | gate 0 .. W-1 | up 0 .. W-1 |   ->   out[t, j] = silu(gate[j]) * up[j],   out: [T, W]
//!                                              (or gelu_tanh(gate[j]) * up[j])
//! ```
//!
//! The tanh GELU is computed as `g / (1 + exp(-2 u))` with `u = sqrt(2 / pi) (g + 0.044715 g^3)`,
//! which equals `0.5 g (1 + tanh(u))` exactly and so goes through the same vectorised `exp` as
//! silu (candle's GELU calls libm's scalar `tanhf`: about 5% of a Gemma 3 270M decode step).
//!
//! Numerics: every element is read as f32, computed with the same f32 operations as candle's
//! CPU kernels (products, then the sum or difference, with no fused multiply-add) and rounded
//! once to the dtype on store. In f32 that is bit for bit what `candle_nn::rotary_emb::rope_i`
//! and `rope` give on the CPU. `silu_mul` on an AVX2 CPU takes `exp` from a branch-free
//! polynomial that vectorises (within 3e-7 relative of libm's; libm's scalar `expf` was a
//! tenth of a batch-1 decode step), so it is within 1e-6 relative of candle's, not bit for bit.
//! In f16/bf16 candle rounds to the dtype after every operation, so results differ from
//! candle's by a few ulp (ours are the correctly rounded f32 results). The CUDA kernels use the
//! same operations with explicit round-to-nearest intrinsics, so `rope_qkv` matches the CPU bit
//! for bit and `silu_mul` differs only through the device's `expf` (within 2 ulp of libm's).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::attention::{
    check_contiguous, check_device, check_dtype, check_rank, contiguous_slice, fast_exp,
    layout_error, KvElem,
};
use crate::error::KernelError;

const ROPE_QKV: &str = "rope_qkv";
const SILU_MUL: &str = "silu_mul";

/// The activation of a gated MLP's gate half.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Glu {
    /// `silu(x) = x / (1 + exp(-x))` (SwiGLU).
    Silu,
    /// The tanh approximation of GELU (GeGLU; `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `sqrt(2 / pi)`, of the tanh GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// Columns of `silu_mul` converted to f32 at a time on the CPU: three 4 KiB buffers (gate, up,
/// out) stay in L1 whatever the width.
const SILU_CPU_COLUMNS: usize = 1024;

/// Which elements of a head the rotary embedding pairs up. Each pair `(x0, x1)` with angle
/// index `i` becomes `(x0 * cos[i] - x1 * sin[i], x0 * sin[i] + x1 * cos[i])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i + 1])`, as `candle_nn::rotary_emb::rope_i` (GGUF llama weights,
    /// whose q/k rows are permuted for it).
    Interleaved,
    /// Pairs `(x[i], x[i + head_dim / 2])`, as `candle_nn::rotary_emb::rope` (Hugging Face
    /// weights).
    Half,
}

/// Rotates the q and k heads of a fused QKV projection by each token's angles and lays q, k
/// and v out as heads: `[T, (H + 2 KVH) * D] -> [T, H + 2 KVH, D]` (see the module doc).
///
/// `qkv`: 2-D, f32, f16 or bf16, last dimension contiguous (any row stride, so a narrow of a
/// wider projection works). `cos`, `sin`: `[T, head_dim / 2]`, contiguous, `qkv`'s dtype and
/// device; row `t` holds token `t`'s own angles (the caller gathers them by position).
/// `head_dim` must be even and non-zero, `num_heads` and `num_kv_heads` non-zero.
///
/// The output is contiguous, in `qkv`'s dtype: heads `0..H` are q rotated, the next `KVH`
/// k rotated, the last `KVH` v copied. Everything is checked before any work; `T == 0` gives
/// an empty `[0, H + 2 KVH, D]` tensor.
pub fn rope_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    style: RopeStyle,
) -> Result<Tensor> {
    let dims = check_rope_qkv_args(qkv, cos, sin, num_heads, num_kv_heads, head_dim)?;
    if dims.num_tokens == 0 {
        return Tensor::zeros(
            (0, dims.heads_total(), dims.head_dim),
            qkv.dtype(),
            qkv.device(),
        );
    }
    qkv.apply_op3_no_bwd(cos, sin, &RopeQkvOp { dims, style })
}

/// SwiGLU's activation of a fused gate/up projection: `[T, 2 W] -> [T, W]` with
/// `out[t, j] = silu(gate_up[t, j]) * gate_up[t, W + j]` and `silu(x) = x / (1 + exp(-x))`.
///
/// `gate_up`: 2-D, f32, f16 or bf16, last dimension contiguous (any row stride), with
/// `2 * width` columns; `width` must be non-zero. The output is contiguous, in `gate_up`'s
/// dtype, computed in f32. `T == 0` gives an empty `[0, width]` tensor.
pub fn silu_mul(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    glu_mul(gate_up, width, Glu::Silu)
}

/// GeGLU's activation of a fused gate/up projection, as [`silu_mul`] with the tanh
/// approximation of GELU: `out[t, j] = gelu_tanh(gate_up[t, j]) * gate_up[t, W + j]`,
/// `gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`. Same arguments.
pub fn gelu_tanh_mul(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    glu_mul(gate_up, width, Glu::GeluTanh)
}

fn glu_mul(gate_up: &Tensor, width: usize, act: Glu) -> Result<Tensor> {
    let dims = check_silu_mul_args(gate_up, width)?;
    if dims.num_tokens == 0 {
        return Tensor::zeros((0, dims.width), gate_up.dtype(), gate_up.device());
    }
    gate_up.apply_op1_no_bwd(&SiluMulOp { dims, act })
}

// ---------------------------------------------------------------------------------------------
// Argument checks (device independent: shapes, dtypes, layouts, devices).

/// Every size a `rope_qkv` launch needs, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RopeQkvDims {
    pub(crate) num_tokens: usize,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl RopeQkvDims {
    /// Heads of the output: q, k and v.
    pub(crate) fn heads_total(&self) -> usize {
        self.num_heads + 2 * self.num_kv_heads
    }

    /// Elements of one token's row, in the input and the output.
    pub(crate) fn width(&self) -> usize {
        self.heads_total() * self.head_dim
    }

    /// Elements of one token's q and k heads (the rotated prefix of a row).
    pub(crate) fn rotated_width(&self) -> usize {
        (self.num_heads + self.num_kv_heads) * self.head_dim
    }
}

/// Every size a `silu_mul` launch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SiluMulDims {
    pub(crate) num_tokens: usize,
    pub(crate) width: usize,
}

fn check_float_dtype(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
) -> std::result::Result<(), KernelError> {
    if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(KernelError::DType {
            op,
            tensor,
            expected: "F32, F16 or BF16".to_string(),
            got: t.dtype(),
        });
    }
    Ok(())
}

fn param_error(op: &'static str, param: &'static str, expected: &str, got: usize) -> KernelError {
    KernelError::Param {
        op,
        param,
        expected: expected.to_string(),
        got: got.to_string(),
    }
}

/// A 2-D activation whose rows may be strided but whose elements within a row are not.
fn check_last_dim_contiguous(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
) -> std::result::Result<(), KernelError> {
    if t.dims()[1] > 1 && t.stride()[1] != 1 {
        return Err(layout_error(
            op,
            tensor,
            t,
            "contiguous in its last dimension (stride 1)",
        ));
    }
    Ok(())
}

fn check_rope_qkv_args(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> std::result::Result<RopeQkvDims, KernelError> {
    let op = ROPE_QKV;
    if num_heads == 0 {
        return Err(param_error(op, "num_heads", "must be > 0", num_heads));
    }
    if num_kv_heads == 0 {
        return Err(param_error(op, "num_kv_heads", "must be > 0", num_kv_heads));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(param_error(
            op,
            "head_dim",
            "must be even and > 0 (rope rotates pairs)",
            head_dim,
        ));
    }
    let width = num_kv_heads
        .checked_mul(2)
        .and_then(|kv| kv.checked_add(num_heads))
        .and_then(|heads| heads.checked_mul(head_dim))
        .ok_or_else(|| KernelError::Param {
            op,
            param: "head_dim",
            expected: format!(
                "makes (num_heads + 2 num_kv_heads) * head_dim overflow with num_heads = \
                 {num_heads}, num_kv_heads = {num_kv_heads}"
            ),
            got: head_dim.to_string(),
        })?;

    let qkv_dims = check_rank(op, "qkv", qkv, 2)?;
    check_float_dtype(op, "qkv", qkv)?;
    let num_tokens = qkv_dims[0];
    if qkv_dims[1] != width {
        return Err(KernelError::Shape {
            op,
            tensor: "qkv",
            expected: format!(
                "[T, {width}] ([T, (num_heads + 2 num_kv_heads) * head_dim] with {num_heads}, \
                 {num_kv_heads}, {head_dim})"
            ),
            got: qkv_dims.to_vec(),
        });
    }
    check_last_dim_contiguous(op, "qkv", qkv)?;

    let half = head_dim / 2;
    for (name, t) in [("cos", cos), ("sin", sin)] {
        let dims = check_rank(op, name, t, 2)?;
        check_dtype(op, name, t, qkv.dtype())?;
        check_device(op, name, t, qkv.device())?;
        if dims != [num_tokens, half] {
            return Err(KernelError::Shape {
                op,
                tensor: name,
                expected: format!("[{num_tokens}, {half}] ([T, head_dim / 2])"),
                got: dims.to_vec(),
            });
        }
        check_contiguous(op, name, t)?;
    }
    Ok(RopeQkvDims {
        num_tokens,
        num_heads,
        num_kv_heads,
        head_dim,
    })
}

fn check_silu_mul_args(
    gate_up: &Tensor,
    width: usize,
) -> std::result::Result<SiluMulDims, KernelError> {
    let op = SILU_MUL;
    if width == 0 {
        return Err(param_error(op, "width", "must be > 0", width));
    }
    let dims = check_rank(op, "gate_up", gate_up, 2)?;
    check_float_dtype(op, "gate_up", gate_up)?;
    if width.checked_mul(2) != Some(dims[1]) {
        return Err(KernelError::Shape {
            op,
            tensor: "gate_up",
            expected: format!("[T, 2 * width] with width = {width}"),
            got: dims.to_vec(),
        });
    }
    check_last_dim_contiguous(op, "gate_up", gate_up)?;
    Ok(SiluMulDims {
        num_tokens: dims[0],
        width,
    })
}

/// Where token `t`'s row starts in a 2-D tensor's storage, after checking that all `rows` rows
/// of `width` elements lie inside the `len` elements of the storage: candle's layouts already
/// guarantee it, but a launch must never read out of bounds on a broken one.
pub(crate) fn check_row_bounds(
    op: &'static str,
    tensor: &'static str,
    layout: &Layout,
    rows: usize,
    width: usize,
    len: usize,
) -> Result<(usize, usize)> {
    let (offset, stride) = (layout.start_offset(), layout.stride()[0]);
    if rows == 0 {
        return Ok((offset, stride));
    }
    let end = rows
        .checked_sub(1)
        .and_then(|last| last.checked_mul(stride))
        .and_then(|last| last.checked_add(offset))
        .and_then(|last| last.checked_add(width));
    match end {
        Some(end) if end <= len => Ok((offset, stride)),
        _ => candle_core::bail!(
            "{op}: `{tensor}` rows ({rows} x {width}, offset {offset}, row stride {stride}) \
             exceed its storage of {len} elements"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The rotary embedding of q and k.

/// Custom op `(qkv, cos, sin) -> [T, H + 2 KVH, D]`, with the checked sizes and the style.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeQkvOp {
    pub(crate) dims: RopeQkvDims,
    pub(crate) style: RopeStyle,
}

/// Per-thread f32 buffers of the CPU kernels, reused across the rows a thread handles.
#[derive(Default)]
struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    out: Vec<f32>,
}

fn resized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// Rotates every head of `x` (`heads x head_dim` floats) into `y`, each head by the same
/// `cos`/`sin` (`head_dim / 2` angles). The expressions are candle's, term for term, so f32
/// results are bit-identical to candle_nn's (Rust never contracts them into a fused
/// multiply-add).
fn rotate_heads(style: RopeStyle, x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32]) {
    let half = cos.len();
    let head_dim = 2 * half;
    for (xh, yh) in x.chunks_exact(head_dim).zip(y.chunks_exact_mut(head_dim)) {
        match style {
            RopeStyle::Interleaved => {
                let pairs = xh.chunks_exact(2).zip(yh.chunks_exact_mut(2));
                for ((xp, yp), (&c, &s)) in pairs.zip(cos.iter().zip(sin)) {
                    let (x0, x1) = (xp[0], xp[1]);
                    yp[0] = x0 * c - x1 * s;
                    yp[1] = x0 * s + x1 * c;
                }
            }
            RopeStyle::Half => {
                let (x_lo, x_hi) = xh.split_at(half);
                let (y_lo, y_hi) = yh.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1, c, s) = (x_lo[i], x_hi[i], cos[i], sin[i]);
                    y_lo[i] = x0 * c - x1 * s;
                    y_hi[i] = x0 * s + x1 * c;
                }
            }
        }
    }
}

impl RopeQkvOp {
    fn run_cpu<T: KvElem>(
        &self,
        qkv: &[T],
        qkv_layout: &Layout,
        cos: &[T],
        cos_layout: &Layout,
        sin: &[T],
        sin_layout: &Layout,
    ) -> Result<Vec<T>> {
        let dims = self.dims;
        let (width, rotated) = (dims.width(), dims.rotated_width());
        let half = dims.head_dim / 2;
        let cos = contiguous_slice(ROPE_QKV, "cos", cos, cos_layout)?;
        let sin = contiguous_slice(ROPE_QKV, "sin", sin, sin_layout)?;
        if cos.len() != dims.num_tokens * half || sin.len() != cos.len() {
            candle_core::bail!("{ROPE_QKV}: cos/sin do not hold [T, head_dim / 2] elements");
        }
        let (offset, stride) = check_row_bounds(
            ROPE_QKV,
            "qkv",
            qkv_layout,
            dims.num_tokens,
            width,
            qkv.len(),
        )?;
        let mut out = vec![T::zero(); dims.num_tokens * width];
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(Scratch::default, |s, (t, out_row)| {
                let src = &qkv[offset + t * stride..][..width];
                let angles = t * half..(t + 1) * half;
                let x = T::as_f32(&src[..rotated], resized(&mut s.a, rotated));
                let c = T::as_f32(&cos[angles.clone()], resized(&mut s.b, half));
                let sn = T::as_f32(&sin[angles], resized(&mut s.c, half));
                let y = resized(&mut s.out, rotated);
                rotate_heads(self.style, x, c, sn, y);
                T::from_f32_into(y, &mut out_row[..rotated]);
                // v is copied in its own dtype: no conversion, no rounding.
                out_row[rotated..].copy_from_slice(&src[rotated..]);
            });
        Ok(out)
    }
}

impl CustomOp3 for RopeQkvOp {
    fn name(&self) -> &'static str {
        ROPE_QKV
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        cos: &CpuStorage,
        cos_layout: &Layout,
        sin: &CpuStorage,
        sin_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        if qkv_layout.dims() != [dims.num_tokens, dims.width()] {
            candle_core::bail!(
                "{ROPE_QKV}: qkv shape {:?} does not match the checked shape",
                qkv_layout.dims()
            );
        }
        let storage = match (qkv, cos, sin) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(self.run_cpu(x, qkv_layout, c, cos_layout, s, sin_layout)?)
            }
            (CpuStorage::F16(x), CpuStorage::F16(c), CpuStorage::F16(s)) => {
                CpuStorage::F16(self.run_cpu(x, qkv_layout, c, cos_layout, s, sin_layout)?)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                CpuStorage::BF16(self.run_cpu(x, qkv_layout, c, cos_layout, s, sin_layout)?)
            }
            (x, c, s) => candle_core::bail!(
                "{ROPE_QKV}: qkv, cos, sin must share one of F32, F16, BF16, got {:?}, {:?}, {:?}",
                x.dtype(),
                c.dtype(),
                s.dtype()
            ),
        };
        let shape = Shape::from((dims.num_tokens, dims.heads_total(), dims.head_dim));
        Ok((storage, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        qkv_layout: &Layout,
        cos: &candle_core::CudaStorage,
        cos_layout: &Layout,
        sin: &candle_core::CudaStorage,
        sin_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::fused::rope_qkv(self, qkv, qkv_layout, cos, cos_layout, sin, sin_layout)
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU's activation.

/// Custom op `gate_up -> silu(gate) * up`, with the checked sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SiluMulOp {
    pub(crate) dims: SiluMulDims,
    pub(crate) act: Glu,
}

/// `silu(g) * u` in f32, written as candle's `Silu` then `Mul` (libm's `expf`).
#[inline(always)]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// `y[i] = silu(g[i]) * u[i]`: with AVX2 and FMA, 8 lanes at a time through [`fast_exp`]
/// (clamped to exp's finite range, where silu is `g` or 0 to f32 precision anyway); else
/// [`silu_times`] element by element.
fn silu_times_slice(g: &[f32], u: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has avx2 and fma (checked just above).
        return unsafe { silu_times_avx2(g, u, y) };
    }
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = silu_times(g, u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_times_avx2(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g / (1.0 + fast_exp::<true>(-g)) * u;
    }
}

/// The argument `-2 sqrt(2 / pi) (g + 0.044715 g^3)` of the exp in the tanh GELU.
#[inline(always)]
fn gelu_exp_arg(g: f32) -> f32 {
    -2.0 * SQRT_2_OVER_PI * (g + 0.044_715 * g * g * g)
}

/// `gelu_tanh(g) * u` in f32 (see the module doc for the form).
#[inline(always)]
fn gelu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + gelu_exp_arg(g).exp()) * u
}

/// `y[i] = gelu_tanh(g[i]) * u[i]`, vectorised as [`silu_times_slice`].
fn gelu_times_slice(g: &[f32], u: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has avx2 and fma (checked just above).
        return unsafe { gelu_times_avx2(g, u, y) };
    }
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = gelu_times(g, u);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn gelu_times_avx2(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g / (1.0 + fast_exp::<true>(gelu_exp_arg(g))) * u;
    }
}

impl SiluMulOp {
    fn run_cpu<T: KvElem>(&self, src: &[T], layout: &Layout) -> Result<Vec<T>> {
        let SiluMulDims { num_tokens, width } = self.dims;
        let (offset, stride) = check_row_bounds(
            SILU_MUL,
            "gate_up",
            layout,
            num_tokens,
            2 * width,
            src.len(),
        )?;
        let mut out = vec![T::zero(); num_tokens * width];
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(Scratch::default, |s, (t, out_row)| {
                let (gate, up) = src[offset + t * stride..][..2 * width].split_at(width);
                for j0 in (0..width).step_by(SILU_CPU_COLUMNS) {
                    let cols = j0..(j0 + SILU_CPU_COLUMNS).min(width);
                    let n = cols.len();
                    let g = T::as_f32(&gate[cols.clone()], resized(&mut s.a, n));
                    let u = T::as_f32(&up[cols.clone()], resized(&mut s.b, n));
                    let y = resized(&mut s.out, n);
                    match self.act {
                        Glu::Silu => silu_times_slice(g, u, y),
                        Glu::GeluTanh => gelu_times_slice(g, u, y),
                    }
                    T::from_f32_into(y, &mut out_row[cols]);
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for SiluMulOp {
    fn name(&self) -> &'static str {
        SILU_MUL
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let SiluMulDims { num_tokens, width } = self.dims;
        if layout.dims() != [num_tokens, 2 * width] {
            candle_core::bail!(
                "{SILU_MUL}: gate_up shape {:?} does not match the checked shape",
                layout.dims()
            );
        }
        let out = match storage {
            CpuStorage::F32(x) => CpuStorage::F32(self.run_cpu(x, layout)?),
            CpuStorage::F16(x) => CpuStorage::F16(self.run_cpu(x, layout)?),
            CpuStorage::BF16(x) => CpuStorage::BF16(self.run_cpu(x, layout)?),
            other => candle_core::bail!(
                "{SILU_MUL}: gate_up must be F32, F16 or BF16, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, Shape::from((num_tokens, width))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::fused::silu_mul(self.dims, self.act, storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::zeros(shape, dtype, &Device::Cpu).unwrap()
    }

    #[test]
    fn rope_qkv_argument_errors_name_the_culprit() {
        let (h, kvh, d, t) = (4, 2, 8, 3);
        let qkv = zeros(&[t, (h + 2 * kvh) * d], DType::F32);
        let cs = zeros(&[t, d / 2], DType::F32);
        let check =
            |qkv: &Tensor, cos: &Tensor, h, kvh, d| check_rope_qkv_args(qkv, cos, &cs, h, kvh, d);
        assert!(check(&qkv, &cs, h, kvh, d).is_ok());
        assert!(matches!(
            check(&qkv, &cs, h, kvh, 7),
            Err(KernelError::Param {
                param: "head_dim",
                ..
            })
        ));
        assert!(matches!(
            check(&qkv, &cs, 0, kvh, d),
            Err(KernelError::Param {
                param: "num_heads",
                ..
            })
        ));
        assert!(matches!(
            check(&qkv, &cs, h, 0, d),
            Err(KernelError::Param {
                param: "num_kv_heads",
                ..
            })
        ));
        assert!(matches!(
            check(&qkv, &cs, h, usize::MAX / 2, d),
            Err(KernelError::Param { .. })
        ));
        assert!(matches!(
            check(&qkv, &cs, h + 1, kvh, d),
            Err(KernelError::Shape { tensor: "qkv", .. })
        ));
        assert!(matches!(
            check(&qkv.reshape((t, h + 2 * kvh, d)).unwrap(), &cs, h, kvh, d),
            Err(KernelError::Rank { tensor: "qkv", .. })
        ));
        assert!(matches!(
            check(&qkv.to_dtype(DType::U32).unwrap(), &cs, h, kvh, d),
            Err(KernelError::DType { tensor: "qkv", .. })
        ));
        assert!(matches!(
            check(&qkv, &cs.to_dtype(DType::F16).unwrap(), h, kvh, d),
            Err(KernelError::DType { tensor: "cos", .. })
        ));
        assert!(matches!(
            check(&qkv, &zeros(&[t + 1, d / 2], DType::F32), h, kvh, d),
            Err(KernelError::Shape { tensor: "cos", .. })
        ));
        let strided_cos = zeros(&[d / 2, t], DType::F32).t().unwrap();
        assert!(matches!(
            check(&qkv, &strided_cos, h, kvh, d),
            Err(KernelError::Layout { tensor: "cos", .. })
        ));
        let strided_qkv = zeros(&[(h + 2 * kvh) * d, t], DType::F32).t().unwrap();
        assert!(matches!(
            check(&strided_qkv, &cs, h, kvh, d),
            Err(KernelError::Layout { tensor: "qkv", .. })
        ));
    }

    #[test]
    fn silu_mul_argument_errors_name_the_culprit() {
        let x = zeros(&[3, 10], DType::F16);
        assert_eq!(
            check_silu_mul_args(&x, 5),
            Ok(SiluMulDims {
                num_tokens: 3,
                width: 5
            })
        );
        assert!(matches!(
            check_silu_mul_args(&x, 0),
            Err(KernelError::Param { param: "width", .. })
        ));
        assert!(matches!(
            check_silu_mul_args(&x, 4),
            Err(KernelError::Shape {
                tensor: "gate_up",
                ..
            })
        ));
        assert!(matches!(
            check_silu_mul_args(&x, usize::MAX),
            Err(KernelError::Shape {
                tensor: "gate_up",
                ..
            })
        ));
        assert!(matches!(
            check_silu_mul_args(&zeros(&[30], DType::F16), 15),
            Err(KernelError::Rank { .. })
        ));
        assert!(matches!(
            check_silu_mul_args(&x.to_dtype(DType::U8).unwrap(), 5),
            Err(KernelError::DType { .. })
        ));
        let strided = zeros(&[10, 3], DType::F32).t().unwrap();
        assert!(matches!(
            check_silu_mul_args(&strided, 5),
            Err(KernelError::Layout { .. })
        ));
    }

    #[test]
    fn row_bounds_reject_rows_past_the_storage() {
        let t = zeros(&[4, 6], DType::F32).narrow(1, 2, 3).unwrap();
        let layout = t.layout();
        assert_eq!(
            check_row_bounds("op", "x", layout, 4, 3, 24).ok(),
            Some((2, 6))
        );
        assert!(check_row_bounds("op", "x", layout, 4, 3, 22).is_err());
        assert!(check_row_bounds("op", "x", layout, 4, usize::MAX, 24).is_err());
        assert!(check_row_bounds("op", "x", layout, 0, 3, 0).is_ok());
    }

    #[test]
    fn rotation_pairs_the_documented_elements() {
        // One head of 4: angles 0 and 90 degrees.
        let x = [1.0, 2.0, 3.0, 4.0];
        let (cos, sin) = ([1.0, 0.0], [0.0, 1.0]);
        let mut y = [0.0; 4];
        // Interleaved: (1, 2) unrotated, (3, 4) -> (-4, 3).
        rotate_heads(RopeStyle::Interleaved, &x, &cos, &sin, &mut y);
        assert_eq!(y, [1.0, 2.0, -4.0, 3.0]);
        // Half: (x0, x2) = (1, 3) unrotated, (x1, x3) = (2, 4) -> (-4, 2).
        rotate_heads(RopeStyle::Half, &x, &cos, &sin, &mut y);
        assert_eq!(y, [1.0, -4.0, 3.0, 2.0]);
    }
}
