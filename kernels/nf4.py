"""Row-tiled NF4 dequantisation (optionally merged with the LoRA update) for aligned weights.

    out[n, k] = code[q(n, k)] * absmax(n, k // QBLOCK)  [+ scaling * sum_r B[n, r] * A[r, k]]

Used when ``K % QBLOCK == 0`` (every Llama projection): each quantisation block then lies in
one row, so a (BLOCK_N, BLOCK_K) tile reads its packed bytes as one contiguous
(BLOCK_N, BLOCK_K/2) uint8 tile -- each byte once, no per-element address arithmetic --
splits the two nibbles, looks both up in the 16-entry code table, interleaves them with
``tl.join`` (high nibble first, as bitsandbytes packs them), and scales by ONE absmax per
QBLOCK elements (decoded once per block, nested statistics included).  The general kernel in
``lowrank.py`` gathers the byte, the code, the absmax (and its nested code and scale) for every
element instead.  The value is ``code * absmax`` in fp32 (plus the fp32 merge), rounded once to
the output dtype: bit-exact with bitsandbytes' dequantisation when there is no merge.

Signature::

    nf4_rows_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
                    a_ptr, b_ptr, out_ptr, N, K, R, scaling,
                    stride_ar, stride_ak, stride_bn, stride_br, stride_on, stride_ok,
                    QBLOCK, QBLOCK2, NESTED, HAS_MERGE, BLOCK_R, IEEE,   # constexpr
                    BLOCK_N, BLOCK_K)                              # constexpr, autotuned
    grid = (cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),)

Requirements (checked by the launcher): K % QBLOCK == 0, BLOCK_K % QBLOCK == 0.
"""
import os

import triton
import triton.language as tl

from .common import elsize as _elsize, tune_pick

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# BLOCK_K must be a multiple of the quantisation blocksize: 256 covers blocksizes 32..256 (the
# prune also drops any config that is not, should one be added).  8 warps: with 4, 256-wide rows
# spill 72-208 B under triton 3.6 (the GPU image's) for merges with fp32 factors.
ROWS_CONFIGS = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=8, num_stages=1),
]


def prune_rows(configs, named_args, **kwargs):
    """fp32 merge factors (``IEEE``: FMA dots) hold a BLOCK_R-long dot per output element: tiles
    above 16 elements per thread spill (16 B at 32 under triton 3.6 on sm_90; 0.8-3 KB of stack
    at 64 and more on sm_80/86/90, compile_check)."""
    a = {**named_args, **kwargs}
    qblock = int(a.get("QBLOCK", 0) or 0)
    if qblock > 0:
        whole = [c for c in configs if c.kwargs["BLOCK_K"] % qblock == 0]
        configs = whole or list(configs)
    if a.get("IEEE", False) and a.get("HAS_MERGE", False):
        small = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 16 * 32 * c.num_warps]
        configs = small or list(configs)
    elif a.get("HAS_MERGE", False) and max(_elsize(a.get("a_ptr")), _elsize(a.get("b_ptr"))) >= 4:
        # fp32 factors rounded in registers for the tensor cores: BLOCK_N=32 with 8 warps spills
        # 8 B on sm_90 (compile_check); the other configs compile clean on sm_80/86/90
        fits = [c for c in configs if not (c.kwargs["BLOCK_N"] == 32 and c.num_warps == 8)]
        configs = fits or list(configs)
    return tune_pick(configs)


ROWS_INTERP_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=1)
ROWS_MAX_QBLOCK = 256


@triton.autotune(
    configs=[ROWS_INTERP_CONFIG] if INTERPRET else ROWS_CONFIGS,
    key=["N", "K", "QBLOCK", "NESTED", "HAS_MERGE", "BLOCK_R", "IEEE"],
    prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: prune_rows(configs, named_args, **kw)},
)
@triton.jit
def nf4_rows_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
    a_ptr, b_ptr, out_ptr,
    N, K, R, scaling,
    stride_ar, stride_ak, stride_bn, stride_br, stride_on, stride_ok,
    QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, NESTED: tl.constexpr,
    HAS_MERGE: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    pid_n = pid // n_kblocks
    pid_k = pid % n_kblocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)

    # packed bytes: row n starts at byte n*K/2 (K is even: a multiple of QBLOCK)
    half_k = K // 2
    offs_b = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b_mask = n_mask[:, None] & (offs_b < half_k)[None, :]
    byte = tl.load(packed_ptr + offs_n64[:, None] * half_k + offs_b[None, :], mask=b_mask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))
    lo = tl.load(code_ptr + (byte & 15))
    w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))

    # one absmax per QBLOCK elements of a row
    blocks_per_row = K // QBLOCK
    offs_q = pid_k * (BLOCK_K // QBLOCK) + tl.arange(0, BLOCK_K // QBLOCK)
    q_mask = n_mask[:, None] & (offs_q < blocks_per_row)[None, :]
    blk = offs_n64[:, None] * blocks_per_row + offs_q[None, :]
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=q_mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + blk // QBLOCK2, mask=q_mask, other=0.0) + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=q_mask, other=0.0)
    w = tl.reshape(w, (BLOCK_N, BLOCK_K // QBLOCK, QBLOCK)) * scale[:, :, None]
    w = tl.reshape(w, (BLOCK_N, BLOCK_K))

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    if HAS_MERGE:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            bt = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            at = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(bt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
            else:
                # tensor cores in the output's 16-bit dtype (fp32 factors are rounded in registers)
                acc = tl.dot(bt.to(out_ptr.dtype.element_ty), at.to(out_ptr.dtype.element_ty), acc)
        w = w + scaling * acc
    tl.store(out_ptr + offs_n64[:, None] * stride_on + offs_k[None, :] * stride_ok,
             w.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])
