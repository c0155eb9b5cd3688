// The residual add fused with the RMS norm after it (see crates/candela-kernels/src/norm.rs):
// out[0] = x + y, out[1] = rms_norm(x + y) * w, one cta per row. One launch instead of two
// is the point: at decode sizes a layer's small kernels cost their launches, not their bytes.
// The arithmetic follows the CPU op: the sum rounded to T, then in f32 s / sqrt(mean + eps) * w.
#include "common.cuh"

using namespace candela;

template <typename T>
__device__ __forceinline__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ y,
                                             const T* __restrict__ w, T* __restrict__ out,
                                             int rows, int h, float eps) {
  __shared__ float partial[32];
  const size_t row = blockIdx.x;
  const T* xr = x + row * h;
  const T* yr = y + row * h;
  T* sr = out + row * h;
  T* nr = out + (size_t)rows * h + row * h;
  float acc = 0.f;
  for (int c = threadIdx.x; c < h; c += blockDim.x) {
    const T s = from_f32<T>(to_f32(xr[c]) + to_f32(yr[c]));
    sr[c] = s;
    const float v = to_f32(s);
    acc += v * v;
  }
  acc = warp_sum(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  acc = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
  acc = warp_sum(acc);
  const float m = sqrtf(acc / (float)h + eps);
  // Each thread reads back only the sums it wrote itself: no barrier needed.
  for (int c = threadIdx.x; c < h; c += blockDim.x) {
    nr[c] = from_f32<T>(to_f32(sr[c]) / m * to_f32(w[c]));
  }
}

#define ADD_RMS_NORM(T, SUFFIX)                                                                \
  extern "C" __global__ void __launch_bounds__(1024)                                          \
      add_rms_norm_##SUFFIX(const T* x, const T* y, const T* w, T* out, int rows, int h,    \
                            float eps) {                                                      \
    add_rms_norm<T>(x, y, w, out, rows, h, eps);                                              \
  }

ADD_RMS_NORM(float, f32)
ADD_RMS_NORM(__half, f16)
ADD_RMS_NORM(__nv_bfloat16, bf16)
