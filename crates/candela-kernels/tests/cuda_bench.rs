//! Benchmarks of the CUDA kernels (`#[ignore]`: `scripts/gpu-check` runs them with
//! `--ignored`). Each prints one table row: the median time of a batch of launches, and the
//! bandwidth it implies from the fewest bytes the op must move (each input read once, each
//! output written once), next to a device-to-device copy measured the same way.
//!
//! Times are host clocks around `Device::synchronize`, over batches of `ITERS` launches after
//! a warm-up, so launch overhead is included (it matters for small shapes, as in serving).
#![cfg(feature = "cuda")]

#[path = "support/mod.rs"]
mod support;

use std::time::Instant;

use candela_kernels::cuda::CudaPackedWeight;
use candela_kernels::quant::{PackedWeight, QuantBits};
use candela_kernels::{paged_attention, write_kv, AttentionMetadata};
use candle_core::{DType, Device, Result, Tensor};
use support::cuda_device;

const ITERS: usize = 20;
const BATCHES: usize = 7;

/// Median seconds per call of `f`.
fn time(dev: &Device, mut f: impl FnMut() -> Result<()>) -> f64 {
    for _ in 0..3 {
        f().unwrap();
    }
    dev.synchronize().unwrap();
    let mut per_call: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..ITERS {
                f().unwrap();
            }
            dev.synchronize().unwrap();
            t0.elapsed().as_secs_f64() / ITERS as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    per_call[BATCHES / 2]
}

fn row(what: &str, secs: f64, bytes: f64, flops: f64) {
    eprintln!(
        "BENCH | {what:<58} | {:>9.1} us | {:>7.0} GB/s | {:>7.2} TFLOP/s",
        secs * 1e6,
        bytes / secs / 1e9,
        flops / secs / 1e12
    );
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_copy_ceiling() {
    let Some(dev) = cuda_device() else { return };
    let n = 256 << 20; // 1 GiB of f32
    let x = Tensor::ones(n, DType::F32, &dev).unwrap();
    let secs = time(&dev, || x.copy().map(|_| ()));
    row(
        "device-to-device copy 1 GiB (read + write)",
        secs,
        2.0 * 4.0 * n as f64,
        0.0,
    );
}

struct Attn {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kc: Tensor,
    vc: Tensor,
    meta: AttentionMetadata,
}

/// `seqs` sequences of `ctx` keys each, `n_q` query tokens each (1: decode).
fn attention_inputs(
    dev: &Device,
    dtype: DType,
    seqs: usize,
    ctx: usize,
    n_q: usize,
    heads: (usize, usize, usize),
) -> Attn {
    let (h, kvh, d) = heads;
    let bs = 16;
    let blocks_per_seq = ctx.div_ceil(bs);
    let num_blocks = seqs * blocks_per_seq;
    // Interleave the sequences' blocks, as a busy block manager would.
    let tables: Vec<u32> = (0..seqs)
        .flat_map(|s| (0..blocks_per_seq).map(move |b| (b * seqs + s) as u32))
        .collect();
    let mut slots = Vec::new();
    for s in 0..seqs {
        for pos in ctx - n_q..ctx {
            slots.push(tables[s * blocks_per_seq + pos / bs] * bs as u32 + (pos % bs) as u32);
        }
    }
    let t = seqs * n_q;
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1f32, shape, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let u32s = |v: Vec<u32>, shape: &[usize]| Tensor::from_vec(v, shape, dev).unwrap();
    Attn {
        q: randn(&[t, h, d]),
        k: randn(&[t, kvh, d]),
        v: randn(&[t, kvh, d]),
        kc: randn(&[num_blocks, bs, kvh, d]),
        vc: randn(&[num_blocks, bs, kvh, d]),
        meta: AttentionMetadata {
            slot_mapping: u32s(slots, &[t]),
            block_tables: u32s(tables, &[seqs, blocks_per_seq]),
            context_lens: u32s(vec![ctx as u32; seqs], &[seqs]),
            cu_seqlens_q: u32s((0..=seqs).map(|s| (s * n_q) as u32).collect(), &[seqs + 1]),
            max_seqlen_q: n_q,
            max_context_len: ctx,
        },
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_paged_attention() {
    let Some(dev) = cuda_device() else { return };
    let esize = |dt: DType| dt.size_in_bytes() as f64;
    // (label, heads, kv heads, head dim)
    let models = [("smollm2-135m", 9, 3, 64), ("llama-8b", 32, 8, 128)];
    for (name, h, kvh, d) in models {
        for dtype in [DType::BF16, DType::F16] {
            for (seqs, ctx) in [(1, 4096), (32, 1024), (64, 2048), (256, 512)] {
                let a = attention_inputs(&dev, dtype, seqs, ctx, 1, (h, kvh, d));
                let scale = 1.0 / (d as f32).sqrt();
                let secs = time(&dev, || {
                    paged_attention(&a.q, &a.kc, &a.vc, &a.meta, scale).map(|_| ())
                });
                let kv_bytes = (seqs * ctx * kvh * d * 2) as f64 * esize(dtype);
                let qo_bytes = (2 * seqs * h * d) as f64 * esize(dtype);
                let flops = 4.0 * (seqs * ctx * h * d) as f64;
                let what = format!("decode {name} {dtype:?} seqs {seqs} ctx {ctx}");
                row(&what, secs, kv_bytes + qo_bytes, flops);
            }
            // Prefill: one 2048-token prompt, causal.
            let t = 2048;
            let a = attention_inputs(&dev, dtype, 1, t, t, (h, kvh, d));
            let scale = 1.0 / (d as f32).sqrt();
            let secs = time(&dev, || {
                paged_attention(&a.q, &a.kc, &a.vc, &a.meta, scale).map(|_| ())
            });
            let flops = 4.0 * (t * t / 2 * h * d) as f64;
            let bytes = ((t * kvh * d * 2) + 2 * t * h * d) as f64 * esize(dtype);
            row(
                &format!("prefill {name} {dtype:?} 1 x {t}"),
                secs,
                bytes,
                flops,
            );
            let secs = time(&dev, || {
                write_kv(&a.k, &a.v, &a.kc, &a.vc, &a.meta.slot_mapping)
            });
            let bytes = (4 * t * kvh * d) as f64 * esize(dtype);
            row(
                &format!("write_kv {name} {dtype:?} {t} tokens"),
                secs,
                bytes,
                0.0,
            );
        }
    }
}

#[test]
#[ignore = "benchmark: run on a GPU with --ignored"]
fn bench_quant_matmul() {
    let Some(dev) = cuda_device() else { return };
    // (n, k): Llama-8B-like projections, and SmolLM2's MLP.
    for (n, k) in [(4096, 4096), (14336, 4096), (4096, 14336), (1536, 576)] {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i as u64).wrapping_mul(2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for bits in [QuantBits::Int4, QuantBits::Int8] {
            let pw = PackedWeight::quantize_f32(&w, n, k, bits, 32).unwrap();
            let dw = CudaPackedWeight::new(&pw, &dev).unwrap();
            for m in [1, 4] {
                let x = Tensor::randn(0f32, 1f32, (m, k), &dev)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap();
                let secs = time(&dev, || dw.matmul(&x).map(|_| ()));
                let bytes = pw.storage_bytes() as f64 + 2.0 * (m * (k + n)) as f64;
                let flops = 2.0 * (m * n * k) as f64;
                row(
                    &format!("gemv {bits:?} gs32 n {n} k {k} m {m} f16"),
                    secs,
                    bytes,
                    flops,
                );
            }
            let m = 512;
            let x = Tensor::randn(0f32, 1f32, (m, k), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let secs = time(&dev, || dw.matmul(&x).map(|_| ()));
            let bytes = pw.storage_bytes() as f64 + 2.0 * (m * (k + n)) as f64;
            let flops = 2.0 * (m * n * k) as f64;
            row(
                &format!("dequant+cuBLAS {bits:?} n {n} k {k} m {m} bf16"),
                secs,
                bytes,
                flops,
            );
        }
    }
}
