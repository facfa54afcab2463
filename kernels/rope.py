"""Triton kernel for Llama's rotary position embedding (``apply_rotary_pos_emb``).

With ``h = head_dim / 2``, x = (x1, x2) the two halves of a head row and rotate_half(x) = (−x2, x1):

    forward   y1 = r(r(x1·c1) − r(x2·s1)),  y2 = r(r(x2·c2) + r(x1·s2))
    backward  d1 = r(r(g1·c1) + r(g2·s2)),  d2 = r(r(g2·c2) − r(g1·s1))

``r`` rounds to the tensor's dtype: the rounding points of Hugging Face's
``q * cos + rotate_half(q) * sin`` and of its autograd (mul, mul, add; the backward's two
gradient contributions meet in one add), so bf16/fp16 results are bit-equal.  One launch per
tensor and pass instead of ~5 forward and ~6 backward elementwise kernels.  x is 4-D with any
strides over its three leading dims (the transposed projection outputs) and a contiguous head
dim; cos and sin are broadcast to it through their own strides (0 where broadcast; their head dim
contiguous).  Launcher:
``lora_fast/norm_mlp.py``.
"""
import triton
import triton.language as tl

from .common import round_to

ROPE_WARPS = 4


def rope_rows(block_h: int) -> int:
    """Rows per program: 16 up to head_dim 256, fewer above (ptxas spilled 16 rows of head_dim
    512 on sm_80, compile check)."""
    return max(1, min(16, 2048 // block_h))


# (BLOCK_R, BLOCK_H) by half head dim, the only configs the launcher uses (up to head_dim 1024)
ROPE_CONFIGS = [triton.Config({"BLOCK_R": rope_rows(h), "BLOCK_H": h}, num_warps=ROPE_WARPS, num_stages=1)
                for h in (8, 16, 32, 64, 128, 256, 512)]


@triton.jit
def rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,
    R, D1, D2, HALF,
    sx0, sx1, sx2, sc0, sc1, sc2, ss0, ss1, ss2, sy0, sy1, sy2,
    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    i2 = rows % D2
    t = rows // D2
    i1 = t % D1
    i0 = t // D1
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < HALF)[None, :]
    xo = (i0 * sx0 + i1 * sx1 + i2 * sx2)[:, None] + cols[None, :]
    co = (i0 * sc0 + i1 * sc1 + i2 * sc2)[:, None] + cols[None, :]
    so = (i0 * ss0 + i1 * ss1 + i2 * ss2)[:, None] + cols[None, :]
    yo = (i0 * sy0 + i1 * sy1 + i2 * sy2)[:, None] + cols[None, :]
    dt = y_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + co, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + so, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + so + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = round_to(x1 * c1, dt, EMULATE_RNE).to(tl.float32)
    a2 = round_to(x2 * c2, dt, EMULATE_RNE).to(tl.float32)
    if BACKWARD:
        b1 = round_to(x2 * s2, dt, EMULATE_RNE).to(tl.float32)
        b2 = round_to(x1 * s1, dt, EMULATE_RNE).to(tl.float32)
        y1 = a1 + b1
        y2 = a2 - b2
    else:
        b1 = round_to(x2 * s1, dt, EMULATE_RNE).to(tl.float32)
        b2 = round_to(x1 * s2, dt, EMULATE_RNE).to(tl.float32)
        y1 = a1 - b1
        y2 = a2 + b2
    tl.store(y_ptr + yo, round_to(y1, dt, EMULATE_RNE), mask=mask)
    tl.store(y_ptr + yo + HALF, round_to(y2, dt, EMULATE_RNE), mask=mask)
