// PyTorch bindings of the lora_fast CUDA kernels (module lora_fast._C, or the JIT build of
// lora_fast.cuda_ext).  Every input is checked here (device, dtype, contiguity, shapes) so the
// launchers in csrc/*.cu can take raw pointers.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <tuple>

#include "lora_fast_kernels.h"

namespace {

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return lora_fast::kFloat16;
    case at::kBFloat16:
      return lora_fast::kBFloat16;
    case at::kFloat:
      return lora_fast::kFloat32;
    default:
      return -1;
  }
}

void check_on(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "lora_fast CUDA op: ", name, " must be a CUDA tensor (got ", t.device(), ")");
  TORCH_CHECK(t.device() == dev, "lora_fast CUDA op: ", name, " is on ", t.device(), " but x is on ", dev);
}

void check_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "lora_fast CUDA op: ", name, " must be contiguous (got strides ", t.strides(), ")");
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

void check_cuda_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lora_fast CUDA op: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

// Returns (y (M, N) x.dtype, xa (M, r) fp32, used_mma).
std::tuple<at::Tensor, at::Tensor, bool> nf4_lora_forward(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& absmax2, const c10::optional<at::Tensor>& code2, const at::Tensor& code,
    double offset, const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
    double scaling, int64_t N, int64_t K, int64_t blocksize, int64_t nested_blocksize, bool force_scalar,
    int64_t use_pdl) {
  TORCH_CHECK(x.is_cuda(), "lora_fast CUDA op: x must be a CUDA tensor (got ", x.device(), ")");
  const at::Device dev = x.device();
  TORCH_CHECK(x.dim() == 2, "lora_fast CUDA op: x must be 2-D (M, K), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "lora_fast CUDA op: x must be float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(N > 0 && N <= INT32_MAX && K > 0 && K <= INT32_MAX, "lora_fast CUDA op: bad weight shape (", N, ", ", K, ")");
  TORCH_CHECK(x.size(1) == K, "lora_fast CUDA op: x has ", x.size(1), " features but the weight expects K=", K);
  const int64_t M = x.size(0);
  TORCH_CHECK(M >= 1 && M <= 64, "lora_fast CUDA op: the GEMV kernel takes 1 <= M <= 64 rows, got M=", M);
  TORCH_CHECK(x.stride(1) == 1 || x.size(1) == 1, "lora_fast CUDA op: x must have unit stride along K (got strides ",
              x.strides(), ")");
  const int64_t ldx = (M == 1) ? K : x.stride(0);
  TORCH_CHECK(ldx >= K, "lora_fast CUDA op: x row stride ", ldx, " < K=", K);

  TORCH_CHECK(is_pow2(blocksize) && blocksize >= 32, "lora_fast CUDA op: blocksize must be a power of two >= 32, got ",
              blocksize);
  const int64_t numel = N * K;
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;

  check_on(packed, "packed weight", dev);
  check_contig(packed, "packed weight");
  TORCH_CHECK(packed.element_size() * packed.numel() >= (numel + 1) / 2, "lora_fast CUDA op: packed weight holds ",
              packed.element_size() * packed.numel(), " bytes, need ", (numel + 1) / 2, " for (", N, ", ", K, ")");

  const bool nested = absmax2.has_value() && absmax2->defined();
  check_on(absmax, "absmax", dev);
  check_contig(absmax, "absmax");
  TORCH_CHECK(absmax.numel() >= nblocks, "lora_fast CUDA op: absmax has ", absmax.numel(), " entries, need ", nblocks);
  if (nested) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte, "lora_fast CUDA op: nested absmax must be uint8 codes, got ",
                absmax.scalar_type());
    TORCH_CHECK(code2.has_value() && code2->defined(), "lora_fast CUDA op: nested absmax needs code2");
    TORCH_CHECK(is_pow2(nested_blocksize), "lora_fast CUDA op: nested_blocksize must be a power of two, got ",
                nested_blocksize);
    check_on(*absmax2, "absmax2", dev);
    check_contig(*absmax2, "absmax2");
    check_on(*code2, "code2", dev);
    check_contig(*code2, "code2");
    TORCH_CHECK(absmax2->scalar_type() == at::kFloat, "lora_fast CUDA op: absmax2 must be float32");
    TORCH_CHECK(code2->scalar_type() == at::kFloat, "lora_fast CUDA op: code2 must be float32");
    TORCH_CHECK(code2->numel() >= 256, "lora_fast CUDA op: code2 must have 256 entries, got ", code2->numel());
    const int64_t n2 = (nblocks + nested_blocksize - 1) / nested_blocksize;
    TORCH_CHECK(absmax2->numel() >= n2, "lora_fast CUDA op: absmax2 has ", absmax2->numel(), " entries, need ", n2);
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "lora_fast CUDA op: absmax must be float32 (or uint8 with absmax2), got ",
                absmax.scalar_type());
  }
  check_on(code, "code", dev);
  check_contig(code, "code");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() >= 16,
              "lora_fast CUDA op: code must be 16 float32 NF4 values, got ", code.scalar_type(), " x", code.numel());

  at::Tensor bias_t;
  if (bias.has_value() && bias->defined()) {
    bias_t = *bias;
    check_on(bias_t, "bias", dev);
    check_contig(bias_t, "bias");
    TORCH_CHECK(bias_t.scalar_type() == x.scalar_type(), "lora_fast CUDA op: bias dtype ", bias_t.scalar_type(),
                " must match x dtype ", x.scalar_type());
    TORCH_CHECK(bias_t.numel() == N, "lora_fast CUDA op: bias has ", bias_t.numel(), " entries, expected N=", N);
  }

  check_on(A, "lora_A", dev);
  check_on(B, "lora_B", dev);
  check_contig(A, "lora_A");
  check_contig(B, "lora_B");
  TORCH_CHECK(A.dim() == 2 && A.size(1) == K, "lora_fast CUDA op: lora_A must be (r, K=", K, "), got ", A.sizes());
  const int64_t r = A.size(0);
  TORCH_CHECK(r >= 1 && r <= 4096, "lora_fast CUDA op: rank r must be in [1, 4096], got ", r);
  TORCH_CHECK(B.dim() == 2 && B.size(0) == N && B.size(1) == r, "lora_fast CUDA op: lora_B must be (N=", N, ", r=", r,
              "), got ", B.sizes());
  TORCH_CHECK(A.scalar_type() == x.scalar_type() || A.scalar_type() == at::kFloat,
              "lora_fast CUDA op: lora_A dtype must be x's dtype or float32, got ", A.scalar_type());
  TORCH_CHECK(B.scalar_type() == x.scalar_type() || B.scalar_type() == at::kFloat,
              "lora_fast CUDA op: lora_B dtype must be x's dtype or float32, got ", B.scalar_type());

  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor xa = at::empty({M, r}, x.options().dtype(at::kFloat));

  lora_fast::Nf4LoraParams p;
  p.x = x.data_ptr();
  p.ldx = ldx;
  p.x_dtype = kind_of(x.scalar_type());
  p.packed = static_cast<const uint8_t*>(packed.data_ptr());
  p.absmax = absmax.data_ptr();
  p.nested = nested ? 1 : 0;
  if (nested) {
    p.absmax2 = absmax2->data_ptr<float>();
    p.code2 = code2->data_ptr<float>();
    p.offset = static_cast<float>(offset);
    p.nested_blocksize = static_cast<int>(nested_blocksize);
  }
  p.code = code.data_ptr<float>();
  p.bias = bias_t.defined() ? bias_t.data_ptr() : nullptr;
  p.A = A.data_ptr();
  p.a_dtype = kind_of(A.scalar_type());
  p.B = B.data_ptr();
  p.b_dtype = kind_of(B.scalar_type());
  p.scaling = static_cast<float>(scaling);
  p.y = y.data_ptr();
  p.xa = xa.data_ptr<float>();
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.r = static_cast<int>(r);
  p.blocksize = static_cast<int>(blocksize);
  p.force_scalar = force_scalar ? 1 : 0;
  p.use_pdl = static_cast<int>(use_pdl);

  int used_mma = 0;
  check_cuda_error(lora_fast::nf4_lora_forward(p, c10::cuda::getCurrentCUDAStream(), &used_mma), "nf4_lora_forward");
  return std::make_tuple(y, xa, used_mma != 0);
}

// Returns (packed uint8 ((n+1)/2,), absmax fp32 (ceil(n/blocksize),)), bit-exact with
// bitsandbytes' CUDA quantize_4bit(W, blocksize, quant_type="nf4").
std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& W, int64_t blocksize) {
  TORCH_CHECK(W.is_cuda(), "lora_fast nf4_quantize: W must be a CUDA tensor (got ", W.device(), ")");
  TORCH_CHECK(W.scalar_type() == at::kHalf || W.scalar_type() == at::kBFloat16 || W.scalar_type() == at::kFloat,
              "lora_fast nf4_quantize: W must be float16, bfloat16 or float32, got ", W.scalar_type());
  TORCH_CHECK(is_pow2(blocksize) && blocksize >= 32 && blocksize <= 4096,
              "lora_fast nf4_quantize: blocksize must be a power of two in [32, 4096], got ", blocksize);
  const c10::cuda::CUDAGuard guard(W.device());
  at::Tensor Wc = W.contiguous();
  const int64_t n = Wc.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::empty({(n + 1) / 2}, Wc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, Wc.options().dtype(at::kFloat));
  if (n > 0) {
    check_cuda_error(lora_fast::nf4_quantize(Wc.data_ptr(), kind_of(Wc.scalar_type()), n, static_cast<int>(blocksize),
                                             static_cast<uint8_t*>(packed.data_ptr()), absmax.data_ptr<float>(),
                                             c10::cuda::getCurrentCUDAStream()),
                     "nf4_quantize");
  }
  return std::make_tuple(packed, absmax);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_fast CUDA kernels: fused NF4+LoRA GEMV (M <= 64) and NF4 quantisation";
  m.def("nf4_lora_forward", &nf4_lora_forward, "Fused NF4 + LoRA forward for 1 <= M <= 64",
        py::arg("x"), py::arg("packed"), py::arg("absmax"), py::arg("absmax2"), py::arg("code2"), py::arg("code"),
        py::arg("offset"), py::arg("bias"), py::arg("A"), py::arg("B"), py::arg("scaling"), py::arg("N"),
        py::arg("K"), py::arg("blocksize"), py::arg("nested_blocksize"), py::arg("force_scalar") = false,
        py::arg("use_pdl") = -1);
  m.def("nf4_quantize", &nf4_quantize, "NF4 quantisation (bitsandbytes CUDA bit-exact)", py::arg("W"),
        py::arg("blocksize"));
  m.attr("ABI_VERSION") = 1;
}
