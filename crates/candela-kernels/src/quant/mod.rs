//! Packed int8 / int4 weights and a fast CPU quantized matmul (`y = x W^T`).
//!
//! Why our own format: candle 0.11 runs GGUF Q4_1 (the default model's type) without SIMD and
//! its tiled Q4_0/Q8_0 paths need `k % 256 == 0`, which SmolLM2's `k = 576` is not. We repack
//! those weights at load, losslessly, into one layout that a single kernel family serves, and
//! `--quantize int8|int4` produces the same layout from float weights.
//!
//! Every weight value is stored as an unsigned code `q` with a per-group scale `d` and min `m`
//! (both f16), so `w = q * d + m` whatever the source: Q4_1 keeps its own `d` and `m`, Q4_0
//! becomes `m = -8 d`, Q8_0 becomes `q + 128` with `m = -128 d`. Those symmetric types store
//! no min: the kernels compute `-z d`, bit for bit the stored value, and read the GGUF's own
//! 18 bytes per 32 Q4_0 weights rather than 20 (see `pack.rs`).
//!
//! GGUF k-quants (Q2_K .. Q6_K) repack losslessly too, with two extensions of the format: f32
//! group scales and mins ([`ScaleDType::F32`]), since a k-quant sub-block's scale is an f16
//! super-block scale times a 4- to 8-bit integer (`d * sc`), exact in f32 but not in f16; and
//! groups of 16 for the types whose sub-blocks are 16 weights (Q2_K, Q3_K, Q6_K). Q4_K and
//! Q2_K/Q3_K codes fit int4, Q5_K and Q6_K codes int8. See [`PackedWeight::from_ggml`] for
//! each type's mapping and `benches/qmatmul.rs` for what it buys over candle's k-quant path.
//!
//! Unsigned codes are what
//! VNNI's `vpdpbusd` (u8 x i8) wants; the `m` term is folded in per group with the activation
//! group sum. Activations are quantized per row on the fly, in groups of the weight's group size,
//! to i8 with a scale `sx` (llama.cpp's Q8_1 scheme), so a group's dot product is
//! `sx * d * sum(xq * q) + m * sx * sum(xq)`.
//!
//! The kernels, fastest first ([`Kernel::ALL`]; [`Kernel::detect`] picks the first this CPU
//! runs, except AMX, which only `CANDELA_CPU_KERNEL=amx` selects since it lost end to end where
//! measured; `CANDELA_CPU_KERNEL` picks any other): `amx` (AMX int8 tiles, from
//! [`AMX_ROWS_MIN`] rows, AVX-512 VNNI below), `avx512vnni`, `avxvnni`, `avx512vl-vnni256`, `avx2`, `portable`. See `pack.rs`
//! for the byte layout, `x86.rs` for the SIMD kernels, `amx.rs` for the tile kernel and
//! `portable.rs` for the fallback that every SIMD kernel is tested against.

mod act;
#[cfg(target_arch = "x86_64")]
mod amx;
mod driver;
mod pack;
mod portable;
pub mod timing;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::mem::MaybeUninit;

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

pub use driver::AMX_ROWS_MIN;
pub use pack::TILE_COLS;

/// Most input rows the fused CUDA matrix-vector kernel serves; must match `GEMV_ROWS_MAX` in
/// kernels/quant.cu. Past it, a GEMM wins (the weight read is shared by the rows). Defined
/// here, not behind the `cuda` feature, so callers that choose a path by row count compile
/// without it.
pub const CUDA_GEMV_ROWS_MAX: usize = 8;

/// How the per-group scales and mins are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDType {
    /// 2 bytes each: `--quantize` and the 32-weight GGML types (whose scales are f16 already).
    F16,
    /// 4 bytes each: GGUF k-quants, whose `d * sc` products need up to 19 significant bits.
    F32,
}

/// Width of the stored integer codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantBits {
    /// One byte per weight: symmetric int8 (`--quantize int8`), Q8_0, Q5_0, Q5_1, Q5_K, Q6_K.
    Int8,
    /// Half a byte per weight with a per-group min: `--quantize int4`, Q4_0, Q4_1, Q2_K, Q3_K,
    /// Q4_K.
    Int4,
}

/// One implementation of the matmul kernel. [`Kernel::detect`] picks the fastest one the CPU
/// runs; the others stay callable so tests can check each against the same reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// AMX int8 tiles (`tdpbsud`, Sapphire Rapids and later, with Linux's permission for the
    /// tile state) for the integer sums, AVX-512 for the rest; bit-identical to
    /// [`Kernel::Avx512Vnni`]. [`PackedWeight::matmul_f32`] runs it from
    /// [`AMX_ROWS_MIN`] rows and the AVX-512 VNNI kernel below; an explicit
    /// [`PackedWeight::matmul_f32_with`] runs the tiles at any row count.
    Amx,
    /// 512-bit `vpdpbusd` (AVX-512 F/BW/VL + VNNI): 16 output columns per register.
    Avx512Vnni,
    /// 256-bit `vpdpbusd` in its VEX encoding (AVX-VNNI, e.g. Alder Lake without AVX-512).
    AvxVnni,
    /// The same 256-bit kernel with the EVEX `vpdpbusd` of AVX-512 VL + VNNI; it exists so the
    /// 256-bit VNNI code path can be tested on CPUs that lack AVX-VNNI.
    Avx512VlVnni256,
    /// AVX2 + FMA: `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd`.
    Avx2,
    /// Plain Rust, any CPU: the reference the SIMD kernels are tested against.
    Portable,
}

impl Kernel {
    /// All kernels, fastest first.
    pub const ALL: [Kernel; 6] = [
        Kernel::Amx,
        Kernel::Avx512Vnni,
        Kernel::AvxVnni,
        Kernel::Avx512VlVnni256,
        Kernel::Avx2,
        Kernel::Portable,
    ];

    /// Whether this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            match self {
                Kernel::Amx => avx512 && amx::available(),
                Kernel::Avx512Vnni | Kernel::Avx512VlVnni256 => avx512,
                Kernel::AvxVnni => avx2 && is_x86_feature_detected!("avxvnni"),
                Kernel::Avx2 => avx2,
                Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            matches!(self, Kernel::Portable)
        }
    }

    /// The kernel's name, as `CANDELA_CPU_KERNEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Vnni => "avx512vnni",
            Kernel::AvxVnni => "avxvnni",
            Kernel::Avx512VlVnni256 => "avx512vl-vnni256",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// The kernel every packed matmul uses (chosen once, then cached): the one named by
    /// `CANDELA_CPU_KERNEL` when this CPU runs it (to reproduce what another CPU computes, or
    /// to measure one kernel end to end), else the fastest this CPU runs.
    pub fn detect() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let requested = std::env::var("CANDELA_CPU_KERNEL").ok();
            let named = requested.as_deref().and_then(|name| {
                let k = Kernel::ALL.into_iter().find(|k| k.name() == name);
                match k {
                    Some(k) if k.is_available() => Some(k),
                    _ => {
                        tracing::warn!(
                            name,
                            "CANDELA_CPU_KERNEL names no kernel this CPU runs; ignored"
                        );
                        None
                    }
                }
            });
            named.unwrap_or_else(|| {
                Kernel::ALL
                    .into_iter()
                    .find(|k| k.is_picked_by_default() && k.is_available())
                    .unwrap_or(Kernel::Portable)
            })
        })
    }

    /// Whether [`Self::detect`] may pick the kernel without `CANDELA_CPU_KERNEL` naming it.
    ///
    /// Not AMX: alone it beats AVX-512 VNNI by 1.0-1.25x from 32 rows (bench/results/
    /// amx-qmatmul.md), but inside the server it made whole steps slower on the one AMX
    /// machine measured (Sapphire Rapids VM, SmolLM2-135M Q4_1, 2 threads, decode steps from
    /// the step trace, 2026-12-04): 48.1 ms vs 40.2 ms at 32 sequences, 82 ms vs 69 ms at 64,
    /// and prefill of 512 tokens 935 vs 1,115 tok/s. The matmul share did not shrink while the
    /// rest of the step (attention, norms) slowed, which is what a lower core clock while tiles
    /// are in use would do; bench/results/amx-qmatmul.md has the runs.
    fn is_picked_by_default(self) -> bool {
        self != Kernel::Amx
    }

    /// The kernel [`PackedWeight::matmul_f32`] runs for `m` rows when `self` is the detected
    /// one: AMX's 16-row tiles lose to AVX-512 on few rows (see [`AMX_ROWS_MIN`]).
    fn for_rows(self, m: usize) -> Kernel {
        match self {
            Kernel::Amx if m < AMX_ROWS_MIN => Kernel::Avx512Vnni,
            k => k,
        }
    }

    /// The kernels this CPU runs, fastest first.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }
}

/// Errors of packing and of the quantized matmul.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The group size must be a multiple of 16 in 16..=512.
    #[error("unsupported group size {group_size}: expected a multiple of 16 in 16..=512")]
    GroupSize {
        /// The requested group size.
        group_size: usize,
    },
    /// `k` must be a non-zero multiple of the group size (a group never straddles rows).
    #[error("k = {k} is not a non-zero multiple of the group size {group_size}")]
    KNotMultipleOfGroup {
        /// Input features.
        k: usize,
        /// Group size.
        group_size: usize,
    },
    /// `n` must be non-zero.
    #[error("n = 0: a weight needs at least one output feature")]
    EmptyN,
    /// A buffer's length does not match the shape.
    #[error("{what}: expected length {expected}, got {got}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Length implied by the shape.
        expected: usize,
        /// Length passed.
        got: usize,
    },
    /// This GGML type has no lossless repacking into our format.
    #[error("GGML type {dtype:?} cannot be repacked; keep candle's QMatMul for it")]
    UnsupportedGgml {
        /// The type.
        dtype: GgmlDType,
    },
    /// A scale or min does not fit in f16 (weights above ~65000 in magnitude, or not finite).
    #[error("weight row {row}, group {group}: scale or min not representable as f16")]
    NotRepresentable {
        /// Output feature.
        row: usize,
        /// Group index along k.
        group: usize,
    },
    /// Weights stacked with [`PackedWeight::concat_rows`] must share k, bits, group size and
    /// scale type.
    #[error("cannot stack packed weights of different k, bits, group size or scale type")]
    Incompatible,
    /// The requested kernel needs CPU features this machine lacks.
    #[error("kernel {kernel:?} is not supported by this CPU")]
    KernelUnavailable {
        /// The kernel.
        kernel: Kernel,
    },
}

/// Result of this module's fallible functions.
pub type Result<T> = std::result::Result<T, QuantError>;

/// Weight of a linear layer `y = x W^T`, `W: [n, k]` (n output features, k input features),
/// packed group-wise along k for our CPU kernels. Immutable once built; `Send + Sync`.
#[derive(Clone)]
pub struct PackedWeight {
    layout: pack::PackLayout,
    data: pack::AlignedBytes,
    source: Option<GgmlDType>,
    /// The same bytes on a CUDA device, uploaded by the first `matmul` of a CUDA tensor.
    #[cfg(feature = "cuda")]
    cuda: std::sync::OnceLock<crate::cuda::CudaPackedWeight>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("n", &self.layout.n)
            .field("k", &self.layout.k)
            .field("bits", &self.layout.bits)
            .field("group_size", &self.layout.group_size)
            .field("source", &self.source)
            .finish()
    }
}

impl PackedWeight {
    /// Quantizes a row-major `[n, k]` f32 weight: `Int8` is symmetric (`d = amax / 127`),
    /// `Int4` uses each group's min and max (`d = (max - min) / 15`, `m = min`).
    pub fn quantize_f32(
        w: &[f32],
        n: usize,
        k: usize,
        bits: QuantBits,
        group_size: usize,
    ) -> Result<Self> {
        pack::quantize_f32(w, n, k, bits, group_size)
    }

    /// Repacks raw GGML block bytes of a `[n, k]` weight (k contiguous), keeping every value
    /// exactly (dequantization is bit-exact with candle's, up to the sign of zero):
    ///
    /// | GGML | codes | group | scales | `d`, `m` of a group |
    /// |------|-------|-------|--------|---------------------|
    /// | Q4_0, Q4_1 | int4 | 32 | f16 | block `d`; `-8 d` or the block min |
    /// | Q5_0, Q5_1, Q8_0 | int8 | 32 | f16 | block `d`; `-16 d`, the block min or `-128 d` |
    /// | Q4_K, Q5_K | int4, int8 | 32 | f32 | `d * sc`, `-dmin * m` (6-bit `sc`, `m`) |
    /// | Q6_K | int8 | 16 | f32 | `d * sc` (i8 `sc`), `-32 d sc` |
    /// | Q3_K | int4 | 16 | f32 | `d * (sc - 32)` (6-bit `sc`), `-4 d (sc - 32)` |
    /// | Q2_K | int4 | 16 | f32 | `d * sc`, `-dmin * m` (4-bit `sc`, `m`) |
    ///
    /// Other types (floats, Q8_1, Q8_K) return [`QuantError::UnsupportedGgml`].
    pub fn from_ggml(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Result<Self> {
        pack::from_ggml(dtype, data, n, k)
    }

    /// The output features of `parts`, stacked in order into one weight (codes and scales
    /// copied as they are): q/k/v or gate/up projections of the same input then run as one
    /// matmul, one parallel region instead of three or two.
    pub fn concat_rows(parts: &[&PackedWeight]) -> Result<Self> {
        pack::concat_rows(parts)
    }

    /// The weight as row-major `[n, k]` f32, computed as `q * d + m` (bit-exact with candle's
    /// dequantization for every repacked GGML type).
    pub fn dequantize(&self) -> Vec<f32> {
        pack::dequantize(self)
    }

    /// Output features.
    pub fn n(&self) -> usize {
        self.layout.n
    }

    /// Input features.
    pub fn k(&self) -> usize {
        self.layout.k
    }

    /// Code width.
    pub fn bits(&self) -> QuantBits {
        self.layout.bits
    }

    /// Weights per scale along k.
    pub fn group_size(&self) -> usize {
        self.layout.group_size
    }

    /// How the group scales and mins are stored.
    pub fn scale_dtype(&self) -> ScaleDType {
        self.layout.scales
    }

    /// The GGML type this weight was repacked from, if any.
    pub fn source_ggml(&self) -> Option<GgmlDType> {
        self.source
    }

    /// Bytes of packed data (codes, scales and, unless symmetric, mins).
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    /// The packed bytes themselves (the CUDA kernels read this very layout on the device).
    #[cfg(feature = "cuda")]
    pub(crate) fn packed_bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The same weight with a stored min row in every block, the layout the CUDA kernels
    /// read (symmetric types leave the row out on the CPU; see `pack.rs`).
    #[cfg(feature = "cuda")]
    pub(crate) fn with_stored_mins(&self) -> Result<Self> {
        pack::with_stored_mins(self)
    }

    /// Whether every block stores its min row (false for the symmetric types).
    #[cfg(feature = "cuda")]
    pub(crate) fn stores_mins(&self) -> bool {
        self.layout.zero_point.is_none()
    }

    /// `y[m, n] = x[m, k] W^T` with the fastest kernel of this CPU for `m` rows, parallel over
    /// output columns on rayon's current pool. `x` and `y` are row-major.
    pub fn matmul_f32(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        driver::matmul(self, Kernel::detect().for_rows(m), x, m, as_uninit(y))
    }

    /// [`Self::matmul_f32`] into memory that need not be initialized: on `Ok` every element
    /// of `y` has been written.
    pub fn matmul_f32_uninit(&self, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>]) -> Result<()> {
        driver::matmul(self, Kernel::detect().for_rows(m), x, m, y)
    }

    /// [`Self::matmul_f32`] with an explicit kernel, at every row count (for tests and
    /// benchmarks).
    pub fn matmul_f32_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<()> {
        driver::matmul(self, kernel, x, m, as_uninit(y))
    }

    /// `x: [.., k]` f32 on the CPU (any rank >= 1) -> `[.., n]` f32. With the `cuda` feature,
    /// a CUDA `x` (f32, f16 or bf16) -> `[.., n]` in its dtype, on the device (the weight is
    /// uploaded on first use; see [`crate::cuda::CudaPackedWeight`]). Metal is an `Err`.
    pub fn matmul(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return crate::cuda::quant::matmul_cached(self, &self.cuda, x);
        }
        if !x.device().is_cpu() {
            candle_core::bail!(
                "candela packed qmatmul: only CPU tensors are supported for now, got {:?}",
                x.device().location()
            );
        }
        let x = x.contiguous()?;
        x.apply_op1_no_bwd(&PackedMatMulOp { weight: self })
    }
}

/// Candle op wrapper, so candle hands us the CPU slice without a copy; `cuda_fwd` keeps candle's
/// default (an `Err`).
struct PackedMatMulOp<'a> {
    weight: &'a PackedWeight,
}

impl CustomOp1 for PackedMatMulOp<'_> {
    fn name(&self) -> &'static str {
        "candela-packed-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(xs) = storage else {
            candle_core::bail!("candela packed qmatmul: expected f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("candela packed qmatmul: input is not contiguous {layout:?}");
        };
        let (n, k) = (self.weight.n(), self.weight.k());
        let dims = layout.shape().dims();
        match dims.last() {
            Some(&last) if last == k => {}
            _ => candle_core::bail!(
                "candela packed qmatmul: input shape {dims:?} does not end in k = {k}"
            ),
        }
        let x = &xs[start..end];
        let m = x.len() / k;
        // Not zeroed: the kernels write every element (zeroing the outputs was ~2% of a
        // 64-sequence decode step, as `memset`).
        let mut y = Vec::with_capacity(m * n);
        self.weight
            .matmul_f32_uninit(x, m, &mut y.spare_capacity_mut()[..m * n])
            .map_err(candle_core::Error::wrap)?;
        // SAFETY: on `Ok` the matmul wrote all `m * n` elements.
        unsafe { y.set_len(m * n) };
        let mut out_dims = dims.to_vec();
        out_dims.pop();
        out_dims.push(n);
        Ok((CpuStorage::F32(y), Shape::from(out_dims)))
    }
}

/// `y` as possibly-uninitialized memory, for the driver, which only writes it.
fn as_uninit(y: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the driver stores only initialized
    // `f32`s through it, so `y` stays valid.
    unsafe { &mut *(y as *mut [f32] as *mut [MaybeUninit<f32>]) }
}
