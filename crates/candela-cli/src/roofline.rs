//! `candela roofline`: the machine's limits, measured, so that a benchmark's figures can be
//! read as fractions of them (scripts/bench-cost-curve runs it beside every measurement).
//!
//! Two numbers: the DRAM read bandwidth the given threads reach (what batch-1 decode is bound
//! by: every token reads every weight once), and the int8 multiply-add rate of our own packed
//! matmul on a weight that stays in cache, for each kernel this CPU runs (what prefill and
//! batched decode are bound by). The second is our kernel's ceiling, including activation
//! quantization and the per-group fold, not the instruction set's paper peak.

use std::hint::black_box;
use std::time::Instant;

use anyhow::Context;
use candela_kernels::quant::{timing, Kernel, PackedWeight, QuantBits};
use rayon::prelude::*;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Bytes read per bandwidth pass, in MiB: well above the last-level cache.
    #[arg(long, default_value_t = 2048)]
    bandwidth_mib: usize,
    /// Timed repetitions of each measurement; the best is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

#[derive(Serialize)]
struct Report {
    cpu: String,
    threads: usize,
    read_gb_per_s: f64,
    /// Kernel name -> int8 multiply-adds per second, in units of 1e9 (64 activation rows, a
    /// decode batch).
    int8_gmacs_per_s: Vec<(String, f64)>,
    /// The selected kernel's rate on 512 activation rows (a prefill chunk, which the driver
    /// splits by rows rather than by output tiles).
    int8_gmacs_per_s_512_rows: f64,
    /// f32 fused multiply-adds per second, 1e9, over all threads: what the CPU attention's
    /// dot products are bound by (None where neither AVX-512F nor AVX2+FMA exists).
    f32_gfmas_per_s: Option<f64>,
    /// The kernel the engine picks on this CPU (`CANDELA_CPU_KERNEL` honoured).
    kernel_selected: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(t) = args.threads {
        pool = pool.num_threads(t);
    }
    let pool = pool.build().context("building the thread pool")?;
    let repeats = args.repeats.max(1);
    let selected = Kernel::detect();
    let report = pool.install(|| -> anyhow::Result<Report> {
        Ok(Report {
            cpu: cpu_model(),
            threads: rayon::current_num_threads(),
            read_gb_per_s: read_bandwidth(args.bandwidth_mib, repeats),
            int8_gmacs_per_s: Kernel::available()
                .into_iter()
                .map(|k| Ok((k.name().to_string(), int8_rate(k, 64, repeats)?)))
                .collect::<anyhow::Result<_>>()?,
            int8_gmacs_per_s_512_rows: int8_rate(selected, 512, repeats)?,
            f32_gfmas_per_s: fma_rate(repeats),
            kernel_selected: selected.name().to_string(),
        })
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

/// Best GB/s of summing `mib` MiB of u64 split evenly over the pool's threads. The buffer is
/// written first so that its pages exist (a fresh allocation reads the shared zero page).
fn read_bandwidth(mib: usize, repeats: usize) -> f64 {
    let words = (mib << 20) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(rayon::current_num_threads());
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        let sum: u64 = data
            .par_chunks(chunk)
            .map(sum_lanes)
            .reduce(|| 0, u64::wrapping_add);
        black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// The wrapping sum of `c` in 8 independent lanes: one running sum would chain every add on
/// the previous one and measure the adder's latency instead of the memory.
fn sum_lanes(c: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let blocks = c.chunks_exact(8);
    let tail = blocks
        .remainder()
        .iter()
        .fold(0u64, |a, &x| a.wrapping_add(x));
    for block in blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane = lane.wrapping_add(x);
        }
    }
    lanes.iter().fold(tail, |a, &x| a.wrapping_add(x))
}

/// Best int8 multiply-adds per second (1e9) of `kernel` on a 512 KiB int8 weight (fits in L2)
/// with `m` activation rows: the matmul's compute ceiling without the memory wall.
fn int8_rate(kernel: Kernel, m: usize, repeats: usize) -> anyhow::Result<f64> {
    let (n, k) = (512usize, 1024usize);
    let w = timing::test_values(n * k, 7919);
    let x = timing::test_values(m * k, 104_729);
    let packed = PackedWeight::quantize_f32(&w, n, k, QuantBits::Int8, 32)?;
    let mut y = vec![0f32; m * n];
    packed.matmul_f32_with(kernel, &x, m, &mut y)?;
    let best = timing::best_seconds_per_call(repeats, 50 * 64 / m, || {
        packed.matmul_f32_with(kernel, &x, m, &mut y)
    })?;
    black_box(&y);
    Ok((m * n * k) as f64 / best / 1e9)
}

/// Best f32 fused multiply-adds per second (1e9) of every pool thread at once, each running
/// independent chains of the widest FMA the CPU has (enough chains to cover its latency).
fn fma_rate(repeats: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let wide = std::is_x86_feature_detected!("avx512f");
        let narrow = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        if !wide && !narrow {
            return None;
        }
        const ITERS: usize = 2_000_000;
        let threads = rayon::current_num_threads();
        let mut best = f64::INFINITY;
        for _ in 0..repeats {
            let start = Instant::now();
            let sum: f32 = (0..threads)
                .into_par_iter()
                .map(|_| {
                    // SAFETY: the features were detected above.
                    unsafe {
                        if wide {
                            x86_fma::chains_512(ITERS)
                        } else {
                            x86_fma::chains_256(ITERS)
                        }
                    }
                })
                .sum();
            black_box(sum);
            best = best.min(start.elapsed().as_secs_f64());
        }
        let lanes = if wide { 16 } else { 8 };
        Some((threads * ITERS * x86_fma::CHAINS * lanes) as f64 / best / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = repeats;
        None
    }
}

/// FMA chains for [`fma_rate`], hand-written with intrinsics: the compiler would fold or
/// reassociate a plain loop, and the point is the instruction's own rate.
#[cfg(target_arch = "x86_64")]
mod x86_fma {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// Independent accumulators: more than latency (4) x FMA ports (2) of current cores.
    pub const CHAINS: usize = 12;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn chains_512(iters: usize) -> f32 {
        // Opaque inputs, or the compiler evaluates the whole loop at build time.
        let (a, b) = (
            _mm512_set1_ps(black_box(0.999_9)),
            _mm512_set1_ps(black_box(1e-4)),
        );
        let mut acc = [_mm512_set1_ps(black_box(1.0)); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn chains_256(iters: usize) -> f32 {
        let (a, b) = (
            _mm256_set1_ps(black_box(0.999_9)),
            _mm256_set1_ps(black_box(1e-4)),
        );
        let mut acc = [_mm256_set1_ps(black_box(1.0)); CHAINS];
        for _ in 0..iters {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let mut sum = 0.0;
        for v in acc {
            _mm256_storeu_ps(lanes.as_mut_ptr(), v);
            sum += lanes.iter().sum::<f32>();
        }
        sum
    }
}
