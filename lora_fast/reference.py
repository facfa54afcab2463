"""Pure-PyTorch reference LoRA/QLoRA: the parity oracle for every kernel and the CPU backend.

    y = x·W0ᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ,   s = α/r  (α/√r with rsLoRA)

Gradients of a frozen-base layer: dX = dY·W0 + s·((dY·B)·A)⊙m, dA = s·(dY·B)ᵀ·drop(x),
dB = s·dYᵀ·(drop(x)·Aᵀ), never dW0.  ``m`` is the dropout scale mask (0 or 1/(1-p)).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._operand import NF4Operand

Tensor = torch.Tensor


def nf4_dequantize(op: NF4Operand, dtype: torch.dtype) -> Tensor:
    """Dequantise an NF4 operand to a dense (N, K) tensor exactly as bitsandbytes does
    (code value times fp32 absmax, one rounding to ``dtype``)."""
    n, k = op.shape
    numel = n * k
    packed = op.packed.reshape(-1)
    idx = torch.stack(((packed >> 4) & 15, packed & 15), dim=-1).reshape(-1)[:numel].long()
    if op.nested:
        absmax = op.code2.to(torch.float32)[op.absmax.long()]
        groups = torch.arange(absmax.numel(), device=absmax.device) // op.nested_blocksize
        absmax = absmax * op.absmax2.to(torch.float32)[groups] + op.offset
    else:
        absmax = op.absmax.to(torch.float32)
    scale = absmax.repeat_interleave(op.blocksize)[:numel]
    return (op.code.to(torch.float32)[idx] * scale).to(dtype).reshape(n, k)


def dropout_scale_mask(seed: int, m: int, k: int, p: float, device: torch.device) -> Tensor:
    """Dropout scale mask (fp32, 0 or 1/(1-p)) of the torch backend, regenerated from ``seed``."""
    if p <= 0.0:
        return torch.ones(m, k, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    keep = torch.rand(m, k, generator=gen, device=device) >= p
    return keep.to(torch.float32) / (1.0 - p)


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    mask: Optional[Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Differentiable reference.  ``x`` (..., K), ``weight`` (N, K) dense, ``lora_A`` (r, K),
    ``lora_B`` (N, r), ``mask`` (..., K) dropout scale mask or None.  With ``compute_dtype``
    (e.g. torch.float64) everything is upcast: that is the oracle the tests compare against;
    the result is returned in that dtype."""
    dt = compute_dtype or x.dtype
    xc = x.to(dt)
    xd = xc if mask is None else xc * mask.to(dt)
    y = xc @ weight.to(dt).t() + scaling * ((xd @ lora_A.to(dt).t()) @ lora_B.to(dt).t())
    if bias is not None:
        y = y + bias.to(dt)
    return y


def forward(
    x: Tensor, w: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor, scaling: float, mask: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Torch-backend forward on 2-D ``x`` (M, K) with dense ``w`` (N, K): returns (y, xa fp32).

    The adapter term (+ bias) is written first and the base GEMM accumulates onto it, so Y is
    rounded once from the fp32 sum, as the Triton kernels do.  (Rounding ``X·Wᵀ`` first, as
    PEFT does, drops an adapter term below half an ulp of the output: bench/NOTES.md.)"""
    dt = x.dtype
    xd = x if mask is None else (x * mask).to(dt)
    xa = xd @ A.to(dt).t()
    if bias is not None:
        y = torch.addmm(bias.to(dt), xa, B.to(dt).t(), alpha=scaling)
    else:
        y = torch.mm(xa, B.to(dt).t()).mul_(scaling)
    y.addmm_(x, w.to(dt).t())
    return y, xa.to(torch.float32)


def _mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in fp32 (fp16/bf16 operands upcast: their products are exact in fp32, so this is
    the fp32-accumulated product the kernels compute)."""
    return torch.mm(a, b) if a.dtype == torch.float32 and b.dtype == torch.float32 else torch.mm(a.float(), b.float())


def backward(
    dy: Tensor,
    x: Tensor,
    xa: Tensor,
    w: Tensor,
    A: Tensor,
    B: Tensor,
    scaling: float,
    mask: Optional[Tensor],
    needs: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Torch-backend backward: (dx, dA, dB, dbias) for the flags in ``needs``; dW0 never."""
    need_dx, need_da, need_db, need_dbias = needs
    dt = dy.dtype
    # dY·B, dA and dB accumulate and come out in fp32 as the kernels' passes do (an fp16 product
    # would overflow where the fp32 adapter gradient does not); dY·B enters the next products in
    # the activation dtype, as in the kernels
    dyb = _mm_f32(dy, B.to(dt)).to(dt)  # (M, r)
    dx = da = db = dbias = None
    if need_dx:
        adapter = (dyb @ A.to(dt)).mul_(scaling)
        if mask is not None:
            adapter = adapter * mask
        dx = adapter.to(dt).addmm_(dy, w.to(dt)).to(x.dtype)  # one rounding, as in forward
    if need_da:
        xd = x if mask is None else (x * mask).to(dt)
        da = _mm_f32(dyb.t(), xd.to(dt)).mul_(scaling).to(A.dtype)
    if need_db:
        db = _mm_f32(dy.t(), xa.to(dt)).mul_(scaling).to(B.dtype)
    if need_dbias:
        dbias = dy.sum(0)
    return dx, da, db, dbias
