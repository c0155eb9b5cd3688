// Fused elementwise ops of the decoder layer: rope of a fused QKV projection, and SwiGLU's
// silu(gate) * up. Each replaces several launches of a launch-bound decode step by one.
//
// Layouts (row-major, element strides):
//   qkv      [T, (H + 2 KVH) * D]   row stride passed in, element stride 1
//   cos, sin [T, D / 2]             contiguous, row t: token t's angles
//   out      [T, H + 2 KVH, D]      contiguous: q rotated, k rotated, v copied
//   gate_up  [T, 2 W]               row stride passed in, element stride 1
//   out      [T, W]                 contiguous
//
// Both compute in f32 with explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, ...):
// they forbid nvcc's contraction of a product and a sum into one fma, so the results are
// those of the CPU reference (crates/candela-kernels/src/fused.rs), which, like candle's CPU
// kernels, rounds every product.
#include "common.cuh"

using namespace candela;

namespace {

constexpr int STYLE_INTERLEAVED = 0;  // pairs (x[2i], x[2i + 1]): candle_nn's rope_i
constexpr int STYLE_HALF = 1;         // pairs (x[i], x[i + D/2]):  candle_nn's rope

// One cta per (token, head): blockIdx.x the token, blockIdx.y the head among the H + 2 KVH
// of the output. Each thread rotates pairs p, p + blockDim.x, ... of its head; v heads are
// copied element by element in their own dtype (no conversion).
template <typename T, int STYLE>
__device__ void rope_qkv_impl(const T* __restrict__ qkv, int64_t stride_t,
                              const T* __restrict__ cos, const T* __restrict__ sin,
                              T* __restrict__ out, int rotated_heads, int heads_total,
                              int head_dim) {
  const int64_t t = blockIdx.x;
  const int h = blockIdx.y;
  const int half = head_dim / 2;
  const T* x = qkv + t * stride_t + (int64_t)h * head_dim;
  T* y = out + (t * heads_total + h) * head_dim;
  if (h >= rotated_heads) {
    for (int i = threadIdx.x; i < head_dim; i += blockDim.x) y[i] = x[i];
    return;
  }
  const T* c_row = cos + t * half;
  const T* s_row = sin + t * half;
  for (int p = threadIdx.x; p < half; p += blockDim.x) {
    const int i0 = STYLE == STYLE_INTERLEAVED ? 2 * p : p;
    const int i1 = STYLE == STYLE_INTERLEAVED ? 2 * p + 1 : p + half;
    const float x0 = to_f32(x[i0]), x1 = to_f32(x[i1]);
    const float c = to_f32(c_row[p]), s = to_f32(s_row[p]);
    y[i0] = from_f32<T>(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)));
    y[i1] = from_f32<T>(__fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c)));
  }
}

constexpr int ACT_SILU = 0;       // silu(g) = g / (1 + exp(-g))
constexpr int ACT_GELU_TANH = 1;  // the tanh approximation of GELU (Gemma's GeGLU)

// Grid-stride loop over the n = T * W output elements. The row/column split is a 32-bit
// division when n fits in 32 bits (always, in practice), a 64-bit one otherwise.
template <typename T, int ACT>
__device__ void silu_mul_impl(const T* __restrict__ gate_up, int64_t stride_t,
                              T* __restrict__ out, int64_t n, int64_t width) {
  const int64_t step = (int64_t)gridDim.x * blockDim.x;
  const bool narrow = n <= (int64_t)UINT32_MAX;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    int64_t t, j;
    if (narrow) {
      const uint32_t tt = (uint32_t)i / (uint32_t)width;
      t = tt;
      j = (int64_t)((uint32_t)i - tt * (uint32_t)width);
    } else {
      t = i / width;
      j = i - t * width;
    }
    const T* row = gate_up + t * stride_t;
    const float g = to_f32(row[j]), u = to_f32(row[width + j]);
    // silu(g) * u = g / (1 + exp(-g)) * u, as candle's Silu then Mul. The tanh GELU is
    // g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3))), the CPU's form (src/fused.rs).
    float arg = -g;
    if (ACT == ACT_GELU_TANH) {
      const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, g), g), g);
      arg = __fmul_rn(-2.f * 0.7978846f, __fadd_rn(g, cube));
    }
    const float act = __fdiv_rn(g, __fadd_rn(1.f, expf(arg)));
    out[i] = from_f32<T>(__fmul_rn(act, u));
  }
}

}  // namespace

#define ROPE_QKV(NAME, T, STYLE)                                                          \
  extern "C" __global__ void NAME(const T* qkv, int64_t stride_t, const T* cos,           \
                                  const T* sin, T* out, int rotated_heads,                \
                                  int heads_total, int head_dim) {                        \
    rope_qkv_impl<T, STYLE>(qkv, stride_t, cos, sin, out, rotated_heads, heads_total,     \
                            head_dim);                                                    \
  }

ROPE_QKV(rope_qkv_interleaved_f32, float, STYLE_INTERLEAVED)
ROPE_QKV(rope_qkv_interleaved_f16, __half, STYLE_INTERLEAVED)
ROPE_QKV(rope_qkv_interleaved_bf16, __nv_bfloat16, STYLE_INTERLEAVED)
ROPE_QKV(rope_qkv_half_f32, float, STYLE_HALF)
ROPE_QKV(rope_qkv_half_f16, __half, STYLE_HALF)
ROPE_QKV(rope_qkv_half_bf16, __nv_bfloat16, STYLE_HALF)

#define SILU_MUL(NAME, T, ACT)                                                            \
  extern "C" __global__ void NAME(const T* gate_up, int64_t stride_t, T* out, int64_t n,  \
                                  int64_t width) {                                        \
    silu_mul_impl<T, ACT>(gate_up, stride_t, out, n, width);                              \
  }

SILU_MUL(silu_mul_f32, float, ACT_SILU)
SILU_MUL(silu_mul_f16, __half, ACT_SILU)
SILU_MUL(silu_mul_bf16, __nv_bfloat16, ACT_SILU)
SILU_MUL(gelu_tanh_mul_f32, float, ACT_GELU_TANH)
SILU_MUL(gelu_tanh_mul_f16, __half, ACT_GELU_TANH)
SILU_MUL(gelu_tanh_mul_bf16, __nv_bfloat16, ACT_GELU_TANH)
