//! Helpers shared by the kernel tests: a tensor read back as f32, a dtype's machine epsilon,
//! an elementwise closeness check, the CUDA device (or why there is none), and the shape of a
//! `rope_qkv` case.
// Each test binary includes this module and uses only a subset of it.
#![allow(dead_code)]

use candela_kernels::RopeStyle;
use candle_core::{DType, Device, Tensor};

/// `t`'s elements in row-major order, as f32 on the host. Copies off the device first (a
/// no-op for CPU tensors).
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `dtype`'s machine epsilon, the gap between 1 and the next value up: 2^-10 for f16, 2^-7
/// for bf16, f32's for anything else.
pub fn eps(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f32::powi(2.0, -10),
        DType::BF16 => f32::powi(2.0, -7),
        _ => f32::EPSILON,
    }
}

/// Asserts `|got[i] - want[i]| <= rel * |want[i]| + floor` for every element; a failure names
/// the element with `what(i)`. Returns the worst relative difference `|got - want| / |want|`
/// over the elements where `want` is not zero (0 if there are none).
pub fn assert_close(
    got: &[f32],
    want: &[f32],
    rel: f32,
    floor: f32,
    what: impl Fn(usize) -> String,
) -> f32 {
    assert_eq!(got.len(), want.len(), "`got` and `want` differ in length");
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        assert!(
            diff <= rel * w.abs() + floor,
            "{}: got {g}, want {w}: |diff| {diff:e} > {rel:e} * |want| + {floor:e}",
            what(i)
        );
        if w != 0.0 {
            worst = worst.max(diff / w.abs());
        }
    }
    worst
}

/// The first CUDA device, or `None` after printing why there is none: CI has no GPU, so the
/// CUDA tests skip there (`scripts/gpu-check` runs them on one).
#[cfg(feature = "cuda")]
pub fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipping: no CUDA device ({e})");
            None
        }
    }
}

/// One `rope_qkv` case: `[num_tokens, (num_heads + 2 num_kv_heads) * head_dim]` in `dtype`,
/// read from a wider tensor when `strided`.
#[derive(Debug, Clone, Copy)]
pub struct RopeCase {
    pub dtype: DType,
    pub style: RopeStyle,
    pub num_tokens: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub strided: bool,
}
