"""Triton kernels for the gated SiLU of Llama-family MLPs: ``h = silu(g) · u``.

    forward   a = round(g·σ(g)),  h = round(a · u)                          ``silu_mul_fwd_kernel``
    backward  du = round(dh · a),  da = round(dh · u),
              dg = round(da · σ(g) · (1 + g·(1 − σ(g))))                     ``silu_mul_bwd_kernel``

``round`` is to the activation dtype: the same rounding points as PyTorch's eager
``F.silu(g) * u`` and its autograd (each op computes in fp32 and rounds its output), so the
fused pair reproduces the two-op expression up to ``exp``'s last bits, while reading g and u
once per pass and never storing ``silu(g)`` for backward.  Flat, contiguous tensors; int64
offsets.  Launchers: ``lora_fast/norm_mlp.py``.
"""
import triton
import triton.language as tl

from .common import round_to

# one fixed config (bandwidth-bound elementwise kernels: 16-byte accesses of 16-bit values at 8
# elements per thread); listed for bench.compile_check
ELTWISE_BLOCK = 2048
ELTWISE_WARPS = 8
SWIGLU_CONFIGS = [triton.Config({"BLOCK": ELTWISE_BLOCK}, num_warps=ELTWISE_WARPS, num_stages=1)]


@triton.jit
def silu_mul_fwd_kernel(g_ptr, u_ptr, h_ptr, numel, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = round_to(g / (1.0 + tl.exp(-g)), h_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
    tl.store(h_ptr + offs, round_to(a * u, h_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)


@triton.jit
def silu_mul_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, numel, BLOCK: tl.constexpr, EMULATE_RNE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = 1.0 + tl.exp(-g)
    sig = 1.0 / e
    a = round_to(g / e, du_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)  # forward's silu(g), bit for bit
    tl.store(du_ptr + offs, round_to(dh * a, du_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
    da = round_to(dh * u, dg_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
    tl.store(dg_ptr + offs, round_to(da * sig * (1.0 + g * (1.0 - sig)), dg_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
