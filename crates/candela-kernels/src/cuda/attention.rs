//! Launchers of `kernels/paged_attention.cu`: the KV-cache write and paged attention.
//!
//! Unlike the CPU path, these do not read the metadata back to the host to check it (that
//! would cost a device synchronisation per layer). The kernels stay memory safe on bad
//! metadata instead: a slot or block id outside the cache is skipped, never dereferenced, and
//! query rows that see no key come out as zeros. The public functions in `crate::attention`
//! check every shape, dtype, device and layout before either path runs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Result, Shape};
use half::{bf16, f16};
use std::num::NonZeroUsize;

use super::meta_guard;
use super::PAGED_ATTENTION_PTX;
use super::{allow_shared_bytes, arg_i32, contiguous_view, dim_u32, kernel, KernelDType};
use crate::attention::{CacheDims, PagedAttentionOp};

const WRITE_KV: &str = "write_kv";
const PAGED_ATTENTION: &str = "paged_attention";

/// Query rows ((token, head) pairs) per cta; must match `ROWS` in the kernel.
const CTA_ROWS: usize = 16;
/// Keys per shared-memory chunk; must match `KEYS` in the kernel.
const CTA_KEYS: usize = 32;
/// Threads per cta; must match `WARPS * 32` in the kernel.
const CTA_THREADS: u32 = 128;
/// Largest head dimension a kernel is instantiated for.
pub(crate) const HEAD_DIM_MAX: usize = 256;

/// Strides of a `[T, heads, head_dim]` tensor whose last dimension is contiguous.
fn row_strides(op: &str, tensor: &str, layout: &Layout) -> Result<(i64, i64)> {
    let stride = layout.stride();
    let dims = layout.dims();
    if stride.len() != 3 || (stride[2] != 1 && dims[2] > 1) {
        candle_core::bail!(
            "{op}: `{tensor}` must be [T, heads, head_dim] with a contiguous last dimension, got shape {dims:?} strides {stride:?}"
        );
    }
    let to_i64 = |s: usize| {
        i64::try_from(s).map_err(|_| candle_core::Error::Msg(format!("{op}: stride {s} too large")))
    };
    Ok((to_i64(stride[0])?, to_i64(stride[1])?))
}

/// `cache[slot_mapping[t]] = src[t]` for every token `t`, in place on the device.
pub(crate) fn write_kv(
    dims: CacheDims,
    cache: &mut CudaStorage,
    cache_layout: &Layout,
    src: &CudaStorage,
    src_layout: &Layout,
    slots: &CudaStorage,
    slots_layout: &Layout,
) -> Result<()> {
    match cache.dtype() {
        candle_core::DType::F32 => write_kv_t::<f32>(
            dims,
            cache,
            cache_layout,
            src,
            src_layout,
            slots,
            slots_layout,
        ),
        candle_core::DType::F16 => write_kv_t::<f16>(
            dims,
            cache,
            cache_layout,
            src,
            src_layout,
            slots,
            slots_layout,
        ),
        candle_core::DType::BF16 => write_kv_t::<bf16>(
            dims,
            cache,
            cache_layout,
            src,
            src_layout,
            slots,
            slots_layout,
        ),
        other => {
            candle_core::bail!("{WRITE_KV}: cache dtype must be F32, F16 or BF16, got {other:?}")
        }
    }
}

fn write_kv_t<T: KernelDType>(
    dims: CacheDims,
    cache: &mut CudaStorage,
    cache_layout: &Layout,
    src: &CudaStorage,
    src_layout: &Layout,
    slots: &CudaStorage,
    slots_layout: &Layout,
) -> Result<()> {
    let dev = cache.device.clone();
    let num_tokens = src_layout.dims().first().copied().unwrap_or(0);
    if src_layout.dims() != [num_tokens, dims.num_kv_heads, dims.head_dim] {
        candle_core::bail!(
            "{WRITE_KV}: source shape {:?} does not match the cache's [T, {}, {}]",
            src_layout.dims(),
            dims.num_kv_heads,
            dims.head_dim
        );
    }
    if slots_layout.dims() != [num_tokens] {
        candle_core::bail!(
            "{WRITE_KV}: slot_mapping shape {:?}, expected [{num_tokens}]",
            slots_layout.dims()
        );
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let (stride_t, stride_h) = row_strides(WRITE_KV, "k/v", src_layout)?;
    let slots = slots.as_cuda_slice::<u32>()?;
    let slots = match slots_layout.contiguous_offsets() {
        Some((start, end)) => slots.slice(start..end),
        None => candle_core::bail!("{WRITE_KV}: `slot_mapping` must be contiguous"),
    };
    let src = src.as_cuda_slice::<T>()?.slice(src_layout.start_offset()..);
    let (start, end) = match cache_layout.contiguous_offsets() {
        Some(range) => range,
        None => candle_core::bail!("{WRITE_KV}: the cache must be contiguous"),
    };
    let mut cache = cache.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
    let num_slots = (dims.num_blocks * dims.block_size) as u64;
    let row = dims.num_kv_heads * dims.head_dim;
    let threads = row.next_multiple_of(32).min(256) as u32;
    let func = kernel(
        &dev,
        PAGED_ATTENTION_PTX,
        &format!("write_kv_{}", T::SUFFIX),
    )?;
    let cfg = LaunchConfig {
        grid_dim: (dim_u32(WRITE_KV, "num_tokens", num_tokens)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let num_kv_heads = arg_i32(WRITE_KV, "num_kv_heads", dims.num_kv_heads)?;
    let head_dim = arg_i32(WRITE_KV, "head_dim", dims.head_dim)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&src);
    b.arg(&stride_t);
    b.arg(&stride_h);
    b.arg(&mut cache);
    b.arg(&slots);
    b.arg(&num_kv_heads);
    b.arg(&head_dim);
    b.arg(&num_slots);
    // SAFETY: the argument list matches `write_kv_*` in kernels/paged_attention.cu; every
    // index the kernel forms is bounded by the shapes checked above or by `num_slots`.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Paged attention of `q` over one layer's caches, with the step's metadata from `op`.
pub(crate) fn paged_attention(
    op: &PagedAttentionOp,
    q: &CudaStorage,
    q_layout: &Layout,
    k: &CudaStorage,
    k_layout: &Layout,
    v: &CudaStorage,
    v_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    match (q.dtype(), k.dtype(), v.dtype()) {
        (candle_core::DType::F32, candle_core::DType::F32, candle_core::DType::F32) => {
            paged_attention_t::<f32>(op, q, q_layout, k, k_layout, v, v_layout)
        }
        (candle_core::DType::F16, candle_core::DType::F16, candle_core::DType::F16) => {
            paged_attention_t::<f16>(op, q, q_layout, k, k_layout, v, v_layout)
        }
        (candle_core::DType::BF16, candle_core::DType::BF16, candle_core::DType::BF16) => {
            paged_attention_t::<bf16>(op, q, q_layout, k, k_layout, v, v_layout)
        }
        (a, b, c) => candle_core::bail!(
            "{PAGED_ATTENTION}: q, key_cache, value_cache must share one of F32, F16, BF16, got {a:?}, {b:?}, {c:?}"
        ),
    }
}

fn paged_attention_t<T: KernelDType>(
    op: &PagedAttentionOp,
    q: &CudaStorage,
    q_layout: &Layout,
    k: &CudaStorage,
    k_layout: &Layout,
    v: &CudaStorage,
    v_layout: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dims = op.dims;
    let cache = dims.cache;
    let (num_tokens, num_heads, head_dim) = (dims.num_tokens, dims.num_heads, dims.head_dim);
    if q_layout.dims() != [num_tokens, num_heads, head_dim] {
        candle_core::bail!(
            "{PAGED_ATTENTION}: q shape {:?} does not match the checked [{num_tokens}, {num_heads}, {head_dim}]",
            q_layout.dims()
        );
    }
    if head_dim > HEAD_DIM_MAX || head_dim == 0 {
        candle_core::bail!(
            "{PAGED_ATTENTION}: head_dim {head_dim} not in 1..={HEAD_DIM_MAX} on CUDA"
        );
    }
    if cache.num_kv_heads == 0 || num_heads % cache.num_kv_heads != 0 {
        candle_core::bail!(
            "{PAGED_ATTENTION}: num_heads {num_heads} is not a multiple of num_kv_heads {}",
            cache.num_kv_heads
        );
    }
    let dev = q.device.clone();
    let shape = Shape::from((num_tokens, num_heads, head_dim));
    let out = dev.alloc_zeros::<T>(num_tokens * num_heads * head_dim)?;
    let group = num_heads / cache.num_kv_heads;
    let row_tiles = (op.max_seqlen_q * group).div_ceil(CTA_ROWS);
    if num_tokens == 0 || row_tiles == 0 || dims.num_seqs == 0 {
        return Ok((CudaStorage::wrap_cuda_slice(out, dev), shape));
    }

    let (q_stride_t, q_stride_h) = row_strides(PAGED_ATTENTION, "q", q_layout)?;
    let q = q.as_cuda_slice::<T>()?.slice(q_layout.start_offset()..);
    let k = contiguous_view::<T>(PAGED_ATTENTION, "key_cache", k, k_layout)?;
    let v = contiguous_view::<T>(PAGED_ATTENTION, "value_cache", v, v_layout)?;
    let bt = meta_guard("block_tables", &op.block_tables)?;
    let cl = meta_guard("context_lens", &op.context_lens)?;
    let cu = meta_guard("cu_seqlens_q", &op.cu_seqlens_q)?;
    let (bt, cl, cu) = (
        bt.view(PAGED_ATTENTION)?,
        cl.view(PAGED_ATTENTION)?,
        cu.view(PAGED_ATTENTION)?,
    );
    if bt.len() != dims.num_seqs * dims.max_blocks_per_seq
        || cl.len() != dims.num_seqs
        || cu.len() != dims.num_seqs + 1
    {
        candle_core::bail!("{PAGED_ATTENTION}: metadata lengths do not match the checked shapes");
    }

    let variant = if head_dim <= 64 {
        64
    } else if head_dim <= 128 {
        128
    } else {
        256
    };
    // The window's keys, 0 for none; the sliding-window kernels are compiled apart, so the
    // plain ones carry none of their registers.
    let window = window_arg(op.window);
    let kind = if window > 0 { "swa_" } else { "" };
    let func = kernel(
        &dev,
        PAGED_ATTENTION_PTX,
        &format!("paged_attention_{kind}{}_{variant}", T::SUFFIX),
    )?;
    let shared_bytes = (CTA_ROWS * head_dim + 2 * CTA_KEYS * (head_dim + 1)) * 4;
    allow_shared_bytes(&func, shared_bytes)?;
    let base_ctas = row_tiles * cache.num_kv_heads * dims.num_seqs;
    let keys_span = cta_keys_max(op.window, op.max_context_len, op.max_seqlen_q);
    let (num_splits, keys_per_split) = kv_splits(base_ctas, keys_span);
    // Partial results of the splits: [splits, T, H, D] accumulators and [splits, T, H, 2]
    // (running max, sum); a 1-element dummy when there is no split.
    let part_len = if num_splits > 1 {
        num_splits * num_tokens * num_heads
    } else {
        1
    };
    let mut part_acc =
        dev.alloc_zeros::<f32>(part_len * if num_splits > 1 { head_dim } else { 1 })?;
    let mut part_ml = dev.alloc_zeros::<f32>(part_len * 2)?;
    let cfg = LaunchConfig {
        grid_dim: (
            dim_u32(
                PAGED_ATTENTION,
                "query row tiles x splits",
                row_tiles * num_splits,
            )?,
            dim_u32(PAGED_ATTENTION, "num_kv_heads", cache.num_kv_heads)?,
            dim_u32(PAGED_ATTENTION, "num_seqs", dims.num_seqs)?,
        ),
        block_dim: (CTA_THREADS, 1, 1),
        shared_mem_bytes: shared_bytes as u32,
    };
    if cfg.grid_dim.1 > 65_535 || cfg.grid_dim.2 > 65_535 {
        candle_core::bail!(
            "{PAGED_ATTENTION}: more than 65535 sequences or kv heads in one launch"
        );
    }
    let num_tokens_a = arg_i32(PAGED_ATTENTION, "num_tokens", num_tokens)?;
    let num_heads_a = arg_i32(PAGED_ATTENTION, "num_heads", num_heads)?;
    let num_kv_heads = arg_i32(PAGED_ATTENTION, "num_kv_heads", cache.num_kv_heads)?;
    let head_dim_a = arg_i32(PAGED_ATTENTION, "head_dim", head_dim)?;
    let block_size = arg_i32(PAGED_ATTENTION, "block_size", cache.block_size)?;
    let max_blocks = arg_i32(
        PAGED_ATTENTION,
        "max_blocks_per_seq",
        dims.max_blocks_per_seq,
    )?;
    let num_blocks = dim_u32(PAGED_ATTENTION, "num_blocks", cache.num_blocks)?;
    let scale = op.scale;
    let mut out = out;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    b.arg(&q);
    b.arg(&q_stride_t);
    b.arg(&q_stride_h);
    b.arg(&k);
    b.arg(&v);
    b.arg(&bt);
    b.arg(&cl);
    b.arg(&cu);
    b.arg(&mut out);
    b.arg(&num_tokens_a);
    b.arg(&num_heads_a);
    b.arg(&num_kv_heads);
    b.arg(&head_dim_a);
    b.arg(&block_size);
    b.arg(&max_blocks);
    b.arg(&num_blocks);
    b.arg(&scale);
    b.arg(&window);
    let num_splits_a = arg_i32(PAGED_ATTENTION, "num_splits", num_splits)?;
    let keys_per_split_a = arg_i32(PAGED_ATTENTION, "keys_per_split", keys_per_split)?;
    b.arg(&num_splits_a);
    b.arg(&keys_per_split_a);
    b.arg(&mut part_acc);
    b.arg(&mut part_ml);
    // SAFETY: the argument list matches `paged_attention_*` in kernels/paged_attention.cu;
    // q is read within its checked shape and strides, the caches within their checked
    // contiguous shape (block ids >= num_blocks are skipped), block-table entries within the
    // row's first max_blocks_per_seq, the output is [T, H, D] and the partials
    // [splits, T, H, D] / [splits, T, H, 2] when num_splits > 1.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    if num_splits > 1 {
        let func = kernel(
            &dev,
            PAGED_ATTENTION_PTX,
            &format!("combine_splits_{}", T::SUFFIX),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                dim_u32(PAGED_ATTENTION, "tokens x heads", num_tokens * num_heads)?,
                1,
                1,
            ),
            block_dim: (head_dim.next_multiple_of(32).min(256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&part_acc);
        b.arg(&part_ml);
        b.arg(&mut out);
        b.arg(&num_tokens_a);
        b.arg(&num_heads_a);
        b.arg(&head_dim_a);
        b.arg(&num_splits_a);
        // SAFETY: matches `combine_splits_*`; reads the partials written above, writes
        // [T, H, D].
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
}

/// The kernel's `window` argument: the window's keys, 0 for none. A window of 2^32 keys or
/// more is wider than any context (`context_lens` are u32), so it is passed as none.
fn window_arg(window: Option<NonZeroUsize>) -> u32 {
    window.map_or(0, |w| u32::try_from(w.get()).unwrap_or(0))
}

/// Most keys one cta attends over: the whole context without a window; with one, the window
/// of its first row's token plus one key for each later token of the cta (a cta spans at most
/// `CTA_ROWS` tokens, one row each when there is no GQA), never more than the context. Splits
/// are sized from this, so that a windowed decode over a long context is split over its
/// window, not over the context.
fn cta_keys_max(
    window: Option<NonZeroUsize>,
    max_context_len: usize,
    max_seqlen_q: usize,
) -> usize {
    match window {
        None => max_context_len,
        Some(w) => {
            let tokens = max_seqlen_q.clamp(1, CTA_ROWS);
            max_context_len.min(w.get().saturating_add(tokens - 1))
        }
    }
}

/// Ctas wanted per launch: about 2.5 waves of an H100 (132 multiprocessors x 3 resident
/// ctas of this kernel), so the last, partial wave costs little.
const CTAS_TARGET: usize = 1024;
/// Fewest keys a split is given (shorter splits cost more in the combine than they save).
const SPLIT_KEYS_MIN: usize = 256;

/// Splits of the key range (flash-decoding) when the (row tile, kv head, sequence) grid
/// alone would leave the GPU idle: decode of few sequences over long contexts. Returns
/// `(num_splits, keys_per_split)`, keys per split a multiple of the cta's key chunk, that
/// cover `max_context_len` keys: the most keys one cta attends over ([`cta_keys_max`]).
fn kv_splits(base_ctas: usize, max_context_len: usize) -> (usize, usize) {
    let whole = max_context_len.max(1).next_multiple_of(CTA_KEYS);
    if base_ctas == 0 || base_ctas >= CTAS_TARGET || max_context_len < 2 * SPLIT_KEYS_MIN {
        return (1, whole);
    }
    let wanted = CTAS_TARGET.div_ceil(base_ctas);
    let most = max_context_len / SPLIT_KEYS_MIN;
    let splits = wanted.min(most).max(1);
    let keys = max_context_len.div_ceil(splits).next_multiple_of(CTA_KEYS);
    (max_context_len.div_ceil(keys), keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_the_context_in_key_chunks() {
        for base in [1, 3, 24, 100, 263, 264, 1000] {
            for ctx in [1, 31, 32, 511, 512, 513, 4096, 100_000] {
                let (splits, keys) = kv_splits(base, ctx);
                assert!(splits >= 1 && keys % CTA_KEYS == 0, "{base} {ctx}");
                assert!(splits * keys >= ctx, "{base} {ctx}: {splits} x {keys}");
                assert!(
                    (splits - 1) * keys < ctx.max(1),
                    "{base} {ctx}: empty split"
                );
                if base >= CTAS_TARGET {
                    assert_eq!(splits, 1);
                }
            }
        }
    }

    #[test]
    fn a_cta_never_attends_over_more_keys_than_its_splits_cover() {
        // Brute force over the kernel's own arithmetic: for every cta (row tile) of a
        // sequence, key_begin..key_end must fit in cta_keys_max keys.
        for window in [1usize, 3, 16, 31, 32, 33, 100, 4096] {
            let w = NonZeroUsize::new(window);
            for group in [1usize, 2, 3, 8] {
                for n_q in [1usize, 2, 15, 16, 17, 40] {
                    for extra in [0usize, 1, 50, 5000] {
                        let ctx = n_q + extra;
                        let first_pos = ctx - n_q;
                        let rows = n_q * group;
                        let most = cta_keys_max(w, ctx, n_q);
                        for row0 in (0..rows).step_by(CTA_ROWS) {
                            let last_row = (row0 + CTA_ROWS).min(rows) - 1;
                            let key_end = (first_pos + last_row / group + 1).min(ctx);
                            let key_begin = (first_pos + row0 / group + 1).saturating_sub(window);
                            assert!(
                                key_end - key_begin <= most,
                                "w {window} g {group} n_q {n_q} ctx {ctx} row0 {row0}"
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(cta_keys_max(None, 777, 3), 777);
        assert_eq!(window_arg(None), 0);
        assert_eq!(window_arg(NonZeroUsize::new(4096)), 4096);
    }
}
