//! x86_64 SIMD kernels over the packed layout (see `pack.rs`): AVX-512 VNNI with 16 columns per
//! register, and one 256-bit kernel instantiated three ways (AVX-VNNI, AVX-512 VL VNNI, AVX2).
//!
//! Register blocking: a kernel call computes `MR` activation rows x `NC` tiles. Each weight
//! chunk is loaded (and for int4 unpacked) once and used for all `MR` rows; each activation
//! broadcast is used for all `NC` tiles. When the block is small (decode, `MR * NC <= 4`) the
//! low- and high-nibble products go to separate accumulators so `vpdpbusd`'s latency does not
//! serialize the loop. Per group the int32 sums are folded into f32 accumulators:
//! `acc += float(isum) * (d * sx) + m * sumx`, with `d` and `m` read as f16 or f32 (k-quants).

use std::arch::x86_64::*;

use super::driver::KernelArgs;
use super::pack::TILE_COLS;
use super::{portable, Kernel, QuantBits, ScaleDType};

/// Runs `kernel` on output tiles `tile_begin..tile_end`, all rows.
///
/// # Safety
/// The CPU must support `kernel` (`Kernel::is_available`); for `Kernel::Amx`, `a.xq` must be
/// padded as `amx::run_tiles` requires.
pub(crate) unsafe fn run_tiles(
    a: &KernelArgs<'_>,
    kernel: Kernel,
    tile_begin: usize,
    tile_end: usize,
) {
    match kernel {
        Kernel::Avx512Vnni => run_avx512(a, tile_begin, tile_end),
        Kernel::AvxVnni => run_avxvnni(a, tile_begin, tile_end),
        Kernel::Avx512VlVnni256 => run_avx512vl_256(a, tile_begin, tile_end),
        Kernel::Avx2 => run_avx2(a, tile_begin, tile_end),
        Kernel::Amx => super::amx::run_tiles(a, tile_begin, tile_end),
        Kernel::Portable => portable::run_tiles(a, tile_begin, tile_end),
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI

/// Rows per kernel call.
const MR_512: usize = 4;

/// How many groups ahead the kernel prefetches its weight blocks, where it does (see
/// [`weight_prefetch`]).
const PREFETCH_GROUPS: usize = 4;

/// Whether the AVX-512 kernel asks for its weight blocks [`PREFETCH_GROUPS`] groups ahead with
/// software prefetch. It depends on the CPU's hardware prefetcher, so it is chosen per vendor
/// (once per process; `CANDELA_WEIGHT_PREFETCH=on|off` overrides it, to measure a new CPU).
/// Measured on the 1B Q4_0 weights of `examples/gemv_stream` (batch-1 decode's matmuls
/// streamed from DRAM, 2 threads, A/B alternated):
/// - Intel Xeon (Sapphire Rapids class): on wins, end to end 30.9-31.5 -> 33.4-34.5 tok/s
///   (the commit that added it).
/// - AMD EPYC (Zen 4): off wins, 26.4-27.8 -> 29.5-32.1 GB/s of packed weights, four rounds:
///   its own prefetcher already follows the four tile streams, and the extra requests crowd
///   its miss queue.
pub(crate) fn weight_prefetch() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        match std::env::var("CANDELA_WEIGHT_PREFETCH").as_deref() {
            Ok("on") => return true,
            Ok("off") => return false,
            Ok(other) => tracing::warn!(
                value = other,
                "CANDELA_WEIGHT_PREFETCH is neither on nor off; ignored"
            ),
            Err(_) => {}
        }
        let v = __cpuid(0);
        let vendor: Vec<u8> = [v.ebx, v.edx, v.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor != b"AuthenticAMD"
    })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn run_avx512(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    let int4 = a.layout.bits == QuantBits::Int4;
    let prefetch = weight_prefetch();
    // Decode (one row) has no row reuse, so it takes more tiles at once to hide latency.
    let nc_main = if a.m == 1 { 4 } else { 2 };
    let mut t = tile_begin;
    while t < tile_end {
        let left = tile_end - t;
        let nc = if left >= nc_main {
            nc_main
        } else if left >= 2 {
            2
        } else {
            1
        };
        let mut r = 0;
        while r < a.m {
            // Blocks of 4 rows, but 5 rather than 4 + 1: a one-row block unpacks the weights
            // for a single row (a speculative verification of 4 drafts is 5 rows).
            let mr = match a.m - r {
                5 => 5,
                left => left.min(MR_512),
            };
            macro_rules! go {
                ($($mr:literal, $nc:literal);*) => {
                    match (mr, nc, int4) {
                        $(
                            ($mr, $nc, true) => block_512::<$mr, $nc, true>(a, t, r, prefetch),
                            ($mr, $nc, false) => block_512::<$mr, $nc, false>(a, t, r, prefetch),
                        )*
                        _ => unreachable!("row block {mr} x tile block {nc}"),
                    }
                };
            }
            go!(1, 1; 1, 2; 1, 4; 2, 1; 2, 2; 3, 1; 3, 2; 4, 1; 4, 2; 5, 1; 5, 2);
            r += mr;
        }
        t += nc;
    }
}

/// Rows `r0..r0 + MR`, tiles `t0..t0 + NC`.
// Register blocking: `(r, t)` index the accumulator grid, the activation rows and the tiles at
// once; the constant-bound loops unroll, and the arrays live in registers.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn block_512<const MR: usize, const NC: usize, const INT4: bool>(
    a: &KernelArgs<'_>,
    t0: usize,
    r0: usize,
    prefetch: bool,
) {
    let l = &a.layout;
    let split = MR * NC <= 4;
    let h = usize::from(split);
    let gs = l.group_size;
    let w0 = a.w.as_ptr().add(t0 * l.tile_bytes);
    let xq0 = a.xq.as_ptr().add(r0 * l.k);
    let nib = _mm512_set1_epi8(0x0F);
    // A per-weight constant: the branch below always goes the same way.
    let f32_scales = l.scales == ScaleDType::F32;
    let min_per_scale = l.min_per_scale();
    let mut facc = [[_mm512_setzero_ps(); NC]; MR];
    for g in 0..l.groups {
        let blk = w0.add(g * l.block_bytes);
        let xg = xq0.add(g * gs);
        if prefetch && r0 == 0 {
            // The first row block of a tile is the one that reads it from memory (the others
            // find it in cache): ask for the tiles' blocks a few groups ahead (the NC tile
            // streams are a tile apart, more than the hardware prefetcher follows at once).
            // `wrapping_add`: the address may lie past the weights; prefetch never faults.
            for t in 0..NC {
                let ahead = blk.wrapping_add(t * l.tile_bytes + PREFETCH_GROUPS * l.block_bytes);
                for line in (0..l.block_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
                }
            }
        }
        let mut ia = [[[_mm512_setzero_si512(); 2]; NC]; MR];
        if INT4 {
            for c in 0..gs / 8 {
                for t in 0..NC {
                    let wv = _mm512_loadu_si512(blk.add(t * l.tile_bytes + c * 64).cast());
                    let lo = _mm512_and_si512(wv, nib);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), nib);
                    for r in 0..MR {
                        let xp = xg.add(r * l.k + c * 8);
                        let x0 = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                        let x1 = _mm512_set1_epi32(xp.add(4).cast::<i32>().read_unaligned());
                        ia[r][t][0] = _mm512_dpbusd_epi32(ia[r][t][0], lo, x0);
                        ia[r][t][h] = _mm512_dpbusd_epi32(ia[r][t][h], hi, x1);
                    }
                }
            }
        } else {
            for c in (0..gs / 4).step_by(2) {
                for t in 0..NC {
                    let p = blk.add(t * l.tile_bytes + c * 64);
                    let wa = _mm512_loadu_si512(p.cast());
                    let wb = _mm512_loadu_si512(p.add(64).cast());
                    for r in 0..MR {
                        let xp = xg.add(r * l.k + c * 4);
                        let x0 = _mm512_set1_epi32(xp.cast::<i32>().read_unaligned());
                        let x1 = _mm512_set1_epi32(xp.add(4).cast::<i32>().read_unaligned());
                        ia[r][t][0] = _mm512_dpbusd_epi32(ia[r][t][0], wa, x0);
                        ia[r][t][h] = _mm512_dpbusd_epi32(ia[r][t][h], wb, x1);
                    }
                }
            }
        }
        for t in 0..NC {
            let sp = blk.add(t * l.tile_bytes + l.code_bytes);
            let (d, mn) = scales_512(sp, f32_scales, min_per_scale);
            for r in 0..MR {
                let gi = (r0 + r) * l.groups + g;
                let isum = if split {
                    _mm512_add_epi32(ia[r][t][0], ia[r][t][1])
                } else {
                    ia[r][t][0]
                };
                let s = _mm512_mul_ps(d, _mm512_set1_ps(*a.sx.get_unchecked(gi)));
                let f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, facc[r][t]);
                facc[r][t] = _mm512_fmadd_ps(mn, _mm512_set1_ps(*a.sumx.get_unchecked(gi)), f);
            }
        }
    }
    for (r, row) in facc.iter().enumerate() {
        for (t, &v) in row.iter().enumerate() {
            let col = (t0 + t) * TILE_COLS;
            let cols = TILE_COLS.min(l.n - col);
            let dst = a.y.at((r0 + r) * l.n + col, cols);
            if cols == TILE_COLS {
                _mm512_storeu_ps(dst, v);
            } else {
                _mm512_mask_storeu_ps(dst, ((1u32 << cols) - 1) as u16, v);
            }
        }
    }
}

/// A block's 16 scales and 16 mins as f32, from its scale row `sp`. A symmetric layout stores
/// no mins: they are `d * -z` (`min_per_scale`), exactly what a stored row would hold, so the
/// fold that follows gives the same bits either way.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
pub(crate) unsafe fn scales_512(
    sp: *const u8,
    f32_scales: bool,
    min_per_scale: Option<f32>,
) -> (__m512, __m512) {
    let (d, row_bytes) = if f32_scales {
        (_mm512_loadu_ps(sp.cast()), 64)
    } else {
        (_mm512_cvtph_ps(_mm256_loadu_si256(sp.cast())), 32)
    };
    let mn = match (min_per_scale, f32_scales) {
        (Some(z), _) => _mm512_mul_ps(d, _mm512_set1_ps(z)),
        (None, true) => _mm512_loadu_ps(sp.add(row_bytes).cast()),
        (None, false) => _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(row_bytes).cast())),
    };
    (d, mn)
}

// ---------------------------------------------------------------------------------------------
// 256-bit kernels: a tile is two 8-column halves.

/// The one instruction that differs between the 256-bit variants: `acc += sum of 4 u8 x i8`.
trait Dot256 {
    /// Whether the kernel may sum `vpmaddubsw`'s i16 products in i16 for a few steps before
    /// widening them with `vpmaddwd` (AVX2 without VNNI: it halves the multiplies, the port
    /// that bounds this kernel on AMD Zen 1).
    const I16_SUMS: bool;
    /// Whether `dot_u8` returns `sum((q - 128) x)` (sign trick) rather than `sum(q x)`, so the
    /// group sum needs `128 * sum(xq)` added back.
    const I8_FIX: bool;
    /// `w` bytes are < 128 (int4 codes, or int8 codes of at most 7 bits).
    unsafe fn dot_u7(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
    /// `w` bytes are any u8 (int8 codes).
    unsafe fn dot_u8(acc: __m256i, w: __m256i, x: __m256i) -> __m256i;
}

struct AvxVnniDot;
impl Dot256 for AvxVnniDot {
    const I16_SUMS: bool = false;
    const I8_FIX: bool = false;
    #[inline(always)]
    unsafe fn dot_u7(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
    #[inline(always)]
    unsafe fn dot_u8(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
}

struct Avx512VlDot;
impl Dot256 for Avx512VlDot {
    const I16_SUMS: bool = false;
    const I8_FIX: bool = false;
    #[inline(always)]
    unsafe fn dot_u7(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }
    #[inline(always)]
    unsafe fn dot_u8(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }
}

struct Avx2Dot;
impl Dot256 for Avx2Dot {
    const I16_SUMS: bool = true;
    const I8_FIX: bool = true;
    #[inline(always)]
    unsafe fn dot_u7(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // Pairs of 127 * 127 (or 127 * -128) cannot saturate the i16 of vpmaddubsw.
        let p = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
    #[inline(always)]
    unsafe fn dot_u8(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        // 255 * 127 pairs would saturate vpmaddubsw; use the signed code s = q - 128 and
        // |s| * (x * sign(s)) = s * x, whose pairs stay within 2 * 128 * 127.
        let s = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(x, s));
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn run_avxvnni(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    run_256::<AvxVnniDot>(a, tile_begin, tile_end);
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
unsafe fn run_avx512vl_256(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    run_256::<Avx512VlDot>(a, tile_begin, tile_end);
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    run_256::<Avx2Dot>(a, tile_begin, tile_end);
}

/// Inlined into each target-feature wrapper above, so the intrinsics compile with its features.
#[inline(always)]
unsafe fn run_256<D: Dot256>(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    let int4 = a.layout.bits == QuantBits::Int4;
    let code_max = usize::from(a.layout.code_max).max(1);
    let u7 = code_max < 128;
    // Loop steps (an int4 chunk, or a pair of int8 chunks: 2 `vpmaddubsw` each) whose i16
    // products can be summed in i16: each product pair is at most 2 * 127 * code_max.
    let i16_steps = I16_MAX / (4 * 127 * code_max);
    let i16 = D::I16_SUMS && u7 && i16_steps >= 1;
    for t in tile_begin..tile_end {
        let mut r = 0;
        while r < a.m {
            // 16 ymm registers (AVX2) hold two rows x two halves of accumulators at most.
            let mr = if a.m - r >= 2 { 2 } else { 1 };
            let n = i16_steps;
            match (mr, int4, u7, i16) {
                (2, true, _, true) => block_256::<D, 2, true, true, true>(a, t, r, n),
                (2, true, _, false) => block_256::<D, 2, true, true, false>(a, t, r, n),
                (2, false, true, true) => block_256::<D, 2, false, true, true>(a, t, r, n),
                (2, false, true, false) => block_256::<D, 2, false, true, false>(a, t, r, n),
                (2, false, false, _) => block_256::<D, 2, false, false, false>(a, t, r, n),
                (_, true, _, true) => block_256::<D, 1, true, true, true>(a, t, r, n),
                (_, true, _, false) => block_256::<D, 1, true, true, false>(a, t, r, n),
                (_, false, true, true) => block_256::<D, 1, false, true, true>(a, t, r, n),
                (_, false, true, false) => block_256::<D, 1, false, true, false>(a, t, r, n),
                (_, false, false, _) => block_256::<D, 1, false, false, false>(a, t, r, n),
            }
            r += mr;
        }
    }
}

/// The largest i16.
const I16_MAX: usize = i16::MAX as usize;

/// Rows `r0..r0 + MR` of tile `t0`. `U7`: every code is below 128 (always so for int4), so
/// int8 codes take `dot_u7`, without AVX2's sign trick and its `128 * sum(xq)` fix-up.
/// `I16` (AVX2, `U7` only): `vpmaddubsw` products are summed in i16 (in `ia[..][..][1]`) for
/// `i16_steps` loop steps, then widened into `ia[..][..][0]` by one `vpmaddwd`; exact, since
/// the caller chose `i16_steps` so that no i16 sum can overflow.
// Register blocking: `(r, t)` index the accumulator grid, the activation rows and the tiles at
// once; the constant-bound loops unroll, and the arrays live in registers.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn block_256<
    D: Dot256,
    const MR: usize,
    const INT4: bool,
    const U7: bool,
    const I16: bool,
>(
    a: &KernelArgs<'_>,
    t0: usize,
    r0: usize,
    i16_steps: usize,
) {
    let l = &a.layout;
    // Decode splits the i32 sums over two accumulators to break `vpdpbusd`'s dependency
    // chain; the i16 path's `vpaddw` has a one-cycle latency and uses the second slot itself.
    let split = MR == 1 && !I16;
    let h = usize::from(split);
    let ones = _mm256_set1_epi16(1);
    // Widens the i16 sums of slot 1 into the i32 sums of slot 0.
    let widen = |ia: &mut [[[__m256i; 2]; 2]; MR]| {
        for row in ia.iter_mut() {
            for acc in row.iter_mut() {
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(acc[1], ones));
                acc[1] = _mm256_setzero_si256();
            }
        }
    };
    let gs = l.group_size;
    let w0 = a.w.as_ptr().add(t0 * l.tile_bytes);
    let xq0 = a.xq.as_ptr().add(r0 * l.k);
    let nib = _mm256_set1_epi8(0x0F);
    // A per-weight constant: the branch below always goes the same way.
    let f32_scales = l.scales == ScaleDType::F32;
    let min_per_scale = l.min_per_scale();
    let mut facc = [[_mm256_setzero_ps(); 2]; MR];
    for g in 0..l.groups {
        let blk = w0.add(g * l.block_bytes);
        let xg = xq0.add(g * gs);
        let mut ia = [[[_mm256_setzero_si256(); 2]; 2]; MR];
        if INT4 {
            for c in 0..gs / 8 {
                for half in 0..2 {
                    let wv = _mm256_loadu_si256(blk.add(c * 64 + half * 32).cast());
                    let lo = _mm256_and_si256(wv, nib);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), nib);
                    for r in 0..MR {
                        let xp = xg.add(r * l.k + c * 8);
                        let x0 = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                        let x1 = _mm256_set1_epi32(xp.add(4).cast::<i32>().read_unaligned());
                        if I16 {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, x0),
                                _mm256_maddubs_epi16(hi, x1),
                            );
                            ia[r][half][1] = _mm256_add_epi16(ia[r][half][1], p);
                        } else {
                            ia[r][half][0] = D::dot_u7(ia[r][half][0], lo, x0);
                            ia[r][half][h] = D::dot_u7(ia[r][half][h], hi, x1);
                        }
                    }
                }
                if I16 && ((c + 1) % i16_steps == 0 || c + 1 == gs / 8) {
                    widen(&mut ia);
                }
            }
        } else {
            for c in (0..gs / 4).step_by(2) {
                for half in 0..2 {
                    let p = blk.add(c * 64 + half * 32);
                    let wa = _mm256_loadu_si256(p.cast());
                    let wb = _mm256_loadu_si256(p.add(64).cast());
                    for r in 0..MR {
                        let xp = xg.add(r * l.k + c * 4);
                        let x0 = _mm256_set1_epi32(xp.cast::<i32>().read_unaligned());
                        let x1 = _mm256_set1_epi32(xp.add(4).cast::<i32>().read_unaligned());
                        if I16 {
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(wa, x0),
                                _mm256_maddubs_epi16(wb, x1),
                            );
                            ia[r][half][1] = _mm256_add_epi16(ia[r][half][1], p);
                        } else if U7 {
                            ia[r][half][0] = D::dot_u7(ia[r][half][0], wa, x0);
                            ia[r][half][h] = D::dot_u7(ia[r][half][h], wb, x1);
                        } else {
                            ia[r][half][0] = D::dot_u8(ia[r][half][0], wa, x0);
                            ia[r][half][h] = D::dot_u8(ia[r][half][h], wb, x1);
                        }
                    }
                }
                let step = c / 2 + 1;
                if I16 && (step % i16_steps == 0 || c + 2 >= gs / 4) {
                    widen(&mut ia);
                }
            }
        }
        for half in 0..2 {
            let (d, mn) = if f32_scales {
                let sp = blk.add(l.code_bytes + half * 32);
                let d = _mm256_loadu_ps(sp.cast());
                match min_per_scale {
                    Some(z) => (d, _mm256_mul_ps(d, _mm256_set1_ps(z))),
                    None => (d, _mm256_loadu_ps(sp.add(64).cast())),
                }
            } else {
                let sp = blk.add(l.code_bytes + half * 16);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sp.cast()));
                match min_per_scale {
                    Some(z) => (d, _mm256_mul_ps(d, _mm256_set1_ps(z))),
                    None => (d, _mm256_cvtph_ps(_mm_loadu_si128(sp.add(32).cast()))),
                }
            };
            for r in 0..MR {
                let gi = (r0 + r) * l.groups + g;
                let mut isum = if split {
                    _mm256_add_epi32(ia[r][half][0], ia[r][half][1])
                } else {
                    ia[r][half][0]
                };
                if !U7 && D::I8_FIX {
                    let fix = 128 * *a.sumq.get_unchecked(gi);
                    isum = _mm256_add_epi32(isum, _mm256_set1_epi32(fix));
                }
                let s = _mm256_mul_ps(d, _mm256_set1_ps(*a.sx.get_unchecked(gi)));
                let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), s, facc[r][half]);
                facc[r][half] = _mm256_fmadd_ps(mn, _mm256_set1_ps(*a.sumx.get_unchecked(gi)), f);
            }
        }
    }
    for (r, row) in facc.iter().enumerate() {
        for (half, &v) in row.iter().enumerate() {
            let col = t0 * TILE_COLS + half * 8;
            if col >= l.n {
                continue;
            }
            let cols = 8.min(l.n - col);
            let dst = a.y.at((r0 + r) * l.n + col, cols);
            if cols == 8 {
                _mm256_storeu_ps(dst, v);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
            }
        }
    }
}
