// Dequantization and the fused dequantize + matrix-vector product of candela's packed
// int8 / int4 weights (`crates/candela-kernels/src/quant/pack.rs`), read in place: the GPU
// holds the very bytes the CPU kernels use.
//
// Packed layout (n output columns, k inputs, group size G, 16 columns per tile):
//
//   tile t:  [ block g=0 ][ block g=1 ] ... [ block g=k/G-1 ]        tile_bytes = groups * block_bytes
//   block:   [ codes: code_bytes ][ 16 x f16 d ][ 16 x f16 m ]      w = q * d + m
//   codes:   chunks of 64 bytes = 16 columns x 4 bytes
//     int8:  chunk c, column j, byte b = code of w[j, gG + 4c + b]
//     int4:  chunk c, column j, byte b = w[j, gG + 8c + b] (low nibble) | w[j, gG + 8c + 4 + b] << 4
//
// A thread reads one 16-byte "unit" at a time: unit u of a block is chunk u / 4, columns
// 4 (u % 4) .. 4 (u % 4) + 3, so a warp's loads are contiguous, and a thread whose stride
// over units is a multiple of 4 always serves the same 4 columns (its accumulators stay in
// registers). A group's contribution to y[r, j] is d_j * sum(x q) + m_j * sum(x).
#include "common.cuh"

using namespace candela;

namespace {

constexpr int TILE_COLS = 16;
constexpr int GEMV_THREADS = 256;
constexpr int GEMV_ROWS_MAX = 8;

// RUN consecutive activations as f32; one or two 16-byte loads when `aligned` (x's rows start
// 16-byte aligned: k is a multiple of 32 and the launcher checks the base).
template <typename T, int RUN>
__device__ __forceinline__ void load_x(const T* __restrict__ x, bool aligned, float* out) {
  constexpr int BYTES = RUN * sizeof(T);
  if (aligned && BYTES % 8 == 0) {
    constexpr int WORDS = BYTES / 8;  // 8-byte words: 1..4
    uint2 w[WORDS];
#pragma unroll
    for (int i = 0; i < WORDS; ++i) w[i] = __ldg(reinterpret_cast<const uint2*>(x) + i);
    const T* e = reinterpret_cast<const T*>(w);
#pragma unroll
    for (int i = 0; i < RUN; ++i) out[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < RUN; ++i) out[i] = to_f32(x[i]);
  }
}

// The value of code byte `b` of `word` for input `i` of the unit's run (8 inputs for int4,
// 4 for int8).
template <bool INT4>
__device__ __forceinline__ float code_at(uint32_t word, int i) {
  if (INT4) return (float)((word >> (8 * (i & 3) + 4 * (i >> 2))) & 0xFu);
  return (float)((word >> (8 * i)) & 0xFFu);
}

__device__ __forceinline__ void load_dm(const uint8_t* block, int code_bytes, int quad, float* d,
                                        float* m) {
  const uint2 dv = *reinterpret_cast<const uint2*>(block + code_bytes + 8 * quad);
  const uint2 mv = *reinterpret_cast<const uint2*>(block + code_bytes + 32 + 8 * quad);
  const __half* dh = reinterpret_cast<const __half*>(&dv);
  const __half* mh = reinterpret_cast<const __half*>(&mv);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    d[i] = __half2float(dh[i]);
    m[i] = __half2float(mh[i]);
  }
}

// y[r, :] = x[r, :] W^T for r < m <= GEMV_ROWS_MAX. One cta per 16-column tile.
template <typename T, bool INT4>
__device__ void gemv_impl(const uint8_t* __restrict__ w, const T* __restrict__ x,
                          T* __restrict__ y, int m, int n, int k, int group_size,
                          int code_bytes, int block_bytes, int64_t tile_bytes) {
  constexpr int RUN = INT4 ? 8 : 4;  // inputs per unit and column
  const int tile = blockIdx.x;
  const int units_per_block = code_bytes / 16;
  const int groups = k / group_size;
  const int total_units = groups * units_per_block;
  const int quad = threadIdx.x & 3;
  const uint8_t* tile_base = w + tile * tile_bytes;

  float acc[GEMV_ROWS_MAX][4];
#pragma unroll
  for (int r = 0; r < GEMV_ROWS_MAX; ++r)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[r][i] = 0.f;

  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0;
  // UNROLL units per thread per step, all loads issued before any arithmetic, so each thread
  // keeps UNROLL 16-byte weight loads in flight.
  constexpr int UNROLL = 4;
  for (int base = threadIdx.x; base < total_units; base += UNROLL * GEMV_THREADS) {
    uint4 codes[UNROLL];
    uint2 dv[UNROLL], mv[UNROLL];
#pragma unroll
    for (int s = 0; s < UNROLL; ++s) {
      const int unit = base + s * GEMV_THREADS;
      if (unit < total_units) {
        const int g = unit / units_per_block;
        const int u = unit - g * units_per_block;
        const uint8_t* block = tile_base + (int64_t)g * block_bytes;
        codes[s] = __ldg(reinterpret_cast<const uint4*>(block + 16 * u));
        dv[s] = __ldg(reinterpret_cast<const uint2*>(block + code_bytes + 8 * quad));
        mv[s] = __ldg(reinterpret_cast<const uint2*>(block + code_bytes + 32 + 8 * quad));
      }
    }
#pragma unroll
    for (int s = 0; s < UNROLL; ++s) {
    const int unit = base + s * GEMV_THREADS;
    if (unit >= total_units) break;
    const int g = unit / units_per_block;
    const int u = unit - g * units_per_block;
    float d[4], mn[4];
    {
      const __half* dh = reinterpret_cast<const __half*>(&dv[s]);
      const __half* mh = reinterpret_cast<const __half*>(&mv[s]);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        d[i] = __half2float(dh[i]);
        mn[i] = __half2float(mh[i]);
      }
    }
    const int k0 = g * group_size + RUN * (u >> 2);
    const uint32_t words[4] = {codes[s].x, codes[s].y, codes[s].z, codes[s].w};
#pragma unroll
    for (int r = 0; r < GEMV_ROWS_MAX; ++r) {
      if (r >= m) break;
      float xs[RUN];
      load_x<T, RUN>(x + (int64_t)r * k + k0, aligned, xs);
      float xsum = 0.f;
#pragma unroll
      for (int i = 0; i < RUN; ++i) xsum += xs[i];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < RUN; ++i) dot = fmaf(xs[i], code_at<INT4>(words[c], i), dot);
        acc[r][c] = fmaf(d[c], dot, fmaf(mn[c], xsum, acc[r][c]));
      }
    }
    }
  }

  // Lanes with equal lane % 4 serve the same columns: fold them, then fold the warps.
  __shared__ float red[GEMV_THREADS / 32][GEMV_ROWS_MAX][TILE_COLS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < GEMV_ROWS_MAX; ++r) {
    if (r >= m) break;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float v = acc[r][c];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 4) red[warp][r][4 * lane + c] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < m * TILE_COLS; i += GEMV_THREADS) {
    const int r = i / TILE_COLS, c = i % TILE_COLS;
    float s = 0.f;
#pragma unroll
    for (int wi = 0; wi < GEMV_THREADS / 32; ++wi) s += red[wi][r][c];
    const int col = tile * TILE_COLS + c;
    if (col < n) y[(int64_t)r * n + col] = from_f32<T>(s);
  }
}

// out[n, k] row-major = q * d + m, one thread per 16-byte unit. The multiply and the add are
// rounded separately (no fma), as in the CPU `dequantize`, so f32 output is bit-exact.
template <typename T, bool INT4>
__device__ void dequantize_impl(const uint8_t* __restrict__ w, T* __restrict__ out, int n, int k,
                                int group_size, int code_bytes, int block_bytes,
                                int64_t tile_bytes, int64_t total_units) {
  constexpr int RUN = INT4 ? 8 : 4;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total_units) return;
  const int units_per_block = code_bytes / 16;
  const int groups = k / group_size;
  const int64_t units_per_tile = (int64_t)groups * units_per_block;
  const int tile = (int)(idx / units_per_tile);
  const int rem = (int)(idx - tile * units_per_tile);
  const int g = rem / units_per_block;
  const int u = rem - g * units_per_block;
  const uint8_t* block = w + tile * tile_bytes + (int64_t)g * block_bytes;
  const uint4 codes = *reinterpret_cast<const uint4*>(block + 16 * u);
  const int quad = u & 3;
  float d[4], mn[4];
  load_dm(block, code_bytes, quad, d, mn);
  const int k0 = g * group_size + RUN * (u >> 2);
  const uint32_t words[4] = {codes.x, codes.y, codes.z, codes.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int col = tile * TILE_COLS + 4 * quad + c;
    if (col >= n) continue;
    T* row = out + (int64_t)col * k + k0;
#pragma unroll
    for (int i = 0; i < RUN; ++i)
      row[i] = from_f32<T>(__fadd_rn(__fmul_rn(code_at<INT4>(words[c], i), d[c]), mn[c]));
  }
}

}  // namespace

#define QUANT_KERNELS(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                  \
      gemv_int4_##SUFFIX(const uint8_t* w, const T* x, T* y, int m, int n, int k, int gs,     \
                         int code_bytes, int block_bytes, int64_t tile_bytes) {               \
    gemv_impl<T, true>(w, x, y, m, n, k, gs, code_bytes, block_bytes, tile_bytes);            \
  }                                                                                           \
  extern "C" __global__ void __launch_bounds__(GEMV_THREADS)                                  \
      gemv_int8_##SUFFIX(const uint8_t* w, const T* x, T* y, int m, int n, int k, int gs,     \
                         int code_bytes, int block_bytes, int64_t tile_bytes) {               \
    gemv_impl<T, false>(w, x, y, m, n, k, gs, code_bytes, block_bytes, tile_bytes);           \
  }                                                                                           \
  extern "C" __global__ void dequantize_int4_##SUFFIX(const uint8_t* w, T* out, int n, int k, \
                                                      int gs, int code_bytes,                 \
                                                      int block_bytes, int64_t tile_bytes,    \
                                                      int64_t total_units) {                  \
    dequantize_impl<T, true>(w, out, n, k, gs, code_bytes, block_bytes, tile_bytes,           \
                             total_units);                                                    \
  }                                                                                           \
  extern "C" __global__ void dequantize_int8_##SUFFIX(const uint8_t* w, T* out, int n, int k, \
                                                      int gs, int code_bytes,                 \
                                                      int block_bytes, int64_t tile_bytes,    \
                                                      int64_t total_units) {                  \
    dequantize_impl<T, false>(w, out, n, k, gs, code_bytes, block_bytes, tile_bytes,          \
                              total_units);                                                   \
  }

QUANT_KERNELS(f32, float)
QUANT_KERNELS(f16, __half)
QUANT_KERNELS(bf16, __nv_bfloat16)
