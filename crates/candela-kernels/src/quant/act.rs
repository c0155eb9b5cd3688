//! Per-row, per-group int8 quantization of the activations, done once per matmul call.
//!
//! Group `g` of row `r` (the weight's group size, so one scale pair per weight group) becomes
//! `xq = round_ties_even(x * 127 / amax)` with `sx = amax / 127`. The kernels also need
//! `sumq = sum(xq)` (the AVX2 int8 fix-up) and `sumx = sx * sumq`, which carries the weight's
//! min term: `sum(x (q d + m)) ~= sx d sum(xq q) + m sumx`. The portable and the AVX-512 versions
//! produce identical bytes (same reciprocal, same rounding), so kernels differ only in the
//! order of float additions.

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

/// Quantizes `x: [m, k]` into `buf`, with the fastest code the kernel's CPU features allow.
pub(crate) fn quantize_rows(
    x: &[f32],
    m: usize,
    k: usize,
    group_size: usize,
    use_avx512: bool,
    buf: &mut ActBuf,
) {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(k % group_size, 0);
    let groups = k / group_size;
    buf.grow(m, k, groups);
    #[cfg(target_arch = "x86_64")]
    if use_avx512 {
        // SAFETY: the caller passes `use_avx512` only for a kernel whose features were detected.
        unsafe { quantize_avx512(x, group_size, buf, m * groups) };
        return;
    }
    let _ = use_avx512;
    quantize_portable(x, group_size, buf, m * groups);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_and_portable_quantize_identically() {
        if !super::super::Kernel::Avx512Vnni.is_available() {
            return;
        }
        let (m, k, g) = (3, 128, 64);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let mut a = ActBuf::default();
        let mut b = ActBuf::default();
        quantize_rows(&x, m, k, g, false, &mut a);
        quantize_rows(&x, m, k, g, true, &mut b);
        assert_eq!(a.xq, b.xq);
        assert_eq!(a.sx, b.sx);
        assert_eq!(a.sumq, b.sumq);
        assert_eq!(a.sumx, b.sumx);
    }

    #[test]
    fn zero_group_quantizes_to_zero() {
        let x = vec![0f32; 32];
        let mut a = ActBuf::default();
        quantize_rows(&x, 1, 32, 32, false, &mut a);
        assert!(a.xq.iter().all(|&q| q == 0));
        assert_eq!(a.sx[0], 0.0);
        assert_eq!(a.sumx[0], 0.0);
    }
}
