//! Paged attention and the KV-cache write, as candle custom ops.
//!
//! One step of the engine flattens every scheduled token of every sequence into one batch of
//! `T` tokens (no padding). Sequence `i` owns query rows `cu_seqlens_q[i]..cu_seqlens_q[i+1]`
//! and, after this step's [`write_kv`], `context_lens[i]` keys/values in the paged cache:
//!
//! ```text
//! flat batch (T = 6):   | s0: 4-token prefill chunk | s1: decode | s2: decode |
//! cu_seqlens_q:         0                           4            5            6
//!
//! s0, context_len 7, block_size 4, block table [5, 2]: the chunk is positions 3..=6
//!   block 5: pos 0 1 2 3      query 0 (pos 3) sees 0..=3
//!   block 2: pos 4 5 6 .      query 3 (pos 6) sees 0..=6; the slot after 6 is never read
//! ```
//!
//! Query `j` of a sequence with `n_q` query tokens sits at absolute position
//! `context_len - n_q + j` and attends to KV positions `0..=` that position. That one rule
//! covers prefill (`n_q == context_len`), chunked prefill or a prefix-cache hit
//! (`n_q < context_len`) and decode (`n_q == 1`).
//!
//! Sliding-window layers (Mistral, Gemma 3's local layers) go through
//! [`paged_attention_windowed`]: with a window of `W` keys the query at position `p` sees key
//! position `k` iff `k <= p` and `p - k < W` (llama.cpp's SWA mask), so `W` keys counting
//! itself. The kernels start each sequence's keys at the block that holds
//! `first query position - W + 1` and mask per query inside the first blocks; the blocks
//! wholly before that are never touched, not even their block-table entries, because the
//! engine frees the blocks that have left the window of every query of a sequence and their
//! entries may be stale:
//!
//! ```text
//! W = 3, block_size 4, context_len 11, a 2-token chunk at positions 9 and 10,
//! block table [7, 1, 4]
//!   block 7: pos 0 1 2 3      before every window: entry and slots never read (may be stale)
//!   block 1: pos 4 5 6 7      query 9 sees 7..=9: the table walk starts here, at pos 7
//!   block 4: pos 8 9 10 .     query 10 sees 8..=10 (pos 7 masked out for it)
//! ```
//!
//! Cache layout, per layer: `[num_blocks, block_size, num_kv_heads, head_dim]`, so the slot
//! `block_id * block_size + offset` is one contiguous `[num_kv_heads, head_dim]` row.
//!
//! The CPU kernel is the reference the CUDA kernels are tested against. It runs one rayon task
//! per (sequence, KV head, chunk of query tokens): all query heads that share a KV head are
//! processed together so each K/V row is read once per task, the cache is read in place, and
//! the softmax is online at block granularity (one rescale of the accumulators per KV block,
//! not per key), so a task's scratch is a few KiB whatever the context length.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, InplaceOp3, Layout, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::num::NonZeroUsize;

use crate::error::KernelError;

#[cfg(target_arch = "x86_64")]
mod rows512;

const WRITE_KV: &str = "write_kv";
const PAGED_ATTENTION: &str = "paged_attention";

/// Query rows (query tokens x query heads of one KV head) per CPU task: 32 rows of 64 f32
/// keep a task's queries and accumulators (2 x 8 KiB) in L1 next to the K/V rows it streams.
const CPU_TASK_ROWS_MAX: usize = 32;

/// Per-step attention inputs, built once per step by the engine, shared by all layers.
///
/// All tensors are `u32` and contiguous, on the device of the KV cache.
#[derive(Debug, Clone)]
pub struct AttentionMetadata {
    /// `[T]`: for each token of this step, `block_id * block_size + offset`, where its key and
    /// value are stored by [`write_kv`].
    pub slot_mapping: Tensor,
    /// `[B, max_blocks_per_seq]`: the KV blocks of each sequence, in position order. Rows are
    /// padded; only the first `ceil(context_len / block_size)` entries of a row are read, and
    /// with a sliding window not the leading entries of blocks before every query's window
    /// (see [`paged_attention_windowed`]).
    pub block_tables: Tensor,
    /// `[B]`: KV length of each sequence after this step's write.
    pub context_lens: Tensor,
    /// `[B + 1]`: offsets of each sequence's query tokens in the flat batch; starts at 0 and
    /// ends at `T`.
    pub cu_seqlens_q: Tensor,
    /// Largest `cu_seqlens_q[i + 1] - cu_seqlens_q[i]` (host-side; kernels size launches from it).
    pub max_seqlen_q: usize,
    /// Largest `context_lens[i]` (host-side; kernels size launches from it).
    pub max_context_len: usize,
}

/// Stores this step's keys/values in place: `key_cache[slot / bs, slot % bs] = k[t]` (same for
/// `v`), with `slot = slot_mapping[t]`.
///
/// `k`, `v`: `[T, num_kv_heads, head_dim]` (the last dimension contiguous; other strides are
/// free, so a narrow of a fused QKV projection works); caches:
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous, same dtype as `k`/`v`
/// (f32, f16 or bf16); `slot_mapping`: `[T]` u32.
///
/// Every argument, and every slot, is checked before anything is written, so an `Err` leaves
/// both caches untouched. Two tokens with the same slot are not detected: the later one wins.
pub fn write_kv(
    k: &Tensor,
    v: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    let cache = check_cache_pair(WRITE_KV, key_cache, value_cache)?;
    let num_tokens = check_write_kv_args(k, v, key_cache, slot_mapping, cache)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let op = WriteKvOp { cache };
    key_cache.inplace_op3(k, slot_mapping, &op)?;
    value_cache.inplace_op3(v, slot_mapping, &op)
}

/// Attention of each query token over its own sequence's paged keys/values, causal.
///
/// `q`: `[T, num_heads, head_dim]` (last dimension contiguous) -> `[T, num_heads, head_dim]`,
/// contiguous, in `q`'s dtype. GQA: query head `h` reads KV head
/// `h / (num_heads / num_kv_heads)`. `scale` is usually `1 / sqrt(head_dim)`.
///
/// Shapes, dtypes and devices are checked up front; on the CPU every metadata value
/// (`cu_seqlens_q` monotone and ending at `T`, `n_q <= context_len`, block ids in range, the
/// host-side maxima) is checked before any work.
///
/// The same as [`paged_attention_windowed`] with no window.
pub fn paged_attention(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
) -> Result<Tensor> {
    paged_attention_windowed(q, key_cache, value_cache, meta, scale, None)
}

/// [`paged_attention`] with an optional sliding window of `window` keys: the query at
/// position `p` sees key position `k` iff `k <= p` and `p - k < window` (`None`: every
/// `k <= p`). A window at least as long as a sequence's context changes nothing for it.
///
/// Block-table entries (and cache slots) of blocks that lie wholly before the window of
/// every query of a sequence in this step are never read, so they may be stale (freed and
/// reused): per sequence the kernels read the entries from the block holding
/// `context_len - n_q - window + 1` (or 0) to the block holding `context_len - 1`, and the
/// CPU's check that block ids are in range looks at those entries only.
pub fn paged_attention_windowed(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
    window: Option<NonZeroUsize>,
) -> Result<Tensor> {
    let dims = check_attention_args(q, key_cache, value_cache, meta, scale)?;
    if dims.num_tokens == 0 {
        return Tensor::zeros((0, dims.num_heads, dims.head_dim), q.dtype(), q.device());
    }
    let op = PagedAttentionOp {
        block_tables: meta.block_tables.clone(),
        context_lens: meta.context_lens.clone(),
        cu_seqlens_q: meta.cu_seqlens_q.clone(),
        max_seqlen_q: meta.max_seqlen_q,
        max_context_len: meta.max_context_len,
        scale,
        window,
        dims,
        simd: Simd::detect(),
    };
    q.apply_op3_no_bwd(key_cache, value_cache, &op)
}

// ---------------------------------------------------------------------------------------------
// Argument checks (device independent: shapes, dtypes, layouts, devices).

/// Shape of one layer's paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheDims {
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Every size a paged-attention launch needs, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttentionDims {
    pub(crate) num_tokens: usize,
    pub(crate) num_heads: usize,
    pub(crate) num_seqs: usize,
    pub(crate) max_blocks_per_seq: usize,
    pub(crate) cache: CacheDims,
    pub(crate) head_dim: usize,
}

pub(crate) fn check_rank<'t>(
    op: &'static str,
    tensor: &'static str,
    t: &'t Tensor,
    expected: usize,
) -> std::result::Result<&'t [usize], KernelError> {
    let dims = t.dims();
    if dims.len() != expected {
        return Err(KernelError::Rank {
            op,
            tensor,
            expected,
            got: dims.len(),
            shape: dims.to_vec(),
        });
    }
    Ok(dims)
}

pub(crate) fn check_dtype(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    expected: DType,
) -> std::result::Result<(), KernelError> {
    if t.dtype() != expected {
        return Err(KernelError::DType {
            op,
            tensor,
            expected: format!("{expected:?}"),
            got: t.dtype(),
        });
    }
    Ok(())
}

pub(crate) fn check_device(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    expected: &Device,
) -> std::result::Result<(), KernelError> {
    if !t.device().same_device(expected) {
        return Err(KernelError::Device {
            op,
            tensor,
            expected: format!("{:?}", expected.location()),
            got: format!("{:?}", t.device().location()),
        });
    }
    Ok(())
}

pub(crate) fn layout_error(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    expected: &'static str,
) -> KernelError {
    KernelError::Layout {
        op,
        tensor,
        expected,
        shape: t.dims().to_vec(),
        stride: t.stride().to_vec(),
        offset: t.layout().start_offset(),
    }
}

pub(crate) fn check_contiguous(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
) -> std::result::Result<(), KernelError> {
    if !t.is_contiguous() {
        return Err(layout_error(op, tensor, t, "contiguous"));
    }
    Ok(())
}

/// `[T, heads, head_dim]` activations may be strided (a narrow of a fused projection), but each
/// head's vector must be contiguous.
fn check_rows_contiguous(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
) -> std::result::Result<(), KernelError> {
    if t.dim(2).map_or(0, |d| d) > 1 && t.stride()[2] != 1 {
        return Err(layout_error(
            op,
            tensor,
            t,
            "contiguous in its last dimension (stride 1)",
        ));
    }
    Ok(())
}

/// A u32, contiguous metadata tensor of the given shape.
fn check_meta(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    device: &Device,
    expected_shape: &[Option<usize>],
) -> std::result::Result<(), KernelError> {
    let dims = check_rank(op, tensor, t, expected_shape.len())?;
    check_dtype(op, tensor, t, DType::U32)?;
    check_device(op, tensor, t, device)?;
    let fits = dims
        .iter()
        .zip(expected_shape)
        .all(|(got, want)| want.is_none_or(|w| w == *got));
    if !fits {
        let expected = expected_shape
            .iter()
            .map(|d| d.map_or_else(|| "_".to_string(), |d| d.to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(KernelError::Shape {
            op,
            tensor,
            expected: format!("[{expected}]"),
            got: dims.to_vec(),
        });
    }
    check_contiguous(op, tensor, t)
}

fn is_cache_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

pub(crate) fn check_cache_pair(
    op: &'static str,
    key_cache: &Tensor,
    value_cache: &Tensor,
) -> std::result::Result<CacheDims, KernelError> {
    let dims = check_rank(op, "key_cache", key_cache, 4)?;
    if !is_cache_dtype(key_cache.dtype()) {
        return Err(KernelError::DType {
            op,
            tensor: "key_cache",
            expected: "F32, F16 or BF16".to_string(),
            got: key_cache.dtype(),
        });
    }
    check_contiguous(op, "key_cache", key_cache)?;
    if dims.contains(&0) {
        return Err(KernelError::Shape {
            op,
            tensor: "key_cache",
            expected: "[num_blocks, block_size, num_kv_heads, head_dim], all > 0".to_string(),
            got: dims.to_vec(),
        });
    }
    check_rank(op, "value_cache", value_cache, 4)?;
    if value_cache.dims() != dims {
        return Err(KernelError::Shape {
            op,
            tensor: "value_cache",
            expected: format!("{dims:?} (the key cache's)"),
            got: value_cache.dims().to_vec(),
        });
    }
    check_dtype(op, "value_cache", value_cache, key_cache.dtype())?;
    check_device(op, "value_cache", value_cache, key_cache.device())?;
    check_contiguous(op, "value_cache", value_cache)?;
    Ok(CacheDims {
        num_blocks: dims[0],
        block_size: dims[1],
        num_kv_heads: dims[2],
        head_dim: dims[3],
    })
}

/// `k`/`v`/`q` must have the cache's dtype; on the CPU they may also be F32 with an F16 or BF16
/// cache (converted as they are stored or read, so a model running in f32 keeps a half-size
/// cache without casting its activations).
fn check_activation_dtype(
    op: &'static str,
    tensor: &'static str,
    t: &Tensor,
    cache: &Tensor,
) -> std::result::Result<(), KernelError> {
    if !takes_activations(t.dtype(), cache.dtype(), cache.device()) {
        return Err(KernelError::DType {
            op,
            tensor,
            expected: if cache.device().is_cpu() && cache.dtype() != DType::F32 {
                format!("{:?} (the cache's) or F32", cache.dtype())
            } else {
                format!("{:?} (the cache's)", cache.dtype())
            },
            got: t.dtype(),
        });
    }
    Ok(())
}

/// Whether [`write_kv`] and [`paged_attention`] take q/k/v of dtype `activations` over a cache
/// of dtype `cache` on `device`: the cache's own dtype, or F32 over an F16/BF16 cache on the CPU.
/// A caller whose activations are not taken casts them to the cache's dtype first.
pub fn takes_activations(activations: DType, cache: DType, device: &Device) -> bool {
    activations == cache || (activations == DType::F32 && device.is_cpu() && is_cache_dtype(cache))
}

/// Returns `T`.
fn check_write_kv_args(
    k: &Tensor,
    v: &Tensor,
    key_cache: &Tensor,
    slot_mapping: &Tensor,
    cache: CacheDims,
) -> std::result::Result<usize, KernelError> {
    let op = WRITE_KV;
    let device = key_cache.device();
    let k_dims = check_rank(op, "k", k, 3)?;
    let num_tokens = k_dims[0];
    for (name, t) in [("k", k), ("v", v)] {
        let dims = check_rank(op, name, t, 3)?;
        check_device(op, name, t, device)?;
        check_activation_dtype(op, name, t, key_cache)?;
        if dims != [num_tokens, cache.num_kv_heads, cache.head_dim] {
            return Err(KernelError::Shape {
                op,
                tensor: name,
                expected: format!(
                    "[{num_tokens}, {}, {}] ([T, num_kv_heads, head_dim] of the cache and `k`)",
                    cache.num_kv_heads, cache.head_dim
                ),
                got: dims.to_vec(),
            });
        }
        check_rows_contiguous(op, name, t)?;
    }
    check_meta(
        op,
        "slot_mapping",
        slot_mapping,
        device,
        &[Some(num_tokens)],
    )?;
    Ok(num_tokens)
}

fn check_attention_args(
    q: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    meta: &AttentionMetadata,
    scale: f32,
) -> std::result::Result<AttentionDims, KernelError> {
    let op = PAGED_ATTENTION;
    let cache = check_cache_pair(op, key_cache, value_cache)?;
    let device = key_cache.device();
    let q_dims = check_rank(op, "q", q, 3)?;
    check_device(op, "q", q, device)?;
    check_activation_dtype(op, "q", q, key_cache)?;
    let (num_tokens, num_heads, head_dim) = (q_dims[0], q_dims[1], q_dims[2]);
    if head_dim != cache.head_dim
        || num_heads == 0
        || num_heads < cache.num_kv_heads
        || !num_heads.is_multiple_of(cache.num_kv_heads)
    {
        return Err(KernelError::Shape {
            op,
            tensor: "q",
            expected: format!(
                "[T, num_heads, {}] with num_heads a non-zero multiple of num_kv_heads = {}",
                cache.head_dim, cache.num_kv_heads
            ),
            got: q_dims.to_vec(),
        });
    }
    check_rows_contiguous(op, "q", q)?;
    let bt_dims = check_rank(op, "block_tables", &meta.block_tables, 2)?;
    let (num_seqs, max_blocks_per_seq) = (bt_dims[0], bt_dims[1]);
    check_meta(
        op,
        "block_tables",
        &meta.block_tables,
        device,
        &[None, None],
    )?;
    check_meta(
        op,
        "context_lens",
        &meta.context_lens,
        device,
        &[Some(num_seqs)],
    )?;
    check_meta(
        op,
        "cu_seqlens_q",
        &meta.cu_seqlens_q,
        device,
        &[Some(num_seqs + 1)],
    )?;
    if !scale.is_finite() {
        return Err(KernelError::Param {
            op,
            param: "scale",
            expected: "must be finite".to_string(),
            got: scale.to_string(),
        });
    }
    Ok(AttentionDims {
        num_tokens,
        num_heads,
        num_seqs,
        max_blocks_per_seq,
        cache,
        head_dim,
    })
}

/// Checks the values of the metadata, read on the host: what the kernels index with must be in
/// range, so that a bad batch is an `Err` and never an out-of-bounds read. Block ids are
/// checked only where the kernels read them: from the first block of the window of the
/// sequence's first query (see [`window_first_key`]) to its last block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_metadata_values(
    dims: &AttentionDims,
    cu_seqlens_q: &[u32],
    context_lens: &[u32],
    block_tables: &[u32],
    max_seqlen_q: usize,
    max_context_len: usize,
    window: Option<NonZeroUsize>,
) -> std::result::Result<(), KernelError> {
    let op = PAGED_ATTENTION;
    let bs = dims.cache.block_size;
    debug_assert_eq!(cu_seqlens_q.len(), dims.num_seqs + 1);
    debug_assert_eq!(context_lens.len(), dims.num_seqs);
    debug_assert_eq!(block_tables.len(), dims.num_seqs * dims.max_blocks_per_seq);
    let out_of_range = |tensor, index, value: u32, expected: String| KernelError::OutOfRange {
        op,
        tensor,
        index,
        value: u64::from(value),
        expected,
    };
    if cu_seqlens_q[0] != 0 {
        return Err(out_of_range(
            "cu_seqlens_q",
            0,
            cu_seqlens_q[0],
            "must be 0".to_string(),
        ));
    }
    for (i, pair) in cu_seqlens_q.windows(2).enumerate() {
        if pair[1] < pair[0] {
            return Err(out_of_range(
                "cu_seqlens_q",
                i + 1,
                pair[1],
                format!("must be >= cu_seqlens_q[{i}] = {}", pair[0]),
            ));
        }
    }
    let last = cu_seqlens_q[dims.num_seqs];
    if last as usize != dims.num_tokens {
        return Err(out_of_range(
            "cu_seqlens_q",
            dims.num_seqs,
            last,
            format!(
                "must equal the number of query tokens T = {}",
                dims.num_tokens
            ),
        ));
    }
    for seq in 0..dims.num_seqs {
        let n_q = cu_seqlens_q[seq + 1] - cu_seqlens_q[seq];
        let context_len = context_lens[seq];
        if n_q > context_len {
            return Err(out_of_range(
                "context_lens",
                seq,
                context_len,
                format!("must be >= the sequence's {n_q} query tokens (they are in the cache)"),
            ));
        }
        if n_q as usize > max_seqlen_q {
            return Err(out_of_range(
                "cu_seqlens_q",
                seq + 1,
                cu_seqlens_q[seq + 1],
                format!("sequence {seq} has {n_q} query tokens > max_seqlen_q = {max_seqlen_q}"),
            ));
        }
        if context_len as usize > max_context_len {
            return Err(out_of_range(
                "context_lens",
                seq,
                context_len,
                format!("must be <= max_context_len = {max_context_len}"),
            ));
        }
        let blocks_used = (context_len as usize).div_ceil(bs);
        if blocks_used > dims.max_blocks_per_seq {
            return Err(out_of_range(
                "context_lens",
                seq,
                context_len,
                format!(
                    "must be <= max_blocks_per_seq * block_size = {} * {bs}",
                    dims.max_blocks_per_seq
                ),
            ));
        }
        let row = seq * dims.max_blocks_per_seq;
        // n_q <= context_len was checked above.
        let first_pos = (context_len - n_q) as usize;
        let blocks_skipped = window_first_key(window, first_pos) / bs;
        for (j, &block) in block_tables[row..row + blocks_used]
            .iter()
            .enumerate()
            .skip(blocks_skipped)
        {
            if block as usize >= dims.cache.num_blocks {
                return Err(out_of_range(
                    "block_tables",
                    row + j,
                    block,
                    format!("must be < num_blocks = {}", dims.cache.num_blocks),
                ));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The KV write.

/// In-place op on one cache tensor: `(cache, k or v, slot_mapping)`.
#[derive(Debug, Clone, Copy)]
pub struct WriteKvOp {
    pub(crate) cache: CacheDims,
}

/// A contiguous CPU tensor's elements.
pub(crate) fn contiguous_slice<'s, T>(
    op: &'static str,
    tensor: &'static str,
    data: &'s [T],
    layout: &Layout,
) -> Result<&'s [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(KernelError::Layout {
            op,
            tensor,
            expected: "contiguous",
            shape: layout.dims().to_vec(),
            stride: layout.stride().to_vec(),
            offset: layout.start_offset(),
        }
        .into()),
    }
}

fn check_slots(slots: &[u32], cache: CacheDims) -> std::result::Result<(), KernelError> {
    let capacity = cache.num_blocks * cache.block_size;
    match slots.iter().position(|&s| s as usize >= capacity) {
        Some(t) => Err(KernelError::OutOfRange {
            op: WRITE_KV,
            tensor: "slot_mapping",
            index: t,
            value: u64::from(slots[t]),
            expected: format!(
                "must be < num_blocks * block_size = {} * {}",
                cache.num_blocks, cache.block_size
            ),
        }),
        None => Ok(()),
    }
}

/// `scatter_rows` from f32 rows into a half-precision cache, each row rounded on the way.
fn scatter_rows_from_f32<C: KvElem>(
    cache: &mut [C],
    cache_layout: &Layout,
    src: &[f32],
    src_layout: &Layout,
    slots: &[u32],
    dims: CacheDims,
) -> Result<()> {
    scatter_rows_with(
        cache,
        cache_layout,
        src,
        src_layout,
        slots,
        dims,
        C::from_f32_into,
    )
}

fn scatter_rows<T: Copy>(
    cache: &mut [T],
    cache_layout: &Layout,
    src: &[T],
    src_layout: &Layout,
    slots: &[u32],
    dims: CacheDims,
) -> Result<()> {
    scatter_rows_with(cache, cache_layout, src, src_layout, slots, dims, |s, d| {
        d.copy_from_slice(s)
    })
}

/// `cache[slot_mapping[t]] = store(src[t])`, head by head.
fn scatter_rows_with<S, C>(
    cache: &mut [C],
    cache_layout: &Layout,
    src: &[S],
    src_layout: &Layout,
    slots: &[u32],
    dims: CacheDims,
    store: impl Fn(&[S], &mut [C]),
) -> Result<()> {
    let (start, end) = match cache_layout.contiguous_offsets() {
        Some(range) => range,
        None => candle_core::bail!("{WRITE_KV}: the cache must be contiguous"),
    };
    let cache = &mut cache[start..end];
    let d = dims.head_dim;
    let row_len = dims.num_kv_heads * d;
    let stride = src_layout.stride();
    let offset = src_layout.start_offset();
    for (t, &slot) in slots.iter().enumerate() {
        let dst = &mut cache[slot as usize * row_len..][..row_len];
        for (h, dst_head) in dst.chunks_exact_mut(d).enumerate() {
            let from = offset + t * stride[0] + h * stride[1];
            store(&src[from..from + d], dst_head);
        }
    }
    Ok(())
}

impl InplaceOp3 for WriteKvOp {
    fn name(&self) -> &'static str {
        WRITE_KV
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
        slots: &CpuStorage,
        slots_layout: &Layout,
    ) -> Result<()> {
        let slots = contiguous_slice(WRITE_KV, "slot_mapping", slots.as_slice()?, slots_layout)?;
        check_slots(slots, self.cache)?;
        if src_layout.dims() != [slots.len(), self.cache.num_kv_heads, self.cache.head_dim] {
            candle_core::bail!(
                "{WRITE_KV}: source shape {:?} does not match the checked shape",
                src_layout.dims()
            );
        }
        match (cache, src) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                scatter_rows(c, cache_layout, s, src_layout, slots, self.cache)
            }
            (CpuStorage::F16(c), CpuStorage::F16(s)) => {
                scatter_rows(c, cache_layout, s, src_layout, slots, self.cache)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                scatter_rows(c, cache_layout, s, src_layout, slots, self.cache)
            }
            (CpuStorage::F16(c), CpuStorage::F32(s)) => {
                scatter_rows_from_f32(c, cache_layout, s, src_layout, slots, self.cache)
            }
            (CpuStorage::BF16(c), CpuStorage::F32(s)) => {
                scatter_rows_from_f32(c, cache_layout, s, src_layout, slots, self.cache)
            }
            (c, s) => candle_core::bail!(
                "{WRITE_KV}: cache and source must share one of F32, F16, BF16, got {:?} and {:?}",
                c.dtype(),
                s.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_layout: &Layout,
        src: &candle_core::CudaStorage,
        src_layout: &Layout,
        slots: &candle_core::CudaStorage,
        slots_layout: &Layout,
    ) -> Result<()> {
        crate::cuda::attention::write_kv(
            self.cache,
            cache,
            cache_layout,
            src,
            src_layout,
            slots,
            slots_layout,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Paged attention.

/// Custom op `(q, key_cache, value_cache) -> out`, with the step's metadata held in the op
/// (as candle-flash-attn's varlen op holds its `seqlens`).
#[derive(Debug, Clone)]
pub struct PagedAttentionOp {
    pub(crate) block_tables: Tensor,
    pub(crate) context_lens: Tensor,
    pub(crate) cu_seqlens_q: Tensor,
    pub(crate) max_seqlen_q: usize,
    pub(crate) max_context_len: usize,
    pub(crate) scale: f32,
    /// Sliding window in keys (see [`paged_attention_windowed`]); `None`: causal only.
    pub(crate) window: Option<NonZeroUsize>,
    pub(crate) dims: AttentionDims,
    /// The CPU kernel's instruction set (fixed at construction so tests can pin the baseline).
    simd: Simd,
}

/// Holds the read guard of a metadata tensor's storage while its slice is used.
fn with_cpu_u32<R>(
    tensor: &'static str,
    t: &Tensor,
    f: impl FnOnce(&[u32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(contiguous_slice(
            PAGED_ATTENTION,
            tensor,
            cpu.as_slice::<u32>()?,
            layout,
        )?),
        _ => candle_core::bail!("{PAGED_ATTENTION}: `{tensor}` must be on the CPU like `q`"),
    }
}

impl CustomOp3 for PagedAttentionOp {
    fn name(&self) -> &'static str {
        PAGED_ATTENTION
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        if q_layout.dims() != [dims.num_tokens, dims.num_heads, dims.head_dim] {
            candle_core::bail!(
                "{PAGED_ATTENTION}: q shape {:?} does not match the checked shape",
                q_layout.dims()
            );
        }
        let shape = Shape::from((dims.num_tokens, dims.num_heads, dims.head_dim));
        with_cpu_u32("cu_seqlens_q", &self.cu_seqlens_q, |cu| {
            with_cpu_u32("context_lens", &self.context_lens, |context_lens| {
                with_cpu_u32("block_tables", &self.block_tables, |block_tables| {
                    check_metadata_values(
                        &dims,
                        cu,
                        context_lens,
                        block_tables,
                        self.max_seqlen_q,
                        self.max_context_len,
                        self.window,
                    )?;
                    let meta = SeqMeta {
                        cu_seqlens_q: cu,
                        context_lens,
                        block_tables,
                    };
                    let storage = match (q, k, v) {
                        (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                            CpuStorage::F32(self.run_cpu(q, q_layout, k, k_layout, v, v_layout, meta)?)
                        }
                        (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                            CpuStorage::F16(self.run_cpu(q, q_layout, k, k_layout, v, v_layout, meta)?)
                        }
                        (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                            CpuStorage::BF16(self.run_cpu(q, q_layout, k, k_layout, v, v_layout, meta)?)
                        }
                        // f32 activations over a half-precision cache.
                        (CpuStorage::F32(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                            CpuStorage::F32(self.run_cpu(q, q_layout, k, k_layout, v, v_layout, meta)?)
                        }
                        (CpuStorage::F32(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                            CpuStorage::F32(self.run_cpu(q, q_layout, k, k_layout, v, v_layout, meta)?)
                        }
                        (q, k, v) => candle_core::bail!(
                            "{PAGED_ATTENTION}: q, key_cache, value_cache must share one of F32, F16, BF16, got {:?}, {:?}, {:?}",
                            q.dtype(),
                            k.dtype(),
                            v.dtype()
                        ),
                    };
                    Ok((storage, shape))
                })
            })
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_layout: &Layout,
        k: &candle_core::CudaStorage,
        k_layout: &Layout,
        v: &candle_core::CudaStorage,
        v_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::attention::paged_attention(self, q, q_layout, k, k_layout, v, v_layout)
    }
}

/// The step's metadata, read on the host and already checked.
#[derive(Clone, Copy)]
struct SeqMeta<'a> {
    cu_seqlens_q: &'a [u32],
    context_lens: &'a [u32],
    block_tables: &'a [u32],
}

/// One CPU task: query tokens `tok_begin..tok_end` (0-based within the sequence) of sequence
/// `seq`, all query heads of KV head `kv_head`.
#[derive(Debug, Clone, Copy)]
struct Task {
    seq: usize,
    kv_head: usize,
    tok_begin: usize,
    tok_end: usize,
}

/// Everything a CPU task reads: `q` (and the output) in `Q`, the caches in `C`.
struct CpuArgs<'a, Q, C> {
    q: &'a [Q],
    q_offset: usize,
    q_stride_token: usize,
    q_stride_head: usize,
    k_cache: &'a [C],
    v_cache: &'a [C],
    meta: SeqMeta<'a>,
    dims: AttentionDims,
    /// Query heads per KV head.
    group: usize,
    scale: f32,
    window: Option<NonZeroUsize>,
}

/// Sizes and positions of one task, as both CPU kernels read them.
struct TaskGeometry {
    /// Head dimension.
    d: usize,
    /// Query heads per KV head.
    g: usize,
    /// Cache block size.
    bs: usize,
    /// Elements from one cache slot's row to the next (all KV heads).
    kv_row: usize,
    /// The sequence's first query token in the step.
    q_begin: usize,
    /// Query tokens of the task, and rows (tokens x heads of the KV head).
    n_tok: usize,
    rows: usize,
    /// Positions of the task's first and last query tokens.
    first_pos: usize,
    last_pos: usize,
}

impl<Q: KvElem, C: KvElem> CpuArgs<'_, Q, C> {
    /// Row `r` of the task's queries (token `r / g`, head `r % g` of its KV head) into `out`,
    /// in f32, scaled. q meets a half-precision cache in the cache's precision, as it would had
    /// it been cast to the cache's dtype (llama.cpp's flash attention does the same).
    fn query_row(&self, task: &Task, r: usize, out: &mut [f32]) {
        let (d, g) = (self.dims.head_dim, self.group);
        let token = self.meta.cu_seqlens_q[task.seq] as usize + task.tok_begin + r / g;
        let head = task.kv_head * g + r % g;
        let from = self.q_offset + token * self.q_stride_token + head * self.q_stride_head;
        Q::to_f32_into(&self.q[from..from + d], out);
        C::round_f32(out);
        for x in out.iter_mut() {
            *x *= self.scale;
        }
    }

    fn geometry(&self, task: &Task) -> TaskGeometry {
        let d = self.dims.head_dim;
        let q_begin = self.meta.cu_seqlens_q[task.seq] as usize;
        let n_q = self.meta.cu_seqlens_q[task.seq + 1] as usize - q_begin;
        let context_len = self.meta.context_lens[task.seq] as usize;
        let n_tok = task.tok_end - task.tok_begin;
        // Checked up front: n_q <= context_len, so positions are non-negative.
        let first_pos = context_len - n_q + task.tok_begin;
        TaskGeometry {
            d,
            g: self.group,
            bs: self.dims.cache.block_size,
            kv_row: self.dims.cache.num_kv_heads * d,
            q_begin,
            n_tok,
            rows: n_tok * self.group,
            first_pos,
            last_pos: first_pos + n_tok - 1,
        }
    }
}

/// Where the tasks write their disjoint pieces of the output.
#[derive(Clone, Copy)]
struct OutPtr<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the pointer is only used to write disjoint ranges (see `OutPtr::range`) of a buffer
// that outlives the parallel loop; `T: Send` makes moving those writes across threads sound.
unsafe impl<T: Send> Send for OutPtr<T> {}
// SAFETY: as above; no two tasks ever touch the same element.
unsafe impl<T: Send> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// # Safety
    /// `start + len <= self.len`, the buffer is alive, and no other live slice overlaps this one.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "output range out of bounds");
        // SAFETY: in bounds (asserted), alive and unaliased (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

/// Per-thread scratch of a CPU task, reused across tasks.
#[derive(Default)]
struct Scratch {
    /// `[rows, head_dim]`: the task's queries, scaled, in f32.
    q: Vec<f32>,
    /// `[rows, head_dim]`: un-normalised outputs.
    acc: Vec<f32>,
    /// `[rows]`: running maximum of the scores.
    max: Vec<f32>,
    /// `[rows]`: running sum of `exp(score - max)`.
    sum: Vec<f32>,
    /// `[rows, block_size]`: one KV block's scores, then its softmax weights.
    scores: Vec<f32>,
    /// One K or V row converted to f32 (only without AVX2, for f16/bf16 caches).
    row: Vec<f32>,
    /// The AVX-512 many-row kernel's own buffers.
    #[cfg(target_arch = "x86_64")]
    wide: rows512::Scratch,
}

impl Scratch {
    fn prepare(&mut self, rows: usize, head_dim: usize, block_size: usize) {
        // The accumulators start from zero; every other buffer is written before it is read,
        // so it only has to be long enough (zeroing them cost a memset per task).
        self.acc.clear();
        self.acc.resize(rows * head_dim, 0.0);
        self.max.clear();
        self.max.resize(rows, f32::NEG_INFINITY);
        self.sum.clear();
        self.sum.resize(rows, 0.0);
        let at_least = |buf: &mut Vec<f32>, len: usize| {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        };
        at_least(&mut self.q, rows * head_dim);
        at_least(&mut self.scores, rows * block_size);
        at_least(&mut self.row, head_dim);
    }
}

/// Cache element types: the kernel computes in f32 and converts rows on the fly.
pub(crate) trait KvElem: candle_core::WithDType {
    /// 8 elements from `p` as f32 lanes (F16C / AVX2 conversions for the half types), so the
    /// AVX2 kernels read f16/bf16 caches in place instead of converting rows into a buffer.
    ///
    /// # Safety
    /// `p..p + 8` is readable, and the CPU has avx2, fma and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// One element as f32.
    fn elem_f32(self) -> f32;
    /// Rounds f32 values to this type's precision, as `from_f32_into` stores them (a no-op
    /// for f32).
    fn round_f32(values: &mut [f32]);
    fn to_f32_into(src: &[Self], dst: &mut [f32]);
    fn from_f32_into(src: &[f32], dst: &mut [Self]);
    /// The row as f32: borrowed as is for f32, converted into `buf` otherwise.
    #[inline(always)]
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        Self::to_f32_into(src, buf);
        buf
    }
}

impl KvElem for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats at `p`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn elem_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn round_f32(_values: &mut [f32]) {}
    #[inline(always)]
    fn to_f32_into(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn from_f32_into(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn as_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

/// The conversions f16 and bf16 share (through `half`'s slice conversions).
macro_rules! half_conversions {
    () => {
        #[inline(always)]
        fn elem_f32(self) -> f32 {
            self.to_f32()
        }
        /// Through a stack buffer with `half`'s slice conversions, which are vectorized (F16C
        /// for f16): its scalar conversions are a call each, and ran at a fifth of the time of a
        /// prefill's attention outside the dot products (the queries and outputs of every row).
        /// Both round to nearest even, so the bits are the same.
        #[inline(always)]
        fn round_f32(values: &mut [f32]) {
            let mut buf = [Self::ZERO; 64];
            for chunk in values.chunks_mut(buf.len()) {
                let half = &mut buf[..chunk.len()];
                half.convert_from_f32_slice(chunk);
                half.convert_to_f32_slice(chunk);
            }
        }
        #[inline(always)]
        fn to_f32_into(src: &[Self], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst);
        }
        #[inline(always)]
        fn from_f32_into(src: &[f32], dst: &mut [Self]) {
            dst.convert_from_f32_slice(src);
        }
    };
}

impl KvElem for f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable halves (16 bytes) at `p`.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }
    half_conversions!();
}

impl KvElem for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at `p`. A bf16 is the top
        // half of the f32 with the same bits.
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<__m128i>()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    half_conversions!();
}

impl PagedAttentionOp {
    #[allow(clippy::too_many_arguments)]
    fn run_cpu<Q: KvElem, C: KvElem>(
        &self,
        q: &[Q],
        q_layout: &Layout,
        k: &[C],
        k_layout: &Layout,
        v: &[C],
        v_layout: &Layout,
        meta: SeqMeta<'_>,
    ) -> Result<Vec<Q>> {
        let dims = self.dims;
        let group = dims.num_heads / dims.cache.num_kv_heads;
        let args = CpuArgs {
            q,
            q_offset: q_layout.start_offset(),
            q_stride_token: q_layout.stride()[0],
            q_stride_head: q_layout.stride()[1],
            k_cache: contiguous_slice(PAGED_ATTENTION, "key_cache", k, k_layout)?,
            v_cache: contiguous_slice(PAGED_ATTENTION, "value_cache", v, v_layout)?,
            meta,
            dims,
            group,
            scale: self.scale,
            window: self.window,
        };
        let tokens_per_task = (CPU_TASK_ROWS_MAX / group).max(1);
        let mut tasks = Vec::new();
        for seq in 0..dims.num_seqs {
            let n_q = (meta.cu_seqlens_q[seq + 1] - meta.cu_seqlens_q[seq]) as usize;
            for tok_begin in (0..n_q).step_by(tokens_per_task) {
                let tok_end = (tok_begin + tokens_per_task).min(n_q);
                for kv_head in 0..dims.cache.num_kv_heads {
                    tasks.push(Task {
                        seq,
                        kv_head,
                        tok_begin,
                        tok_end,
                    });
                }
            }
        }
        let mut out = vec![Q::from_f64(0.0); dims.num_tokens * dims.num_heads * dims.head_dim];
        let out_ptr = OutPtr {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        let simd = self.simd;
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |scratch, task| {
                simd.attend(&args, task, scratch, out_ptr);
            });
        Ok(out)
    }
}

/// The instruction set the CPU kernel was compiled for, picked once per call.
#[derive(Debug, Clone, Copy)]
enum Simd {
    /// Whatever the build target allows (SSE2 on a default x86_64 build).
    Baseline,
    /// AVX2 + FMA (+ F16C for half caches), detected at run time.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// AVX2 + FMA + F16C and AVX-512 F/DQ: tasks with many rows go to `rows512`, the others
    /// to the AVX2 kernel.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512dq")
            {
                return Simd::Avx512;
            }
            return Simd::Avx2Fma;
        }
        Simd::Baseline
    }

    fn attend<Q: KvElem, C: KvElem>(
        self,
        args: &CpuArgs<'_, Q, C>,
        task: &Task,
        scratch: &mut Scratch,
        out: OutPtr<Q>,
    ) {
        // Without a window the kernel is compiled with the window code folded away: with the
        // window checked at run time, a plain decode ran 1.8% more instructions (cachegrind;
        // the compiler kept exp's constants in registers and reloaded them after each dot).
        #[cfg(target_arch = "x86_64")]
        let simd = match self {
            Simd::Avx512 => {
                let rows = (task.tok_end - task.tok_begin) * args.group;
                if rows512::applies(rows, args.dims.head_dim, args.window.is_some()) {
                    // SAFETY: `detect` saw avx512f, avx512dq, avx2, fma and f16c.
                    unsafe { rows512::attend(args, task, &mut scratch.wide, out) };
                    return;
                }
                Simd::Avx2Fma
            }
            other => other,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let simd = self;
        match (simd, args.window.is_some()) {
            #[cfg(target_arch = "x86_64")]
            (Simd::Avx512, _) => unreachable!("the AVX-512 case is handled above"),
            (Simd::Baseline, false) => attend::<Q, C, false, false>(args, task, scratch, out),
            (Simd::Baseline, true) => attend::<Q, C, false, true>(args, task, scratch, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `detect` saw avx2, fma and f16c on this CPU.
            (Simd::Avx2Fma, false) => unsafe {
                attend_avx2_fma::<Q, C, false>(args, task, scratch, out)
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            (Simd::Avx2Fma, true) => unsafe {
                attend_avx2_fma::<Q, C, true>(args, task, scratch, out)
            },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn attend_avx2_fma<Q: KvElem, C: KvElem, const WINDOWED: bool>(
    args: &CpuArgs<'_, Q, C>,
    task: &Task,
    scratch: &mut Scratch,
    out: OutPtr<Q>,
) {
    attend::<Q, C, true, WINDOWED>(args, task, scratch, out);
}

/// First key position that the query at position `pos` sees: `pos + 1 - window` (a window of
/// `W` keys counts the query's own), or 0.
#[inline(always)]
pub(crate) fn window_first_key(window: Option<NonZeroUsize>, pos: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w.get()))
}

/// One task: a flash-attention pass over the sequence's KV blocks, one block at a time.
///
/// Rows are `(token, head)` pairs, row `r` = token `r / group`, head `r % group` of the KV
/// head's group. Tokens are in position order, so at KV position `p` the rows that may see it
/// are a suffix: those of tokens at positions `>= p`; with a window, a band: the tokens at
/// positions `p..p + window`. The walk over the block table starts at the block of the first
/// key the task's first token sees, so no entry before it is read.
///
/// `WINDOWED` is `args.window.is_some()`, as a constant so the plain causal kernel carries no
/// window arithmetic.
#[inline(always)]
fn attend<Q: KvElem, C: KvElem, const FMA: bool, const WINDOWED: bool>(
    args: &CpuArgs<'_, Q, C>,
    task: &Task,
    scratch: &mut Scratch,
    out: OutPtr<Q>,
) {
    debug_assert_eq!(WINDOWED, args.window.is_some());
    let window = if WINDOWED { args.window } else { None };
    let TaskGeometry {
        d,
        g,
        bs,
        kv_row,
        q_begin,
        n_tok,
        rows,
        first_pos,
        last_pos,
    } = args.geometry(task);

    scratch.prepare(rows, d, bs);
    let Scratch {
        q,
        acc,
        max,
        sum,
        scores,
        row: row_buf,
        ..
    } = scratch;
    // Longer than needed when an earlier task of this thread had more rows.
    let q = &mut q[..rows * d];
    let row_buf = &mut row_buf[..d];

    for (r, q_row) in q.chunks_exact_mut(d).enumerate() {
        args.query_row(task, r, q_row);
    }

    // Every key a row of this task sees lies in key_first..=last_pos.
    let key_first = window_first_key(window, first_pos);
    let (block_first, blocks_used) = (key_first / bs, last_pos / bs + 1);
    let table = &args.meta.block_tables[task.seq * args.dims.max_blocks_per_seq..]
        [block_first..blocks_used];
    for (b, &block) in table.iter().enumerate() {
        let p0 = (block_first + b) * bs;
        let len = (last_pos + 1 - p0).min(bs);
        let block_base = block as usize * bs * kv_row + task.kv_head * d;
        // Blocks are scattered, so the hardware prefetcher cannot guess the next one: ask for
        // it now, while this block is computed (decode is bound by these loads).
        if let Some(&next) = table.get(b + 1) {
            let next_base = next as usize * bs * kv_row + task.kv_head * d;
            let next_len = (last_pos + 1 - (p0 + bs)).min(bs);
            for i in 0..next_len {
                prefetch_row(&args.k_cache[next_base + i * kv_row..][..d]);
                prefetch_row(&args.v_cache[next_base + i * kv_row..][..d]);
            }
        }

        // Scores of the (key, row) pairs where the row sees the key; the others are left as
        // they were and never read below.
        for i in key_first.saturating_sub(p0)..len {
            let key = p0 + i;
            let from = block_base + i * kv_row;
            let k_row = &args.k_cache[from..from + d];
            let r_min = key.saturating_sub(first_pos) * g;
            // Tokens at positions key + window and later no longer see it.
            let r_end = window.map_or(rows, |w| {
                (key.saturating_add(w.get()) - first_pos).min(n_tok) * g
            });
            // Up to 4 rows per pass: each K load feeds 4 FMAs, and the 4 horizontal sums
            // share one reduction.
            let mut r = r_min;
            while r < r_end {
                let n = (r_end - r).min(4);
                let mut dots = [0f32; 4];
                dot_rows::<C, FMA>(&q[r * d..(r + n) * d], k_row, &mut dots[..n], row_buf);
                for (j, &dot) in dots[..n].iter().enumerate() {
                    scores[(r + j) * bs + i] = dot;
                }
                r += n;
            }
        }

        for r in 0..rows {
            let pos = first_pos + r / g;
            if pos < p0 {
                continue;
            }
            // The keys of this block that the row sees: i_begin..i_end.
            let i_begin = window_first_key(window, pos).saturating_sub(p0);
            let i_end = (pos + 1 - p0).min(len);
            // Only a window can leave a row no key in this block; `WINDOWED &&` keeps the check
            // (and what it did to register allocation) out of the plain kernel.
            if WINDOWED && i_begin >= i_end {
                continue;
            }
            let s = &mut scores[r * bs + i_begin..r * bs + i_end];
            let max_new = max[r].max(max_of(s));
            let block_sum = exp_sub_in_place::<FMA>(s, max_new);
            if max_new > max[r] {
                // exp(-inf) = 0 on the first block: the empty accumulators stay empty.
                let correction = (max[r] - max_new).exp();
                sum[r] = sum[r] * correction + block_sum;
                for x in &mut acc[r * d..(r + 1) * d] {
                    *x *= correction;
                }
                max[r] = max_new;
            } else {
                sum[r] += block_sum;
            }
        }

        // acc[r] += sum over the keys row r sees of weight x V row. The rows of one token
        // see the same keys; up to 4 of them go together, their accumulators held in registers
        // across the block's keys (accumulating straight into memory made every key wait for
        // the previous key's store). Per element the sum runs over the keys in order with one
        // fused multiply-add each, as before.
        let v_block = &args.v_cache[block_base..];
        for t in 0..n_tok {
            let pos = first_pos + t;
            if pos < p0 {
                continue;
            }
            let i_begin = window_first_key(window, pos).saturating_sub(p0);
            let i_end = (pos + 1 - p0).min(len);
            // As above.
            if WINDOWED && i_begin >= i_end {
                continue;
            }
            let v = &v_block[i_begin * kv_row..];
            let mut r = t * g;
            while r < (t + 1) * g {
                let n = ((t + 1) * g - r).min(4);
                accumulate_rows::<C, FMA>(
                    (&scores[r * bs + i_begin..], bs),
                    (v, kv_row),
                    i_end - i_begin,
                    &mut acc[r * d..(r + n) * d],
                    row_buf,
                );
                r += n;
            }
        }
    }

    write_rows::<Q, C>(args, task, q_begin, acc, sum, out);
}

/// The task's output rows: `acc[r] / sum[r]`, rounded to the cache's precision, into `out`.
#[inline(always)]
fn write_rows<Q: KvElem, C: KvElem>(
    args: &CpuArgs<'_, Q, C>,
    task: &Task,
    q_begin: usize,
    acc: &mut [f32],
    sum: &[f32],
    out: OutPtr<Q>,
) {
    let (d, g) = (args.dims.head_dim, args.group);
    for t in 0..task.tok_end - task.tok_begin {
        let token = q_begin + task.tok_begin + t;
        let start = (token * args.dims.num_heads + task.kv_head * g) * d;
        // SAFETY: tasks partition (token, KV head) pairs, and the heads of one KV head are
        // adjacent in a token's output row, so this range is written by this task alone;
        // `out` lives until every task has returned.
        let dst = unsafe { out.range(start, g * d) };
        for (h, dst_head) in dst.chunks_exact_mut(d).enumerate() {
            let r = t * g + h;
            // Every row sees at least its own position, so sum[r] >= 1.
            let inv = 1.0 / sum[r];
            let acc_row = &mut acc[r * d..(r + 1) * d];
            for x in acc_row.iter_mut() {
                *x *= inv;
            }
            // The output too leaves in the cache's precision: with f32 activations over an
            // f16 cache the result is what casting q/k/v to f16 gave (the reference's numerics).
            C::round_f32(acc_row);
            Q::from_f32_into(acc_row, dst_head);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vector helpers, written so the compiler vectorises them (fixed-width lane accumulators: a
// plain float reduction cannot be reordered, so it would stay scalar).

/// Hints the CPU to pull `row` into the cache; a no-op where there is no such hint.
#[inline(always)]
fn prefetch_row<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE_BYTES: usize = 64;
        let bytes = std::mem::size_of_val(row);
        let start = row.as_ptr().cast::<i8>();
        for offset in (0..bytes).step_by(LINE_BYTES) {
            // SAFETY: prefetch never faults, and the address is inside `row` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // mul_add is one instruction with FMA and a slow libm call without it.
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn hsum<const N: usize>(mut lanes: [f32; N]) -> f32 {
    let mut width = N / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .fold(0.0, |s, (x, y)| madd::<FMA>(*x, *y, s));
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] = madd::<FMA>(x[i], y[i], lanes[i]);
        }
    }
    hsum(lanes) + tail
}

/// `out[j] = dot(rows[j], k)` for the `out.len()` (at most 4) consecutive rows of `k.len()`,
/// `k` a cache row in its own dtype (read in place with AVX2; else converted into `buf`).
#[inline(always)]
fn dot_rows<T: KvElem, const FMA: bool>(rows: &[f32], k: &[T], out: &mut [f32], buf: &mut [f32]) {
    let d = k.len();
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: FMA = true only runs inside `attend_avx2_fma`, on a CPU with avx2, fma and
        // f16c.
        unsafe {
            match out.len() {
                4 => x86::dot_rows::<4, T>(rows, k, out),
                3 => x86::dot_rows::<3, T>(rows, k, out),
                2 => x86::dot_rows::<2, T>(rows, k, out),
                _ => x86::dot_rows::<1, T>(rows, k, out),
            }
        }
        return;
    }
    let k = T::as_f32(k, buf);
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot::<FMA>(&rows[j * d..(j + 1) * d], k);
    }
}

/// `acc[j] += sum_{i < keys} w[j * w_stride + i] * v[i * v_stride ..][..d]` for the
/// `acc.len() / d` (at most 4) rows of `acc` (`d = buf.len()`), each element summed over `i`
/// in order; `v` holds cache rows in their own dtype (read in place with AVX2; else each row
/// is converted into `buf`).
#[inline(always)]
fn accumulate_rows<T: KvElem, const FMA: bool>(
    (w, w_stride): (&[f32], usize),
    (v, v_stride): (&[T], usize),
    keys: usize,
    acc: &mut [f32],
    buf: &mut [f32],
) {
    let d = buf.len();
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `dot_rows`.
        unsafe {
            match acc.len() / d {
                4 => x86::accumulate_rows::<4, T>(w, w_stride, v, v_stride, keys, acc, d),
                3 => x86::accumulate_rows::<3, T>(w, w_stride, v, v_stride, keys, acc, d),
                2 => x86::accumulate_rows::<2, T>(w, w_stride, v, v_stride, keys, acc, d),
                _ => x86::accumulate_rows::<1, T>(w, w_stride, v, v_stride, keys, acc, d),
            }
        }
        return;
    }
    for i in 0..keys {
        let v_row = T::as_f32(&v[i * v_stride..i * v_stride + d], buf);
        for (j, acc_row) in acc.chunks_exact_mut(d).enumerate() {
            axpy::<FMA>(w[j * w_stride + i], v_row, acc_row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::KvElem;

    /// `out[j] = dot(rows[j], k)` for `N <= 4` consecutive rows of `k.len()` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_rows<const N: usize, T: KvElem>(rows: &[f32], k: &[T], out: &mut [f32]) {
        let d = k.len();
        assert!(N <= 4 && rows.len() >= N * d && out.len() >= N);
        let (pq, pk) = (rows.as_ptr(), k.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: loads read 8 floats at i..i + 8 <= d of `k` and of row j < N of `rows`.
        unsafe {
            while i + 8 <= d {
                let kv = T::load8(pk.add(i));
                for (j, a) in acc.iter_mut().enumerate().take(N) {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(j * d + i)), kv, *a);
                }
                i += 8;
            }
        }
        // [a b c d] <- the four 8-lane sums, in three adds.
        let ab = _mm256_hadd_ps(acc[0], acc[1]);
        let cd = _mm256_hadd_ps(acc[2], acc[3]);
        let abcd = _mm256_hadd_ps(ab, cd);
        let sums = _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        );
        let mut lanes = [0f32; 4];
        // SAFETY: `lanes` holds 4 floats.
        unsafe { _mm_storeu_ps(lanes.as_mut_ptr(), sums) };
        for j in 0..N {
            let mut s = lanes[j];
            for t in i..d {
                s = rows[j * d + t].mul_add(k[t].elem_f32(), s);
            }
            out[j] = s;
        }
    }

    /// `acc[j] += sum_{i < keys} w[j * ws + i] * v[i * vs ..][..d]` for `N <= 4` rows of `d`.
    /// Two 8-float column chunks of the N rows stay in registers over all keys: 2N
    /// independent FMA chains, enough to cover the FMA latency.
    // `j` indexes two register arrays and the row offsets at once: a range reads clearer here.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn accumulate_rows<const N: usize, T: KvElem>(
        w: &[f32],
        ws: usize,
        v: &[T],
        vs: usize,
        keys: usize,
        acc: &mut [f32],
        d: usize,
    ) {
        assert!(N <= 4 && acc.len() >= N * d);
        if keys == 0 {
            return;
        }
        assert!(w.len() > (N - 1) * ws + keys - 1 && v.len() >= (keys - 1) * vs + d);
        let (pw, pv, pa) = (w.as_ptr(), v.as_ptr(), acc.as_mut_ptr());
        let mut c = 0;
        // SAFETY (all blocks below): weights read at j * ws + i (j < N, i < keys), V at
        // i * vs + c.. + 8 <= (keys - 1) * vs + d, accumulators at j * d + c.. + 8 <= N * d:
        // all inside the slices (asserted above).
        unsafe {
            while c + 16 <= d {
                let mut lo = [_mm256_setzero_ps(); 4];
                let mut hi = [_mm256_setzero_ps(); 4];
                for j in 0..N {
                    lo[j] = _mm256_loadu_ps(pa.add(j * d + c));
                    hi[j] = _mm256_loadu_ps(pa.add(j * d + c + 8));
                }
                for i in 0..keys {
                    let v_lo = T::load8(pv.add(i * vs + c));
                    let v_hi = T::load8(pv.add(i * vs + c + 8));
                    for j in 0..N {
                        let wj = _mm256_broadcast_ss(&*pw.add(j * ws + i));
                        lo[j] = _mm256_fmadd_ps(wj, v_lo, lo[j]);
                        hi[j] = _mm256_fmadd_ps(wj, v_hi, hi[j]);
                    }
                }
                for j in 0..N {
                    _mm256_storeu_ps(pa.add(j * d + c), lo[j]);
                    _mm256_storeu_ps(pa.add(j * d + c + 8), hi[j]);
                }
                c += 16;
            }
            while c + 8 <= d {
                let mut lo = [_mm256_setzero_ps(); 4];
                for j in 0..N {
                    lo[j] = _mm256_loadu_ps(pa.add(j * d + c));
                }
                for i in 0..keys {
                    let v_lo = T::load8(pv.add(i * vs + c));
                    for j in 0..N {
                        let wj = _mm256_broadcast_ss(&*pw.add(j * ws + i));
                        lo[j] = _mm256_fmadd_ps(wj, v_lo, lo[j]);
                    }
                }
                for j in 0..N {
                    _mm256_storeu_ps(pa.add(j * d + c), lo[j]);
                }
                c += 8;
            }
        }
        for j in 0..N {
            for i in 0..keys {
                let wi = w[j * ws + i];
                for t in c..d {
                    acc[j * d + t] = wi.mul_add(v[i * vs + t].elem_f32(), acc[j * d + t]);
                }
            }
        }
    }
}

#[inline(always)]
fn axpy<const FMA: bool>(w: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(w, *x, *y);
    }
}

#[inline(always)]
fn max_of(s: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = s.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

/// `s[i] = exp(s[i] - m)`; returns the sum.
#[inline(always)]
fn exp_sub_in_place<const FMA: bool>(s: &mut [f32], m: f32) -> f32 {
    for x in s.iter_mut() {
        *x = fast_exp::<FMA>(*x - m);
    }
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let chunks = s.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    hsum(lanes) + tail
}

/// `exp(x)` for `x <= 0` (softmax arguments), within 2 ulp, branch-free so it vectorises
/// (libm's `expf` does not). Cephes' `expf`: `exp(x) = 2^k e^r` with `k = round(x / ln 2)`,
/// `|r| <= ln(2) / 2`, and a degree-7 polynomial for `e^r`. Inputs below -87 give ~1e-38
/// instead of a denormal or 0, which is nothing next to the row's maximum term, `exp(0) = 1`.
#[inline(always)]
pub(crate) fn fast_exp<const FMA: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = madd::<FMA>(x, std::f32::consts::LOG2_E, ROUND);
    let k = t - ROUND;
    let r = madd::<FMA>(k, -LN2_HI, x);
    let r = madd::<FMA>(k, -LN2_LO, r);
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let e_r = madd::<FMA>(p, r * r, r) + 1.0;
    let k_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    e_r * f32::from_bits(((k_int + 127) << 23) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(
        device: &Device,
        cu: &[u32],
        context_lens: &[u32],
        tables: &[u32],
        max_blocks: usize,
    ) -> AttentionMetadata {
        let num_seqs = context_lens.len();
        let num_tokens = cu.last().copied().unwrap_or(0) as usize;
        AttentionMetadata {
            slot_mapping: Tensor::zeros(num_tokens, DType::U32, device).unwrap(),
            block_tables: Tensor::from_slice(tables, (num_seqs, max_blocks), device).unwrap(),
            context_lens: Tensor::from_slice(context_lens, num_seqs, device).unwrap(),
            cu_seqlens_q: Tensor::from_slice(cu, num_seqs + 1, device).unwrap(),
            max_seqlen_q: cu
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap_or(0),
            max_context_len: context_lens.iter().copied().max().unwrap_or(0) as usize,
        }
    }

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=20_000 {
            let x = -87.0 * i as f32 / 20_000.0;
            let want = x.exp();
            for got in [fast_exp::<false>(x), fast_exp::<true>(x)] {
                worst = worst.max(((got - want) / want).abs());
            }
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(fast_exp::<false>(0.0), 1.0);
        assert!(fast_exp::<false>(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn dot_and_reductions_match_plain_loops() {
        for len in [1usize, 7, 16, 64, 67, 128] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot::<false>(&a, &b) - want).abs() < 1e-4);
            assert!((dot::<true>(&a, &b) - want).abs() < 1e-4);
            let want_max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&a), want_max);
            let mut s = a.clone();
            let total = exp_sub_in_place::<false>(&mut s, want_max);
            let want_total: f32 = a.iter().map(|x| (x - want_max).exp()).sum();
            assert!((total - want_total).abs() < 1e-4 * want_total);
        }
    }

    #[test]
    fn metadata_values_are_checked() {
        let dims = AttentionDims {
            num_tokens: 5,
            num_heads: 2,
            num_seqs: 2,
            max_blocks_per_seq: 2,
            cache: CacheDims {
                num_blocks: 4,
                block_size: 4,
                num_kv_heads: 1,
                head_dim: 8,
            },
            head_dim: 8,
        };
        let ok = |cu: &[u32], ctx: &[u32], bt: &[u32]| {
            check_metadata_values(&dims, cu, ctx, bt, 4, 8, None)
        };
        assert_eq!(ok(&[0, 4, 5], &[6, 1], &[3, 0, 2, 9]), Ok(()));
        let tensor_of = |r: std::result::Result<(), KernelError>| match r {
            Err(KernelError::OutOfRange { tensor, index, .. }) => (tensor, index),
            other => panic!("expected OutOfRange, got {other:?}"),
        };
        assert_eq!(
            tensor_of(ok(&[1, 4, 5], &[6, 1], &[3, 0, 2, 9])),
            ("cu_seqlens_q", 0)
        );
        assert_eq!(
            tensor_of(ok(&[0, 4, 3], &[6, 1], &[3, 0, 2, 9])),
            ("cu_seqlens_q", 2)
        );
        assert_eq!(
            tensor_of(ok(&[0, 4, 4], &[6, 1], &[3, 0, 2, 9])),
            ("cu_seqlens_q", 2)
        );
        // More query tokens than the context holds.
        assert_eq!(
            tensor_of(ok(&[0, 4, 5], &[3, 1], &[3, 0, 2, 9])),
            ("context_lens", 0)
        );
        // Context longer than the block table's row (2 blocks of 4).
        assert_eq!(
            tensor_of(ok(&[0, 4, 5], &[9, 1], &[3, 0, 2, 9])),
            ("context_lens", 0)
        );
        // A block id that is read (sequence 1's first) is out of range; padding is not read.
        assert_eq!(
            tensor_of(ok(&[0, 4, 5], &[6, 1], &[3, 0, 4, 9])),
            ("block_tables", 2)
        );
        // Host-side maxima too small for the batch.
        let (cu, ctx, bt) = (&[0, 4, 5], &[6, 1], &[3, 0, 2, 9]);
        assert!(check_metadata_values(&dims, cu, ctx, bt, 3, 8, None).is_err());
        assert!(check_metadata_values(&dims, cu, ctx, bt, 4, 5, None).is_err());
    }

    #[test]
    fn with_a_window_only_the_block_ids_read_are_checked() {
        let dims = AttentionDims {
            num_tokens: 2,
            num_heads: 1,
            num_seqs: 2,
            max_blocks_per_seq: 3,
            cache: CacheDims {
                num_blocks: 4,
                block_size: 4,
                num_kv_heads: 1,
                head_dim: 8,
            },
            head_dim: 8,
        };
        // Sequence 0: a decode at position 9 (context 10, entries 0..=2); sequence 1: a decode
        // at position 4 (context 5, entries 3..=4; entry 5 is padding). Block id 7 is out of
        // range (4 blocks): a stale entry.
        let (cu, ctx) = (&[0, 1, 2], &[10, 5]);
        let index_of = |bt: &[u32], w: Option<NonZeroUsize>| match check_metadata_values(
            &dims, cu, ctx, bt, 1, 10, w,
        ) {
            Ok(()) => None,
            Err(KernelError::OutOfRange {
                tensor: "block_tables",
                index,
                ..
            }) => Some(index),
            Err(other) => panic!("unexpected {other:?}"),
        };
        let w = NonZeroUsize::new;
        // Only sequence 0's first block is stale: read from a window of 7 (keys 3..=9) up,
        // skipped by a window of 6 (keys 4..=9, from the first slot of entry 1).
        let stale_0 = &[7, 1, 2, 0, 3, 9];
        assert_eq!(index_of(stale_0, None), Some(0));
        assert_eq!(index_of(stale_0, w(7)), Some(0));
        assert_eq!(index_of(stale_0, w(6)), None);
        assert_eq!(index_of(stale_0, w(1)), None);
        // Both first blocks stale: a window of 4 skips sequence 0's (keys 6..=9) but reads
        // sequence 1's (keys 1..=4); a window of 1 reads neither.
        let stale_both = &[7, 1, 2, 7, 3, 9];
        assert_eq!(index_of(stale_both, w(4)), Some(3));
        assert_eq!(index_of(stale_both, w(1)), None);
        // The padding entry past the context is never checked.
        assert_eq!(index_of(&[0, 1, 2, 0, 3, 7], None), None);
    }

    #[test]
    fn argument_errors_name_the_tensor() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 4, 1, 8), DType::F32, &dev).unwrap();
        let m = meta(&dev, &[0, 1], &[1], &[0, 0], 2);
        let q = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
        match check_attention_args(&q, &cache, &cache, &m, 1.0) {
            Ok(_) => {}
            Err(e) => panic!("valid arguments rejected: {e}"),
        }
        let q_bad = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        assert!(matches!(
            check_attention_args(&q_bad, &cache, &cache, &m, 1.0),
            Err(KernelError::Shape { tensor: "q", .. })
        ));
        let q_f16 = q.to_dtype(DType::F16).unwrap();
        assert!(matches!(
            check_attention_args(&q_f16, &cache, &cache, &m, 1.0),
            Err(KernelError::DType { tensor: "q", .. })
        ));
        assert!(matches!(
            check_attention_args(&q, &cache, &cache, &m, f32::NAN),
            Err(KernelError::Param { param: "scale", .. })
        ));
        let strided = Tensor::zeros((1, 8, 3), DType::F32, &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(matches!(
            check_attention_args(&strided, &cache, &cache, &m, 1.0),
            Err(KernelError::Layout { tensor: "q", .. })
        ));
    }

    #[test]
    fn baseline_and_avx2_kernels_agree() {
        // The integration tests run whatever this CPU detects; pin the portable path here.
        let dev = Device::Cpu;
        let (num_blocks, bs, hkv, d) = (6, 4, 2, 20);
        let kc = Tensor::randn(0f32, 1.0, (num_blocks, bs, hkv, d), &dev).unwrap();
        let vc = Tensor::randn(0f32, 1.0, (num_blocks, bs, hkv, d), &dev).unwrap();
        // A 5-token chunk over a 9-token context, then a decode over 7.
        let m = meta(&dev, &[0, 5, 6], &[9, 7], &[4, 0, 2, 1, 5, 3], 3);
        // 1, 3 and 4 query heads per KV head: every row count of the row-major kernels.
        for heads in [2, 6, 8] {
            let q = Tensor::randn(0f32, 1.0, (6, heads, d), &dev).unwrap();
            // f16/bf16 caches: the AVX2 kernel reads them in place (F16C), the baseline
            // converts rows; both compute in f32 and round the output once to the dtype.
            for_each_dtype(&q, &kc, &vc, |q, kc, vc, tolerance| {
                for window in [None, NonZeroUsize::new(1), NonZeroUsize::new(6)] {
                    baseline_and_avx2_agree_on(q, kc, vc, &m, window, tolerance);
                    avx512_equals_avx2(q, kc, vc, &m, window);
                }
            });
        }
    }

    /// Where the CPU has AVX-512: what it runs gives the AVX2 kernel's output bit for bit, so
    /// a row's output does not depend on which kernel its task took.
    fn avx512_equals_avx2(
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        m: &AttentionMetadata,
        window: Option<NonZeroUsize>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if matches!(Simd::detect(), Simd::Avx512) {
            let wide = run_attention(Simd::Avx512, q, kc, vc, m, window);
            let narrow = run_attention(Simd::Avx2Fma, q, kc, vc, m, window);
            for (i, (a, b)) in wide.iter().zip(&narrow).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{:?} {:?} {window:?} at {i}: {a} vs {b}",
                    q.dtype(),
                    q.dims()
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (q, kc, vc, m, window);
    }

    /// `f(q, kc, vc, tolerance)` with all three in f32, f16 and bf16, and the tolerance of the
    /// baseline comparison in that precision.
    fn for_each_dtype(
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        mut f: impl FnMut(&Tensor, &Tensor, &Tensor, f32),
    ) {
        for (dtype, tolerance) in [
            (DType::F32, 1e-5),
            (DType::F16, 2e-3),
            (DType::BF16, 1.6e-2),
        ] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            f(&cast(q), &cast(kc), &cast(vc), tolerance);
        }
    }

    #[test]
    fn many_row_tasks_agree_with_the_baseline() {
        // Shapes the AVX-512 many-row kernel takes (head_dim a multiple of 64, tasks of 8+ rows:
        // prefill chunks), next to a decode that stays on the row-major kernel, in blocks of 16
        // scattered over the cache; where the CPU has no AVX-512 this compares AVX2 again.
        if !matches!(Simd::detect(), Simd::Avx512) {
            eprintln!("many_row_tasks_agree_with_the_baseline: no AVX-512 here, AVX2 compared");
        }
        let dev = Device::Cpu;
        let (num_blocks, bs, hkv) = (8, 16, 2);
        // A 40-token chunk at the end of a 70-token context, a whole 9-token prompt, a decode,
        // and whole 5- and 15-token prompts: with 3 query heads per KV head, tasks of 10, 2, 1
        // and 3 chunks of 16 rows (every tile width of the many-row kernel's scores).
        let tables = [
            0, 3, 5, 7, 1, 2, 0, 0, 0, 0, 4, 6, 0, 0, 0, 3, 0, 0, 0, 0, 6, 0, 0, 0, 0,
        ];
        let m = meta(
            &dev,
            &[0, 40, 49, 50, 55, 70],
            &[70, 9, 20, 5, 15],
            &tables,
            5,
        );
        for d in [64, 128] {
            let kc = Tensor::randn(0f32, 1.0, (num_blocks, bs, hkv, d), &dev).unwrap();
            let vc = Tensor::randn(0f32, 1.0, (num_blocks, bs, hkv, d), &dev).unwrap();
            let q = Tensor::randn(0f32, 1.0, (70, 6, d), &dev).unwrap();
            for_each_dtype(&q, &kc, &vc, |q, kc, vc, tolerance| {
                baseline_and_avx2_agree_on(q, kc, vc, &m, None, tolerance);
                // A row's output must not depend on which kernel its task took (the engine's
                // outputs must not depend on how a step's rows were split into tasks), so the
                // many-row kernel matches the row-major AVX2 kernel bit for bit.
                avx512_equals_avx2(q, kc, vc, &m, None);
            });
        }
    }

    /// The attention output, as f32, computed with `simd`.
    fn run_attention(
        simd: Simd,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        m: &AttentionMetadata,
        window: Option<NonZeroUsize>,
    ) -> Vec<f32> {
        let dims = check_attention_args(q, kc, vc, m, 0.2).unwrap();
        let op = PagedAttentionOp {
            block_tables: m.block_tables.clone(),
            context_lens: m.context_lens.clone(),
            cu_seqlens_q: m.cu_seqlens_q.clone(),
            max_seqlen_q: m.max_seqlen_q,
            max_context_len: m.max_context_len,
            scale: 0.2,
            window,
            dims,
            simd,
        };
        q.apply_op3_no_bwd(kc, vc, &op)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn baseline_and_avx2_agree_on(
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        m: &AttentionMetadata,
        window: Option<NonZeroUsize>,
        tolerance: f32,
    ) {
        let run = |simd| run_attention(simd, q, kc, vc, m, window);
        let (base, detected) = (run(Simd::Baseline), run(Simd::detect()));
        let diff = base
            .iter()
            .zip(&detected)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(
            diff < tolerance,
            "{:?} {window:?}: max diff {diff}",
            q.dtype()
        );
    }

    #[test]
    fn gqa_needs_a_whole_number_of_query_heads_per_kv_head() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 4, 2, 8), DType::F32, &dev).unwrap();
        let m = meta(&dev, &[0, 1], &[1], &[0, 0], 2);
        let q = Tensor::zeros((1, 3, 8), DType::F32, &dev).unwrap();
        assert!(matches!(
            check_attention_args(&q, &cache, &cache, &m, 1.0),
            Err(KernelError::Shape { tensor: "q", .. })
        ));
    }

    #[test]
    fn write_then_attend_single_token_returns_its_value() {
        // One key: the softmax weight is 1, so the output is exactly v (for every GQA head).
        let dev = Device::Cpu;
        let kc = Tensor::zeros((3, 4, 1, 8), DType::F32, &dev).unwrap();
        let vc = kc.zeros_like().unwrap();
        let k = Tensor::ones((1, 1, 8), DType::F32, &dev).unwrap();
        let v = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((1, 1, 8))
            .unwrap();
        let slots = Tensor::from_slice(&[8u32], 1, &dev).unwrap();
        write_kv(&k, &v, &kc, &vc, &slots).unwrap();
        let m = meta(&dev, &[0, 1], &[1], &[2, 0], 2);
        let q = Tensor::ones((1, 2, 8), DType::F32, &dev).unwrap();
        let out = paged_attention(&q, &kc, &vc, &m, 0.125).unwrap();
        let want: Vec<f32> = (0..8).chain(0..8).map(|x| x as f32).collect();
        assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }

    /// `round_f32` goes through `half`'s vectorized slice conversions; it must give the bits
    /// of one element at a time (ties, subnormals, overflow, infinities, NaN; lengths that
    /// leave a partial chunk of the stack buffer and of the 8-wide conversion). One element at a
    /// time is candle's scalar conversion from the f64 of the value (exact, so one rounding).
    fn round_matches_scalar<T: KvElem>() {
        let mut values: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            6e-8,
            3e-8,
            1e-40,
            // Ties: halfway between two f16 (1 + 2^-11, 1 + 3 * 2^-11) and two bf16 values.
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
        ];
        values.extend(
            (0..300).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.01371 + 1e-4 * i as f32),
        );
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 129, values.len()] {
            let mut got = values[..len].to_vec();
            T::round_f32(&mut got);
            for (&x, &g) in values[..len].iter().zip(&got) {
                let want = T::from_f64(f64::from(x)).to_f64() as f32;
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{} rounds {x:e} to {g:e}, one at a time {want:e}",
                    std::any::type_name::<T>()
                );
            }
        }
    }

    #[test]
    fn rounding_to_half_precision_matches_one_element_at_a_time() {
        round_matches_scalar::<half::f16>();
        round_matches_scalar::<half::bf16>();
    }
}
