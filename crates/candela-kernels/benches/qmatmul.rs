//! Quantized matmul: our packed kernels against candle's `QMatMul` (same GGUF bytes) and against
//! an f32 matmul, at SmolLM2-135M's shapes.
//!
//! Ids are `{type}/{impl}/m{m}_k{k}_n{n}`, with impl one of `ours` (rayon's global pool),
//! `ours_1t` (a one-thread pool), `candle` (candle's quantized matmul, its own pool) and `f32`.
//! Run a slice with e.g. `cargo bench -p candela-kernels --bench qmatmul -- 'q4_1/.*m1_k1536'`.
//! Measurement times are short on purpose: the machine is a shared 2-core VM.

use std::time::Duration;

use candela_kernels::quant::PackedWeight;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (k, n) of the attention projections, the MLP and the LM head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
const ROWS: [usize; 5] = [1, 4, 16, 64, 256];
const LM_HEAD: (usize, usize) = (576, 49152);
const LM_HEAD_ROWS: [usize; 2] = [1, 16];

fn random_tensor(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("bench tensor")
}

fn bench_shape(
    c: &mut Criterion,
    one_thread: &rayon::ThreadPool,
    k: usize,
    n: usize,
    rows: &[usize],
) {
    let mut rng = StdRng::seed_from_u64(7);
    let w = random_tensor(&mut rng, n, k, 0.05);
    let mut group = c.benchmark_group("qmatmul");
    for (dtype, name) in [
        (GgmlDType::Q4_1, "q4_1"),
        (GgmlDType::Q4_0, "q4_0"),
        (GgmlDType::Q8_0, "q8_0"),
    ] {
        let qt = QTensor::quantize(&w, dtype).expect("quantize");
        let packed =
            PackedWeight::from_ggml(dtype, &qt.data().expect("bytes"), n, k).expect("repack");
        let qmm = QMatMul::from_qtensor(qt).expect("qmatmul");
        for &m in rows {
            let x = random_tensor(&mut rng, m, k, 1.0);
            let id = format!("m{m}_k{k}_n{n}");
            group.bench_function(format!("{name}/ours/{id}"), |b| {
                b.iter(|| packed.matmul(&x).expect("ours"))
            });
            group.bench_function(format!("{name}/ours_1t/{id}"), |b| {
                // Installed once around the loop, so the hand-off to the pool is not timed.
                one_thread.install(|| b.iter(|| packed.matmul(&x).expect("ours")))
            });
            group.bench_function(format!("{name}/candle/{id}"), |b| {
                b.iter(|| qmm.forward(&x).expect("candle"))
            });
        }
    }
    let wt = w.t().expect("transpose");
    for &m in rows {
        let x = random_tensor(&mut rng, m, k, 1.0);
        group.bench_function(format!("f32/f32/m{m}_k{k}_n{n}"), |b| {
            b.iter(|| x.matmul(&wt).expect("f32"))
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    for (k, n) in SHAPES {
        bench_shape(c, &one_thread, k, n, &ROWS);
    }
    bench_shape(c, &one_thread, LM_HEAD.0, LM_HEAD.1, &LM_HEAD_ROWS);
}

criterion_group! {
    name = qmatmul;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800));
    targets = benches
}
criterion_main!(qmatmul);
