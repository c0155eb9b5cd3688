//! One packed int4/int8 matmul shape, timed as the engine runs it (`quant::timing`: a pool of
//! `threads` workers kept awake, as for a forward pass), weights in cache.
//! Prints the best of 5 rounds of 5 calls and the multiply-adds per second: what the driver's
//! split (by output tiles for decode batches, by rows from 128 rows) reaches on a prefill chunk
//! (`2048 960 576`: SmolLM2's stacked q/k/v on a 2,048-token chunk) or a decode batch
//! (`64 1536 576`).
//!
//! `cargo run --release -p candela-kernels --example matmul_rows -- ROWS N K [BITS] [THREADS]`
//! (BITS 4 or 8, default 4; THREADS default 2); `CANDELA_CPU_KERNEL` picks the kernel.

use candela_kernels::quant::{timing, PackedWeight, QuantBits};

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
    let w = timing::test_values(n * k, 7919);
    let x = timing::test_values(m * k, 104_729);
    let p = PackedWeight::quantize_f32(&w, n, k, bits, 32)?;
    let mut y = vec![0f32; m * n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let best =
        pool.install(|| timing::best_seconds_per_call(5, 5, || p.matmul_f32(&x, m, &mut y)))?;
    println!(
        "{threads} threads, {bits:?}, rows {m} n {n} k {k}: {:.1} us, {:.1} GMAC/s",
        best * 1e6,
        (m * n * k) as f64 / best / 1e9
    );
    Ok(())
}
