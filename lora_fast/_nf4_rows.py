"""Launcher of ``kernels/nf4.py``: row-tiled NF4 dequantisation (+ LoRA merge) for weights whose
rows hold whole quantisation blocks (``K % blocksize == 0``, blocksize <= 256)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._launch import launch
from ._lowrank import merge_on_tensor_cores
from ._operand import NF4Operand, kernel_module

Tensor = torch.Tensor


def _kernels():
    return kernel_module("nf4")


def supported(op: NF4Operand) -> bool:
    """True when the row-tiled kernel handles ``op`` (else use the general flat-index kernel)."""
    n, k = op.shape
    bs = int(op.blocksize)
    return (
        bs >= 2 and bs % 2 == 0 and bs <= 256 and 256 % bs == 0 and k % bs == 0 and n > 0
        and op.packed.is_contiguous() and op.absmax.is_contiguous()
        and (not op.nested or (op.absmax2.is_contiguous() and op.code2.is_contiguous()))
    )


def dequant_rows(op: NF4Operand, out_dtype: torch.dtype,
                 merge: Optional[Tuple[Tensor, Tensor, float]] = None, round_factors: bool = False) -> Tensor:
    """(N, K) ``deq(W0)`` [+ ``s·B·A`` for ``merge=(A (r,K), B (N,r), s)``] in ``out_dtype``,
    rounded once.  ``round_factors``: as in ``_lowrank.dequant_nf4``.  Caller checks
    :func:`supported`."""
    n, k = op.shape
    out = torch.empty((n, k), dtype=out_dtype, device=op.packed.device)
    if merge is not None:
        A, B, scaling = merge
        r = A.shape[0]
        if tuple(A.shape) != (r, k) or tuple(B.shape) != (n, r):
            raise ValueError(f"merge factors A {tuple(A.shape)} / B {tuple(B.shape)} do not fit an ({n}, {k}) weight")
        ieee = not merge_on_tensor_cores(A, B, out_dtype, round_factors)
        block_r = 16  # wider R chunks spill with fp32 (IEEE) operands (compile_check)
    else:
        A = B = out
        r, scaling, ieee, block_r = 0, 0.0, False, 16
    nested = op.nested
    absmax2 = op.absmax2 if nested else op.absmax
    code2 = op.code2 if nested else op.code
    kern = _kernels()

    def grid(meta):
        return (triton_cdiv(n, meta["BLOCK_N"]) * triton_cdiv(k, meta["BLOCK_K"]),)

    launch(kern.nf4_rows_kernel, grid,
        op.packed, op.absmax, absmax2, code2, op.code, float(op.offset) if nested else 0.0,
        A, B, out, n, k, r, float(scaling),
        A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        QBLOCK=int(op.blocksize), QBLOCK2=int(op.nested_blocksize or 256), NESTED=bool(nested),
        HAS_MERGE=merge is not None and r > 0, BLOCK_R=block_r, IEEE=bool(ieee),
        # no FMA contraction: the nested absmax (code2*absmax2 + offset) and code*absmax must
        # round exactly as bitsandbytes' separate multiply and add do
        enable_fp_fusion=False,
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
