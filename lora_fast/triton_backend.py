"""Triton backend of the LoRA op: composes the kernels of ``kernels/`` into forward/backward.

Two regimes, chosen per call by :func:`plan` (thresholds measured on the GPU, see bench/NOTES.md):

* ``fused``: one Triton GEMM per pass with the NF4 dequantisation in its main loop and the
  adapter in its epilogue (``Y = X·deq(W0)ᵀ + s·XA·Bᵀ + bias``; ``dX = dY·deq(W0) + s·(dY·B)·A⊙m``),
  plus one pass over X for ``XA`` and one over dY for ``dY·B`` and ``dB``.  Reads the 4-bit
  weight once per pass: the right choice when the weight dominates the bytes (small M).
* ``merged`` (no dropout, large M): ``W_eff = deq(W0) + s·B·A`` is built in one Triton pass into
  a transient buffer (freed after use, never kept between forward and backward) and a single
  cuBLAS GEMM computes ``Y = X·W_effᵀ`` and ``dX = dY·W_eff`` -- exact algebra, and the
  adapter costs no extra pass over Y or dX.  ``XA``/``dY·B``/``dB``/``dA`` come from the same
  low-rank passes as in the fused regime.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import torch

from . import _backend
from ._gemm import lora_gemm
from ._lowrank import da_pass, dense_merge, dequant_nf4, dy_pass, xa_forward
from ._operand import NF4Operand

Tensor = torch.Tensor
Base = Union[Tensor, NF4Operand]

# M at or above which the merged (transient W_eff + cuBLAS) regime is used when dropout is 0.
# Set from the M sweep in bench/NOTES.md; LORA_FAST_MERGE_MIN_M overrides it (tests use it to
# force each regime).
MERGE_MIN_M = 256


def _merge_min_m() -> int:
    v = os.environ.get("LORA_FAST_MERGE_MIN_M")
    return int(v) if v else MERGE_MIN_M


def plan(m: int, dropout_p: float, device: torch.device) -> str:
    """'merged' or 'fused' for a call with ``m`` rows."""
    if dropout_p == 0.0 and m >= _merge_min_m():
        return "merged"
    return "fused"


def _effective_weight(base: Base, A: Tensor, B: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    if dtype != torch.float32:
        # W_eff is rounded to ``dtype`` anyway: a bf16/fp16 product with fp32 accumulation is as
        # exact as it needs to be and runs on the tensor cores (fp32 adapters would force the
        # IEEE fp32 path, ~10x slower on sm_90).  The (r, K)/(N, r) casts are tiny.
        A, B = A.to(dtype), B.to(dtype)
    if isinstance(base, NF4Operand):
        return dequant_nf4(base, out_dtype=dtype, merge=(A, B, scaling))
    return dense_merge(base, A, B, scaling=scaling, out_dtype=dtype)


def _kind(base: Base) -> str:
    return "nf4" if isinstance(base, NF4Operand) else "dense"


def forward(
    x: Tensor, base: Base, bias: Optional[Tensor], A: Tensor, B: Tensor, scaling: float, dropout_p: float, seed: int
) -> Tuple[Tensor, Tensor]:
    """x (M, K) -> (y (M, N) in x.dtype, xa (M, r) fp32)."""
    m = x.shape[0]
    xa = xa_forward(x, A, dropout_p=dropout_p, seed=seed)
    path = plan(m, dropout_p, x.device)
    _backend.record("triton", f"fwd_{path}_{_kind(base)}")
    if path == "merged":
        w_eff = _effective_weight(base, A, B, scaling, x.dtype)
        if bias is not None:
            y = torch.addmm(bias.to(x.dtype), x, w_eff.t())
        else:
            y = x @ w_eff.t()
        return y, xa
    y = lora_gemm(x, base, w_transposed=False, p=xa, q=B.t(), scaling=scaling, bias=bias)
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
    path = plan(m, dropout_p, dy.device)
    _backend.record("triton", f"bwd_{path}_{_kind(base)}")
    dyb = db = None
    if need_da or need_db or (need_dx and path == "fused"):
        dyb, db = dy_pass(dy, B, xa, scaling=scaling)
    dx = None
    if need_dx:
        if path == "merged":
            dx = dy @ _effective_weight(base, A, B, scaling, dy.dtype)
        else:
            dx = lora_gemm(dy, base, w_transposed=True, p=dyb, q=A, scaling=scaling,
                           dropout_p=dropout_p, seed=seed)
        if dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
    da = da_pass(dyb, x, scaling=scaling, dropout_p=dropout_p, seed=seed, out_dtype=A.dtype) if need_da else None
    dbias = dy.sum(0) if need_dbias else None
    return dx, da, (db if need_db else None), dbias
