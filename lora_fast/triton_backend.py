"""Triton backend of the LoRA op: composes the kernels of ``kernels/`` into forward/backward.

Regimes, chosen per call by :func:`plan`:

* ``merged`` (no dropout, NF4 base: the default there): ``W_eff = deq(W0) + s·B·A`` is built in
  one Triton pass into a transient buffer (freed after use, never kept between forward and
  backward) and a single cuBLAS GEMM computes ``Y = X·W_effᵀ`` and ``dX = dY·W_eff``; the adapter
  costs no pass over Y or dX.  ``W_eff`` is rounded once to the activation dtype from fp32
  ``code·absmax + s·B·A``, which lies off the bf16 grid: while ``s·B·A`` is far below one ulp of
  W0 (early in training) the rounding keeps it on average (one-ulp flips of W0).  Measured
  (bench/NOTES.md, "End-to-end loss curves"): the loss curve follows an fp32 run of the same model
  as closely as the split regime does.
* ``split`` (no dropout, dense base: the default there): the dense bf16/fp16 W0 is *on* the grid,
  so ``W0 + s·B·A`` would round back to W0 and lose a small adapter.  Instead the adapter term
  ``bias + s·XA·Bᵀ`` is written first by a rank-r cuBLAS GEMM into the output and the base GEMM
  accumulates onto it in its epilogue (``Y.addmm_(X, Wᵀ)``, beta = 1): Y is rounded once, from
  fp32.  The same for ``dX = s·(dY·B)·A + dY·W``.  An NF4 base can ask for it too (its deq(W0)
  goes to a transient buffer).
* ``dequant`` (dropout > 0): the adapter sees ``drop(X)``, so it cannot be folded into the
  weight.  ``deq(W0)`` goes to a transient buffer and the Triton GEMM adds the adapter in its
  epilogue (``Y = X·Wᵀ + s·XA·Bᵀ``; ``dX = dY·W + s·(dY·B)·A⊙m`` with the mask regenerated).
* ``fused``: the same Triton GEMM with the NF4 dequantisation inside its main loop (no
  buffer at all).  On an H100 this lost at every M measured (e.g. gate_proj step at M=64:
  6.2 ms against 1.8 ms merged at M=256, q_proj with dropout at M=8192: 63 ms), so it runs only
  when ``LORA_FAST_TRITON_PATH=fused`` asks for it; decode-sized NF4 forwards go to the CUDA
  GEMV under ``auto`` instead (see ops.py).

``LORA_FAST_TRITON_PATH`` = split | merged | dequant | fused forces a regime where it is valid
(tests and the bench use it).  In every regime ``XA``/``dY·B``/``dB``/``dA`` come from the
low-rank passes.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import torch

from . import _backend, _nf4_rows
from ._gemm import lora_gemm
from ._lowrank import da_pass, dense_merge, dequant_nf4, dy_pass, xa_forward
from ._operand import NF4Operand

Tensor = torch.Tensor
Base = Union[Tensor, NF4Operand]

PATHS = ("split", "merged", "dequant", "fused")
LOWRANK = ("triton", "cublas")


def _lowrank_impl(dropout_p: float) -> str:
    """Who runs the skinny adapter GEMMs (XA, dY·B, dB, dA): the Triton passes of
    ``kernels/lowrank.py`` (one read of dY for dY·B and dB) or cuBLAS (``LORA_FAST_LOWRANK=cublas``,
    four library calls; dropout always uses Triton, which regenerates the mask in-kernel).  Kept
    selectable so the bench can compare them on each GPU (bench/NOTES.md)."""
    name = os.environ.get("LORA_FAST_LOWRANK", "triton").strip().lower() or "triton"
    if name not in LOWRANK:
        raise ValueError(f"LORA_FAST_LOWRANK={name!r} is not one of {', '.join(LOWRANK)}")
    return "triton" if dropout_p > 0 else name


def _xa(x: Tensor, A: Tensor, dropout_p: float, seed: int) -> Tensor:
    if _lowrank_impl(dropout_p) == "cublas":
        return (x @ A.to(x.dtype).t()).float()  # fp32: the op's saved XA (its fake says so)
    return xa_forward(x, A, dropout_p=dropout_p, seed=seed)


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=float32) works here (CUDA, torch >= 2.8)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` as fp32 with fp32 accumulation for fp16/bf16 operands (the adapter gradients
    dA/dB keep fp32, as the Triton passes give them).  On CUDA: cuBLAS with an fp32 output
    (``out_dtype``); where that overload is missing, the product is rounded to the operand dtype
    first, with a warning once.  Elsewhere (CPU tests): the operands are upcast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        if _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE[0] = False
                _backend.warn_once("mm-out-dtype", "lora_fast: this torch has no torch.mm(..., out_dtype=float32); "
                                   "LORA_FAST_LOWRANK=cublas rounds dA/dB to the activation dtype before fp32")
        _backend.record("triton", "lowrank_cublas_rounded_grads")
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _dy(dy: Tensor, B: Tensor, xa: Tensor, scaling: float, dropout_p: float) -> Tuple[Tensor, Tensor]:
    if _lowrank_impl(dropout_p) == "cublas":
        dyb = dy @ B.to(dy.dtype)  # consumed in dy's dtype (dX's adapter term, dA's operand)
        db = _mm_f32(dy.t(), xa.to(dy.dtype)).mul_(scaling).to(B.dtype)
        return dyb, db
    return dy_pass(dy, B, xa, scaling=scaling)


def _da(dyb: Tensor, x: Tensor, scaling: float, dropout_p: float, seed: int, out_dtype: torch.dtype) -> Tensor:
    if _lowrank_impl(dropout_p) == "cublas":
        return _mm_f32(dyb.to(x.dtype).t(), x).mul_(scaling).to(out_dtype)
    return da_pass(dyb, x, scaling=scaling, dropout_p=dropout_p, seed=seed, out_dtype=out_dtype)


def plan(m: int, dropout_p: float, device: torch.device, base: Optional[Base] = None) -> str:
    """The regime of a call with ``m`` rows on ``base``: 'merged', 'split', 'dequant' or 'fused'
    (module docstring)."""
    forced = os.environ.get("LORA_FAST_TRITON_PATH", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise ValueError(f"LORA_FAST_TRITON_PATH={forced!r} is not one of {', '.join(PATHS)}")
        if forced in ("split", "merged") and dropout_p > 0:
            return "dequant"  # the adapter sees drop(X): it cannot be folded into the weight
        return forced
    if dropout_p > 0:
        return "dequant"
    return "merged" if isinstance(base, NF4Operand) else "split"


def adapter_out(lowrank: Tensor, factor: Tensor, scaling: float, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``bias + s·lowrank @ factor`` as a new (M, N) tensor in ``dtype``: the output buffer a base
    GEMM then accumulates onto (``out.addmm_(x, w)``).  lowrank (M, r) fp32, factor (r, N)."""
    lr = lowrank.to(dtype)
    f = factor.to(dtype)
    if bias is not None:
        return torch.addmm(bias.to(dtype), lr, f, alpha=scaling)
    out = torch.empty((lr.shape[0], f.shape[1]), dtype=dtype, device=lr.device)
    return out.addmm_(lr, f, beta=0, alpha=scaling)  # beta = 0: the uninitialised buffer is not read


def _effective_weight(base: Base, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    # W_eff is rounded to ``dtype`` anyway: for a 16-bit dtype the factors are rounded to it in
    # the kernel's registers (``round_factors``) and the product runs on the tensor cores with
    # fp32 accumulation (fp32 adapters would force the IEEE fp32 path, ~10x slower on sm_90).
    # Rounding in registers rather than with ``A.to(dtype)`` on the host gives the same values
    # and saves four torch ops per step (bench/NOTES.md, "Host work per step").
    merge = (A, B, scaling)
    if isinstance(base, NF4Operand):
        if _nf4_rows.supported(base):
            return _nf4_rows.dequant_rows(base, dtype, merge=merge, round_factors=True)
        return dequant_nf4(base, out_dtype=dtype, merge=merge, round_factors=True)
    return dense_merge(base, A, B, scaling=scaling, out_dtype=dtype, round_factors=True)


def _dequantized(base: Base, dtype: torch.dtype, cast: bool = False) -> Tensor:
    """deq(W0) (N, K) in ``dtype``; a dense W0 as it is (``cast``: in ``dtype``, for cuBLAS)."""
    if isinstance(base, NF4Operand):
        if _nf4_rows.supported(base):
            return _nf4_rows.dequant_rows(base, dtype)
        return dequant_nf4(base, out_dtype=dtype)
    return base.to(dtype) if cast else base


def _kind(base: Base) -> str:
    return "nf4" if isinstance(base, NF4Operand) else "dense"


def forward(
    x: Tensor, base: Base, bias: Optional[Tensor], A: Tensor, B: Tensor, scaling: float, dropout_p: float, seed: int
) -> Tuple[Tensor, Tensor]:
    """x (M, K) -> (y (M, N) in x.dtype, xa (M, r) fp32)."""
    m = x.shape[0]
    xa = _xa(x, A, dropout_p, seed)
    path = plan(m, dropout_p, x.device, base)
    _backend.record("triton", f"fwd_{path}_{_kind(base)}")
    if path == "split":
        y = adapter_out(xa, B.t(), scaling, bias, x.dtype)
        return y.addmm_(x, _dequantized(base, x.dtype, cast=True).t()), xa
    if path == "merged":
        w_eff = _effective_weight(base, A, B, scaling, x.dtype)
        return torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype)), xa
    w = _dequantized(base, x.dtype) if path == "dequant" else base
    y = lora_gemm(x, w, w_transposed=False, p=xa, q=B.t(), scaling=scaling, bias=bias)
    return y, xa


def backward(
    dy: Tensor,
    x: Tensor,
    xa: Tensor,
    base: Base,
    A: Tensor,
    B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: List[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dA, dB, dbias) for the flags in ``needs``; dW0 is never computed."""
    need_dx, need_da, need_db, need_dbias = needs
    m = dy.shape[0]
    path = plan(m, dropout_p, dy.device, base)
    _backend.record("triton", f"bwd_{path}_{_kind(base)}")
    dyb = db = None
    if need_da or need_db or (need_dx and path != "merged"):
        dyb, db = _dy(dy, B, xa, scaling, dropout_p)
    dx = None
    if need_dx:
        if path == "split":
            dx = adapter_out(dyb, A, scaling, None, dy.dtype).addmm_(dy, _dequantized(base, dy.dtype, cast=True))
        elif path == "merged":
            dx = dy @ _effective_weight(base, A, B, scaling, dy.dtype)
        else:
            w = _dequantized(base, dy.dtype) if path == "dequant" else base
            dx = lora_gemm(dy, w, w_transposed=True, p=dyb, q=A, scaling=scaling,
                           dropout_p=dropout_p, seed=seed)
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
    da = _da(dyb, x, scaling, dropout_p, seed, A.dtype) if need_da else None
    dbias = dy.sum(0) if need_dbias else None
    return dx, da, (db if need_db else None), dbias
