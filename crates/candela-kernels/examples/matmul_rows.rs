//! One packed int4/int8 matmul shape, timed as the engine runs it: on a pool of `threads`
//! workers kept awake (`team::with_workers_awake`, as for a forward pass), weights in cache.
//! Prints the best of 5 rounds of 5 calls and the multiply-adds per second: what the driver's
//! split (by output tiles for decode batches, by rows from 128 rows) reaches on a prefill chunk
//! (`2048 960 576`: SmolLM2's stacked q/k/v on a 2,048-token chunk) or a decode batch
//! (`64 1536 576`).
//!
//! `cargo run --release -p candela-kernels --example matmul_rows -- ROWS N K [BITS] [THREADS]`
//! (BITS 4 or 8, default 4; THREADS default 2); `CANDELA_CPU_KERNEL` picks the kernel.

use std::time::Instant;

use candela_kernels::quant::{PackedWeight, QuantBits};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<std::result::Result<_, _>>()?;
    let [m, n, k, rest @ ..] = args.as_slice() else {
        return Err("usage: matmul_rows ROWS N K [BITS] [THREADS]".into());
    };
    let (m, n, k) = (*m, *n, *k);
    let bits = match rest.first() {
        Some(8) => QuantBits::Int8,
        _ => QuantBits::Int4,
    };
    let threads = rest.get(1).copied().unwrap_or(2);
    // Deterministic values in [-1, 1): the rate does not depend on them.
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 104_729 % 2000) as f32 / 1000.0) - 1.0)
        .collect();
    let p = PackedWeight::quantize_f32(&w, n, k, bits, 32)?;
    let mut y = vec![0f32; m * n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let best = pool.install(|| -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let dt = candela_kernels::team::with_workers_awake(|| {
                let t = Instant::now();
                for _ in 0..5 {
                    p.matmul_f32(&x, m, &mut y)?;
                }
                Ok::<_, candela_kernels::quant::QuantError>(t.elapsed())
            })?;
            best = best.min(dt.as_secs_f64() / 5.0);
        }
        Ok(best)
    })?;
    println!(
        "{threads} threads, {bits:?}, rows {m} n {n} k {k}: {:.1} us, {:.1} GMAC/s",
        best * 1e6,
        (m * n * k) as f64 / best / 1e9
    );
    Ok(())
}
