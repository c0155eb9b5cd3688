//! Per-row, per-group int8 quantization of the activations, done once per matmul call.
//!
//! Group `g` of row `r` (the weight's group size, so one scale pair per weight group) becomes
//! `xq = round_ties_even(x * 127 / amax)` with `sx = amax / 127`. The kernels also need
//! `sumq = sum(xq)` (the AVX2 int8 fix-up) and `sumx = sx * sumq`, which carries the weight's
//! min term: `sum(x (q d + m)) ~= sx d sum(xq q) + m sumx`. The portable, AVX2 and AVX-512
//! versions produce identical bytes (same reciprocal, same rounding), so kernels differ only in
//! the order of float additions. The SIMD versions matter at prefill sizes: the portable
//! loop's `round_ties_even` is a library call per element on a baseline x86_64 build.

use super::Kernel;

/// Reusable buffers for the quantized activations of one call. Vectors only ever grow, so a
/// thread that keeps calling with similar shapes allocates nothing after its first call.
#[derive(Default)]
pub(crate) struct ActBuf {
    pub xq: Vec<i8>,
    pub sx: Vec<f32>,
    pub sumx: Vec<f32>,
    pub sumq: Vec<i32>,
}

impl ActBuf {
    fn grow(&mut self, m: usize, k: usize, groups: usize) {
        if self.xq.len() < m * k {
            self.xq.resize(m * k, 0);
        }
        for v in [&mut self.sx, &mut self.sumx] {
            if v.len() < m * groups {
                v.resize(m * groups, 0.0);
            }
        }
        if self.sumq.len() < m * groups {
            self.sumq.resize(m * groups, 0);
        }
    }
}

/// Quantizes `x: [m, k]` into `buf`, with the fastest code the features of `kernel` allow
/// (the portable kernel gets the portable code, so its test runs touch no SIMD at all).
pub(crate) fn quantize_rows(
    x: &[f32],
    m: usize,
    k: usize,
    group_size: usize,
    kernel: Kernel,
    buf: &mut ActBuf,
) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(k % group_size, 0);
    debug_assert_eq!(group_size % 16, 0);
    let groups = k / group_size;
    buf.grow(m, k, groups);
    match kernel {
        // SAFETY (both): the driver runs a kernel only after `is_available()`, i.e. on a CPU
        // with its features, which include AVX-512 F/BW/VL or AVX2 + FMA respectively.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni | Kernel::Amx => unsafe {
            quantize_avx512(x, group_size, buf, m * groups)
        },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni | Kernel::Avx512VlVnni256 | Kernel::Avx2 => unsafe {
            quantize_avx2(x, group_size, buf, m * groups)
        },
        _ => quantize_portable(x, group_size, buf, m * groups),
    }
}

fn quantize_portable(x: &[f32], group_size: usize, buf: &mut ActBuf, total_groups: usize) {
    let ActBuf { xq, sx, sumx, sumq } = buf;
    let groups = x
        .chunks_exact(group_size)
        .zip(xq.chunks_exact_mut(group_size));
    for (i, (xs, qs)) in groups.take(total_groups).enumerate() {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut s = 0i32;
        for (q, &v) in qs.iter_mut().zip(xs) {
            let r = (v * inv).round_ties_even() as i32;
            *q = r as i8;
            s += r;
        }
        let d = amax / 127.0;
        sx[i] = d;
        sumq[i] = s;
        sumx[i] = d * s as f32;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_avx512(x: &[f32], group_size: usize, buf: &mut ActBuf, total_groups: usize) {
    use std::arch::x86_64::*;
    let ActBuf { xq, sx, sumx, sumq } = buf;
    debug_assert!(x.len() >= total_groups * group_size && xq.len() >= x.len());
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    for i in 0..total_groups {
        let src = x.as_ptr().add(i * group_size);
        let dst = xq.as_mut_ptr().add(i * group_size);
        let mut vmax = _mm512_setzero_ps();
        for c in (0..group_size).step_by(16) {
            let v = _mm512_loadu_ps(src.add(c));
            let a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
            vmax = _mm512_max_ps(vmax, a);
        }
        let amax = _mm512_reduce_max_ps(vmax);
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let vinv = _mm512_set1_ps(inv);
        let mut vsum = _mm512_setzero_si512();
        for c in (0..group_size).step_by(16) {
            let v = _mm512_mul_ps(_mm512_loadu_ps(src.add(c)), vinv);
            // Default MXCSR rounding is to nearest, ties to even, as `round_ties_even` above.
            let q = _mm512_cvtps_epi32(v);
            vsum = _mm512_add_epi32(vsum, q);
            _mm_storeu_si128(dst.add(c).cast(), _mm512_cvtsepi32_epi8(q));
        }
        let s = _mm512_reduce_add_epi32(vsum);
        let d = amax / 127.0;
        sx[i] = d;
        sumq[i] = s;
        sumx[i] = d * s as f32;
    }
}

/// [`quantize_avx512`] eight lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], group_size: usize, buf: &mut ActBuf, total_groups: usize) {
    use std::arch::x86_64::*;
    let ActBuf { xq, sx, sumx, sumq } = buf;
    debug_assert!(x.len() >= total_groups * group_size && xq.len() >= x.len());
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for i in 0..total_groups {
        let src = x.as_ptr().add(i * group_size);
        let dst = xq.as_mut_ptr().add(i * group_size);
        let mut vmax = _mm256_setzero_ps();
        for c in (0..group_size).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(src.add(c)), abs_mask));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let vinv = _mm256_set1_ps(inv);
        let mut vsum = _mm256_setzero_si256();
        for c in (0..group_size).step_by(16) {
            // Default MXCSR rounding is to nearest, ties to even, as `round_ties_even` above;
            // |q| <= 127, so the saturating packs keep every value.
            let q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src.add(c)), vinv));
            let q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src.add(c + 8)), vinv));
            vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(q0, q1));
            // packs works within 128-bit lanes: [q0 lo, q1 lo, q0 hi, q1 hi] as i16, then the
            // permute restores element order before the final pack to i8.
            let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q0, q1));
            let b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
            _mm_storeu_si128(dst.add(c).cast(), b);
        }
        let mut s4 = [0i32; 8];
        _mm256_storeu_si256(s4.as_mut_ptr().cast(), vsum);
        let s: i32 = s4.iter().sum();
        let d = amax / 127.0;
        sx[i] = d;
        sumq[i] = s;
        sumx[i] = d * s as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_portable_quantize_identically() {
        let (m, k) = (3, 192);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        for g in [16, 32, 64] {
            let mut want = ActBuf::default();
            quantize_rows(&x, m, k, g, Kernel::Portable, &mut want);
            for kernel in [Kernel::Avx512Vnni, Kernel::Avx2] {
                if !kernel.is_available() {
                    continue;
                }
                let mut got = ActBuf::default();
                quantize_rows(&x, m, k, g, kernel, &mut got);
                assert_eq!(got.xq, want.xq, "{kernel:?} g{g}");
                assert_eq!(got.sx, want.sx, "{kernel:?} g{g}");
                assert_eq!(got.sumq, want.sumq, "{kernel:?} g{g}");
                assert_eq!(got.sumx, want.sumx, "{kernel:?} g{g}");
            }
        }
    }

    #[test]
    fn zero_group_quantizes_to_zero() {
        let x = vec![0f32; 32];
        let mut a = ActBuf::default();
        quantize_rows(&x, 1, 32, 32, Kernel::Portable, &mut a);
        assert!(a.xq.iter().all(|&q| q == 0));
        assert_eq!(a.sx[0], 0.0);
        assert_eq!(a.sumx[0], 0.0);
    }
}
