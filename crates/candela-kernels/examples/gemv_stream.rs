//! Batch-1 decode's matmuls in isolation: one-row (or `rows`-row) products through a
//! 1B-class Llama's Q4_0 weights (16 layers of q, k, v, o, gate, up, down at hidden 2048,
//! 512-wide k/v, 8192 FFN: the shapes of scripts/synth-gguf), about 0.55 GB, far past any
//! last-level cache, so every pass streams them from DRAM as a decode step does. Prints the
//! minimum and median pass over several and the packed bytes per second of the minimum: the
//! number to hold against `candela roofline`'s read bandwidth.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p candela-kernels --example gemv_stream [passes]
//! [rows]`; `CANDELA_WEIGHT_PREFETCH=on|off` and `CANDELA_CPU_KERNEL` pick what runs.

use std::time::Instant;

use candela_kernels::quant::PackedWeight;
use candle_core::quantized::GgmlDType;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 2048;
const KV: usize = 512;
const FFN: usize = 8192;
const LAYERS: usize = 16;

/// Random Q4_0 blocks (an f16 scale, then 16 bytes of nibbles) for an `[n, k]` weight.
fn random_q4_0(rng: &mut StdRng, n: usize, k: usize) -> PackedWeight {
    let blocks = n * k / 32;
    let mut bytes = Vec::with_capacity(blocks * 18);
    for _ in 0..blocks {
        let d = f16::from_f32(rng.random_range(0.001..0.01));
        bytes.extend_from_slice(&d.to_le_bytes());
        bytes.extend((0..16).map(|_| rng.random::<u8>()));
    }
    PackedWeight::from_ggml(GgmlDType::Q4_0, &bytes, n, k).expect("packing Q4_0")
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (passes, rows) = (arg(1, 12).max(1), arg(2, 1).max(1));
    let mut rng = StdRng::seed_from_u64(11);
    let shapes = [
        (HIDDEN, HIDDEN),
        (KV, HIDDEN),
        (KV, HIDDEN),
        (HIDDEN, HIDDEN),
        (FFN, HIDDEN),
        (FFN, HIDDEN),
        (HIDDEN, FFN),
    ];
    let weights: Vec<PackedWeight> = (0..LAYERS)
        .flat_map(|_| shapes)
        .map(|(n, k)| random_q4_0(&mut rng, n, k))
        .collect();
    let bytes: usize = weights.iter().map(PackedWeight::storage_bytes).sum();
    let x: Vec<f32> = (0..rows * FFN).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut y = vec![0f32; rows * FFN];
    let mut times = Vec::with_capacity(passes);
    for _ in 0..passes {
        let start = Instant::now();
        for w in &weights {
            w.matmul_f32(&x[..rows * w.k()], rows, &mut y[..rows * w.n()])
                .expect("matmul");
        }
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (min, med) = (times[0], times[times.len() / 2]);
    println!(
        "threads {}, rows {rows}, {:.0} MB packed: pass min {:.2} ms, median {:.2} ms; {:.1} GB/s at the minimum",
        rayon::current_num_threads(),
        bytes as f64 / 1e6,
        min * 1e3,
        med * 1e3,
        bytes as f64 / min / 1e9
    );
}
