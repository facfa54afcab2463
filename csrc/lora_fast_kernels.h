// Host-side interface of the lora_fast CUDA kernels (csrc/*.cu).
//
// The .cu files include no torch header: they compile with plain nvcc (bench/compile_check.py
// does exactly that) and expose C++ launchers that take raw device pointers and a stream.
// csrc/bindings.cpp wraps them for PyTorch.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace lora_fast {

// Element types understood by the launchers.
enum ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Fused NF4 + LoRA forward for small M (the memory-bound decode regime):
//
//   xa[M, r] = X · round_act(A)ᵀ                                  (fp32, written)
//   Y[M, N]  = X · deq(W0)ᵀ + bias + scaling · xa · round_act(B)ᵀ   (activation dtype)
//
// W0 (N, K) is in the bitsandbytes NF4 layout: element f = n*K + k in byte f/2 of `packed`
// (high nibble when f is even); its scale is absmax[f / blocksize], or with double
// quantisation (nested != 0) code2[absmax_u8[b]] * absmax2[b / nested_blocksize] + offset.
// round_act() rounds an adapter weight to the activation dtype (the adapter path runs in the
// activation dtype with fp32 accumulation).
struct Nf4LoraParams {
  const void* x = nullptr;     // (M, K) activation rows, stride ldx elements, unit column stride
  int64_t ldx = 0;
  int x_dtype = kBFloat16;     // kFloat16 | kBFloat16
  const uint8_t* packed = nullptr;
  const void* absmax = nullptr;     // fp32 (nested == 0) or uint8 codes (nested != 0)
  const float* absmax2 = nullptr;   // nested only
  const float* code2 = nullptr;     // nested only, 256 entries
  float offset = 0.f;               // nested only
  int nested = 0;
  const float* code = nullptr;      // 16 NF4 code values (fp32)
  const void* bias = nullptr;       // (N,) activation dtype, or nullptr
  const void* A = nullptr;          // (r, K) contiguous
  int a_dtype = kBFloat16;          // activation dtype or kFloat32
  const void* B = nullptr;          // (N, r) contiguous
  int b_dtype = kBFloat16;          // activation dtype or kFloat32
  float scaling = 1.f;
  void* y = nullptr;                // (M, N) contiguous, activation dtype
  float* xa = nullptr;              // (M, r) contiguous fp32
  int M = 0, N = 0, K = 0, r = 0;
  int blocksize = 64;               // power of two >= 32
  int nested_blocksize = 256;       // power of two
  int force_scalar = 0;             // 1: always use the scalar (reference-exact) kernel
  int use_pdl = -1;                 // programmatic dependent launch: -1 auto (sm_90+), 0 off, 1 on
};

// True when the tensor-core GEMV path applies: K % 32 == 0, 16-byte aligned packed rows and
// activation rows, 1 <= M <= 64 and force_scalar == 0.  Otherwise the scalar kernel runs.
bool nf4_lora_mma_eligible(const Nf4LoraParams& p);

// Launches the two kernels (xa, then the fused GEMV) on `stream`.  *used_mma (if non-null)
// receives 1 when the tensor-core path ran, 0 for the scalar path.
cudaError_t nf4_lora_forward(const Nf4LoraParams& p, cudaStream_t stream, int* used_mma);

// NF4 quantisation, bit-exact with bitsandbytes' CUDA quantize_4bit(quant_type="nf4"):
// packed[(n+1)/2] uint8 and absmax[ceil(n/blocksize)] fp32.  dtype: kFloat16/kBFloat16/kFloat32.
cudaError_t nf4_quantize(const void* W, int dtype, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, cudaStream_t stream);

}  // namespace lora_fast
