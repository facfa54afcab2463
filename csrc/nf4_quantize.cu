// NF4 blockwise quantisation, bit-exact with bitsandbytes' CUDA quantize_4bit(quant_type="nf4").
//
// bitsandbytes (built with --use_fast_math) computes, per block of `blocksize` flat elements:
//   absmax = max |x|                       (abs.ftz / max.ftz over the valid elements)
//   inv    = 1 / absmax                     (rcp.approx.ftz.f32: the fast-math reciprocal)
//   q      = nf4(x * inv)                   (mul.ftz, then a threshold tree on the midpoints
//                                            of adjacent NF4 codes with strict '>' tests)
// and packs element 2i in the high nibble of byte i, 2i+1 in the low nibble.  A padded odd
// tail element is 0 (so it quantises like 0 * inv).  An all-zero block gives inv = inf and
// 0 * inf = NaN, for which every '>' test fails: code 0 (and absmax 0).
//
// The same arithmetic is written here with explicit PTX so the result does not depend on
// this file's own compile flags (fast math or not).  The tree equals "number of midpoints
// strictly below v" for every v (NaN included: 0), which is what nf4_code() computes.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

#include "lora_fast_kernels.h"

namespace lora_fast {
namespace {

__device__ __forceinline__ float load_f32(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_f32(const float* p, int64_t i) { return p[i]; }

__device__ __forceinline__ float abs_ftz(float v) {
  float r;
  asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float max_ftz(float a, float b) {
  float r;
  asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float rcp_approx_ftz(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float mul_ftz(float a, float b) {
  float r;
  asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Midpoints between adjacent NF4 codes, as the fp32 literals bitsandbytes compares against.
__device__ __forceinline__ uint32_t nf4_code(float v) {
  uint32_t c = 0;
  c += (v > -0.8480964004993439f);
  c += (v > -0.6106329262256622f);
  c += (v > -0.4599952697753906f);
  c += (v > -0.33967943489551544f);
  c += (v > -0.23460740596055984f);
  c += (v > -0.13791173323988914f);
  c += (v > -0.045525018125772476f);
  c += (v > 0.03979014977812767f);
  c += (v > 0.1202552504837513f);
  c += (v > 0.2035212516784668f);
  c += (v > 0.2920137718319893f);
  c += (v > 0.3893125355243683f);
  c += (v > 0.5016634166240692f);
  c += (v > 0.6427869200706482f);
  c += (v > 0.8614784181118011f);
  return c;
}

// One CUDA block per quantisation block.
template <typename T>
__global__ void __launch_bounds__(256)
nf4_quantize_kernel(const T* __restrict__ A, int64_t n, int bs, uint8_t* __restrict__ out,
                    float* __restrict__ absmax) {
  __shared__ float warp_max[8];
  __shared__ float s_inv;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * bs;
  const int64_t rem = n - start;
  const int valid = rem < bs ? static_cast<int>(rem) : bs;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;

  float amax = 0.f;
  for (int i = threadIdx.x; i < valid; i += blockDim.x) amax = max_ftz(amax, abs_ftz(load_f32(A, start + i)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = max_ftz(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();
  if (threadIdx.x == 0) {
    float m = warp_max[0];
    for (int w = 1; w < nwarps; ++w) m = max_ftz(m, warp_max[w]);
    absmax[blockIdx.x] = m;
    s_inv = rcp_approx_ftz(m);
  }
  __syncthreads();
  const float inv = s_inv;
  const int nbytes = (valid + 1) >> 1;
  uint8_t* o = out + (start >> 1);
  for (int b = threadIdx.x; b < nbytes; b += blockDim.x) {
    const int i0 = 2 * b;
    const float v0 = load_f32(A, start + i0);
    const float v1 = (i0 + 1 < valid) ? load_f32(A, start + i0 + 1) : 0.f;
    const uint32_t hi = nf4_code(mul_ftz(v0, inv));
    const uint32_t lo = nf4_code(mul_ftz(v1, inv));
    o[b] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

template <typename T>
cudaError_t launch_quantize(const T* W, int64_t n, int bs, uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + bs - 1) / bs;
  int threads = bs / 2;
  if (threads < 32) threads = 32;
  if (threads > 256) threads = 256;
  nf4_quantize_kernel<T><<<static_cast<unsigned int>(nblocks), threads, 0, stream>>>(W, n, bs, packed, absmax);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nf4_quantize(const void* W, int dtype, int64_t n, int blocksize, uint8_t* packed, float* absmax,
                         cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (blocksize < 2 || (blocksize & (blocksize - 1)) != 0) return cudaErrorInvalidValue;
  if ((n + blocksize - 1) / blocksize > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat16:
      return launch_quantize(static_cast<const __half*>(W), n, blocksize, packed, absmax, stream);
    case kBFloat16:
      return launch_quantize(static_cast<const __nv_bfloat16*>(W), n, blocksize, packed, absmax, stream);
    case kFloat32:
      return launch_quantize(static_cast<const float*>(W), n, blocksize, packed, absmax, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace lora_fast
