//! The AMX kernel against AVX-512 VNNI (each forced at every row count) at SmolLM2-135M's
//! shapes, timed as the minimum and the median of many calls: on a shared machine the minimum
//! is what a kernel costs when it is not interrupted. This is what `AMX_ROWS_MIN` in the
//! quant driver was chosen from (results in `bench/results/amx-qmatmul.md`).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p candela-kernels --example amx_timing [filter]`
//! (the filter matches the type name, `q4_1` or `q8_0`).

use std::time::{Duration, Instant};

use candela_kernels::quant::{Kernel, PackedWeight};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (k, n) of the attention projections, the MLP and the LM head... without the LM head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
const ROWS: [usize; 8] = [1, 4, 8, 16, 32, 64, 128, 256];

/// (min, median) in microseconds of each of `fs`, timed in blocks of back-to-back calls, the
/// blocks alternated four times so that a burst of load from the neighbours hits both.
fn time_blocks(fs: &mut [&mut dyn FnMut()], budget: Duration) -> Vec<(f64, f64)> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    for _ in 0..4 {
        for (f, s) in fs.iter_mut().zip(&mut samples) {
            let start = Instant::now();
            while start.elapsed() < budget / 4 || s.len() < 3 {
                let t = Instant::now();
                f();
                s.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            (s[0], s[s.len() / 2])
        })
        .collect()
}

fn main() {
    if !Kernel::Amx.is_available() {
        eprintln!("no AMX int8 on this machine (or the OS refused the tile state)");
        return;
    }
    let filter = std::env::args().nth(1).unwrap_or_default();
    let threads = rayon::current_num_threads();
    println!("threads: {threads}; min / median of calls in microseconds; GOP/s = 2 m n k / min");
    println!("| type | m | k | n | avx512vnni min | amx min | avx512vnni med | amx med | avx512vnni GOP/s | amx GOP/s | amx speedup (min) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rng = StdRng::seed_from_u64(7);
    for (dtype, name) in [(GgmlDType::Q4_1, "q4_1"), (GgmlDType::Q8_0, "q8_0")] {
        if !name.contains(&filter) {
            continue;
        }
        for (k, n) in SHAPES {
            let w: Vec<f32> = (0..n * k)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.05)
                .collect();
            let w = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
            let qt = QTensor::quantize(&w, dtype).expect("quantize");
            let packed =
                PackedWeight::from_ggml(dtype, &qt.data().expect("bytes"), n, k).expect("repack");
            for m in ROWS {
                let x: Vec<f32> = (0..m * k)
                    .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                    .collect();
                let (mut y0, mut y1) = (vec![0f32; m * n], vec![0f32; m * n]);
                let mut avx = || {
                    packed
                        .matmul_f32_with(Kernel::Avx512Vnni, &x, m, &mut y0)
                        .expect("avx512vnni");
                };
                let mut amx = || {
                    packed
                        .matmul_f32_with(Kernel::Amx, &x, m, &mut y1)
                        .expect("amx");
                };
                let budget = Duration::from_millis(if m >= 64 { 600 } else { 300 });
                let t = time_blocks(&mut [&mut avx, &mut amx], budget);
                let gops = |us: f64| 2.0 * (m * n * k) as f64 / us / 1e3;
                println!(
                    "| {name} | {m} | {k} | {n} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} |",
                    t[0].0,
                    t[1].0,
                    t[0].1,
                    t[1].1,
                    gops(t[0].0),
                    gops(t[1].0),
                    t[0].0 / t[1].0
                );
            }
        }
    }
}
