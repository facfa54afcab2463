"""The CUDA C++ backend: fused NF4 + LoRA GEMV for decode-sized batches (M <= 64).

The kernels live in ``csrc/`` (plain CUDA, no torch headers; installed as ``lora_fast/csrc``)
with PyTorch bindings in ``csrc/bindings.cpp``.  They are used from the extension module
``lora_fast._C`` when ``setup.py`` built it (``pip install --no-build-isolation``), else they
are JIT-compiled with :func:`torch.utils.cpp_extension.load` on first use on a GPU machine (a
message goes to stderr; the build is cached under ``$LORA_FAST_CUDA_BUILD_DIR`` or
``~/.cache/lora_fast/cuda_ext``).  Target GPUs come from ``LORA_FAST_CUDA_ARCHS`` (parsed by
``lora_fast._archs``, the same rules as ``setup.py``: e.g. ``"80;90"``, ``"8.0 9.0"``,
``"sm_90a"``), default the current GPU.

What runs where:

* :func:`forward` runs the CUDA GEMV when the base is NF4, ``1 <= M <= 64``, activations are
  fp16/bf16, there is no dropout and the adapter dtype is the activation dtype or fp32.
  Anything else (dense base, larger M, dropout, ...) is delegated to the Triton backend and
  recorded as ``cuda:delegated_to_triton(<reason>)`` in :func:`lora_fast.dispatch_stats`.
* :func:`backward` always delegates to the Triton backend (the CUDA kernels target
  inference/decode), recorded likewise.
* :func:`quantize_nf4_cuda` quantises to NF4, bit-exact with bitsandbytes' CUDA kernel.

``LORA_FAST_NO_PDL=1`` turns off programmatic dependent launch (sm_90+) between the two
kernels of a forward.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from typing import List, Optional, Sequence, Tuple

import torch

from . import _archs, _backend
from ._operand import NF4Operand

__all__ = [
    "status",
    "load",
    "forward",
    "backward",
    "gemv_unsupported_reason",
    "quantize_nf4_cuda",
    "quantize_nf4_operand_cuda",
    "NF4_CODE",
]

MAX_M = 64

# bitsandbytes' NF4 code values (functional.get_4bit_type("nf4")).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC_CANDIDATES = (
    os.path.join(os.path.dirname(_HERE), "csrc"),  # source checkout / editable install
    os.path.join(_HERE, "csrc"),                   # if packaged inside lora_fast/
)

_lock = threading.Lock()
_ext = None
_ext_error: Optional[str] = None


class CudaExtUnavailable(RuntimeError):
    """The CUDA extension cannot be loaded or built here (the message says why)."""


def _csrc_dir() -> Optional[str]:
    for d in _CSRC_CANDIDATES:
        if os.path.isdir(d) and any(f.endswith(".cu") for f in os.listdir(d)):
            return d
    return None


def _sources(csrc: str) -> List[str]:
    return sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST form ("8.0;9.0") of LORA_FAST_CUDA_ARCHS, default the current GPU."""
    env = os.environ.get(_archs.ENV, "").strip()
    if env:
        return _archs.arch_list(_archs.parse(env))
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _nvcc_available() -> Tuple[bool, str]:
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # pragma: no cover
        return False, f"torch.utils.cpp_extension unavailable ({exc})"
    nvcc = None
    if CUDA_HOME:
        cand = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(cand):
            nvcc = cand
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME) and lora_fast._C was not built"
    return True, nvcc


def _build_dir(tag: str) -> str:
    root = os.environ.get("LORA_FAST_CUDA_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lora_fast", "cuda_ext"
    )
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def _jit_build():
    csrc = _csrc_dir()
    if csrc is None:
        raise CudaExtUnavailable("lora_fast._C is not built and the csrc/ sources are not found")
    ok, nvcc_or_reason = _nvcc_available()
    if not ok:
        raise CudaExtUnavailable(nvcc_or_reason)
    from torch.utils import cpp_extension

    srcs = _sources(csrc)
    archs = _arch_list()
    h = hashlib.sha256()
    for s in srcs + sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith((".h", ".cuh"))):
        with open(s, "rb") as fh:
            h.update(os.path.basename(s).encode() + b"\0" + fh.read())
    h.update(archs.encode() + torch.__version__.encode() + str(torch.version.cuda).encode())
    tag = h.hexdigest()[:12]
    name = f"lora_fast_cuda_{tag}"
    build_dir = _build_dir(tag)
    print("lora_fast: compiling CUDA kernels (first use, ~1 min)…", file=sys.stderr, flush=True)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        mod = cpp_extension.load(
            name=name,
            sources=srcs,
            extra_include_paths=[csrc],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", "-std=c++17"],
            build_directory=build_dir,
            verbose=os.environ.get("LORA_FAST_CUDA_VERBOSE", "0") == "1",
        )
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    print(f"lora_fast: CUDA kernels ready ({build_dir})", file=sys.stderr, flush=True)
    return mod


def _precheck() -> Optional[str]:
    """Why the extension cannot run at all here (None when it might)."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build (torch.version.cuda is None)"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        major, minor = torch.cuda.get_device_capability()
    except Exception as exc:
        return f"CUDA is not usable ({exc})"
    if major < 8:
        return f"GPU compute capability {major}.{minor} < 8.0 (the kernels use bf16 mma.sync)"
    return None


def load():
    """The compiled extension module (importing ``lora_fast._C`` or JIT-building it).

    Raises :class:`CudaExtUnavailable` with the reason when that is impossible; a failed build
    is remembered and not retried in this process."""
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _ext_error is not None:
            raise CudaExtUnavailable(_ext_error)
        why = _precheck()
        if why is not None:
            _ext_error = why  # the machine does not change under us
            raise CudaExtUnavailable(why)
        try:
            from . import _C as mod  # type: ignore[attr-defined]
        except ImportError:
            try:
                mod = _jit_build()
            except CudaExtUnavailable as exc:
                _ext_error = str(exc)
                raise
            except Exception as exc:  # compiler errors, missing headers...
                _ext_error = f"building the CUDA extension failed: {type(exc).__name__}: {exc}"
                raise CudaExtUnavailable(_ext_error) from exc
        _ext = mod
        return mod


def status() -> Tuple[bool, str]:
    """``(usable, reason)`` for the CUDA backend on this machine; never raises.

    On a GPU machine this builds the extension if needed (first call only)."""
    try:
        load()
        return True, ""
    except CudaExtUnavailable as exc:
        return False, str(exc)
    except Exception as exc:  # pragma: no cover - defensive: status must not raise
        return False, f"{type(exc).__name__}: {exc}"


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def gemv_unsupported_reason(x: torch.Tensor, base, bias, A: torch.Tensor, B: torch.Tensor, dropout_p: float) -> str:
    """'' when the CUDA GEMV handles this call, else a short reason (used in dispatch_stats)."""
    if not isinstance(base, NF4Operand):
        return "dense base weight"
    if x.dim() != 2:
        return "x is not 2-D"
    m = x.shape[0]
    if m > MAX_M:
        return f"M={m} > {MAX_M}"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {x.dtype}"
    if dropout_p > 0:
        return "dropout"
    if A.dtype not in (x.dtype, torch.float32) or B.dtype not in (x.dtype, torch.float32):
        return f"adapter dtypes {A.dtype}/{B.dtype}"
    if not (_is_pow2(base.blocksize) and base.blocksize >= 32):
        return f"blocksize {base.blocksize}"
    if base.nested and not _is_pow2(base.nested_blocksize):
        return f"nested blocksize {base.nested_blocksize}"
    if x.numel() and x.stride(-1) != 1:
        return "x not unit-stride along K"
    if not x.is_cuda:
        return "x not on a CUDA device"
    return ""


def _delegate_forward(reason: str, x, base, bias, A, B, scaling, dropout_p, seed):
    try:
        from . import triton_backend
    except ImportError as exc:
        from . import reference as ref

        _backend.record("cuda", f"delegated_to_torch({reason}; triton backend missing: {exc})")
        mask = ref.dropout_scale_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
        w = ref.nf4_dequantize(base, x.dtype) if isinstance(base, NF4Operand) else base
        return ref.forward(x, w, bias, A, B, scaling, mask)
    _backend.record("cuda", f"delegated_to_triton({reason})")
    return triton_backend.forward(x, base, bias, A, B, scaling, dropout_p, seed)


def forward(x: torch.Tensor, base, bias: Optional[torch.Tensor], A: torch.Tensor, B: torch.Tensor,
            scaling: float, dropout_p: float, seed: int, *, force_scalar: bool = False,
            use_pdl: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA forward ``(y, xa_fp32)``; the CUDA GEMV for NF4 bases with M <= 64, else Triton."""
    reason = gemv_unsupported_reason(x, base, bias, A, B, dropout_p)
    if reason:
        return _delegate_forward(reason, x, base, bias, A, B, scaling, dropout_p, seed)
    n, k = base.shape
    m = x.shape[0]
    if m == 0:
        _backend.record("cuda", "nf4_gemv_empty")
        return x.new_empty(0, n), x.new_empty(0, A.shape[0], dtype=torch.float32)
    ext = load()
    packed = base.packed if base.packed.dtype == torch.uint8 else base.packed.view(torch.uint8)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    code = base.code
    if code is None or code.device != x.device or code.dtype != torch.float32:
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=x.device)
    y, xa, used_mma = ext.nf4_lora_forward(
        x, packed.reshape(-1), base.absmax.reshape(-1),
        base.absmax2.reshape(-1) if base.nested else None,
        base.code2.reshape(-1) if base.nested else None,
        code.reshape(-1), float(base.offset) if base.nested else 0.0,
        bias.contiguous() if bias is not None else None,
        A.contiguous(), B.contiguous(), float(scaling),
        int(n), int(k), int(base.blocksize), int(base.nested_blocksize or 256),
        bool(force_scalar), int(use_pdl),
    )
    _backend.record("cuda", "nf4_gemv_mma" if used_mma else "nf4_gemv_scalar")
    return y, xa


def backward(dy, x, xa, base, A, B, scaling: float, dropout_p: float, seed: int, needs: Sequence[bool]):
    """LoRA backward ``(dx, dA, dB, dbias)``: always the Triton backend (the CUDA kernels are
    inference/decode kernels); the delegation is recorded in ``dispatch_stats``."""
    reason = "backward: the CUDA kernels are forward-only"
    try:
        from . import triton_backend
    except ImportError as exc:
        from . import reference as ref

        _backend.record("cuda", f"delegated_to_torch({reason}; triton backend missing: {exc})")
        mask = ref.dropout_scale_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
        w = ref.nf4_dequantize(base, dy.dtype) if isinstance(base, NF4Operand) else base
        return ref.backward(dy, x, xa, w, A, B, scaling, mask, needs)
    _backend.record("cuda", f"delegated_to_triton({reason})")
    return triton_backend.backward(dy, x, xa, base, A, B, scaling, dropout_p, seed, list(needs))


def quantize_nf4_cuda(W: torch.Tensor, blocksize: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantise ``W`` (CUDA, fp16/bf16/fp32) like bitsandbytes' CUDA ``quantize_4bit``.

    Returns ``(packed, absmax)``: uint8 ``((numel+1)//2,)`` (high nibble = even flat element)
    and fp32 ``(ceil(numel/blocksize),)``, bit-identical to bitsandbytes."""
    return load().nf4_quantize(W, int(blocksize))


def _quantize_blockwise_dynamic(A: torch.Tensor, blocksize: int = 256):
    """8-bit blockwise quantisation with bitsandbytes' dynamic map (the nested absmax step),
    done by bitsandbytes itself (a dependency) so it matches ``quantize_4bit(compress_statistics=True)``."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_blockwise(A, blocksize=blocksize)
    return q, state.absmax.float(), state.code.float().to(A.device)


def quantize_nf4_operand_cuda(W: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                              nested_blocksize: int = 256) -> NF4Operand:
    """An :class:`NF4Operand` of ``W`` (N, K): the NF4 step on the CUDA kernel, the nested
    (double-quant) step like bitsandbytes (offset = mean absmax, 8-bit dynamic blockwise)."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (N, K), got shape {tuple(W.shape)}")
    packed, absmax = quantize_nf4_cuda(W, blocksize)
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=W.device)
    n, k = W.shape
    if not double_quant:
        return NF4Operand(packed, absmax, None, None, 0.0, int(blocksize), int(nested_blocksize), (n, k), code)
    offset = absmax.mean()
    q, absmax2, code2 = _quantize_blockwise_dynamic(absmax - offset, nested_blocksize)
    return NF4Operand(packed, q.reshape(-1), absmax2.reshape(-1), code2.reshape(-1), float(offset),
                      int(blocksize), int(nested_blocksize), (n, k), code)
