//! CUDA `rope_qkv`, `silu_mul` and `gelu_tanh_mul` against the CPU reference, on random shapes.
//!
//! Each case draws a dtype, a token count (0, 1 and odd ones included), head counts with a GQA
//! ratio, a head dimension, and a contiguous or strided (narrowed) input, and runs the op on
//! the CPU and on the GPU from the same host data.
//!
//! Tolerances. `rope_qkv` must match bit for bit: both sides compute in f32 with every product
//! rounded (the kernel uses `__fmul_rn`/`__fadd_rn`, so nvcc cannot fuse them into an fma) and
//! round once, to nearest even, on store. `silu_mul` differs only through `expf`: CUDA's is
//! within 2 ulp, libm's within 1, so the f32 results may differ by a few ulp (we allow 1e-6
//! relative, about 8 ulp); in f16/bf16 such a difference can move a result across a rounding
//! boundary of the dtype, so we allow 1 ulp of the dtype (`eps` relative), plus a floor of
//! one f16 subnormal step for results below f16's normal range.
//!
//! Without a CUDA device the tests print why and return: CI has no GPU; `scripts/gpu-check`
//! runs them on one.
#![cfg(feature = "cuda")]

#[path = "support/mod.rs"]
mod support;

use candela_kernels::{gelu_tanh_mul, rope_qkv, silu_mul, RopeStyle};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{assert_close, cuda_device, eps, to_f32_vec, RopeCase};

/// Uniform in `[-scale, scale)`, `[rows, cols]` in `dtype` on the CPU, as a narrow of a wider
/// tensor (row stride > cols, non-zero offset) when `strided`.
fn input(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    scale: f32,
    strided: bool,
    dtype: DType,
) -> Tensor {
    let (before, after) = if strided {
        (rng.random_range(1..9), rng.random_range(0..9))
    } else {
        (0, 0)
    };
    let wide = before + cols + after;
    let data: Vec<f32> = (0..rows * wide)
        .map(|_| rng.random_range(-scale..scale))
        .collect();
    Tensor::from_vec(data, (rows, wide), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .narrow(1, before, cols)
        .unwrap()
}

fn random_rope_case(rng: &mut StdRng) -> RopeCase {
    let num_kv_heads = rng.random_range(1..=8);
    RopeCase {
        dtype: [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)],
        style: [RopeStyle::Interleaved, RopeStyle::Half][rng.random_range(0..2)],
        num_tokens: [0, 1, 2, 3, 7, 33, 257, 1000][rng.random_range(0..8)],
        num_heads: num_kv_heads * [1, 2, 4, 5, 8][rng.random_range(0..5)],
        num_kv_heads,
        head_dim: [2, 6, 64, 80, 96, 128, 256, 300][rng.random_range(0..8)],
        strided: rng.random_bool(0.5),
    }
}

#[test]
fn cuda_rope_qkv_matches_cpu_bit_for_bit() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(0x0f05_ed02);
    for i in 0..60 {
        let c = random_rope_case(&mut rng);
        let (t, d) = (c.num_tokens, c.head_dim);
        let width = (c.num_heads + 2 * c.num_kv_heads) * d;
        let qkv = input(&mut rng, t, width, 4.0, c.strided, c.dtype);
        let cos = input(&mut rng, t, d / 2, 1.0, false, c.dtype);
        let sin = input(&mut rng, t, d / 2, 1.0, false, c.dtype);
        let run = |dev: &Device| {
            // `to_device` copies the whole storage and keeps the layout: a narrowed qkv
            // stays strided on the GPU.
            let on = |x: &Tensor| x.to_device(dev).unwrap();
            rope_qkv(
                &on(&qkv),
                &on(&cos),
                &on(&sin),
                c.num_heads,
                c.num_kv_heads,
                d,
                c.style,
            )
            .unwrap()
        };
        let (cpu, gpu_out) = (run(&Device::Cpu), run(&gpu));
        assert_eq!(gpu_out.dims(), cpu.dims(), "case {i} {c:?}");
        let (a, b) = (to_f32_vec(&gpu_out), to_f32_vec(&cpu));
        let differ = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(
            differ.is_none(),
            "case {i} {c:?}: element {differ:?} differs"
        );
        eprintln!("case {i:2}: {c:?}: equal");
    }
}

/// Rows narrowed along both dimensions (a non-zero start offset and a row stride), narrowed
/// on the device itself.
#[test]
fn cuda_rope_qkv_reads_strided_rows_in_place() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(5);
    let (t, h, kvh, d) = (9, 8, 2, 64);
    let width = (h + 2 * kvh) * d;
    let parent = input(&mut rng, t + 2, width + 7, 2.0, false, DType::BF16);
    let cos = input(&mut rng, t, d / 2, 1.0, false, DType::BF16);
    let sin = input(&mut rng, t, d / 2, 1.0, false, DType::BF16);
    let run = |dev: &Device| {
        let qkv = parent
            .to_device(dev)
            .unwrap()
            .narrow(0, 2, t)
            .unwrap()
            .narrow(1, 5, width)
            .unwrap();
        assert!(!qkv.is_contiguous());
        let cos = cos.to_device(dev).unwrap();
        let sin = sin.to_device(dev).unwrap();
        rope_qkv(&qkv, &cos, &sin, h, kvh, d, RopeStyle::Half).unwrap()
    };
    assert_eq!(to_f32_vec(&run(&gpu)), to_f32_vec(&run(&Device::Cpu)));
}

#[test]
fn cuda_silu_mul_matches_cpu() {
    check_glu_mul(silu_mul, 0x5111_0001);
}

/// The tanh GELU goes through the same `expf` as silu (the CPU's form, src/fused.rs): the same
/// tolerances hold.
#[test]
fn cuda_gelu_tanh_mul_matches_cpu() {
    check_glu_mul(gelu_tanh_mul, 0x6e10_0001);
}

fn check_glu_mul(op: fn(&Tensor, usize) -> candle_core::Result<Tensor>, seed: u64) {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..60 {
        let dtype = [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)];
        let t = [0, 1, 2, 3, 7, 33, 257, 1000][rng.random_range(0..8)];
        let width = [1, 3, 64, 100, 1025, 2816, 14336][rng.random_range(0..7)];
        let strided = rng.random_bool(0.5);
        let (before, extra) = if strided {
            (rng.random_range(1..9), rng.random_range(0..9))
        } else {
            (0, 0)
        };
        // Uniform in [-12, 12): both tails of silu; exp(-gate) stays finite in f32.
        let parent = input(&mut rng, t, before + 2 * width + extra, 12.0, false, dtype);
        let run = |dev: &Device| {
            let gate_up = parent
                .to_device(dev)
                .unwrap()
                .narrow(1, before, 2 * width)
                .unwrap();
            op(&gate_up, width).unwrap()
        };
        let (cpu, gpu_out) = (run(&Device::Cpu), run(&gpu));
        assert_eq!(gpu_out.dims(), [t, width], "case {i}");
        let (rel, floor) = match dtype {
            DType::F32 => (1e-6, 1e-30),
            DType::F16 => (eps(dtype), 6e-8),
            _ => (eps(dtype), 1e-30),
        };
        let worst = assert_close(&to_f32_vec(&gpu_out), &to_f32_vec(&cpu), rel, floor, |e| {
            format!(
                "case {i} {dtype:?} t {t} width {width} strided {strided}: element {e}, gpu vs cpu"
            )
        });
        eprintln!(
            "case {i:2}: {dtype:?} t {t} width {width} strided {strided}: worst rel diff {worst:.2e}"
        );
    }
}
