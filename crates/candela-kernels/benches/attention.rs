//! Paged attention on the CPU at the default model's head shapes (9 query heads, 3 KV heads of
//! 64, 16-token blocks): decode at batch 1/16/64 over 512-token contexts, and one 512-token
//! prefill. Times are per layer; the model runs 30 of them per step.
//!
//! Ids are `attention/{case}/{cache dtype}/{threads}`, threads `pool` (rayon's global pool) or
//! `1t` (a one-thread pool). `dense_candle` is the same prefill or batch-1 decode done with
//! plain candle ops (repeat KV, matmul, mask, softmax, matmul) from contiguous K/V, as a yardstick.
//! Run a slice with e.g. `cargo bench -p candela-kernels --bench attention -- decode_b16`.

use std::time::Duration;

use candela_kernels::{paged_attention, write_kv, AttentionMetadata, PagedKvCache};
use candle_core::{DType, Device, Tensor, D};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

const NUM_HEADS: usize = 9;
const NUM_KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK_SIZE: usize = 16;
const CONTEXT_LEN: usize = 512;

/// A batch of `num_seqs` sequences of `CONTEXT_LEN` keys, each with `n_q` query tokens, on
/// shuffled blocks of a cache whose K/V are random.
struct Case {
    q: Tensor,
    cache: PagedKvCache,
    meta: AttentionMetadata,
}

fn case(num_seqs: usize, n_q: usize, dtype: DType) -> Case {
    let dev = Device::Cpu;
    let blocks_per_seq = CONTEXT_LEN.div_ceil(BLOCK_SIZE);
    let num_blocks = num_seqs * blocks_per_seq;
    let cache = PagedKvCache::new(
        1,
        num_blocks,
        BLOCK_SIZE,
        NUM_KV_HEADS,
        HEAD_DIM,
        dtype,
        &dev,
    )
    .expect("cache");
    let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
    pool.shuffle(&mut StdRng::seed_from_u64(1));
    // Fill every slot once, through the op under test's sibling.
    let all_slots: Vec<u32> = (0..(num_blocks * BLOCK_SIZE) as u32).collect();
    let rows = all_slots.len();
    let kv = |seed: f64| {
        Tensor::randn(seed, 1.0, (rows, NUM_KV_HEADS, HEAD_DIM), &dev)
            .and_then(|t| t.to_dtype(dtype))
            .expect("kv")
    };
    let (kc, vc) = cache.layer(0);
    write_kv(
        &kv(0.0),
        &kv(0.1),
        kc,
        vc,
        &Tensor::from_vec(all_slots, rows, &dev).expect("slots"),
    )
    .expect("fill cache");
    let mut cu = vec![0u32];
    for _ in 0..num_seqs {
        cu.push(cu[cu.len() - 1] + n_q as u32);
    }
    let num_tokens = num_seqs * n_q;
    let meta = AttentionMetadata {
        slot_mapping: Tensor::zeros(num_tokens, DType::U32, &dev).expect("slots"),
        block_tables: Tensor::from_vec(pool, (num_seqs, blocks_per_seq), &dev).expect("tables"),
        context_lens: Tensor::from_vec(vec![CONTEXT_LEN as u32; num_seqs], num_seqs, &dev)
            .expect("context_lens"),
        cu_seqlens_q: Tensor::from_vec(cu, num_seqs + 1, &dev).expect("cu"),
        max_seqlen_q: n_q,
        max_context_len: CONTEXT_LEN,
    };
    let q = Tensor::randn(0f32, 1.0, (num_tokens, NUM_HEADS, HEAD_DIM), &dev)
        .and_then(|t| t.to_dtype(dtype))
        .expect("q");
    Case { q, cache, meta }
}

/// Causal attention of `n_q` trailing queries over `CONTEXT_LEN` contiguous keys, with candle ops.
fn dense_candle(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    // q: [H, n_q, D]; k, v: [Hkv, ctx, D] -> repeat to [H, ctx, D].
    let group = NUM_HEADS / NUM_KV_HEADS;
    let repeat = |t: &Tensor| {
        let (hkv, n, d) = t.dims3()?;
        t.unsqueeze(1)?
            .expand((hkv, group, n, d))?
            .reshape((hkv * group, n, d))
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    let scores = (q.matmul(&k.t()?)? * (1.0 / (HEAD_DIM as f64).sqrt()))?;
    let scores = scores.broadcast_add(mask)?;
    candle_nn_free_softmax(&scores)?.matmul(&v)
}

/// Softmax over the last dimension with core ops (candela-kernels does not depend on candle-nn).
fn candle_nn_free_softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn bench(c: &mut Criterion) {
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("pool");
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let cases = [
        ("decode_b1", 1, 1),
        ("decode_b16", 16, 1),
        ("decode_b64", 64, 1),
        ("prefill_512", 1, CONTEXT_LEN),
    ];
    for (name, num_seqs, n_q) in cases {
        for dtype in [DType::F32, DType::F16] {
            let c = case(num_seqs, n_q, dtype);
            let (kc, vc) = c.cache.layer(0);
            let dt = format!("{dtype:?}").to_lowercase();
            group.bench_function(format!("{name}/{dt}/pool"), |b| {
                b.iter(|| paged_attention(&c.q, kc, vc, &c.meta, scale).expect("attention"))
            });
            group.bench_function(format!("{name}/{dt}/1t"), |b| {
                one_thread.install(|| {
                    b.iter(|| paged_attention(&c.q, kc, vc, &c.meta, scale).expect("attention"))
                })
            });
        }
    }

    // Yardstick: the same work with candle ops on contiguous f32 K/V.
    let dev = Device::Cpu;
    for (name, n_q) in [("decode_b1", 1), ("prefill_512", CONTEXT_LEN)] {
        let q = Tensor::randn(0f32, 1.0, (NUM_HEADS, n_q, HEAD_DIM), &dev).expect("q");
        let k = Tensor::randn(0f32, 1.0, (NUM_KV_HEADS, CONTEXT_LEN, HEAD_DIM), &dev).expect("k");
        let v = Tensor::randn(0f32, 1.0, (NUM_KV_HEADS, CONTEXT_LEN, HEAD_DIM), &dev).expect("v");
        let offset = CONTEXT_LEN - n_q;
        let mask: Vec<f32> = (0..n_q)
            .flat_map(|i| {
                (0..CONTEXT_LEN).map(move |j| {
                    if j <= offset + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n_q, CONTEXT_LEN), &dev).expect("mask");
        group.bench_function(format!("{name}/f32/dense_candle"), |b| {
            b.iter(|| dense_candle(&q, &k, &v, &mask).expect("dense"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
