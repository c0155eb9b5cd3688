//! Packed int8/int4 weights on a CUDA device: dequantization and `y = x W^T`.
//!
//! The device holds the very bytes of [`PackedWeight`] (tile-major, see `quant/pack.rs` and
//! `kernels/quant.cu`), uploaded once. Decode-sized inputs (at most [`GEMV_ROWS_MAX`] rows)
//! run the fused dequantize + matrix-vector kernel, which reads each weight byte once; larger
//! ones (prefill) dequantize the weight to the activation dtype and use candle's cuBLAS
//! matmul, where the weight read is amortised over many rows.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Tensor,
};
use half::{bf16, f16};

use super::{arg_i32, contiguous_view, dim_u32, kernel, KernelDType};
use crate::quant::{PackedWeight, QuantBits, ScaleDType, TILE_COLS};

/// PTX of `kernels/quant.cu` (module name, source).
const QUANT_PTX: (&str, &str) = (
    "candela_quant",
    include_str!(concat!(env!("OUT_DIR"), "/quant.ptx")),
);

pub use crate::quant::CUDA_GEMV_ROWS_MAX as GEMV_ROWS_MAX;
const GEMV_THREADS: u32 = 256;
const DEQUANT_THREADS: u32 = 256;
const OP: &str = "candela-packed-qmatmul (cuda)";

/// Byte geometry of the packed layout; mirrors `PackLayout` in `quant/pack.rs` (checked
/// against the weight's byte count when uploading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    k: usize,
    bits: QuantBits,
    group_size: usize,
    tiles: usize,
    code_bytes: usize,
    block_bytes: usize,
    tile_bytes: usize,
}

impl Geometry {
    fn of(w: &PackedWeight) -> Result<Self> {
        let (n, k, bits, group_size) = (w.n(), w.k(), w.bits(), w.group_size());
        // kernels/quant.cu reads f16 scales and whole 32-weight chunks per group; the k-quant
        // repacks (f32 scales, groups of 16) run on the CPU only, and stay with candle on CUDA.
        if w.scale_dtype() != ScaleDType::F16 || !group_size.is_multiple_of(32) {
            candle_core::bail!(
                "{OP}: expected f16 scales and a group size that is a multiple of 32, got {:?} scales, group size {group_size}",
                w.scale_dtype()
            );
        }
        let code_bytes = match bits {
            QuantBits::Int8 => TILE_COLS * group_size,
            QuantBits::Int4 => TILE_COLS * group_size / 2,
        };
        // 16 f16 scales then 16 f16 mins after the codes of each block.
        let block_bytes = code_bytes + 2 * 2 * TILE_COLS;
        let tiles = n.div_ceil(TILE_COLS);
        let g = Self {
            n,
            k,
            bits,
            group_size,
            tiles,
            code_bytes,
            block_bytes,
            tile_bytes: (k / group_size) * block_bytes,
        };
        if g.tiles * g.tile_bytes != w.storage_bytes() || code_bytes % 64 != 0 {
            candle_core::bail!(
                "{OP}: packed layout {g:?} does not match the weight's {} bytes",
                w.storage_bytes()
            );
        }
        Ok(g)
    }

    fn bits_name(&self) -> &'static str {
        match self.bits {
            QuantBits::Int8 => "int8",
            QuantBits::Int4 => "int4",
        }
    }
}

/// A [`PackedWeight`] resident on a CUDA device.
#[derive(Debug, Clone)]
pub struct CudaPackedWeight {
    /// The packed bytes, `u8` on the device.
    bytes: Tensor,
    geometry: Geometry,
}

impl CudaPackedWeight {
    /// Uploads `w`'s packed bytes to `device` (a CUDA device).
    pub fn new(w: &PackedWeight, device: &Device) -> Result<Self> {
        if !device.is_cuda() {
            candle_core::bail!("{OP}: expected a CUDA device, got {:?}", device.location());
        }
        // The device kernels read stored mins; a symmetric weight gets its min rows back here
        // (once per weight, at upload), the same values the CPU computes.
        let full;
        let w = if w.stores_mins() {
            w
        } else {
            full = w
                .with_stored_mins()
                .map_err(|e| candle_core::Error::Msg(format!("{OP}: {e}")))?;
            &full
        };
        let geometry = Geometry::of(w)?;
        let bytes = Tensor::from_slice(w.packed_bytes(), w.packed_bytes().len(), device)?;
        Ok(Self { bytes, geometry })
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.geometry.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.geometry.k
    }

    /// The device the weight lives on.
    pub fn device(&self) -> &Device {
        self.bytes.device()
    }

    /// The weight as `[n, k]` in `dtype` (f32, f16 or bf16) on the device; `q * d + m`
    /// rounded once per operation as on the CPU, so f32 is bit-exact with
    /// [`PackedWeight::dequantize`].
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.bytes.apply_op1_no_bwd(&DequantizeOp {
            geometry: self.geometry,
            dtype,
        })
    }

    /// `x: [.., k]` (f32, f16 or bf16, on this weight's device) -> `[.., n]` in `x`'s dtype,
    /// accumulated in f32.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry;
        let dims = x.dims();
        if dims.last() != Some(&g.k) {
            candle_core::bail!("{OP}: input shape {dims:?} does not end in k = {}", g.k);
        }
        let mut out_dims = dims.to_vec();
        out_dims.pop();
        let m: usize = out_dims.iter().product();
        out_dims.push(g.n);
        let x2 = x.reshape((m, g.k))?;
        let y = if m <= GEMV_ROWS_MAX {
            x2.contiguous()?
                .apply_op2_no_bwd(&self.bytes, &GemvOp { geometry: g })?
        } else {
            let w = self.dequantize(x.dtype())?;
            x2.matmul(&w.t()?)?
        };
        y.reshape(out_dims)
    }
}

/// `w.matmul(x)` for a CUDA `x`: uploads `w` to `x`'s device on first use, keeping it in
/// `cache` (the `PackedWeight`'s own slot), then runs [`CudaPackedWeight::matmul`].
pub(crate) fn matmul_cached(
    w: &PackedWeight,
    cache: &std::sync::OnceLock<CudaPackedWeight>,
    x: &Tensor,
) -> Result<Tensor> {
    if cache.get().is_none() {
        // Two threads may both upload; one copy wins and the other is dropped.
        let _ = cache.set(CudaPackedWeight::new(w, x.device())?);
    }
    match cache.get() {
        Some(dw) if dw.device().same_device(x.device()) => dw.matmul(x),
        Some(dw) => candle_core::bail!(
            "{OP}: the weight lives on {:?}, the input on {:?}",
            dw.device().location(),
            x.device().location()
        ),
        None => candle_core::bail!("{OP}: the weight upload was lost"),
    }
}

fn cuda_only(op: &str) -> Result<(CpuStorage, Shape)> {
    candle_core::bail!("{op}: runs on CUDA tensors only")
}

struct DequantizeOp {
    geometry: Geometry,
    dtype: DType,
}

impl CustomOp1 for DequantizeOp {
    fn name(&self) -> &'static str {
        "candela-packed-dequantize"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, bytes: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match self.dtype {
            DType::F32 => dequantize_t::<f32>(self.geometry, bytes, layout),
            DType::F16 => dequantize_t::<f16>(self.geometry, bytes, layout),
            DType::BF16 => dequantize_t::<bf16>(self.geometry, bytes, layout),
            other => candle_core::bail!(
                "{}: dtype {other:?} is not one of F32, F16, BF16",
                self.name()
            ),
        }
    }
}

fn dequantize_t<T: KernelDType>(
    g: Geometry,
    bytes: &CudaStorage,
    layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = bytes.device.clone();
    let w = contiguous_view::<u8>(OP, "packed bytes", bytes, layout)?;
    let mut out = unsafe {
        // SAFETY: every element of [n, k] is written below: each 16-byte unit of the first
        // n columns' blocks writes its 4 columns x 8 (int4) or 4 (int8) inputs.
        dev.alloc::<T>(g.n * g.k)?
    };
    let total_units = (g.tiles * g.tile_bytes / g.block_bytes * g.code_bytes / 16) as i64;
    let func = kernel(
        &dev,
        QUANT_PTX,
        &format!("dequantize_{}_{}", g.bits_name(), T::SUFFIX),
    )?;
    let cfg = LaunchConfig {
        grid_dim: (
            dim_u32(
                OP,
                "dequantize ctas",
                (total_units as usize).div_ceil(DEQUANT_THREADS as usize),
            )?,
            1,
            1,
        ),
        block_dim: (DEQUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n, k, gs) = (
        arg_i32(OP, "n", g.n)?,
        arg_i32(OP, "k", g.k)?,
        arg_i32(OP, "group_size", g.group_size)?,
    );
    let (code_bytes, block_bytes) = (
        arg_i32(OP, "code_bytes", g.code_bytes)?,
        arg_i32(OP, "block_bytes", g.block_bytes)?,
    );
    let tile_bytes = g.tile_bytes as i64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&w);
    b.arg(&mut out);
    b.arg(&n);
    b.arg(&k);
    b.arg(&gs);
    b.arg(&code_bytes);
    b.arg(&block_bytes);
    b.arg(&tile_bytes);
    b.arg(&total_units);
    // SAFETY: argument list matches `dequantize_*` in kernels/quant.cu; reads stay within the
    // packed bytes (checked length), writes within [n, k].
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((g.n, g.k)),
    ))
}

struct GemvOp {
    geometry: Geometry,
}

impl CustomOp2 for GemvOp {
    fn name(&self) -> &'static str {
        "candela-packed-gemv"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        bytes: &CudaStorage,
        bytes_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F32 => gemv_t::<f32>(self.geometry, x, x_layout, bytes, bytes_layout),
            DType::F16 => gemv_t::<f16>(self.geometry, x, x_layout, bytes, bytes_layout),
            DType::BF16 => gemv_t::<bf16>(self.geometry, x, x_layout, bytes, bytes_layout),
            other => candle_core::bail!(
                "{}: x dtype {other:?} is not one of F32, F16, BF16",
                self.name()
            ),
        }
    }
}

fn gemv_t<T: KernelDType>(
    g: Geometry,
    x: &CudaStorage,
    x_layout: &Layout,
    bytes: &CudaStorage,
    bytes_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device.clone();
    let (m, k) = x_layout.shape().dims2()?;
    if k != g.k || m > GEMV_ROWS_MAX {
        candle_core::bail!(
            "{OP}: gemv input [{m}, {k}], expected [<= {GEMV_ROWS_MAX}, {}]",
            g.k
        );
    }
    let xs = contiguous_view::<T>(OP, "x", x, x_layout)?;
    let w = contiguous_view::<u8>(OP, "packed bytes", bytes, bytes_layout)?;
    if m == 0 {
        let y = dev.alloc_zeros::<T>(0)?;
        return Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, g.n))));
    }
    // SAFETY: every element of y [m, n] is written by the kernel (one cta per 16 columns,
    // each writing its m x 16 block, columns >= n excepted).
    let mut y = unsafe { dev.alloc::<T>(m * g.n)? };
    let func = kernel(
        &dev,
        QUANT_PTX,
        &format!("gemv_{}_{}", g.bits_name(), T::SUFFIX),
    )?;
    let cfg = LaunchConfig {
        grid_dim: (dim_u32(OP, "tiles", g.tiles)?, 1, 1),
        block_dim: (GEMV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (m_a, n, k_a, gs) = (
        arg_i32(OP, "m", m)?,
        arg_i32(OP, "n", g.n)?,
        arg_i32(OP, "k", g.k)?,
        arg_i32(OP, "group_size", g.group_size)?,
    );
    let (code_bytes, block_bytes) = (
        arg_i32(OP, "code_bytes", g.code_bytes)?,
        arg_i32(OP, "block_bytes", g.block_bytes)?,
    );
    let tile_bytes = g.tile_bytes as i64;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&w);
    b.arg(&xs);
    b.arg(&mut y);
    b.arg(&m_a);
    b.arg(&n);
    b.arg(&k_a);
    b.arg(&gs);
    b.arg(&code_bytes);
    b.arg(&block_bytes);
    b.arg(&tile_bytes);
    // SAFETY: argument list matches `gemv_*` in kernels/quant.cu; x is [m, k] contiguous,
    // y [m, n], and the kernel reads the packed bytes of `tiles` tiles only.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, g.n))))
}
