//! Our packed matmul against candle's `QMatMul` on the GGUF k-quants at Gemma 3 270M's shapes,
//! timed as the minimum and the median of many calls: on a shared machine the
//! minimum is what each path costs when it is not interrupted (criterion's estimates in
//! `benches/qmatmul.rs` move with the neighbours' load).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p candela-kernels --example kquant_timing`
//! (ours runs on rayon's global pool, candle on its own pool of as many threads).

use std::time::{Duration, Instant};

use candela_kernels::quant::PackedWeight;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_tensor(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
}

/// (min, median) in microseconds of each of `fs`, timed in blocks of back-to-back calls, the
/// blocks alternated four times with a pause between them: not call by call, since candle's
/// worker threads spin for a while after each call and would steal the other path's cores.
fn time_blocks(fs: &mut [&mut dyn FnMut()], budget: Duration) -> Vec<(f64, f64)> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); fs.len()];
    for _ in 0..4 {
        for (f, s) in fs.iter_mut().zip(&mut samples) {
            std::thread::sleep(Duration::from_millis(20));
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
    let filter = std::env::args().nth(1).unwrap_or_default();
    let threads = rayon::current_num_threads();
    println!("threads: {threads}; min / median of calls, microseconds");
    println!("type  m    k     n    candle min  ours min  | candle med  ours med | speedup (min)");
    let mut rng = StdRng::seed_from_u64(7);
    for (dtype, name) in [
        (GgmlDType::Q4K, "q4k"),
        (GgmlDType::Q6K, "q6k"),
        (GgmlDType::Q5K, "q5k"),
        (GgmlDType::Q3K, "q3k"),
        (GgmlDType::Q2K, "q2k"),
    ] {
        if !name.contains(&filter) {
            continue;
        }
        for (k, n) in [(1024, 640), (2048, 640)] {
            let w = random_tensor(&mut rng, n, k, 0.05);
            let qt = QTensor::quantize(&w, dtype).expect("quantize");
            let packed =
                PackedWeight::from_ggml(dtype, &qt.data().expect("bytes"), n, k).expect("repack");
            let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
            for m in [1, 7, 64] {
                let x = random_tensor(&mut rng, m, k, 1.0);
                let budget = Duration::from_millis(if m == 64 { 1500 } else { 600 });
                let mut candle = || {
                    std::hint::black_box(qmm.forward(&x).expect("candle"));
                };
                let mut ours = || {
                    std::hint::black_box(packed.matmul(&x).expect("ours"));
                };
                let t = time_blocks(&mut [&mut candle, &mut ours], budget);
                println!(
                    "{name:5} {m:<4} {k:<5} {n:<4} {:10.1}  {:8.1}  | {:10.1}  {:8.1} | {:6.1}x",
                    t[0].0,
                    t[1].0,
                    t[0].1,
                    t[1].1,
                    t[0].0 / t[1].0
                );
            }
        }
    }
}
