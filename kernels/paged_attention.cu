// Paged KV-cache write and paged attention over a flattened variable-length batch.
//
// Layouts (all row-major, element strides):
//   q           [T, num_heads, head_dim]         token and head strides passed in, dim stride 1
//   key/value   [num_blocks, block_size, num_kv_heads, head_dim]   contiguous
//   block_tables[B, max_blocks_per_seq] u32, context_lens [B] u32, cu_seqlens_q [B+1] u32
//   out         [T, num_heads, head_dim]         contiguous
//
// Sequence b owns query tokens cu[b]..cu[b+1]; its query j sits at absolute position
// p = context_len - n_q + j and attends to keys 0..=p (causal). Decode is n_q == 1, prefill
// n_q == context_len, chunked prefill anything between.
//
// Sliding window (the paged_attention_swa_* kernels, window > 0): query p attends to keys
// max(0, p - window + 1)..=p only, as llama.cpp's SWA mask. A cta starts its keys at the
// window of its first row's token and never reads a block-table entry (nor a cache slot)
// before it: the engine frees and reuses the blocks that have left the window of every query
// of a sequence, so those entries may be stale. The window code is a template parameter, so
// the plain kernels are compiled without it (it costs registers: 154 -> 167 for f16/d128,
// 128 -> 145 for f32/d64, one cta less per multiprocessor there).
//
// One cta handles one (sequence, kv head) and a tile of ROWS "rows", a row being one
// (query token, query head) pair among the heads that share the kv head (GQA); local row
// r * WARPS + w belongs to warp w, so a decode step's few rows land on different warps:
//
//   row = j * group + hg        j: query token of the sequence, hg: head within the group
//
// so every key/value chunk a cta loads from the cache is reused by all the query heads of
// its group and, in prefill, by ROWS / group query tokens. When that grid is too small to
// fill the GPU (decode of few sequences over long contexts), the key range is also split
// over ctas (flash-decoding) and combine_splits merges their partial softmax results.
//
// Each lane of a warp scores one key of a 32-key chunk (the q row is broadcast from shared
// memory); the softmax is online (running max and sum per row, flash-attention style), and
// each lane accumulates head_dim / 32 output dimensions in registers.
#include "common.cuh"

using namespace candela;

namespace {

constexpr int WARPS = 4;
constexpr int ROWS_PER_WARP = 4;
constexpr int ROWS = WARPS * ROWS_PER_WARP;
constexpr int KEYS = 32;

// Block-table index and in-block offset of a key position: a shift and a mask when
// block_size is a power of two (bs_shift >= 0, the usual 16), one 32-bit division otherwise.
__device__ __forceinline__ void key_slot(uint32_t key, int block_size, int bs_shift, uint32_t& idx,
                                         uint32_t& off) {
  if (bs_shift >= 0) {
    idx = key >> bs_shift;
    off = key & (uint32_t)(block_size - 1);
  } else {
    idx = key / (uint32_t)block_size;
    off = key - idx * (uint32_t)block_size;
  }
}

__device__ __forceinline__ int block_shift(int block_size) {
  return (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
}

// Moves one chunk of KEYS keys' K and V rows from the paged cache into shared memory (as
// f32) in two steps: `issue` starts 16-byte loads into registers (one block-table lookup per
// load), `commit` converts and stores them. The main loop issues chunk c + 1 before it
// computes on chunk c, so the cache reads overlap the arithmetic. Requires head_dim to be a
// multiple of 16 / sizeof(T) and 16-byte aligned caches (the launcher's `vec` check).
template <typename T, int DMAX>
struct ChunkLoader {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int LOADS = (KEYS * DMAX / VEC + WARPS * 32 - 1) / (WARPS * 32);
  uint4 k[LOADS], v[LOADS];

  __device__ __forceinline__ void issue(const T* __restrict__ key_cache,
                                        const T* __restrict__ value_cache,
                                        const uint32_t* __restrict__ table, int64_t c0,
                                        int64_t key_end, int D, int block_size,
                                        int num_kv_heads, int g, uint32_t num_blocks) {
    const int segs = D / VEC;
    const int bs_shift = block_shift(block_size);
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = threadIdx.x + i * WARPS * 32;
      const int kk = idx / segs, seg = idx - (idx / segs) * segs;
      const int64_t key = c0 + kk;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
      if (kk < KEYS && key < key_end) {
        uint32_t bi, bo;
        key_slot((uint32_t)key, block_size, bs_shift, bi, bo);
        const uint32_t blk = table[bi];
        if (blk < num_blocks) {
          const int64_t off =
              (((int64_t)blk * block_size + bo) * num_kv_heads + g) * D + seg * VEC;
          kv = __ldg(reinterpret_cast<const uint4*>(key_cache + off));
          vv = __ldg(reinterpret_cast<const uint4*>(value_cache + off));
        }
      }
      k[i] = kv;
      v[i] = vv;
    }
  }

  __device__ __forceinline__ void commit(float* ks, float* vs, int D, int DP) const {
    const int segs = D / VEC;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int idx = threadIdx.x + i * WARPS * 32;
      const int kk = idx / segs, seg = idx - (idx / segs) * segs;
      if (kk >= KEYS) continue;
      const T* ke = reinterpret_cast<const T*>(&k[i]);
      const T* ve = reinterpret_cast<const T*>(&v[i]);
      float* kd = ks + kk * DP + seg * VEC;
      float* vd = vs + kk * DP + seg * VEC;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        kd[e] = to_f32(ke[e]);
        vd[e] = to_f32(ve[e]);
      }
    }
  }
};

template <typename T, int DPL, bool WINDOWED>
__device__ void paged_attention_impl(const T* __restrict__ q, int64_t q_stride_t,
                                     int64_t q_stride_h, const T* __restrict__ key_cache,
                                     const T* __restrict__ value_cache,
                                     const uint32_t* __restrict__ block_tables,
                                     const uint32_t* __restrict__ context_lens,
                                     const uint32_t* __restrict__ cu_seqlens_q,
                                     T* __restrict__ out, int num_tokens, int num_heads,
                                     int num_kv_heads, int head_dim, int block_size,
                                     int max_blocks_per_seq, uint32_t num_blocks, float scale,
                                     uint32_t window, int num_splits, int keys_per_split,
                                     float* __restrict__ part_acc, float* __restrict__ part_ml) {
  extern __shared__ float smem[];
  const int D = head_dim;
  const int DP = D + 1;  // padded row: lane-per-key reads of ks hit distinct banks
  float* qs = smem;            // [ROWS][D], pre-scaled
  float* ks = qs + ROWS * D;   // [KEYS][DP]
  float* vs = ks + KEYS * DP;  // [KEYS][DP]

  const int b = blockIdx.z;
  const int g = blockIdx.y;
  const int group = num_heads / num_kv_heads;
  const uint32_t q_begin = cu_seqlens_q[b];
  // Rows past the flat batch (only on inconsistent metadata) are dropped, never read.
  const int64_t q_end = min((int64_t)cu_seqlens_q[b + 1], (int64_t)num_tokens);
  const int n_q = q_end > (int64_t)q_begin ? (int)(q_end - q_begin) : 0;
  const int64_t ctx = context_lens[b];
  const int rows_total = n_q * group;
  const int split = blockIdx.x % num_splits;
  const int row0 = (blockIdx.x / num_splits) * ROWS;
  if (row0 >= rows_total) return;

  const int64_t first_pos = ctx - n_q;  // absolute position of query 0 (negative: bad input)
  const int last_row = min(row0 + ROWS, rows_total) - 1;
  int64_t key_end = first_pos + last_row / group + 1;
  if (key_end > ctx) key_end = ctx;
  const int64_t max_keys = (int64_t)max_blocks_per_seq * block_size;
  if (key_end > max_keys) key_end = max_keys;
  // First key of the cta: the window's start for its first (lowest-position) row, so the
  // keys, and the block-table entries, before every row's window are never touched.
  int64_t key_begin = 0;
  if (WINDOWED && window > 0) {
    key_begin = first_pos + row0 / group + 1 - (int64_t)window;
    if (key_begin < 0) key_begin = 0;
  }

  for (int i = threadIdx.x; i < ROWS * D; i += blockDim.x) {
    const int r = i / D, d = i - (i / D) * D;
    const int row = row0 + r;
    float v = 0.f;
    if (row < rows_total) {
      const int j = row / group;
      const int h = g * group + (row - j * group);
      v = to_f32(q[(int64_t)(q_begin + j) * q_stride_t + (int64_t)h * q_stride_h + d]) * scale;
    }
    qs[i] = v;
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DPL];
  int64_t pos[ROWS_PER_WARP];  // last key each row may see; -1: inactive row
  int64_t lo[ROWS_PER_WARP];   // first key each row may see (WINDOWED only)
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
    const int row = row0 + r * WARPS + warp;
    pos[r] = row < rows_total ? first_pos + row / group : -1;
    lo[r] = WINDOWED && window > 0 ? pos[r] + 1 - (int64_t)window : 0;
    if (lo[r] < 0) lo[r] = 0;
    if (pos[r] >= key_end) pos[r] = key_end - 1;
    // A window past the clamped position (only on inconsistent metadata): no key, inactive.
    if (WINDOWED && lo[r] > pos[r]) pos[r] = -1;
  }

  const uint32_t* table = block_tables + (int64_t)b * max_blocks_per_seq;
  // This cta's share of the keys (flash-decoding split; the whole range when num_splits == 1).
  // The launcher sizes splits to cover key_begin..key_end of every cta.
  const int64_t split_begin = key_begin + (int64_t)split * keys_per_split;
  if (key_end > split_begin + keys_per_split) key_end = split_begin + keys_per_split;
  ChunkLoader<T, 32 * DPL> loader;
  const bool vec = D % ChunkLoader<T, 32 * DPL>::VEC == 0 &&
                   reinterpret_cast<uintptr_t>(key_cache) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(value_cache) % 16 == 0;
  if (vec && split_begin < key_end)
    loader.issue(key_cache, value_cache, table, split_begin, key_end, D, block_size, num_kv_heads,
                 g, num_blocks);
  for (int64_t c0 = split_begin; c0 < key_end; c0 += KEYS) {
    __syncthreads();  // qs written / previous chunk consumed
    if (vec) {
      loader.commit(ks, vs, D, DP);
      __syncthreads();
      if (c0 + KEYS < key_end)
        loader.issue(key_cache, value_cache, table, c0 + KEYS, key_end, D, block_size,
                     num_kv_heads, g, num_blocks);
    } else {
    for (int i = threadIdx.x; i < KEYS * D; i += blockDim.x) {
      const int kk = i / D, d = i - (i / D) * D;
      const int64_t key = c0 + kk;
      float kv = 0.f, vv = 0.f;
      if (key < key_end) {
        uint32_t bi, bo;
        key_slot((uint32_t)key, block_size, block_shift(block_size), bi, bo);
        const uint32_t blk = table[bi];
        if (blk < num_blocks) {
          const int64_t off = (((int64_t)blk * block_size + bo) * num_kv_heads + g) * D + d;
          kv = to_f32(key_cache[off]);
          vv = to_f32(value_cache[off]);
        }
      }
      ks[kk * DP + d] = kv;
      vs[kk * DP + d] = vv;
    }
    __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
      // Warp-uniform: inactive row, chunk past its causal limit or wholly before its window.
      // Any chunk left holds a key the row sees, so m_new below is finite.
      if (pos[r] < c0 || (WINDOWED && lo[r] >= c0 + KEYS)) continue;
      const float* qrow = qs + (r * WARPS + warp) * D;
      const int64_t key = c0 + lane;
      // (Spelled out twice, not held in a bool: that cost the plain f32/d128 kernel 4
      // registers.)
      float s = -INFINITY;
      if ((!WINDOWED || key >= lo[r]) && key <= pos[r]) {
        const float* krow = ks + lane * DP;
        float dot = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) dot = fmaf(qrow[d], krow[d], dot);
        s = dot;
      }
      const float m_new = fmaxf(m[r], warp_max(s));
      const float alpha = expf(m[r] - m_new);
      const float p = (!WINDOWED || key >= lo[r]) && key <= pos[r] ? expf(s - m_new) : 0.f;
      l[r] = l[r] * alpha + warp_sum(p);
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= alpha;
      for (int kk = 0; kk < KEYS; ++kk) {
        const float pk = __shfl_sync(0xffffffffu, p, kk);
        const float* vrow = vs + kk * DP;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const int d = lane + 32 * i;
          if (d < D) acc[r][i] = fmaf(pk, vrow[d], acc[r][i]);
        }
      }
      m[r] = m_new;
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int row = row0 + r * WARPS + warp;
    if (row >= rows_total) continue;
    const int j = row / group;
    const int h = g * group + (row - j * group);
    const int64_t tok_head = (int64_t)(q_begin + j) * num_heads + h;
    if (num_splits > 1) {
      // Unnormalised partial result; combine_splits merges the splits.
      const int64_t part = (int64_t)split * num_tokens * num_heads + tok_head;
      float* prow = part_acc + part * D;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) prow[d] = acc[r][i];
      }
      if (lane == 0) {
        part_ml[2 * part] = m[r];
        part_ml[2 * part + 1] = l[r];
      }
      continue;
    }
    // A row that saw no key (only on inconsistent metadata) writes zeros, never NaN.
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = out + tok_head * D;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) orow[d] = from_f32<T>(acc[r][i] * inv);
    }
  }
}

// Merges the num_splits partial results of each (token, head): one cta per pair.
template <typename T>
__device__ void combine_splits_impl(const float* __restrict__ part_acc,
                                    const float* __restrict__ part_ml, T* __restrict__ out,
                                    int num_tokens, int num_heads, int head_dim,
                                    int num_splits) {
  const int64_t tok_head = blockIdx.x;
  const int64_t stride = (int64_t)num_tokens * num_heads;
  float m_max = -INFINITY;
  for (int s = 0; s < num_splits; ++s) m_max = fmaxf(m_max, part_ml[2 * (s * stride + tok_head)]);
  float l_sum = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float ms = part_ml[2 * (s * stride + tok_head)];
    if (ms != -INFINITY) l_sum += part_ml[2 * (s * stride + tok_head) + 1] * expf(ms - m_max);
  }
  const float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float ms = part_ml[2 * (s * stride + tok_head)];
      if (ms != -INFINITY)
        acc += part_acc[(s * stride + tok_head) * head_dim + d] * expf(ms - m_max);
    }
    out[tok_head * head_dim + d] = from_f32<T>(acc * inv);
  }
}

// One cta per token; slots outside the cache are skipped (memory safety on bad input).
template <typename T>
__device__ void write_kv_impl(const T* __restrict__ src, int64_t stride_t, int64_t stride_h,
                              T* __restrict__ cache, const uint32_t* __restrict__ slot_mapping,
                              int num_kv_heads, int head_dim, uint64_t num_slots) {
  const int t = blockIdx.x;
  const uint64_t slot = slot_mapping[t];
  if (slot >= num_slots) return;
  const int n = num_kv_heads * head_dim;
  T* dst = cache + slot * (uint64_t)n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int h = i / head_dim, d = i - (i / head_dim) * head_dim;
    dst[i] = src[(int64_t)t * stride_t + (int64_t)h * stride_h + d];
  }
}

}  // namespace

// `window` is read by the _swa kernels only (the plain ones are launched with 0).
#define PAGED_ATTENTION(NAME, T, DPL, WINDOWED)                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                             \
      const T* q, int64_t q_stride_t, int64_t q_stride_h, const T* key_cache,                \
      const T* value_cache, const uint32_t* block_tables, const uint32_t* context_lens,      \
      const uint32_t* cu_seqlens_q, T* out, int num_tokens, int num_heads, int num_kv_heads, \
      int head_dim, int block_size, int max_blocks_per_seq, uint32_t num_blocks,             \
      float scale, uint32_t window, int num_splits, int keys_per_split, float* part_acc,     \
      float* part_ml) {                                                                      \
    paged_attention_impl<T, DPL, WINDOWED>(                                                  \
        q, q_stride_t, q_stride_h, key_cache, value_cache, block_tables, context_lens,       \
        cu_seqlens_q, out, num_tokens, num_heads, num_kv_heads, head_dim, block_size,        \
        max_blocks_per_seq, num_blocks, scale, window, num_splits, keys_per_split, part_acc, \
        part_ml);                                                                            \
  }

PAGED_ATTENTION(paged_attention_f32_64, float, 2, false)
PAGED_ATTENTION(paged_attention_f32_128, float, 4, false)
PAGED_ATTENTION(paged_attention_f32_256, float, 8, false)
PAGED_ATTENTION(paged_attention_f16_64, __half, 2, false)
PAGED_ATTENTION(paged_attention_f16_128, __half, 4, false)
PAGED_ATTENTION(paged_attention_f16_256, __half, 8, false)
PAGED_ATTENTION(paged_attention_bf16_64, __nv_bfloat16, 2, false)
PAGED_ATTENTION(paged_attention_bf16_128, __nv_bfloat16, 4, false)
PAGED_ATTENTION(paged_attention_bf16_256, __nv_bfloat16, 8, false)
PAGED_ATTENTION(paged_attention_swa_f32_64, float, 2, true)
PAGED_ATTENTION(paged_attention_swa_f32_128, float, 4, true)
PAGED_ATTENTION(paged_attention_swa_f32_256, float, 8, true)
PAGED_ATTENTION(paged_attention_swa_f16_64, __half, 2, true)
PAGED_ATTENTION(paged_attention_swa_f16_128, __half, 4, true)
PAGED_ATTENTION(paged_attention_swa_f16_256, __half, 8, true)
PAGED_ATTENTION(paged_attention_swa_bf16_64, __nv_bfloat16, 2, true)
PAGED_ATTENTION(paged_attention_swa_bf16_128, __nv_bfloat16, 4, true)
PAGED_ATTENTION(paged_attention_swa_bf16_256, __nv_bfloat16, 8, true)

#define WRITE_KV(NAME, T)                                                                    \
  extern "C" __global__ void NAME(const T* src, int64_t stride_t, int64_t stride_h, T* cache, \
                                  const uint32_t* slot_mapping, int num_kv_heads,            \
                                  int head_dim, uint64_t num_slots) {                        \
    write_kv_impl<T>(src, stride_t, stride_h, cache, slot_mapping, num_kv_heads, head_dim,  \
                     num_slots);                                                             \
  }

WRITE_KV(write_kv_f32, float)
WRITE_KV(write_kv_f16, __half)
WRITE_KV(write_kv_bf16, __nv_bfloat16)

#define COMBINE(NAME, T)                                                                     \
  extern "C" __global__ void NAME(const float* part_acc, const float* part_ml, T* out,       \
                                  int num_tokens, int num_heads, int head_dim,               \
                                  int num_splits) {                                          \
    combine_splits_impl<T>(part_acc, part_ml, out, num_tokens, num_heads, head_dim,          \
                           num_splits);                                                      \
  }

COMBINE(combine_splits_f32, float)
COMBINE(combine_splits_f16, __half)
COMBINE(combine_splits_bf16, __nv_bfloat16)
