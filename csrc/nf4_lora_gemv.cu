// Fused NF4 + LoRA GEMV for small M (1..64): the memory-bound decode regime.
//
//   kernel 1  lora_xa_kernel         xa[M, r] = X · round_act(A)ᵀ            (fp32)
//   kernel 2  nf4_lora_mma_kernel    Y = X · deq(W0)ᵀ + bias + s · xa · round_act(B)ᵀ
//             (or nf4_lora_scalar_kernel when K % 32 != 0 / unaligned rows)
//
// Kernel 2 is launched with programmatic dependent launch (PDL) on sm_90+: kernel 1 lets it
// start at once (griddepcontrol.launch_dependents), kernel 2 streams the whole NF4 weight and
// only waits (griddepcontrol.wait) before its epilogue reads xa.  So the small xa GEMV hides
// under the weight stream and Y is written once.  Without PDL (sm_80/86, or
// LORA_FAST_NO_PDL=1) the launches serialise as usual and the result is the same.
//
// Tensor-core GEMV (kernel 2, K % 32 == 0).  Yᵀ = W0 · Xᵀ is computed with
// mma.sync.m16n8k16 (fp32 accumulate): the MMA "A" operand is a 16-row tile of W0 dequantised
// in registers, "B" is Xᵀ (8 activation rows per MMA n-tile, so M = 1..8 costs one n-tile).
// A block owns 16 output rows; its 8 warps split K (128 columns per warp iteration).  Lane
// (g = lane/4, t = lane%4) loads, per iteration, one 16-byte chunk (32 NF4 values) of row g
// and one of row g + 8, at columns kc = 128*it + 32*t — each packed byte is read exactly once,
// with 16-byte loads.  The 4 lanes of a quad hold 4 different 32-column chunks; the MMA's
// reduction index is permuted accordingly (sum order is free): for MMA j (0..7), lane t's
// logical k pair (2t, 2t+1) is columns kc + 4j + {0,1} and (2t+8, 2t+9) is kc + 4j + {2,3},
// i.e. byte 2j and byte 2j+1 of its chunk, and the matching Xᵀ fragment is the 8 bytes
// X[m][kc + 4j .. kc + 4j + 3] — one 32-bit word pair of a 16-byte X load.
//
// Dequantisation: a 256-entry table maps a packed byte to the pair (code[hi], code[lo]) in the
// activation dtype; it is replicated 32 times in shared memory (32 KB, word [byte][lane]) so
// that every lane reads its own bank (conflict-free).  The pair is multiplied by the chunk's
// scale with one packed half-precision multiply (a 32-column chunk never straddles a scale
// block since blocksize >= 32).  So one byte (two weights) costs a shift+mask, an LDS and an
// HMUL2.  Partial sums of the 8 warps are reduced through shared memory (reusing the table's
// space), then each warp finishes outputs: + bias + s·Σ_j xa[m][j]·B[n][j] (lanes split j).
//
// This file includes no torch header; launchers take raw pointers and a stream.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>

#include "lora_fast_kernels.h"

namespace lora_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 16;
constexpr int kColsPerIter = 128;             // K columns per warp iteration (4 lanes x 32)
constexpr int kLutWords = 256 * 32;           // 256 byte values x 32 lane copies
constexpr int kLutBytes = kLutWords * 4;      // 32 KB dynamic shared memory

// ---------------------------------------------------------------------------------------
// dtype helpers
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <typename T>
struct Act;

template <>
struct Act<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
  // (lo, hi) -> packed pair, lo in the low 16 bits
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __half2 r = __hmul2(*reinterpret_cast<__half2*>(&a), *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
};

template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<__nv_bfloat162*>(&a), *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
  static __device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// An adapter weight (activation dtype or fp32) rounded to the activation dtype, as fp32.
template <typename T>
__device__ __forceinline__ float round_act(T v) { return to_f32(v); }
template <typename T>
__device__ __forceinline__ float round_act_from(float v) { return to_f32(Act<T>::from(v)); }

template <typename T, typename TW>
__device__ __forceinline__ float adapter_val(const TW* p, int64_t i) {
  return round_act_from<T>(to_f32(p[i]));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Read-once streaming load of the packed weight: no L1 allocation, 256-byte L2 prefetch.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Activation loads: reused by every block, keep them in L1.
__device__ __forceinline__ uint4 ld_act16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// Programmatic dependent launch (sm_90+); no-ops on older targets and when not launched so.
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], uint32_t a0, uint32_t a1,
                                                 uint32_t a2, uint32_t a3, uint32_t b0,
                                                 uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1,
                                                        uint32_t a2, uint32_t a3, uint32_t b0,
                                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------
// Kernel arguments (by value)
// ---------------------------------------------------------------------------------------
template <typename T, typename TB>
struct GemvArgs {
  const T* x;
  int64_t ldx;
  const uint8_t* packed;
  const void* absmax;
  const float* absmax2;
  const float* code2;
  float offset;
  int nested;
  const float* code;
  const T* bias;
  const TB* B;
  float scaling;
  T* y;
  const float* xa;
  int M, N, K, r;
  int bs_log2;
  int nbs_log2;
};

// Scale of the absmax block `blk` (fp32).  Nested: code2[q] * absmax2[blk >> nbs] + offset,
// rounded like the reference (a product, then a sum; no FMA contraction).
template <typename T, typename TB>
__device__ __forceinline__ float resolve_scale(const GemvArgs<T, TB>& p, int64_t blk,
                                               uint32_t raw) {
  if (p.nested) {
    const float c = __ldg(p.code2 + raw);
    const float a2 = __ldg(p.absmax2 + (blk >> p.nbs_log2));
    return __fadd_rn(__fmul_rn(c, a2), p.offset);
  }
  return __uint_as_float(raw);
}

template <typename T, typename TB>
__device__ __forceinline__ uint32_t load_scale_raw(const GemvArgs<T, TB>& p, int64_t blk) {
  if (p.nested) return static_cast<uint32_t>(__ldg(static_cast<const uint8_t*>(p.absmax) + blk));
  return __float_as_uint(__ldg(static_cast<const float*>(p.absmax) + blk));
}

// ---------------------------------------------------------------------------------------
// Kernel 1: xa = X · round_act(A)ᵀ.  Block (bx, by) computes xa[8*by .. +8, JB*bx .. +JB]:
// its 256 threads split K in 8-column chunks (all loads of a thread issued together), then
// the block reduces through warp shuffles and shared memory.
// ---------------------------------------------------------------------------------------
constexpr int kXaRanks = 2;  // JB: adapter ranks per block

template <typename T, typename TA>
__device__ __forceinline__ void load_adapter8(const TA* p, float (&v)[8]) {
  if constexpr (sizeof(TA) == 4) {
    const float4 v0 = __ldg(reinterpret_cast<const float4*>(p));
    const float4 v1 = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = v0.x; v[1] = v0.y; v[2] = v0.z; v[3] = v0.w;
    v[4] = v1.x; v[5] = v1.y; v[6] = v1.z; v[7] = v1.w;
  } else {
    Act<T>::unpack8(__ldg(reinterpret_cast<const uint4*>(p)), v);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = round_act_from<T>(v[i]);
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
lora_xa_kernel(const T* __restrict__ x, int64_t ldx, const TA* __restrict__ A,
               float* __restrict__ xa, int M, int K, int r, int vec) {
  // Let the dependent GEMV start streaming its weights right away.
  griddep_launch_dependents();
  constexpr int JB = kXaRanks;
  __shared__ float red[kWarps][8 * JB];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int j0 = blockIdx.x * JB;
  const int m0 = blockIdx.y * 8;
  float acc[8][JB];
#pragma unroll
  for (int mm = 0; mm < 8; ++mm)
#pragma unroll
    for (int jj = 0; jj < JB; ++jj) acc[mm][jj] = 0.f;

  if (vec) {
    // K % 8 == 0, 16-byte aligned rows.
#pragma unroll 2
    for (int k = tid * 8; k < K; k += kThreads * 8) {
      float av[JB][8];
#pragma unroll
      for (int jj = 0; jj < JB; ++jj) {
        if (j0 + jj < r) {
          load_adapter8<T, TA>(A + static_cast<int64_t>(j0 + jj) * K + k, av[jj]);
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) av[jj][i] = 0.f;
        }
      }
#pragma unroll
      for (int mm = 0; mm < 8; ++mm) {
        if (m0 + mm < M) {
          float xv[8];
          Act<T>::unpack8(ld_act16(x + static_cast<int64_t>(m0 + mm) * ldx + k), xv);
#pragma unroll
          for (int jj = 0; jj < JB; ++jj)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[mm][jj] = fmaf(xv[i], av[jj][i], acc[mm][jj]);
        }
      }
    }
  } else {
#pragma unroll 4
    for (int k = tid; k < K; k += kThreads) {
      float av[JB];
#pragma unroll
      for (int jj = 0; jj < JB; ++jj)
        av[jj] = (j0 + jj < r) ? round_act_from<T>(to_f32(A[static_cast<int64_t>(j0 + jj) * K + k])) : 0.f;
#pragma unroll
      for (int mm = 0; mm < 8; ++mm) {
        if (m0 + mm < M) {
          const float xv = to_f32(x[static_cast<int64_t>(m0 + mm) * ldx + k]);
#pragma unroll
          for (int jj = 0; jj < JB; ++jj) acc[mm][jj] = fmaf(xv, av[jj], acc[mm][jj]);
        }
      }
    }
  }
#pragma unroll
  for (int mm = 0; mm < 8; ++mm)
#pragma unroll
    for (int jj = 0; jj < JB; ++jj) {
      const float v = warp_sum(acc[mm][jj]);
      if (lane == 0) red[warp][mm * JB + jj] = v;
    }
  __syncthreads();
  if (tid < 8 * JB) {
    const int mm = tid / JB;
    const int jj = tid - mm * JB;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][tid];
    if (m0 + mm < M && j0 + jj < r) xa[static_cast<int64_t>(m0 + mm) * r + j0 + jj] = v;
  }
}

// ---------------------------------------------------------------------------------------
// Kernel 2a: tensor-core NF4 GEMV + LoRA epilogue, persistent over row tiles.
//   MT  = n-tiles of 8 activation rows (M <= 8*MT)
//   U   = warp iterations whose loads are in flight (a rolling window that runs across
//         tile boundaries, so the epilogue of one tile overlaps the next tile's loads)
// Block b owns tiles [b*tiles_per_block, ...).  In a tile, warp w handles the K iterations
// it = j*kWarps + w, j = 0..per-1 (per is a multiple of U; iterations past K are no-ops).
// ---------------------------------------------------------------------------------------
constexpr int kRankChunk = 64;  // adapter rank staged per epilogue pass

template <int MT>
struct MmaSmem {
  static constexpr int MP = MT * 8;
  static constexpr int kRedFloats = kWarps * kRowsPerBlock * MP;
  static constexpr int kStageFloats = (MP + kRowsPerBlock) * (kRankChunk + 1);
  static constexpr int kBytes = kLutBytes + 4 * (kRedFloats + kStageFloats);
};

template <typename T, typename TB, int MT, int U, int MINB>
__global__ void __launch_bounds__(kThreads, MINB)
nf4_lora_mma_kernel(const GemvArgs<T, TB> p, int tiles_per_block, int per) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int MP = MmaSmem<MT>::MP;
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem_raw);
  float* red = reinterpret_cast<float*>(smem_raw + kLutBytes);   // [warp][row 16][m MP]
  float* xs = red + MmaSmem<MT>::kRedFloats;                     // [m MP][kRankChunk + 1]
  float* bs = xs + MP * (kRankChunk + 1);                        // [row 16][kRankChunk + 1]
  __shared__ float code_s[16];
  __shared__ float code2_s[256];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int K = p.K;
  const int N = p.N;
  const int nk = (K + kColsPerIter - 1) / kColsPerIter;
  const int ntiles = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  const int tile0 = blockIdx.x * tiles_per_block;
  const int tile_end = min(tile0 + tiles_per_block, ntiles);

  uint4 wv[U][2];
  uint32_t sraw[U][2];
  float sa2[U][2];

  // Load cursor (tile, j) -> slot.
  int ld_tile = tile0;
  int ld_j = 0;
  auto load_slot = [&](int u) {
    const int it = ld_j * kWarps + warp;
    const int kc = it * kColsPerIter + 32 * t;
    const bool kok = (ld_tile < tile_end) && (it < nk) && (kc < K);
    const int row0 = ld_tile * kRowsPerBlock + g;
    const int row1 = row0 + 8;
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    wv[u][0] = z;
    wv[u][1] = z;
    sraw[u][0] = 0u;
    sraw[u][1] = 0u;
    sa2[u][0] = 0.f;
    sa2[u][1] = 0.f;
    if (kok && row0 < N) {
      const int64_t f = static_cast<int64_t>(row0) * K + kc;
      const int64_t blk = f >> p.bs_log2;
      wv[u][0] = ld_stream16(p.packed + (f >> 1));
      sraw[u][0] = load_scale_raw(p, blk);
      if (p.nested) sa2[u][0] = __ldg(p.absmax2 + (blk >> p.nbs_log2));
    }
    if (kok && row1 < N) {
      const int64_t f = static_cast<int64_t>(row1) * K + kc;
      const int64_t blk = f >> p.bs_log2;
      wv[u][1] = ld_stream16(p.packed + (f >> 1));
      sraw[u][1] = load_scale_raw(p, blk);
      if (p.nested) sa2[u][1] = __ldg(p.absmax2 + (blk >> p.nbs_log2));
    }
    if (++ld_j == per) {
      ld_j = 0;
      ++ld_tile;
    }
  };

  // Issue the first loads before building the tables, so they overlap.
#pragma unroll
  for (int u = 0; u < U; ++u) load_slot(u);

  if (tid < 16) code_s[tid] = __ldg(p.code + tid);
  if (p.nested) code2_s[tid] = __ldg(p.code2 + tid);  // kThreads == 256 entries
  __syncthreads();
  {
    // Entry b: (code[b >> 4] in the low half, code[b & 15] in the high half), 32 copies.
    const int b = tid;  // kThreads == 256 entries
    const uint32_t e = Act<T>::pack(code_s[b >> 4], code_s[b & 15]);
    const uint4 e4 = make_uint4(e, e, e, e);
    uint4* dst = reinterpret_cast<uint4*>(lut + b * 32);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[(i + tid) & 7] = e4;  // rotate to spread banks
  }
  __syncthreads();

  constexpr int OPT = (kRowsPerBlock * MP + kThreads - 1) / kThreads;  // outputs per thread

  for (int tile = tile0; tile < tile_end; ++tile) {
    const int row_base = tile * kRowsPerBlock;
    const bool ok0 = row_base + g < N;
    const bool ok1 = row_base + g + 8 < N;
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][c] = 0.f;

    for (int j0 = 0; j0 < per; j0 += U) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int it = (j0 + u) * kWarps + warp;
        if (it < nk) {  // warp-uniform
          const int kc = it * kColsPerIter + 32 * t;
          const bool kok = kc < K;
          float f0 = 0.f, f1 = 0.f;
          if (p.nested) {
            f0 = __fadd_rn(__fmul_rn(code2_s[sraw[u][0]], sa2[u][0]), p.offset);
            f1 = __fadd_rn(__fmul_rn(code2_s[sraw[u][1]], sa2[u][1]), p.offset);
          } else {
            f0 = __uint_as_float(sraw[u][0]);
            f1 = __uint_as_float(sraw[u][1]);
          }
          f0 = (kok && ok0) ? f0 : 0.f;
          f1 = (kok && ok1) ? f1 : 0.f;
          const uint32_t s0 = Act<T>::pack(f0, f0);
          const uint32_t s1 = Act<T>::pack(f1, f1);
          const T* xk = p.x + static_cast<int64_t>(g) * p.ldx + kc;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            uint4 xf[MT];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              xf[mt] = make_uint4(0u, 0u, 0u, 0u);
              if (kok && mt * 8 + g < p.M) xf[mt] = ld_act16(xk + static_cast<int64_t>(mt * 8) * p.ldx + 8 * q);
            }
            const uint32_t w0 = word_of(wv[u][0], q);
            const uint32_t w1 = word_of(wv[u][1], q);
#pragma unroll
            for (int jj = 0; jj < 2; ++jj) {
              const int sh = 16 * jj;
              const uint32_t a0 = Act<T>::mul2(lut[(((w0 >> sh) & 0xffu) << 5) | lane], s0);
              const uint32_t a2 = Act<T>::mul2(lut[(((w0 >> (sh + 8)) & 0xffu) << 5) | lane], s0);
              const uint32_t a1 = Act<T>::mul2(lut[(((w1 >> sh) & 0xffu) << 5) | lane], s1);
              const uint32_t a3 = Act<T>::mul2(lut[(((w1 >> (sh + 8)) & 0xffu) << 5) | lane], s1);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt)
                mma16816<T>(acc[mt], a0, a1, a2, a3, word_of(xf[mt], 2 * jj), word_of(xf[mt], 2 * jj + 1));
            }
          }
        }
        load_slot(u);  // the slot's next use: U steps ahead, possibly in the next tile
      }
    }

    // ---- cross-warp reduction + epilogue of this tile ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int m = mt * 8 + 2 * t;
      red[(warp * 16 + g) * MP + m] = acc[mt][0];
      red[(warp * 16 + g) * MP + m + 1] = acc[mt][1];
      red[(warp * 16 + g + 8) * MP + m] = acc[mt][2];
      red[(warp * 16 + g + 8) * MP + m + 1] = acc[mt][3];
    }
    __syncthreads();

    float base[OPT], lora[OPT], bias_v[OPT];
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      const int o = tid + kThreads * i;
      const int m = o >> 4;
      const int row = o & 15;
      base[i] = 0.f;
      lora[i] = 0.f;
      bias_v[i] = 0.f;
      if (o < kRowsPerBlock * p.M && row_base + row < N) {
#pragma unroll
        for (int w = 0; w < kWarps; ++w) base[i] += red[(w * 16 + row) * MP + m];
        if (p.bias != nullptr) bias_v[i] = to_f32(p.bias[row_base + row]);
      }
    }

    // xa comes from the preceding kernel: wait for it (PDL) only now (no-op after the first).
    griddep_wait();
    for (int j0 = 0; j0 < p.r; j0 += kRankChunk) {
      const int rc = min(kRankChunk, p.r - j0);
      for (int idx = tid; idx < p.M * rc; idx += kThreads) {
        const int m = idx / rc;
        const int jj = idx - m * rc;
        xs[m * (kRankChunk + 1) + jj] = p.xa[static_cast<int64_t>(m) * p.r + j0 + jj];
      }
      for (int idx = tid; idx < kRowsPerBlock * rc; idx += kThreads) {
        const int row = idx / rc;
        const int jj = idx - row * rc;
        const int n = row_base + row;
        bs[row * (kRankChunk + 1) + jj] =
            (n < N) ? adapter_val<T>(p.B, static_cast<int64_t>(n) * p.r + j0 + jj) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < OPT; ++i) {
        const int o = tid + kThreads * i;
        if (o < kRowsPerBlock * p.M) {
          const float* xr = xs + (o >> 4) * (kRankChunk + 1);
          const float* br = bs + (o & 15) * (kRankChunk + 1);
          float l = 0.f;
          for (int jj = 0; jj < rc; ++jj) l = fmaf(xr[jj], br[jj], l);
          lora[i] += l;
        }
      }
      __syncthreads();  // staging reused by the next chunk / tile, red by the next tile
    }
#pragma unroll
    for (int i = 0; i < OPT; ++i) {
      const int o = tid + kThreads * i;
      const int m = o >> 4;
      const int row = o & 15;
      if (o < kRowsPerBlock * p.M && row_base + row < N)
        p.y[static_cast<int64_t>(m) * N + row_base + row] = Act<T>::from(fmaf(p.scaling, lora[i], base[i]) + bias_v[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Kernel 2b: scalar fallback (any K, any alignment).  One warp per output row; dequantises
// exactly like the reference (code * absmax in fp32, one rounding to the activation dtype).
// ---------------------------------------------------------------------------------------
template <typename T, typename TB>
__global__ void __launch_bounds__(kThreads)
nf4_lora_scalar_kernel(const GemvArgs<T, TB> p) {
  __shared__ float code_s[16];
  if (threadIdx.x < 16) code_s[threadIdx.x] = __ldg(p.code + threadIdx.x);
  __syncthreads();
  griddep_wait();
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kWarps + warp;
  if (n >= p.N) return;
  const int K = p.K;
  const int64_t rowflat = static_cast<int64_t>(n) * K;
  for (int m0 = 0; m0 < p.M; m0 += 8) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.f;
    for (int k = lane; k < K; k += 32) {
      const int64_t f = rowflat + k;
      const uint32_t byte = p.packed[f >> 1];
      const uint32_t nib = (f & 1) ? (byte & 15u) : (byte >> 4);
      const int64_t blk = f >> p.bs_log2;
      const float scale = resolve_scale(p, blk, load_scale_raw(p, blk));
      const float w = round_act_from<T>(__fmul_rn(code_s[nib], scale));
#pragma unroll
      for (int mm = 0; mm < 8; ++mm)
        if (m0 + mm < p.M) acc[mm] = fmaf(to_f32(p.x[static_cast<int64_t>(m0 + mm) * p.ldx + k]), w, acc[mm]);
    }
#pragma unroll
    for (int mm = 0; mm < 8; ++mm) {
      const int m = m0 + mm;
      if (m >= p.M) break;  // warp-uniform
      float lora = 0.f;
      const float* xam = p.xa + static_cast<int64_t>(m) * p.r;
      const TB* bn = p.B + static_cast<int64_t>(n) * p.r;
      for (int j = lane; j < p.r; j += 32) lora = fmaf(xam[j], adapter_val<T>(bn, j), lora);
      float v = warp_sum(acc[mm]) + p.scaling * warp_sum(lora);
      if (lane == 0) {
        if (p.bias != nullptr) v += to_f32(p.bias[n]);
        p.y[static_cast<int64_t>(m) * p.N + n] = Act<T>::from(v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------
int ilog2(int v) {
  int l = 0;
  while ((1 << l) < v) ++l;
  return l;
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int device_cc_major() {
  static int cache[128] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 128) return 0;
  if (cache[dev] == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
    cache[dev] = major;
  }
  return cache[dev];
}

bool pdl_wanted(int use_pdl) {
  if (use_pdl == 0) return false;
  static int env = -1;
  if (env < 0) {
    const char* e = std::getenv("LORA_FAST_NO_PDL");
    env = (e != nullptr && e[0] == '1') ? 1 : 0;
  }
  if (env == 1 && use_pdl < 0) return false;
  return device_cc_major() >= 9;
}

template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = pdl ? attr : nullptr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename T, typename TA>
cudaError_t launch_xa(const Nf4LoraParams& p, cudaStream_t stream) {
  const bool vec = (p.K % 8 == 0) && aligned16(p.x) && (p.ldx % 8 == 0) && aligned16(p.A);
  dim3 grid((p.r + kXaRanks - 1) / kXaRanks, (p.M + 7) / 8);
  lora_xa_kernel<T, TA><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), p.ldx, static_cast<const TA*>(p.A), p.xa, p.M, p.K, p.r, vec ? 1 : 0);
  return cudaGetLastError();
}

template <typename T, typename TB>
GemvArgs<T, TB> make_args(const Nf4LoraParams& p) {
  GemvArgs<T, TB> a;
  a.x = static_cast<const T*>(p.x);
  a.ldx = p.ldx;
  a.packed = p.packed;
  a.absmax = p.absmax;
  a.absmax2 = p.absmax2;
  a.code2 = p.code2;
  a.offset = p.offset;
  a.nested = p.nested ? 1 : 0;
  a.code = p.code;
  a.bias = static_cast<const T*>(p.bias);
  a.B = static_cast<const TB*>(p.B);
  a.scaling = p.scaling;
  a.y = static_cast<T*>(p.y);
  a.xa = p.xa;
  a.M = p.M;
  a.N = p.N;
  a.K = p.K;
  a.r = p.r;
  a.bs_log2 = ilog2(p.blocksize);
  a.nbs_log2 = ilog2(p.nested_blocksize > 0 ? p.nested_blocksize : 1);
  return a;
}

template <typename T, typename TB, int MT, int U, int MINB>
cudaError_t launch_mma(const GemvArgs<T, TB>& a, cudaStream_t stream, bool pdl) {
  auto kernel = nf4_lora_mma_kernel<T, TB, MT, U, MINB>;
  constexpr int smem = MmaSmem<MT>::kBytes;
  static int configured_dev = -1;
  static int max_blocks = 0;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (configured_dev != dev) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err != cudaSuccess) return err;
    max_blocks = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
    configured_dev = dev;
  }
  const int ntiles = (a.N + kRowsPerBlock - 1) / kRowsPerBlock;
  // Even split: every block gets the same number of tiles (the last one possibly fewer).
  const int tiles_per_block = (ntiles + max_blocks - 1) / max_blocks;
  const int grid = (ntiles + tiles_per_block - 1) / tiles_per_block;
  const int nk = (a.K + kColsPerIter - 1) / kColsPerIter;
  int per = (nk + kWarps - 1) / kWarps;
  per = ((per + U - 1) / U) * U;
  return launch(kernel, dim3(grid), dim3(kThreads), smem, stream, pdl, a, tiles_per_block, per);
}

template <typename T, typename TB>
cudaError_t launch_main(const Nf4LoraParams& p, cudaStream_t stream, bool pdl, bool mma) {
  const GemvArgs<T, TB> a = make_args<T, TB>(p);
  if (!mma) {
    dim3 grid((p.N + kWarps - 1) / kWarps);
    return launch(nf4_lora_scalar_kernel<T, TB>, grid, dim3(kThreads), 0, stream, pdl, a);
  }
  const int mt = (p.M + 7) / 8;
  if (mt <= 1) return launch_mma<T, TB, 1, 4, 2>(a, stream, pdl);
  if (mt <= 2) return launch_mma<T, TB, 2, 4, 2>(a, stream, pdl);
  if (mt <= 4) return launch_mma<T, TB, 4, 2, 1>(a, stream, pdl);
  return launch_mma<T, TB, 8, 2, 1>(a, stream, pdl);
}

template <typename T>
cudaError_t forward_typed(const Nf4LoraParams& p, cudaStream_t stream, bool pdl, bool mma) {
  cudaError_t err = (p.a_dtype == kFloat32) ? launch_xa<T, float>(p, stream) : launch_xa<T, T>(p, stream);
  if (err != cudaSuccess) return err;
  return (p.b_dtype == kFloat32) ? launch_main<T, float>(p, stream, pdl, mma)
                                 : launch_main<T, T>(p, stream, pdl, mma);
}

}  // namespace

bool nf4_lora_mma_eligible(const Nf4LoraParams& p) {
  return p.force_scalar == 0 && p.M >= 1 && p.M <= 64 && p.K % 32 == 0 && p.blocksize >= 32 &&
         aligned16(p.packed) && aligned16(p.x) && (p.ldx % 8 == 0);
}

cudaError_t nf4_lora_forward(const Nf4LoraParams& p, cudaStream_t stream, int* used_mma) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (p.r <= 0 || p.K <= 0 || p.blocksize <= 0 || (p.blocksize & (p.blocksize - 1)) != 0 ||
      (p.nested && (p.nested_blocksize <= 0 || (p.nested_blocksize & (p.nested_blocksize - 1)) != 0)) ||
      (p.x_dtype != kFloat16 && p.x_dtype != kBFloat16) ||
      (p.a_dtype != kFloat32 && p.a_dtype != p.x_dtype) || (p.b_dtype != kFloat32 && p.b_dtype != p.x_dtype))
    return cudaErrorInvalidValue;
  const bool mma = nf4_lora_mma_eligible(p);
  if (used_mma != nullptr) *used_mma = mma ? 1 : 0;
  const bool pdl = pdl_wanted(p.use_pdl);
  if (p.x_dtype == kFloat16) return forward_typed<__half>(p, stream, pdl, mma);
  return forward_typed<__nv_bfloat16>(p, stream, pdl, mma);
}

}  // namespace lora_fast
