"""Fused RMSNorm, gated-SiLU MLP and causal-LM loss for Llama-family models, and the model patch
that uses them.

A QLoRA step spends GPU time outside the LoRA layers too.  Hugging Face's ``LlamaRMSNorm``
runs as ~7 elementwise kernels forward and ~12 backward over fp32 copies of the hidden state,
and keeps an fp32 copy of it for backward; ``act_fn(gate) * up`` runs as 2 kernels forward and
3 backward and keeps ``silu(gate)`` for backward.  :func:`fuse_ops` swaps those modules, in
place, for one Triton kernel per pass (``kernels/rmsnorm.py``, ``kernels/swiglu.py``)::

    rms_norm(x (..., N), weight (N,), eps) -> (..., N) in promote(weight.dtype, x.dtype)
    silu_mul(g (...), u (...))              -> silu(g) * u, same shape and dtype
    rope(q (B, H, S, D), k (B, Hk, S, D), cos, sin)  -> Llama's apply_rotary_pos_emb, bit-equal
    cross_entropy(logits (M, V), target (M,), num_items_in_batch=None, ignore_index=-100) -> fp32 ()

The causal-LM loss (``ForCausalLMLoss``) upcasts the logits to an fp32 copy and runs
log-softmax and NLL over it, forward and backward; :func:`cross_entropy` reads the logits once
each way and writes only their gradient (``causal_lm_loss`` is installed as the model's
``loss_function``, an instance attribute; the class is untouched).  The rotary embedding is a
module-level function of each modeling file, called by the attention's forward: it is replaced
in that module, process-wide (bit-equal, so other models of the class compute the same numbers),
and restored by :func:`unfuse_ops`.

with Hugging Face's rounding points (bench/NOTES.md: "Fused RMSNorm, SwiGLU, RoPE and loss" has the bytes
each moves and the predicted gain).  Only modules whose ``forward`` is, line for line, Llama's
are converted (Mistral, Qwen2/3 and the many "Copied from Llama" classes); others are listed in
the report with the reason.  On the CPU (``auto``) and with ``LORA_FAST_BACKEND=torch`` the
reference expressions run; under ``torch.compile`` too (Inductor fuses them itself).
"""
from __future__ import annotations

import inspect
import re
import sys
import textwrap
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend
from ._launch import launch
from ._operand import kernel_module
from .patch import PatchReport, swap_class

Tensor = torch.Tensor

__all__ = ["rms_norm", "silu_mul", "rope", "cross_entropy", "causal_lm_loss", "fuse_ops", "unfuse_ops",
           "rms_norm_reference", "silu_mul_reference", "cross_entropy_reference"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# weight/input dtype promotion of the kernel dtypes (torch.promote_types is a dispatched op: host time)
_PROMOTE = {(a, b): torch.promote_types(a, b) for a in _FLOAT for b in _FLOAT}


# --------------------------------------------------------------------------------------------
# references (the torch backend and the parity oracle): Hugging Face's expressions
# --------------------------------------------------------------------------------------------

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm.forward``: fp32 statistics, x̂ rounded to x's dtype, then ``weight * x̂``."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def silu_mul_reference(g: Tensor, u: Tensor) -> Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU."""
    return F.silu(g) * u


# --------------------------------------------------------------------------------------------
# backend choice
# --------------------------------------------------------------------------------------------

def _triton_on(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` (as the LoRA ops choose: ``auto``
    takes them on CUDA, the reference on the CPU; ``cuda`` has no CUDA C++ version of these, so
    it takes the Triton ones)."""
    backend = _backend.select(device)
    if backend == "cuda":
        ok, why = _backend.triton_status(device)
        if not ok:
            raise _backend.BackendUnavailableError(
                f"LORA_FAST_BACKEND=cuda: the fused RMSNorm/SwiGLU kernels are Triton kernels and Triton cannot run: {why}"
            )
        return True
    return backend == "triton"


def _functorch_active() -> bool:
    """Under torch.func transforms (grad, vmap, jvp) the reference expressions run: the kernels'
    autograd Functions define no vmap/jvp rules."""
    return torch._C._are_functorch_transforms_active()


def _fallback(op: str, why: str) -> None:
    _backend.record("torch", f"{op}_fallback({why})")
    _backend.warn_once(f"{op}-fallback:{why}", f"lora_fast: {op} runs the PyTorch reference: {why}")


def _n_programs_cap(device: torch.device) -> int:
    if device.type == "cuda":
        from ._lowrank import _device_info  # (SM count, L2), cached per device

        return 4 * _device_info(device)[0]
    return 8


def _interpreting() -> bool:
    return _backend._interpreting()


# --------------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------------

def _rms_fwd(x2: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    k = kernel_module("rmsnorm")
    m, n = x2.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2.device)
    if m:
        cfg = k.norm_config(n)
        launch(k.rmsnorm_fwd_kernel, (m,), x2, weight, y, rstd, n, x2.stride(0), y.stride(0), float(eps),
               **cfg.kwargs, EMULATE_RNE=_interpreting(), num_warps=cfg.num_warps, num_stages=1)
    return y, rstd


def _rms_bwd(dy: Tensor, x2: Tensor, weight: Tensor, rstd: Tensor, need_dw: bool) -> Tuple[Tensor, Optional[Tensor]]:
    k = kernel_module("rmsnorm")
    m, n = x2.shape
    dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    cfg = k.norm_config(n, backward=True, has_dw=need_dw)
    single = cfg.kwargs["SINGLE"]
    if need_dw:
        rows = -(-m // min(m, _n_programs_cap(x2.device)))
        progs = -(-m // rows)
        # chunked rows accumulate their partial in place: it must start at zero
        part = (torch.empty if single else torch.zeros)((progs, n), dtype=torch.float32, device=x2.device)
    else:
        rows, progs, part = 1, m, dx  # dw_ptr unused (HAS_DW=False)
    launch(k.rmsnorm_bwd_kernel, (progs,), dy, x2, weight, rstd, dx, part, m, n, dy.stride(0), x2.stride(0),
           dx.stride(0), rows, **cfg.kwargs, HAS_DW=need_dw, EMULATE_RNE=_interpreting(),
           num_warps=cfg.num_warps, num_stages=1)
    return dx, (part.sum(0).to(weight.dtype) if need_dw else None)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, eps, out_dtype):
        y, rstd = _rms_fwd(x2, weight, eps, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.eps, ctx.out_dtype = eps, out_dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True
            x2, weight, _ = ctx.saved_tensors
            eps, out_dtype = ctx.eps, ctx.out_dtype
            return _backend.graph_backward(lambda x, w: rms_norm_reference(x, w, eps).to(out_dtype),
                                           (x2, weight), (dy,), "rms_norm") + (None, None)
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        with _backend.device_guard(x2.device):
            dx, dw = _rms_bwd(dy, x2, weight, rstd, need_dw)
        return (dx if need_dx else None), dw, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm: ``weight * (x · rsqrt(mean(x², -1) + eps)).to(x.dtype)``.

    x: (..., N) fp16/bf16/fp32; weight: (N,).  Returns (..., N) in the promotion of the two dtypes,
    as ``LlamaRMSNorm`` does.  Gradients for x and (if it requires grad) weight."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("rms_norm expects tensors for x and weight")
    n = x.shape[-1] if x.dim() else 0
    if weight.dim() != 1 or weight.shape[0] not in (n, 1):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, the input's last dim is {n}: need ({n},)")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: input is on {x.device} but the weight is on {weight.device}")
    if torch.compiler.is_compiling() or _functorch_active() or not _triton_on(x.device) or n == 0:
        return rms_norm_reference(x, weight, eps)
    if x.dtype not in _FLOAT or weight.dtype not in _FLOAT:
        _fallback("rms_norm", f"dtype {x.dtype} / weight {weight.dtype} (kernels take fp16, bf16, fp32)")
        return rms_norm_reference(x, weight, eps)
    _backend.record("triton", "rms_norm")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.shape[0] != n:  # a (1,) gain broadcast over the row (autograd sums its gradient back)
        weight = weight.expand(n)
    if weight.stride(0) != 1:  # the kernels read the weight as contiguous
        weight = weight.contiguous()
    out_dtype = _PROMOTE.get((weight.dtype, x.dtype)) or torch.promote_types(weight.dtype, x.dtype)
    with _backend.device_guard(x.device):
        y = _RMSNormFn.apply(x2, weight, float(eps), out_dtype)
    return y.view(*x.shape[:-1], n)


# --------------------------------------------------------------------------------------------
# gated SiLU
# --------------------------------------------------------------------------------------------

def _grid(numel: int, block: int) -> Tuple[int]:
    return (-(-numel // block),)


class _SiluMulFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        k = kernel_module("swiglu")
        h = torch.empty_like(g)
        if g.numel():
            launch(k.silu_mul_fwd_kernel, _grid(g.numel(), k.ELTWISE_BLOCK), g, u, h, g.numel(),
                   BLOCK=k.ELTWISE_BLOCK, EMULATE_RNE=_interpreting(), num_warps=k.ELTWISE_WARPS, num_stages=1)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh):
        if torch.is_grad_enabled():  # create_graph=True
            return _backend.graph_backward(silu_mul_reference, ctx.saved_tensors, (dh,), "silu_mul")
        k = kernel_module("swiglu")
        g, u = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        if g.numel():
            with _backend.device_guard(g.device):
                launch(k.silu_mul_bwd_kernel, _grid(g.numel(), k.ELTWISE_BLOCK), dh, g, u, dg, du, g.numel(),
                       BLOCK=k.ELTWISE_BLOCK, EMULATE_RNE=_interpreting(), num_warps=k.ELTWISE_WARPS, num_stages=1)
        need = ctx.needs_input_grad
        return (dg if need[0] else None), (du if need[1] else None)


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """``F.silu(g) * u`` in one pass each way (the gated MLP of Llama-family models).

    g, u: same shape, same fp16/bf16/fp32 dtype, same device.  Other inputs (broadcasting,
    mixed dtypes) run the two-op reference, counted in ``dispatch_stats`` and warned about once."""
    if g.device != u.device:
        raise ValueError(f"silu_mul: gate is on {g.device} but up is on {u.device}")
    if torch.compiler.is_compiling() or _functorch_active() or not _triton_on(g.device):
        return silu_mul_reference(g, u)
    if g.shape != u.shape or g.dtype != u.dtype or g.dtype not in _FLOAT:
        _fallback("silu_mul", f"gate {tuple(g.shape)} {g.dtype} / up {tuple(u.shape)} {u.dtype} "
                              "(the kernel takes equal shapes and one fp16/bf16/fp32 dtype)")
        return silu_mul_reference(g, u)
    _backend.record("triton", "silu_mul")
    with _backend.device_guard(g.device):
        return _SiluMulFn.apply(g.contiguous(), u.contiguous())


# --------------------------------------------------------------------------------------------
# rotary position embedding
# --------------------------------------------------------------------------------------------

def _rotate_half(x: Tensor) -> Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb`` (Llama)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rope_block(k, d: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_H) for head dim ``d``: one of kernels/rope.py's ROPE_CONFIGS."""
    block_h = max(8, 1 << (d // 2 - 1).bit_length())
    return k.rope_rows(block_h), block_h


def _rope_launch(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    k = kernel_module("rope")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)
    d0, d1, d2, d = x.shape
    rows = d0 * d1 * d2
    if rows:
        half = d // 2
        block_r, block_h = _rope_block(k, d)
        launch(k.rope_kernel, (-(-rows // block_r),), x, cos, sin, y, rows, d1, d2, half,
               *x.stride()[:3], *cos.stride()[:3], *sin.stride()[:3], *y.stride()[:3], BLOCK_R=block_r,
               BLOCK_H=block_h, BACKWARD=backward, EMULATE_RNE=_interpreting(),
               num_warps=k.ROPE_WARPS, num_stages=1, enable_fp_fusion=False)
    return y


class _RopeFn(torch.autograd.Function):
    """One tensor (q or k) with cos/sin already expanded to its shape."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the reference expression, differentiated
            return _backend.graph_backward(lambda x: x * cos + _rotate_half(x) * sin,
                                           (torch.zeros_like(g).requires_grad_(),), (g,), "rope") + (None, None)
        return _rope_launch(g, cos, sin, True), None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1) -> Tuple[Tensor, Tensor]:
    """Rotary position embedding of ``q`` and ``k`` as Hugging Face's Llama
    ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` computes it (the same rounding points),
    in one kernel per tensor and pass.  q, k: (batch, heads, seq, head_dim) for ``unsqueeze_dim=1``
    (any strides, contiguous head dim; k may have fewer heads); cos, sin: (batch or 1, seq,
    head_dim).  Other layouts and dtypes run the reference expression (counted in
    ``dispatch_stats``, warned once)."""
    if torch.compiler.is_compiling() or _functorch_active() or not _triton_on(q.device):
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    why = None
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        why = f"q {tuple(q.shape)} / k {tuple(k.shape)} (the kernel takes 4-D q and k with an even head dim)"
    elif not (q.dtype == k.dtype == cos.dtype == sin.dtype) or q.dtype not in _FLOAT:
        why = f"dtypes q {q.dtype}, k {k.dtype}, cos {cos.dtype}, sin {sin.dtype} (one fp16/bf16/fp32 dtype)"
    elif cos.requires_grad or sin.requires_grad:
        why = "cos/sin require grad"
    elif cos.stride(-1) != 1 or sin.stride(-1) != 1:
        why = "cos/sin with a strided last dim"
    elif q.shape[-1] > 1024:
        why = f"head_dim {q.shape[-1]} > 1024 (the kernel's configs stop there)"
    if why is not None:
        _fallback("rope", why)
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    try:
        cu, su = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        cq, sq, ck, sk = cu.expand(q.shape), su.expand(q.shape), cu.expand(k.shape), su.expand(k.shape)
    except RuntimeError:
        return rope_reference(q, k, cos, sin, unsqueeze_dim)  # raises PyTorch's own broadcasting error
    if any(t.stride(-1) != 1 for t in (cq, sq, ck, sk)) or cos.device != q.device or sin.device != q.device:
        # (a size-1 head dim broadcast by expand has stride 0; the kernel reads the head dim contiguously)
        _fallback("rope", "cos/sin broadcast over the head dim or on another device")
        return rope_reference(q, k, cos, sin, unsqueeze_dim)
    _backend.record("triton", "rope")
    with _backend.device_guard(q.device):
        return _RopeFn.apply(q, cq, sq), _RopeFn.apply(k, ck, sk)


# --------------------------------------------------------------------------------------------
# causal-LM cross entropy
# --------------------------------------------------------------------------------------------

def cross_entropy_reference(logits: Tensor, target: Tensor, num_items_in_batch=None, ignore_index: int = -100) -> Tensor:
    """Hugging Face's ``fixed_cross_entropy`` on ``logits.float()``."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if target.dtype != torch.int64 and not target.dtype.is_floating_point:
        target = target.long()  # the kernel takes int32/int64 targets; F.cross_entropy only int64
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class _CESumFn(torch.autograd.Function):
    """Σ over rows of the per-row cross entropy (fp32 0-d); backward writes d(logits) in the
    logits' dtype, scaled by the incoming gradient read on the device (no host sync)."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        k = kernel_module("cross_entropy")
        m, v = logits.shape
        loss = torch.empty((m,), dtype=torch.float32, device=logits.device)
        lse = torch.empty((m, 2), dtype=torch.float32, device=logits.device)  # (max, log Σ exp(x − max))
        if m:
            launch(k.ce_fwd_kernel, (m,), logits, target, loss, lse, v, logits.stride(0), int(ignore_index),
                   BLOCK_V=k.CE_BLOCK, num_warps=k.CE_WARPS, num_stages=1)
        ctx.save_for_backward(logits, target, lse)
        ctx.ignore_index = int(ignore_index)
        return loss.sum()

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph=True
            logits, target, _ = ctx.saved_tensors
            ii = ctx.ignore_index
            return _backend.graph_backward(
                lambda lg: F.cross_entropy(lg.float(), target, ignore_index=ii, reduction="sum"), (logits,), (g,),
                "cross_entropy") + (None, None)
        k = kernel_module("cross_entropy")
        logits, target, lse = ctx.saved_tensors
        m, v = logits.shape
        dx = torch.empty((m, v), dtype=logits.dtype, device=logits.device)
        if m:
            g = g.to(torch.float32).reshape(1)
            with _backend.device_guard(logits.device):
                launch(k.ce_bwd_kernel, (m,), logits, target, lse, g, dx, v, logits.stride(0), dx.stride(0),
                       ctx.ignore_index, BLOCK_V=k.CE_BLOCK, EMULATE_RNE=_interpreting(), num_warps=k.CE_WARPS,
                       num_stages=1)
        return dx, None, None


def cross_entropy(logits: Tensor, target: Tensor, num_items_in_batch=None, ignore_index: int = -100) -> Tensor:
    """Cross entropy of ``logits`` (M, V) fp16/bf16/fp32 against ``target`` (M,) int, as Hugging
    Face computes it (``F.cross_entropy(logits.float(), target, ignore_index)``: the mean over
    non-ignored rows, or the sum divided by ``num_items_in_batch`` when given), in one pass over
    the logits each way and without an fp32 copy of them.  A target outside [0, V) that is not
    ``ignore_index`` makes the loss NaN (PyTorch raises on the CPU and asserts on the GPU)."""
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"cross_entropy: logits must be (M, V) and target (M,), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"cross_entropy: logits on {logits.device} but target on {target.device}")
    if torch.compiler.is_compiling() or _functorch_active() or not _triton_on(logits.device):
        return cross_entropy_reference(logits, target, num_items_in_batch, ignore_index)
    if logits.dtype not in _FLOAT or target.dtype not in (torch.int64, torch.int32):
        _fallback("cross_entropy", f"logits {logits.dtype} / target {target.dtype} "
                                   "(the kernel takes fp16/bf16/fp32 logits and int32/int64 targets)")
        return cross_entropy_reference(logits, target, num_items_in_batch, ignore_index)
    _backend.record("triton", "cross_entropy")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    with _backend.device_guard(logits.device):
        total = _CESumFn.apply(logits, target.contiguous(), int(ignore_index))
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Optional[Tensor] = None, **kwargs) -> Tensor:
    """Drop-in for transformers' ``ForCausalLMLoss`` (what :func:`fuse_ops` installs as a causal
    LM's ``loss_function``): labels shifted by one, then :func:`cross_entropy`."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits, shift_labels, num_items_in_batch, ignore_index)


def _hf_causal_lm_loss():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except Exception:  # transformers without the loss registry (< 4.46)
        return None
    return ForCausalLMLoss


# --------------------------------------------------------------------------------------------
# the model patch
# --------------------------------------------------------------------------------------------

def _body(fn) -> Optional[Tuple[str, ...]]:
    """The statements of a function's source, without its signature, docstring, comments and
    blank lines (None when the source cannot be read)."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    lines = src.splitlines()
    while lines and not lines[0].lstrip().startswith("def "):  # decorators
        lines.pop(0)
    # the signature may span lines: drop up to the line that ends it
    while lines and not lines[0].rstrip().endswith(":"):
        lines.pop(0)
    lines = [ln.strip() for ln in lines[1:]]
    out, in_doc = [], False
    for ln in lines:
        if ln.startswith(('"""', "'''")):
            if not (len(ln) > 3 and ln.endswith(ln[:3])):
                in_doc = not in_doc
            continue
        if in_doc or not ln or ln.startswith("#"):
            continue
        out.append(ln.split("  #")[0].rstrip())
    return tuple(out)


# Llama's forward bodies (transformers 4.4x-5.x); a class whose forward reads the same is converted
_LLAMA_RMSNORM = (
    "input_dtype = hidden_states.dtype",
    "hidden_states = hidden_states.to(torch.float32)",
    "variance = hidden_states.pow(2).mean(-1, keepdim=True)",
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)",
    "return self.weight * hidden_states.to(input_dtype)",
)
_LLAMA_MLP = (
    (
        "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "return down_proj",
    ),
    ("return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",),
)


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU):
        return type(act).forward is nn.SiLU.forward  # a subclass may compute something else
    if type(act).__name__ == "SiLUActivation":
        return _body(type(act).forward) in (("return nn.functional.silu(input)",), ("return F.silu(input)",))
    return act is F.silu


class _FusedRMSNorm:
    _lf_fused_orig: type

    def forward(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _FusedMLP:
    _lf_fused_orig: type

    def forward(self, x: Tensor) -> Tensor:
        act = self.act_fn
        if getattr(act, "_forward_hooks", None) or getattr(act, "_forward_pre_hooks", None):  # hooks must see it run
            if not torch.compiler.is_compiling():
                _fallback("fused MLP", "act_fn has forward hooks: the module's own forward runs")
            return self._lf_fused_orig.forward(self, x)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


_FUSED: Dict[type, type] = {}
_PREFIX = "LoraFastFused__"
_SEP = "__"


def _enc(text: str) -> str:
    """Reversible: '_' -> '_u', '.' -> '_d' (so an encoded part never contains '__')."""
    return text.replace("_", "_u").replace(".", "_d")


def _dec(text: str) -> str:
    return re.sub(r"_([ud])", lambda m: "_" if m.group(1) == "u" else ".", text)


def _class_name(orig: type) -> str:
    return _PREFIX + _enc(orig.__module__) + _SEP + _enc(orig.__qualname__)


def _fused_class(orig: type, mixin: type) -> type:
    cls = _FUSED.get(orig)
    if cls is None:
        name = _class_name(orig)
        cls = type(name, (mixin, orig), {"_lf_fused_orig": orig, "__module__": __name__})
        cls.__qualname__ = name
        _FUSED[orig] = cls
    return cls


def __getattr__(name: str):  # importable by name (pickling a fused model): rebuild from the encoded original
    if name.startswith(_PREFIX):
        import importlib

        mod, sep, qual = name[len(_PREFIX):].partition(_SEP)
        if not sep:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        obj = importlib.import_module(_dec(mod))
        for part in _dec(qual).split("."):
            obj = getattr(obj, part)
        return _fused_class(obj, _FusedRMSNorm if _rmsnorm_reason(obj, None) is None else _FusedMLP)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rmsnorm_reason(cls: type, mod: Optional[nn.Module]) -> Optional[str]:
    body = _body(cls.forward)
    if body != _LLAMA_RMSNORM:
        return "forward differs from LlamaRMSNorm's (not converted: another formula or rounding)"
    if mod is not None:
        w = getattr(mod, "weight", None)
        if not isinstance(w, Tensor) or w.dim() != 1:
            return "no 1-D weight"
        if not isinstance(getattr(mod, "variance_epsilon", None), (float, int)):
            return "variance_epsilon is not a number"
    return None


def _mlp_reason(mod: nn.Module) -> Optional[str]:
    if _body(type(mod).forward) not in _LLAMA_MLP:
        return "forward differs from LlamaMLP's down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    act = getattr(mod, "act_fn", None)
    if not _is_silu(act):
        return f"activation {type(act).__name__} is not SiLU"
    if getattr(act, "_forward_hooks", None) or getattr(act, "_forward_pre_hooks", None):
        return "act_fn has forward hooks (the fused kernel would bypass them)"
    return None


def _is_mlp_candidate(mod: nn.Module) -> bool:
    return all(isinstance(getattr(mod, a, None), nn.Module) for a in ("gate_proj", "up_proj", "down_proj"))


_LLAMA_ROPE = (
    "cos = cos.unsqueeze(unsqueeze_dim)",
    "sin = sin.unsqueeze(unsqueeze_dim)",
    "q_embed = (q * cos) + (rotate_half(q) * sin)",
    "k_embed = (k * cos) + (rotate_half(k) * sin)",
    "return q_embed, k_embed",
)
_LLAMA_ROTATE_HALF = (
    "x1 = x[..., : x.shape[-1] // 2]",
    "x2 = x[..., x.shape[-1] // 2 :]",
    "return torch.cat((-x2, x1), dim=-1)",
)
_ROPE_ORIGINALS: Dict[str, object] = {}  # modeling module name -> its own apply_rotary_pos_emb
_ROPE_OWNERS: Dict[str, "weakref.WeakSet"] = {}  # modeling module name -> the models fused with it


def fused_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """What :func:`fuse_ops` puts in place of a modeling module's ``apply_rotary_pos_emb``."""
    return rope(q, k, cos, sin, unsqueeze_dim)


def _rope_reason(modeling) -> Optional[str]:
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None:
        return "no apply_rotary_pos_emb"
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    if params != ["q", "k", "cos", "sin", "unsqueeze_dim"] or _body(fn) != _LLAMA_ROPE:
        return "apply_rotary_pos_emb differs from Llama's"
    if _body(getattr(modeling, "rotate_half", None)) != _LLAMA_ROTATE_HALF:
        return "rotate_half differs from Llama's (another rotary layout)"
    return None


def fuse_ops(model: nn.Module) -> PatchReport:
    """Swap, in place, the RMSNorm and gated-SiLU MLP modules of a Llama-family ``model`` for the
    fused kernels (state dicts, parameters and hooks are untouched: only the class changes), and
    set a transformers ``*ForCausalLM``'s ``loss_function`` to :func:`causal_lm_loss` (``.loss_function``
    in the report) unless it already has a custom one.

    Works on a plain ``transformers`` model, a PEFT model, or one patched by
    :func:`lora_fast.patch` (``patch(model, fuse_ops=True)`` calls this).  Returns a
    :class:`PatchReport`: ``converted`` module names; ``skipped`` name → reason for modules
    named ``*RMSNorm`` or holding gate/up/down projections whose forward is not Llama's.
    :func:`unfuse_ops` undoes it."""
    report = PatchReport()
    hf_loss = _hf_causal_lm_loss()
    seen_modeling = set()
    for name, mod in model.named_modules():
        cls = type(mod)
        modeling = sys.modules.get(cls.__module__)
        if cls.__name__.endswith("Attention") and modeling is not None and cls.__module__ not in seen_modeling:
            # the rotary embedding is a function of the modeling module, called by the attention's
            # forward: it is replaced process-wide (bit-equal in 16-bit dtypes), restored by unfuse_ops
            seen_modeling.add(cls.__module__)
            label = f"{cls.__module__}.apply_rotary_pos_emb"
            if getattr(modeling, "apply_rotary_pos_emb", None) is fused_apply_rotary_pos_emb:
                _ROPE_OWNERS.setdefault(cls.__module__, weakref.WeakSet()).add(model)
                report.converted.append(label)
            else:
                why = _rope_reason(modeling)
                if why is None:
                    _ROPE_ORIGINALS[cls.__module__] = modeling.apply_rotary_pos_emb
                    modeling.apply_rotary_pos_emb = fused_apply_rotary_pos_emb
                    _ROPE_OWNERS.setdefault(cls.__module__, weakref.WeakSet()).add(model)
                    report.converted.append(label)
                elif why != "no apply_rotary_pos_emb":
                    report.skipped[label] = why
        if hf_loss is not None and isinstance(getattr(cls, "loss_function", None), property):
            # a transformers model: its causal-LM loss (instance attribute; the class is untouched)
            fn = mod.__dict__.get("_loss_function")
            label = f"{name}.loss_function" if name else "loss_function"
            if fn is causal_lm_loss:
                report.converted.append(label)
            elif fn is None and getattr(mod, "loss_type", None) in (None, "ForCausalLM") \
                    and _safe_loss_function(mod) is hf_loss and _is_causal_lm(mod):
                mod.loss_function = causal_lm_loss
                report.converted.append(label)
            elif fn is not None and _is_causal_lm(mod):
                report.skipped[label] = "a custom loss_function is set: left alone"
            elif fn is None and not _is_causal_lm(mod) and isinstance(getattr(mod, "lm_head", None), nn.Module) \
                    and _safe_loss_function(mod) is hf_loss:
                report.skipped[label] = (f"{cls.__name__} resolves to ForCausalLMLoss but is not a *ForCausalLM / "
                                         "*LMHeadModel class whose forward is known to call it that way: left alone")
        if isinstance(mod, (_FusedRMSNorm, _FusedMLP)):
            report.converted.append(name)
            continue
        if "rmsnorm" in cls.__name__.lower():
            why = _rmsnorm_reason(cls, mod)
            mixin = _FusedRMSNorm
        elif _is_mlp_candidate(mod):
            why = _mlp_reason(mod)
            mixin = _FusedMLP
        else:
            continue
        if why is None:
            why = swap_class(mod, _fused_class(cls, mixin))
        if why is not None:
            report.skipped[name] = f"{cls.__name__}: {why}"
            continue
        report.converted.append(name)
    return report


def _safe_loss_function(mod: nn.Module):
    try:
        return mod.loss_function
    except Exception:
        return None


def _is_causal_lm(mod: nn.Module) -> bool:
    """A transformers ``*ForCausalLM`` or ``*LMHeadModel`` (GPT-2 style) model: the ones whose
    forward calls ``self.loss_function`` with logits and labels as ForCausalLMLoss expects."""
    name = type(mod).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def unfuse_ops(model: nn.Module) -> List[str]:
    """Give every module converted by :func:`fuse_ops` its class (and a causal LM its loss
    function, the modeling module its rotary function once no fused model uses it) back;
    returns their names (``...loss_function`` and ``<modeling module>.apply_rotary_pos_emb`` are
    labels, not module names)."""
    restored = []
    for modname in list(_ROPE_ORIGINALS):
        owners = _ROPE_OWNERS.get(modname)
        mine = [m for m in model.modules() if owners is not None and m in owners]  # (fused as a whole or a part)
        if not mine:
            continue  # not fused through this model (e.g. a deepcopy of one): another model owns it
        for m in mine:
            owners.discard(m)
        restored.append(f"{modname}.apply_rotary_pos_emb")
        if len(owners):
            continue  # other fused models still use the fused function
        modeling = sys.modules.get(modname)
        original = _ROPE_ORIGINALS.pop(modname)
        if modeling is not None and getattr(modeling, "apply_rotary_pos_emb", None) is fused_apply_rotary_pos_emb:
            modeling.apply_rotary_pos_emb = original  # (a later patch by another library is left alone)
    for name, mod in model.named_modules():
        if mod.__dict__.get("_loss_function") is causal_lm_loss:
            del mod.__dict__["_loss_function"]
            restored.append(f"{name}.loss_function" if name else "loss_function")
        if isinstance(mod, (_FusedRMSNorm, _FusedMLP)):
            why = swap_class(mod, mod._lf_fused_orig)
            if why is not None:
                warnings.warn(f"lora_fast.unfuse_ops: {name} keeps its fused class: {why}", RuntimeWarning, stacklevel=2)
                continue
            restored.append(name)
    return restored
