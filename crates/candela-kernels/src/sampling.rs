//! Host-side math of the engine's sampler that shares the kernels' vectorised `exp`: the
//! unnormalised softmax weights of one logits row.

use crate::attention::fast_exp;

/// `out[i] = exp((logits[i] - max) * scale)`, resized to the row. `max` must be the row's
/// maximum (so every argument is <= 0). A logit of -inf (a masked token) gets weight exactly
/// 0, and a NaN logit weight 0 too: neither can ever be drawn. With AVX2 and FMA the row runs
/// 8 lanes at a time through the kernels' `exp` (within 2 ulp of libm's); libm otherwise.
pub fn softmax_weights(logits: &[f32], max: f32, scale: f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(logits.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has avx2 and fma (checked just above).
        return unsafe { weights_avx2(logits, max, scale, out) };
    }
    for (w, &l) in out.iter_mut().zip(logits) {
        let e = ((l - max) * scale).exp();
        *w = if e.is_nan() { 0.0 } else { e };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn weights_avx2(logits: &[f32], max: f32, scale: f32, out: &mut [f32]) {
    for (w, &l) in out.iter_mut().zip(logits) {
        let e = fast_exp::<true>((l - max) * scale);
        // `fast_exp` clamps its argument, so -inf would give ~1e-38; NaN fails the test too.
        *w = if l > f32::NEG_INFINITY { e } else { 0.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_match_libm_and_masked_or_nan_logits_weigh_nothing() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| match i % 97 {
                0 => f32::NEG_INFINITY,
                1 => f32::NAN,
                _ => (i as f32 * 0.37).sin() * 20.0,
            })
            .collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out = Vec::new();
        for scale in [1.0f32, 1.0 / 0.7, 1.0 / 1.3] {
            softmax_weights(&logits, max, scale, &mut out);
            assert_eq!(out.len(), logits.len());
            for (&l, &w) in logits.iter().zip(&out) {
                if l.is_nan() || l == f32::NEG_INFINITY {
                    assert_eq!(w, 0.0, "logit {l}");
                    continue;
                }
                let expected = ((l - max) * scale).exp();
                assert!(
                    (w - expected).abs() <= expected * 4e-7 + 1e-37,
                    "{l}: {w} vs {expected}"
                );
            }
        }
    }
}
