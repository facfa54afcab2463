"""Launcher of the Triton GEMM with a LoRA epilogue (``kernels/lora_gemm.py``).

    C[M, Nout] = a[M, Kred] @ Wop[Kred, Nout] + scaling * (p @ q) * Dmask + bias

``Wop`` is ``w.T`` (``w_transposed=False``, forward: ``X @ W0^T``) or ``w`` itself
(``w_transposed=True``, backward dX: ``dY @ W0``), where ``w`` is the frozen weight as stored,
dense (Nw, Kw) or NF4 (:class:`NF4Operand`).  ``Dmask`` is the dropout keep mask regenerated
from ``(seed, m*Nout + n)`` (see ``kernels/common.py``) and scaled by ``1/(1-dropout_p)``; it
multiplies only the LoRA term.  No big tensor is copied: every operand is addressed through
its strides (only the NF4 buffers must be contiguous, which bitsandbytes guarantees).

Under ``TRITON_INTERPRET=1`` (CPU tests) a single fixed config
(``kernels.lora_gemm.INTERPRETER_META``) is launched instead of the autotuner.
"""
from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext
from typing import Optional, Union

import torch

from ._launch import launch
from ._operand import NF4Operand, kernel_module  # the shared operand type (bitsandbytes layout)

__all__ = ["NF4Operand", "lora_gemm"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


# Test / benchmark hook: a dict with BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M and optionally
# num_warps / num_stages.  When set, every launch uses exactly that config (no autotuning,
# also under the interpreter).  Not part of the API.
_FORCE_CONFIG: Optional[dict] = None


def _kernels():
    return kernel_module("lora_gemm")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _span(t: torch.Tensor) -> int:
    """Largest element offset reachable through ``t``'s strides (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))


def _flat_contig(t: torch.Tensor, name: str, dtype, device, min_numel: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"NF4Operand.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"NF4Operand.{name} must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"NF4Operand.{name} is on {t.device}, activations on {device}")
    if t.numel() < min_numel:
        raise ValueError(f"NF4Operand.{name} has {t.numel()} elements, needs at least {min_numel}")
    # The kernel indexes these buffers flat; bitsandbytes buffers are already contiguous,
    # so this only copies in the unusual case of a strided view.
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def lora_gemm(
    a: torch.Tensor,
    w: Union[torch.Tensor, NF4Operand],
    *,
    w_transposed: bool,
    p: Optional[torch.Tensor] = None,
    q: Optional[torch.Tensor] = None,
    scaling: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``C = a @ Wop + scaling * (p @ q) * dropmask / (1 - dropout_p) + bias`` in ``a.dtype``.

    a: (M, Kred) fp16/bf16/fp32, any strides.
    w: dense (Nw, Kw) tensor as stored (fp16/bf16/fp32, any strides) or :class:`NF4Operand`.
    w_transposed: False -> Wop = w^T (Kred = Kw, Nout = Nw); True -> Wop = w (Kred = Nw, Nout = Kw).
    p, q: (M, R) and (R, Nout) LoRA factors (both or neither), fp16/bf16/fp32, any strides;
        they are cast to ``a.dtype`` for the tensor-core product (fp32 accumulation).
    bias: (Nout,) or None.
    dropout_p, seed: mask over the output coordinates, flat index ``m*Nout + n``; applied to
        the LoRA term only (a no-op without p/q).  ``dropout_p == 0`` compiles no mask code.
    out: optional (M, Nout) tensor of dtype ``a.dtype`` on a's device, any strides.
    """
    # ---------------- validation ----------------
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (M, Kred), got shape {tuple(a.shape)}")
    if a.dtype not in _ACT_DTYPES:
        raise ValueError(f"a must be fp16/bf16/fp32, got {a.dtype}")
    dev = a.device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"a is on {dev}; the Triton kernel needs a CUDA device (or TRITON_INTERPRET=1)")
    M, Kred = a.shape

    is_nf4 = isinstance(w, NF4Operand)
    if is_nf4:
        if len(w.shape) != 2:
            raise ValueError(f"NF4Operand.shape must be (Nw, Kw), got {w.shape}")
        Nw, Kw = int(w.shape[0]), int(w.shape[1])
        if Nw < 0 or Kw < 0:
            raise ValueError(f"NF4Operand.shape must be non-negative, got {w.shape}")
        if int(w.blocksize) <= 0:
            raise ValueError(f"NF4Operand.blocksize must be positive, got {w.blocksize}")
        numel_w = Nw * Kw
        if numel_w > _INT32_MAX:
            raise ValueError(f"NF4 weight of {numel_w} elements exceeds the kernel's int32 flat index")
        n_blocks = -(-numel_w // int(w.blocksize))
        packed = _flat_contig(w.packed, "packed", torch.uint8, dev, -(-numel_w // 2))
        code = _flat_contig(w.code, "code", torch.float32, dev, 16)
        if not isinstance(w.absmax, torch.Tensor) or w.absmax.dtype not in (torch.uint8, torch.float32):
            raise ValueError("NF4Operand.absmax must be an fp32 (plain) or uint8 (nested) tensor")
        nested = w.absmax.dtype == torch.uint8
        if not nested and w.absmax2 is not None:
            raise ValueError("NF4Operand.absmax2 is set but absmax is fp32 (nested absmax must be uint8)")
        if nested:
            absmax = _flat_contig(w.absmax, "absmax", torch.uint8, dev, n_blocks)
            if w.absmax2 is None or w.code2 is None:
                raise ValueError("NF4Operand.absmax is uint8 (nested) but absmax2/code2 is None")
            if int(w.nested_blocksize) <= 0:
                raise ValueError(f"NF4Operand.nested_blocksize must be positive, got {w.nested_blocksize}")
            absmax2 = _flat_contig(
                w.absmax2, "absmax2", torch.float32, dev, -(-n_blocks // int(w.nested_blocksize))
            )
            code2 = _flat_contig(w.code2, "code2", torch.float32, dev, 256)
        else:
            absmax = _flat_contig(w.absmax, "absmax", torch.float32, dev, n_blocks)
            absmax2 = code2 = absmax
        w_t = packed
        # flat index of Wop[k, n] into the row-major logical (Nw, Kw) weight
        stride_wk, stride_wn = (Kw, 1) if w_transposed else (1, Kw)
    else:
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"w must be a torch.Tensor or NF4Operand, got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D (Nw, Kw), got shape {tuple(w.shape)}")
        if w.dtype not in _ACT_DTYPES:
            raise ValueError(f"dense w must be fp16/bf16/fp32, got {w.dtype}")
        if w.device != dev:
            raise ValueError(f"w is on {w.device}, a on {dev}")
        if _span(w) > _INT32_MAX:
            raise ValueError("w spans more than 2**31 elements (kernel uses int32 weight offsets)")
        Nw, Kw = w.shape
        nested = False
        w_t = w
        absmax = absmax2 = code2 = code = a
        if w_transposed:
            stride_wk, stride_wn = w.stride(0), w.stride(1)
        else:
            stride_wk, stride_wn = w.stride(1), w.stride(0)

    K_w, Nout = (Nw, Kw) if w_transposed else (Kw, Nw)
    if K_w != Kred:
        raise ValueError(
            f"a has {Kred} columns but the weight's reduction dim is {K_w} "
            f"(w shape ({Nw}, {Kw}), w_transposed={w_transposed})"
        )

    if (p is None) != (q is None):
        raise ValueError("p and q must be given together (or both None)")
    has_lora = p is not None
    R = 0
    if has_lora:
        for name, t in (("p", p), ("q", q)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D torch.Tensor")
            if t.dtype not in _ACT_DTYPES:
                raise ValueError(f"{name} must be fp16/bf16/fp32, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device}, a on {dev}")
        if p.shape[0] != M:
            raise ValueError(f"p has {p.shape[0]} rows, a has {M}")
        if q.shape[1] != Nout:
            raise ValueError(f"q has {q.shape[1]} columns, output has {Nout}")
        if p.shape[1] != q.shape[0]:
            raise ValueError(f"rank mismatch: p is {tuple(p.shape)}, q is {tuple(q.shape)}")
        R = int(p.shape[1])
        if R < 1:
            raise ValueError("LoRA rank must be >= 1")
        if _span(q) > _INT32_MAX:
            raise ValueError("q spans more than 2**31 elements (kernel uses int32 offsets)")

    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != Nout:
            raise ValueError(f"bias must be a 1-D tensor of length {Nout}")
        if bias.dtype not in _ACT_DTYPES:
            raise ValueError(f"bias must be fp16/bf16/fp32, got {bias.dtype}")
        if bias.device != dev:
            raise ValueError(f"bias is on {bias.device}, a on {dev}")

    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    has_dropout = has_lora and dropout_p > 0.0
    if has_dropout and M * Nout > _INT32_MAX:
        raise ValueError("dropout mask index m*Nout+n overflows int32 for this output size")

    if out is None:
        out = torch.empty((M, Nout), device=dev, dtype=a.dtype)
    else:
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (M, Nout):
            raise ValueError(f"out must have shape ({M}, {Nout})")
        if out.dtype != a.dtype:
            raise ValueError(f"out must have dtype {a.dtype}, got {out.dtype}")
        if out.device != dev:
            raise ValueError(f"out is on {out.device}, a on {dev}")

    if M == 0 or Nout == 0:
        return out

    # ---------------- launch ----------------
    k = _kernels()
    p_t = p if has_lora else a
    q_t = q if has_lora else a
    bias_t = bias if bias is not None else a
    args = (
        a, w_t, absmax, absmax2, code2, code,
        p_t, q_t, bias_t, out,
        M, Nout, Kred, max(R, 1),
        a.stride(0), a.stride(1), stride_wk, stride_wn,
        p_t.stride(0) if has_lora else 0, p_t.stride(1) if has_lora else 0,
        q_t.stride(0) if has_lora else 0, q_t.stride(1) if has_lora else 0,
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        float(w.offset) if (is_nf4 and nested) else 0.0,
        int(w.blocksize) if is_nf4 else 1,
        int(w.nested_blocksize) if (is_nf4 and nested) else 1,
        float(scaling), dropout_p, 1.0 / (1.0 - dropout_p),
        int(seed),
        _next_pow2(M),
    )
    flags = dict(
        W_NF4=is_nf4, NESTED=nested, HAS_LORA=has_lora, HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_dropout, DOT_IEEE=a.dtype == torch.float32,
    )

    def grid(meta):
        return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(Nout, meta["BLOCK_N"]),)

    if _FORCE_CONFIG is not None:
        meta = dict(_FORCE_CONFIG)
        nw, ns = meta.pop("num_warps", 4), meta.pop("num_stages", 2)
        with torch.cuda.device(dev) if dev.type == "cuda" else _nullcontext():
            k.lora_gemm_kernel_heur[grid](*args, **flags, **meta, num_warps=nw, num_stages=ns)
    elif _interpreting():
        k.lora_gemm_kernel_heur[grid](*args, **flags, **k.INTERPRETER_META, num_warps=4, num_stages=1)
    else:
        with torch.cuda.device(dev):
            launch(k.lora_gemm_kernel_tuned, grid, *args, **flags)
    return out


def triton_cdiv(x: int, y: int) -> int:
    return -(-x // y)
