//! Quantized matmul: our packed kernels against candle's `QMatMul` (same GGUF bytes) and against
//! an f32 matmul, at SmolLM2-135M's shapes, and the GGUF k-quants at Gemma 3 270M's shapes.
//!
//! Ids are `{type}/{impl}/m{m}_k{k}_n{n}`, with impl one of `ours` (rayon's global pool),
//! `ours_1t` (a one-thread pool), `candle` (candle's quantized matmul, its own pool) and `f32`;
//! on CPUs with AMX, also `amx` and `avx512vnni` (each kernel forced at every row count, on
//! slices: `-- '/(amx|avx512vnni)/'`), which is what `AMX_ROWS_MIN` was chosen from.
//! Run a slice with e.g. `cargo bench -p candela-kernels --bench qmatmul -- 'q4_1/.*m1_k1536'`,
//! or only the k-quants with `-- 'q[2-6]k/'`. Threads: rayon's global pool, which candle's
//! quantized matmul also uses (`RAYON_NUM_THREADS=2` to pin both to two).
//! Measurement times are short on purpose: the machine is a shared 2-core VM.

use std::time::Duration;

use candela_kernels::quant::{Kernel, PackedWeight};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (k, n) of the attention projections, the MLP and the LM head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (576, 192), (576, 1536), (1536, 576)];
const ROWS: [usize; 5] = [1, 4, 16, 64, 256];
/// Rows of the AMX against AVX-512 VNNI comparison, around AMX's 16-row tiles.
const KERNEL_ROWS: [usize; 8] = [1, 4, 8, 16, 32, 64, 128, 256];
const LM_HEAD: (usize, usize) = (576, 49152);
const LM_HEAD_ROWS: [usize; 2] = [1, 16];
/// (k, n) of Gemma 3 270M Q4_K_M's k-quant tensors (`examples/gguf_tensors` in candela-models):
/// attn_output [640, 1024] in Q4_K, ffn_down [640, 2048] in Q4_K or Q6_K. Its other matrices
/// have k = 640, not a multiple of 256, so llama.cpp stored them as Q5_0 / Q8_0.
const KQUANT_SHAPES: [(usize, usize); 2] = [(1024, 640), (2048, 640)];
const KQUANT_ROWS: [usize; 3] = [1, 7, 64];
const KQUANTS: [(GgmlDType, &str); 5] = [
    (GgmlDType::Q4K, "q4k"),
    (GgmlDType::Q5K, "q5k"),
    (GgmlDType::Q6K, "q6k"),
    (GgmlDType::Q2K, "q2k"),
    (GgmlDType::Q3K, "q3k"),
];

fn random_tensor(rng: &mut StdRng, rows: usize, cols: usize, scale: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("bench tensor")
}

#[allow(clippy::too_many_arguments)]
fn bench_shape(
    c: &mut Criterion,
    one_thread: &rayon::ThreadPool,
    k: usize,
    n: usize,
    rows: &[usize],
    dtypes: &[(GgmlDType, &str)],
    with_f32: bool,
) {
    let mut rng = StdRng::seed_from_u64(7);
    let w = random_tensor(&mut rng, n, k, 0.05);
    let mut group = c.benchmark_group("qmatmul");
    for &(dtype, name) in dtypes {
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
    if !with_f32 {
        group.finish();
        return;
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

/// The AMX kernel against AVX-512 VNNI, each forced at every row count.
fn bench_kernels(c: &mut Criterion, k: usize, n: usize, dtypes: &[(GgmlDType, &str)]) {
    let mut rng = StdRng::seed_from_u64(7);
    let w = random_tensor(&mut rng, n, k, 0.05);
    let mut group = c.benchmark_group("qmatmul");
    for &(dtype, name) in dtypes {
        let qt = QTensor::quantize(&w, dtype).expect("quantize");
        let packed =
            PackedWeight::from_ggml(dtype, &qt.data().expect("bytes"), n, k).expect("repack");
        for m in KERNEL_ROWS {
            let x: Vec<f32> = (0..m * k)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect();
            let mut y = vec![0f32; m * n];
            for kernel in [Kernel::Avx512Vnni, Kernel::Amx] {
                let id = format!("{name}/{}/m{m}_k{k}_n{n}", kernel.name());
                group.bench_function(id, |b| {
                    b.iter(|| packed.matmul_f32_with(kernel, &x, m, &mut y).expect("ours"))
                });
            }
        }
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    let legacy = [
        (GgmlDType::Q4_1, "q4_1"),
        (GgmlDType::Q4_0, "q4_0"),
        (GgmlDType::Q8_0, "q8_0"),
    ];
    for (k, n) in SHAPES {
        bench_shape(c, &one_thread, k, n, &ROWS, &legacy, true);
    }
    bench_shape(
        c,
        &one_thread,
        LM_HEAD.0,
        LM_HEAD.1,
        &LM_HEAD_ROWS,
        &legacy,
        true,
    );
    for (k, n) in KQUANT_SHAPES {
        bench_shape(c, &one_thread, k, n, &KQUANT_ROWS, &KQUANTS, false);
    }
    if Kernel::Amx.is_available() {
        let dtypes = [(GgmlDType::Q4_1, "q4_1"), (GgmlDType::Q8_0, "q8_0")];
        for (k, n) in SHAPES {
            bench_kernels(c, k, n, &dtypes);
        }
    }
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
