//! CUDA `write_kv` and `paged_attention` against the CPU reference, on random shapes.
//!
//! Each case draws a batch that mixes decode (one query token), full prefill and chunked
//! prefill sequences, a GQA ratio, a head dimension (not always a multiple of 32), a block size
//! and a dtype, scatters the sequences' blocks randomly over the cache, and runs the same step
//! on the CPU and on the GPU. The caches after `write_kv` must match bit for bit (a copy), and
//! the attention outputs within a relative L2 error that depends only on the output dtype's
//! rounding (both sides accumulate in f32).
//!
//! The same with a sliding window (`paged_attention_windowed`), including decode over long
//! contexts (the flash-decoding split, sized from the window) and blocks before every window
//! whose table entries are stale (out of range, or pointing at a reused block full of NaN).
//!
//! Without a CUDA device the tests print why and return: CI has no GPU; `scripts/gpu-check`
//! runs them on one.
#![cfg(feature = "cuda")]

#[path = "support/mod.rs"]
mod support;

use std::num::NonZeroUsize;

use candela_kernels::{paged_attention, paged_attention_windowed, write_kv, AttentionMetadata};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{cuda_device, to_f32_vec};

/// Relative L2 error `|a - b| / |b|` in f64, and whether either side has a NaN.
fn rel_l2(a: &Tensor, b: &Tensor) -> (f64, bool) {
    let (a, b) = (to_f32_vec(a), to_f32_vec(b));
    assert_eq!(a.len(), b.len());
    let nan = a.iter().chain(b.iter()).any(|x| x.is_nan());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    ((num / den.max(1e-30)).sqrt(), nan)
}

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        // Both sides accumulate in f32 and round once to the dtype: on an H100 the worst
        // of 60 random cases was 4.5e-7 (f32), 1.5e-5 (f16), 5.2e-5 (bf16).
        DType::F32 => 1e-5,
        DType::F16 => 2e-4,
        _ => 1e-3,
    }
}

#[derive(Debug)]
struct Case {
    dtype: DType,
    num_kv_heads: usize,
    group: usize,
    head_dim: usize,
    block_size: usize,
    /// (context_len after the step, query tokens this step) per sequence.
    seqs: Vec<(usize, usize)>,
    /// Take q, k, v as narrows of one fused [T, H + 2 KVH, D] tensor (strided rows).
    fused_qkv: bool,
    /// Sliding window: `None` runs `paged_attention`, `Some` `paged_attention_windowed`.
    window: Option<NonZeroUsize>,
}

fn random_case(rng: &mut StdRng) -> Case {
    let dtype = [DType::F32, DType::F16, DType::BF16][rng.random_range(0..3)];
    let num_kv_heads = rng.random_range(1..=4);
    let group = [1, 2, 3, 4, 8][rng.random_range(0..5)];
    let head_dim = [16, 32, 48, 64, 80, 96, 128, 256][rng.random_range(0..8)];
    let block_size = [1, 4, 8, 16, 32][rng.random_range(0..5)];
    let num_seqs = rng.random_range(1..=6);
    let seqs = (0..num_seqs)
        .map(|_| {
            let ctx = rng.random_range(1..=300);
            let n_q = match rng.random_range(0..3) {
                0 => 1,
                1 => ctx,
                _ => rng.random_range(1..=ctx),
            };
            (ctx, n_q)
        })
        .collect();
    Case {
        dtype,
        num_kv_heads,
        group,
        head_dim,
        block_size,
        seqs,
        fused_qkv: rng.random_bool(0.5),
        window: None,
    }
}

/// Runs one case on `dev`; returns (key_cache, value_cache, out) on the CPU.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slot_mapping: Vec<u32>,
    block_tables: Vec<u32>,
    max_blocks: usize,
    context_lens: Vec<u32>,
    cu_seqlens_q: Vec<u32>,
}

fn make_inputs(case: &Case, rng: &mut StdRng) -> Inputs {
    let bs = case.block_size;
    let blocks_per_seq: Vec<usize> = case.seqs.iter().map(|(ctx, _)| ctx.div_ceil(bs)).collect();
    let max_blocks = blocks_per_seq.iter().copied().max().unwrap_or(1) + 1;
    let num_blocks = blocks_per_seq.iter().sum::<usize>() + 3;
    // A random permutation of block ids, dealt out to the sequences in turn.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let mut next = 0;
    let mut block_tables = vec![0u32; case.seqs.len() * max_blocks];
    let mut slot_mapping = Vec::new();
    let mut cu = vec![0u32];
    for (s, &(ctx, n_q)) in case.seqs.iter().enumerate() {
        for b in 0..blocks_per_seq[s] {
            block_tables[s * max_blocks + b] = ids[next];
            next += 1;
        }
        // Padding entries point at a real block: they must never be read.
        block_tables[s * max_blocks + blocks_per_seq[s]] = ids[num_blocks - 1];
        for pos in ctx - n_q..ctx {
            let blk = block_tables[s * max_blocks + pos / bs];
            slot_mapping.push(blk * bs as u32 + (pos % bs) as u32);
        }
        cu.push(cu[s] + n_q as u32);
    }
    let t = *cu.last().unwrap() as usize;
    let (kvh, h, d) = (
        case.num_kv_heads,
        case.num_kv_heads * case.group,
        case.head_dim,
    );
    let randn = |shape: &[usize]| {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap()
    };
    let (q, k, v) = if case.fused_qkv {
        let qkv = randn(&[t, h + 2 * kvh, d]);
        (
            qkv.narrow(1, 0, h).unwrap(),
            qkv.narrow(1, h, kvh).unwrap(),
            qkv.narrow(1, h + kvh, kvh).unwrap(),
        )
    } else {
        (randn(&[t, h, d]), randn(&[t, kvh, d]), randn(&[t, kvh, d]))
    };
    Inputs {
        q,
        k,
        v,
        key_cache: randn(&[num_blocks, bs, kvh, d]),
        value_cache: randn(&[num_blocks, bs, kvh, d]),
        slot_mapping,
        block_tables,
        max_blocks,
        context_lens: case.seqs.iter().map(|&(c, _)| c as u32).collect(),
        cu_seqlens_q: cu,
    }
}

fn run_on(case: &Case, inp: &Inputs, dev: &Device) -> (Tensor, Tensor, Tensor) {
    let to = |t: &Tensor| t.to_device(dev).unwrap();
    let u32s = |v: &[u32], shape: &[usize]| Tensor::from_slice(v, shape, dev).unwrap();
    // Keep q/k/v strided on the device too: copy the fused parent, then narrow again.
    let (q, k, v) = (to(&inp.q), to(&inp.k), to(&inp.v));
    let key_cache = to(&inp.key_cache);
    let value_cache = to(&inp.value_cache);
    let num_seqs = case.seqs.len();
    let meta = AttentionMetadata {
        slot_mapping: u32s(&inp.slot_mapping, &[inp.slot_mapping.len()]),
        block_tables: u32s(&inp.block_tables, &[num_seqs, inp.max_blocks]),
        context_lens: u32s(&inp.context_lens, &[num_seqs]),
        cu_seqlens_q: u32s(&inp.cu_seqlens_q, &[num_seqs + 1]),
        max_seqlen_q: case.seqs.iter().map(|s| s.1).max().unwrap_or(0),
        max_context_len: case.seqs.iter().map(|s| s.0).max().unwrap_or(0),
    };
    write_kv(&k, &v, &key_cache, &value_cache, &meta.slot_mapping).unwrap();
    let scale = 1.0 / (case.head_dim as f32).sqrt();
    let out = match case.window {
        None => paged_attention(&q, &key_cache, &value_cache, &meta, scale).unwrap(),
        Some(w) => {
            paged_attention_windowed(&q, &key_cache, &value_cache, &meta, scale, Some(w)).unwrap()
        }
    };
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    (cpu(&key_cache), cpu(&value_cache), cpu(&out))
}

#[test]
fn cuda_matches_cpu_on_random_batches() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(0x5eed_a77e);
    let cases = 60;
    for i in 0..cases {
        let case = random_case(&mut rng);
        let inp = make_inputs(&case, &mut rng);
        let (kc_cpu, vc_cpu, out_cpu) = run_on(&case, &inp, &Device::Cpu);
        let (kc_gpu, vc_gpu, out_gpu) = run_on(&case, &inp, &gpu);
        let (e_k, _) = rel_l2(&kc_gpu, &kc_cpu);
        let (e_v, _) = rel_l2(&vc_gpu, &vc_cpu);
        assert!(
            e_k == 0.0 && e_v == 0.0,
            "case {i} {case:?}: caches differ ({e_k}, {e_v})"
        );
        let (err, nan) = rel_l2(&out_gpu, &out_cpu);
        let tol = tolerance(case.dtype);
        assert!(
            !nan && err <= tol,
            "case {i} {case:?}: rel L2 {err:e} > {tol:e} (nan: {nan})"
        );
        eprintln!(
            "case {i:2}: {:?} kvh {} group {} d {} bs {} seqs {:?} fused {}: rel L2 {err:.2e}",
            case.dtype,
            case.num_kv_heads,
            case.group,
            case.head_dim,
            case.block_size,
            case.seqs,
            case.fused_qkv
        );
    }
}

/// A decode step over long contexts, the shape that dominates serving.
#[test]
fn cuda_long_context_decode_matches_cpu() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let case = Case {
            dtype,
            num_kv_heads: 3,
            group: 3,
            head_dim: 64,
            block_size: 16,
            seqs: vec![(4000, 1), (1, 1), (2049, 1), (777, 1)],
            fused_qkv: false,
            window: None,
        };
        let inp = make_inputs(&case, &mut rng);
        let (_, _, out_cpu) = run_on(&case, &inp, &Device::Cpu);
        let (_, _, out_gpu) = run_on(&case, &inp, &gpu);
        let (err, nan) = rel_l2(&out_gpu, &out_cpu);
        assert!(!nan && err <= tolerance(dtype), "{dtype:?}: rel L2 {err:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Sliding window.

#[test]
fn cuda_windowed_matches_cpu_on_random_batches() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(0x5a1d_a77e);
    for i in 0..60 {
        let mut case = random_case(&mut rng);
        let bs = case.block_size;
        // Below, at and above a block, and around the kernel's 32-key chunks.
        let w = [1, 2, bs.max(2) - 1, bs, bs + 1, 31, 32, 33, 100, 1000][rng.random_range(0..10)];
        case.window = NonZeroUsize::new(w);
        let inp = make_inputs(&case, &mut rng);
        let (_, _, out_cpu) = run_on(&case, &inp, &Device::Cpu);
        let (_, _, out_gpu) = run_on(&case, &inp, &gpu);
        let (err, nan) = rel_l2(&out_gpu, &out_cpu);
        let tol = tolerance(case.dtype);
        assert!(
            !nan && err <= tol,
            "case {i} window {w} {case:?}: rel L2 {err:e} > {tol:e} (nan: {nan})"
        );
        eprintln!("windowed case {i:2}: window {w} {case:?}: rel L2 {err:.2e}");
    }
}

/// Decode of few sequences over long contexts: the launch splits the keys of each cta
/// (flash-decoding), and with a window the splits cover the window, not the context.
#[test]
fn cuda_windowed_long_context_decode_matches_cpu() {
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(71);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for w in [1, 31, 256, 512, 513, 1000, 2049, 4000, 5000] {
            let case = Case {
                dtype,
                num_kv_heads: 2,
                group: 4,
                head_dim: 128,
                block_size: 16,
                seqs: vec![(4000, 1), (1, 1), (2049, 1), (777, 1), (600, 17)],
                fused_qkv: false,
                window: NonZeroUsize::new(w),
            };
            let inp = make_inputs(&case, &mut rng);
            let (_, _, out_cpu) = run_on(&case, &inp, &Device::Cpu);
            let (_, _, out_gpu) = run_on(&case, &inp, &gpu);
            let (err, nan) = rel_l2(&out_gpu, &out_cpu);
            assert!(
                !nan && err <= tolerance(dtype),
                "{dtype:?} window {w}: rel L2 {err:e}"
            );
        }
    }
}

/// What a stale block-table entry holds.
#[derive(Debug, Clone, Copy)]
enum StaleEntries {
    /// A block id past the cache.
    OutOfRange,
    /// A block now owned by someone else, here full of NaN.
    NanBlock,
}

/// `inp` with the blocks wholly before the window of every query of each sequence made stale
/// (their slots NaN, their entries replaced), plus `extra` blocks more per sequence. Returns
/// the inputs and how many blocks were made stale.
fn make_stale(
    case: &Case,
    inp: &Inputs,
    window: usize,
    entries: StaleEntries,
    extra: usize,
) -> (Inputs, usize) {
    let bs = case.block_size;
    let (kvh, d) = (case.num_kv_heads, case.head_dim);
    let mut block_tables = inp.block_tables.clone();
    let owned: Vec<u32> = case
        .seqs
        .iter()
        .enumerate()
        .flat_map(|(s, &(ctx, _))| {
            inp.block_tables[s * inp.max_blocks..][..ctx.div_ceil(bs)].to_vec()
        })
        .collect();
    let num_blocks = inp.key_cache.dim(0).unwrap();
    let spare = (0..num_blocks as u32)
        .find(|b| !owned.contains(b))
        .expect("a spare block");
    let mut nan_blocks = vec![spare];
    let mut stale = 0;
    for (s, &(ctx, n_q)) in case.seqs.iter().enumerate() {
        let before = (ctx - n_q + 1).saturating_sub(window) / bs;
        let n = (before + extra).min(ctx.div_ceil(bs));
        for j in 0..n {
            let entry = &mut block_tables[s * inp.max_blocks + j];
            nan_blocks.push(*entry);
            *entry = match entries {
                StaleEntries::OutOfRange => u32::MAX - j as u32,
                StaleEntries::NanBlock => spare,
            };
            stale += 1;
        }
    }
    let poison = |cache: &Tensor| {
        let mut data = to_f32_vec(cache);
        for &b in &nan_blocks {
            data[b as usize * bs * kvh * d..][..bs * kvh * d].fill(f32::NAN);
        }
        Tensor::from_vec(data, cache.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(case.dtype)
            .unwrap()
    };
    let stale_inputs = Inputs {
        q: inp.q.clone(),
        k: inp.k.clone(),
        v: inp.v.clone(),
        key_cache: poison(&inp.key_cache),
        value_cache: poison(&inp.value_cache),
        slot_mapping: inp.slot_mapping.clone(),
        block_tables,
        max_blocks: inp.max_blocks,
        context_lens: inp.context_lens.clone(),
        cu_seqlens_q: inp.cu_seqlens_q.clone(),
    };
    (stale_inputs, stale)
}

#[test]
fn cuda_windowed_never_reads_blocks_before_every_window() {
    // Entries and slots of blocks before every window are stale: the GPU output must be
    // finite and equal to the GPU output on the untouched inputs (same keys read, same
    // arithmetic), and close to the CPU's.
    let Some(gpu) = cuda_device() else { return };
    let mut rng = StdRng::seed_from_u64(73);
    for dtype in [DType::F32, DType::BF16] {
        for (block_size, w) in [(16, 1), (16, 20), (16, 300), (8, 33), (1, 50), (32, 31)] {
            let case = Case {
                dtype,
                num_kv_heads: 2,
                group: 3,
                head_dim: 64,
                block_size,
                // Decodes and chunks whose first query is far past the window, one that is
                // not, and a split decode over a long context.
                seqs: vec![(700, 1), (450, 40), (35, 35), (2000, 1), (129, 3)],
                fused_qkv: false,
                window: NonZeroUsize::new(w),
            };
            let inp = make_inputs(&case, &mut rng);
            let (_, _, want_gpu) = run_on(&case, &inp, &gpu);
            for entries in [StaleEntries::OutOfRange, StaleEntries::NanBlock] {
                let what = format!("{dtype:?} bs {block_size} window {w} {entries:?}");
                let (stale, n) = make_stale(&case, &inp, w, entries, 0);
                assert!(n > 0, "{what}: nothing made stale");
                let (_, _, out_cpu) = run_on(&case, &stale, &Device::Cpu);
                let (_, _, out_gpu) = run_on(&case, &stale, &gpu);
                let (same, nan) = rel_l2(&out_gpu, &want_gpu);
                assert!(
                    !nan && same == 0.0,
                    "{what}: differs from the untouched run ({same:e}, nan {nan})"
                );
                let (err, _) = rel_l2(&out_gpu, &out_cpu);
                assert!(err <= tolerance(dtype), "{what}: rel L2 {err:e} vs the CPU");
                if let StaleEntries::NanBlock = entries {
                    // One block more per sequence is inside a window: the NaN must show, or
                    // the check above proves nothing.
                    let (stale, _) = make_stale(&case, &inp, w, entries, 1);
                    let (_, _, out_gpu) = run_on(&case, &stale, &gpu);
                    assert!(
                        to_f32_vec(&out_gpu).iter().any(|x| x.is_nan()),
                        "{what}: poison not seen"
                    );
                }
            }
        }
    }
}
