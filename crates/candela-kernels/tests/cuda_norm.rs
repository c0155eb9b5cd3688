//! CUDA `add_rms_norm` against the CPU op on random shapes and dtypes.
//!
//! The sums must match bit for bit (one rounded addition on both sides); the norms within a
//! relative error that allows for the different summation order of the squares (sequential on
//! the CPU, a tree on the GPU) and the dtype's one rounding.
//!
//! Without a CUDA device the test prints why and returns: CI has no GPU; `scripts/gpu-check`
//! runs it on one.
#![cfg(feature = "cuda")]

#[path = "support/mod.rs"]
mod support;

use candela_kernels::norm::add_rms_norm;
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{cuda_device, to_f32_vec};

#[test]
fn cuda_add_rms_norm_matches_the_cpu() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for case in 0..40 {
        let t = [1, 2, 7, 64, 300][rng.random_range(0..5)];
        let h = [1, 31, 64, 576, 960, 2048, 4096][rng.random_range(0..7)];
        let dtype = [DType::F32, DType::F16, DType::BF16][case % 3];
        let eps = [1e-5f32, 1e-6][rng.random_range(0..2)];
        let mut rand = |n: usize, scale: f32| -> Tensor {
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
            Tensor::from_vec(v, n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let x = rand(t * h, 4.0).reshape((t, h)).unwrap();
        let y = rand(t * h, 1.0).reshape((t, h)).unwrap();
        let w = rand(h, 2.0);
        let (cpu_sum, cpu_norm) = add_rms_norm(&x, &y, &w, eps).unwrap();
        let to_gpu = |a: &Tensor| a.to_device(&gpu).unwrap();
        let (gpu_sum, gpu_norm) = add_rms_norm(&to_gpu(&x), &to_gpu(&y), &to_gpu(&w), eps).unwrap();
        let what = format!("case {case}: t {t} h {h} {dtype:?} eps {eps}");
        assert_eq!(to_f32_vec(&gpu_sum), to_f32_vec(&cpu_sum), "{what}: sums");
        // f32: the sum of squares in another order moves the scale by a few ulps; half types:
        // the same, then one rounding that can land on the other side of a half-way point.
        let rel = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 1e-3,
            _ => 8e-3,
        };
        for (i, (g, c)) in to_f32_vec(&gpu_norm)
            .iter()
            .zip(to_f32_vec(&cpu_norm))
            .enumerate()
        {
            assert!(
                (g - c).abs() <= rel * c.abs().max(1e-2),
                "{what}: norm[{i}] gpu {g} cpu {c}"
            );
        }
    }
}
