"""Triton kernels for the low-rank (adapter) side of a LoRA layer.

    XA  = drop(x) @ Aᵀ                      ``xa_kernel``        (M, r)  fp32
    dYB = dy @ B,  dB = s·dyᵀ @ XA          ``dy_pass_kernel``   one read of dy for both
    dA  = s·dYBᵀ @ drop(x)                   ``da_kernel``        (r, K)
    W   = deq(W0) [+ s·B @ A]                ``merge_kernel`` (2-D tiles, dense or NF4 base)
    W   = deq_nf4(W0)                        ``nf4_dequant_kernel`` (1-D, contiguous runs)
    mask(m, k) = dropout_keep_scale(seed, m*K + k, p, 1/(1-p))   ``dropout_mask_kernel``

Only ``@triton.jit`` code and autotune configs live here; launchers (argument checks, split
heuristics, workspaces) are in ``lora_fast/_lowrank.py``.

Conventions shared by every kernel:

* ``BLOCK_R`` is the (power of two, >= 16, <= 128) tile over the rank dimension, chosen by the
  launcher, never autotuned.  Larger ranks are tiled over a grid axis (xa, dy, da) or looped
  over (merge).
* Reductions that are split over programs write fp32 partials into a workspace with a leading
  split axis; the launcher sums it with torch, so every result is deterministic.
* The dropout flat index is ``m*K + k`` computed in int64 (``tl.rand`` gives the same bits for
  an int32 and an int64 offset of equal value < 2**32).
* fp32 operands use ``input_precision="ieee"`` (``IEEE``) so fp32 results match torch's
  default (non-TF32) matmul; fp16/bf16 operands use the tensor cores with fp32 accumulation.
* Autotune configs: ``*_CONFIGS`` are the lists used on a GPU; under ``TRITON_INTERPRET=1``
  one fixed small config (``*_INTERP_CONFIG``) is used instead.  Each config list is pruned at
  launch by ``prune_*`` using a shared-memory / register-load estimate (``*_cost``) that depends on
  ``BLOCK_R`` and the element sizes (see ``SMEM_LIMIT``).
"""
import os

import triton
import triton.language as tl

from .common import configs_in, dropout_keep_scale, elsize as _elsize, nf4_dequant_flat, tune_pick

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Launch-time pruning.  Each kernel has a cost estimate measured against ``triton.compile`` for
# sm_80/86/90 (metadata.shared, cuobjdump register/spill counts, Triton 3.9): ``*_smem`` is an
# upper bound of the shared memory (bytes) and ``*_load`` a per-thread register-load figure
# (elements held per thread); configs above SMEM_LIMIT or the load limits are dropped for the
# launch at hand (they spill or exceed sm_86's 99 KiB), and if none is left the cheapest one
# runs.  The limits depend on BLOCK_R and on the element size, so each list is wide and the
# prune keeps the sensible part of it.  Every config a prune can keep also compiles without
# spills under triton 3.6 (the GPU image's): configs that spilled there only (4-warp dA/XA tiles
# with the dropout mask, 256-wide dA/merge rows) now use 8 warps or a narrower tile.
SMEM_LIMIT = 96 * 1024  # sm_86: 99 KiB of dynamic shared memory per block (sm_80 163, sm_90 227)
MAX_BLOCK_R = 128
MAX_BLOCK_R_IEEE = 32  # fp32 operands run on FMA: larger rank tiles spill


def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def _prune(configs, cost, limit_smem=SMEM_LIMIT):
    """Keep configs whose (smem, load, load_limit) = cost(config) fit; never return nothing."""
    kept, scored = [], []
    for c in configs:
        smem, load, load_limit = cost(c)
        scored.append((max(smem / limit_smem, load / load_limit), c))
        if smem <= limit_smem and load <= load_limit:
            kept.append(c)
    return tune_pick(kept) if kept else [min(scored, key=lambda t: t[0])[1]]


def _major() -> int:
    """Compute capability major of the current GPU (8 when unknown: the stricter limits)."""
    try:
        import torch

        return int(torch.cuda.get_device_capability()[0])
    except Exception:
        return 8


def _launch_args(named_args, kwargs):
    a = dict(named_args)
    a.update(kwargs)
    return a


# ----------------------------------------------------------------------------------------------
# XA = drop(x) @ Aᵀ
# ----------------------------------------------------------------------------------------------
XA_CONFIGS = [
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=128),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=256),
    _cfg(8, 3, BLOCK_M=16, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=32, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_K=32),
    _cfg(8, 4, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=256, BLOCK_K=32),
]
# fp32 operands (FMA path, register heavy): the only configs offered to them; each compiles
# without spills for BLOCK_R 16 and 32 on sm_80/86/90 (bench/compile_check.py)
XA_FP32_CONFIGS = [
    _cfg(8, 3, BLOCK_M=16, BLOCK_K=32),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=16),
    _cfg(8, 2, BLOCK_M=64, BLOCK_K=32),
    _cfg(4, 3, BLOCK_M=32, BLOCK_K=16),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=16),
]
XA_CONFIGS += XA_FP32_CONFIGS
XA_INTERP_CONFIG = _cfg(4, 1, BLOCK_M=16, BLOCK_K=32)
XA_K_GRANULE = 256  # split-K chunk sizes are multiples of this (>= every BLOCK_K above)


def xa_cost(c, block_r, ex, ea, dropout):
    """(smem bytes, register estimate, register limit) of an XA_CONFIGS entry."""
    bm, bk, t = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], 32 * c.num_warps
    smem = max(c.num_stages, 1) * (bm * bk * ex + bk * block_r * ea)
    if ex == 4:  # FMA dot: the reduction dim must stay short, operands live in registers
        return smem, 40 + (bm * bk + bk * block_r + bm * block_r) / t + (0 if bk <= 32 else 999), 112
    # the regenerated dropout mask (Philox) costs ~3 registers per x element a thread holds
    return smem, 40 + (bm * bk / t) * (3 if dropout else 1) + 1.5 * bm * block_r / t, 200


def prune_xa(configs, named_args, **kwargs):
    a = _launch_args(named_args, kwargs)
    br, dropout = a.get("BLOCK_R", MAX_BLOCK_R), a.get("HAS_DROPOUT", True)
    ex = _elsize(a.get("x_ptr"))
    ea = max(ex, _elsize(a.get("a_ptr")))
    configs = configs_in(configs, XA_FP32_CONFIGS, keep=ex == 4)
    return _prune(configs, lambda c: xa_cost(c, br, ex, ea, dropout))


# ----------------------------------------------------------------------------------------------
# dYB = dy @ B and dB-partials = dyᵀ @ XA from one read of dy
# ----------------------------------------------------------------------------------------------
DY_CONFIGS = [
    _cfg(4, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_N=128),
    _cfg(8, 2, BLOCK_M=128, BLOCK_N=128),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=32),
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=32),
    _cfg(4, 3, BLOCK_M=16, BLOCK_N=64),
    _cfg(8, 3, BLOCK_M=16, BLOCK_N=64),
    # small tiles for fp32 operands (FMA path)
    _cfg(8, 2, BLOCK_M=16, BLOCK_N=16),
    _cfg(8, 2, BLOCK_M=32, BLOCK_N=16),
]
DY_INTERP_CONFIG = _cfg(4, 1, BLOCK_M=16, BLOCK_N=32)
DY_M_GRANULE = 64  # rows per split are multiples of this (x4 when large)
DY_N_GRANULE = 64  # columns per group are multiples of this (x4 when large)


def dy_cost(c, block_r, ed, eb):
    """(smem bytes, register estimate, register limit) of a DY_CONFIGS entry."""
    bm, bn, t = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], 32 * c.num_warps
    smem = max(c.num_stages, 1) * bm * bn * ed + (bm + bn) * block_r * max(ed, eb) * 2
    # dYB accumulator + the dB partial (prefetched, converted, MMA result) + dy in registers
    load = (bm * block_r + 3 * bn * block_r + bm * bn) / t
    if ed == 4:  # FMA dots reduce over BLOCK_N and BLOCK_M
        # 32x16 with 8 warps spills 24 B at BLOCK_R=32 on sm_80/86
        wide = block_r > 16 and bm > bn and bm * bn >= 512
        return smem, 40 + load + (0 if max(bm, bn) <= 32 and not wide else 999), 112
    # register limit from bench/compile_check.py (triton 3.9): on sm_90, 128x64 with 8 warps
    # (estimate 144) compiles without spills at BLOCK_R <= 32 while 64x128 (160, fp16) and 64x64
    # with 4 warps (168) spill; on sm_80/86 and for wide rank tiles all three spill
    return smem, 40 + 2 * load, (150 if _major() >= 9 and block_r <= 32 else 105)


def prune_dy(configs, named_args, **kwargs):
    a = _launch_args(named_args, kwargs)
    br = a.get("BLOCK_R", MAX_BLOCK_R)
    ed = _elsize(a.get("dy_ptr"))
    eb = _elsize(a.get("b_ptr"))
    return _prune(configs, lambda c: dy_cost(c, br, ed, eb))


# ----------------------------------------------------------------------------------------------
# dA-partials = s·dYBᵀ @ drop(x)
# ----------------------------------------------------------------------------------------------
DA_CONFIGS = [
    _cfg(8, 3, BLOCK_M=32, BLOCK_K=128),
    _cfg(4, 4, BLOCK_M=32, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=64, BLOCK_K=256),
    _cfg(8, 4, BLOCK_M=32, BLOCK_K=128),
    _cfg(8, 4, BLOCK_M=32, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_K=32),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=64),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=32),
]
# fp32 operands (FMA dots reduce over BLOCK_M): the only configs offered to them (spill-free
# for BLOCK_R 16 and 32 on sm_80/86/90)
DA_FP32_CONFIGS = [
    _cfg(8, 3, BLOCK_M=16, BLOCK_K=32),
    _cfg(4, 3, BLOCK_M=16, BLOCK_K=16),
]
DA_CONFIGS += DA_FP32_CONFIGS
DA_INTERP_CONFIG = _cfg(4, 1, BLOCK_M=16, BLOCK_K=32)
DA_M_GRANULE = 128  # rows per split are multiples of this (>= every BLOCK_M above)


def da_cost(c, block_r, ex, dropout):
    """(smem bytes, register estimate, register limit) of a DA_CONFIGS entry."""
    bm, bk, t = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], 32 * c.num_warps
    smem = max(c.num_stages, 1) * (bm * bk * ex + block_r * bm * 4)
    if ex == 4:  # FMA dot reduces over BLOCK_M
        return smem, 40 + (bm * bk + block_r * bm + block_r * bk) / t + (0 if bm <= 32 else 999), 90
    # wide rank tiles: 32x64 with 4 warps at BLOCK_R=128 (estimate 152) spills on sm_80/86
    return smem, 40 + (bm * bk / t) * (3 if dropout else 1) + 1.5 * block_r * bk / t, (220 if block_r <= 64 else 150)


def prune_da(configs, named_args, **kwargs):
    a = _launch_args(named_args, kwargs)
    br, dropout = a.get("BLOCK_R", MAX_BLOCK_R), a.get("HAS_DROPOUT", True)
    ex = _elsize(a.get("x_ptr"))
    configs = configs_in(configs, DA_FP32_CONFIGS, keep=ex == 4)
    return _prune(configs, lambda c: da_cost(c, br, ex, dropout))


# ----------------------------------------------------------------------------------------------
# W = deq(W0) [+ s·B@A]  (2-D tiles) and the 1-D NF4 dequant
# ----------------------------------------------------------------------------------------------
MERGE_CONFIGS = [
    _cfg(8, 2, BLOCK_N=16, BLOCK_K=256),
    _cfg(4, 2, BLOCK_N=32, BLOCK_K=128),
    _cfg(8, 2, BLOCK_N=64, BLOCK_K=64),
    _cfg(8, 2, BLOCK_N=32, BLOCK_K=256),
    _cfg(8, 2, BLOCK_N=64, BLOCK_K=128),
    _cfg(8, 2, BLOCK_N=128, BLOCK_K=64),
    # small tiles for fp32 A/B (FMA path)
    _cfg(8, 2, BLOCK_N=16, BLOCK_K=64),
    _cfg(8, 2, BLOCK_N=32, BLOCK_K=64),
]
MERGE_INTERP_CONFIG = _cfg(4, 1, BLOCK_N=16, BLOCK_K=64)
MERGE_MAX_BLOCK_R = 64  # the merge loops over the rank in chunks of at most this (16-bit A/B)
MERGE_MAX_BLOCK_R_IEEE = 16  # ... and of at most this for fp32 A/B (FMA)


def merge_cost(c, block_r, ieee):
    """(smem bytes, register estimate, register limit) of a MERGE_CONFIGS entry."""
    bn, bk, t = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 32 * c.num_warps
    smem = max(c.num_stages, 1) * (bn + bk) * block_r * 4 + bn * bk * 4
    load = 40 + 4 * bn * bk / t  # NF4 decode temporaries + the fp32 tile
    if ieee and block_r:  # FMA dot: every output a thread holds costs a BLOCK_R-long dot
        load += (bn * bk / t) * block_r / 2
    return smem, load, 200


def _merge_mma_fits(c, factor_bytes: int, nf4: bool) -> bool:
    """Tensor-core merges (``IEEE=False``) that compile without spills on sm_80/86/90
    (``python -m bench.compile_check --kernel merge_kernel``): with fp32 factors (rounded in
    registers) only tiles of BLOCK_N <= 16 or <= 16 elements per thread; with 16-bit factors on an
    NF4 weight, BLOCK_N < 128."""
    bn, bk, t = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], 32 * c.num_warps
    if factor_bytes >= 4:
        return bn <= 16 or bn * bk <= 16 * t
    return not (nf4 and bn >= 128)


def prune_merge(configs, named_args, **kwargs):
    a = _launch_args(named_args, kwargs)
    br, ieee = a.get("BLOCK_R", MERGE_MAX_BLOCK_R), a.get("IEEE", True)
    if not a.get("HAS_MERGE", True):
        br = 0
    elif not ieee:
        fb = max(_elsize(a.get("a_ptr"), 2), _elsize(a.get("b_ptr"), 2))
        fits = [c for c in configs if _merge_mma_fits(c, fb, bool(a.get("NF4", False)))]
        configs = fits or list(configs)
    return _prune(configs, lambda c: merge_cost(c, br, ieee))


DEQUANT_CONFIGS = [
    _cfg(4, 1, BLOCK=1024),
    _cfg(4, 1, BLOCK=2048),
    _cfg(8, 1, BLOCK=4096),
    _cfg(8, 1, BLOCK=8192),
]
DEQUANT_INTERP_CONFIG = _cfg(4, 1, BLOCK=1024)

MASK_BLOCK = 65536 if INTERPRET else 1024  # dropout_mask_kernel: a test/reference utility, fixed config

KERNEL_CONFIGS = {
    "xa_kernel": XA_CONFIGS,
    "dy_pass_kernel": DY_CONFIGS,
    "da_kernel": DA_CONFIGS,
    "merge_kernel": MERGE_CONFIGS,
    "nf4_dequant_kernel": DEQUANT_CONFIGS,
}


def _tune(configs, interp_config, key, prune=None):
    if INTERPRET:
        return triton.autotune(configs=[interp_config], key=key)
    if prune is None:
        prune = _pick_only
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})


def _pick_only(configs, named_args, **kwargs):
    return tune_pick(configs)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------------------------
@_tune(XA_CONFIGS, XA_INTERP_CONFIG, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"], prune=prune_xa)
@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def xa_kernel(
    x_ptr, a_ptr, out_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak,
    stride_os, stride_om, stride_or,
    k_per_split, n_rblocks, seed, p, inv_keep, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """xa_kernel(x_ptr, a_ptr, out_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_ak,
    stride_os, stride_om, stride_or, k_per_split, n_rblocks, seed, p, inv_keep, M_BUCKET,
    HAS_DROPOUT, IEEE, BLOCK_R, [autotuned:] BLOCK_M, BLOCK_K)

    out[s, m, r] = sum_{k in split s} drop(x)[m, k] * A[r, k]   (fp32)
    x: (M, K) fp16/bf16/fp32 any strides.  A: (R, K) any float dtype, cast to x's dtype.
    out: (S, M, R) fp32 workspace (S = number of K splits; the launcher sums over s).
    grid = (cdiv(M, BLOCK_M) * n_rblocks, S); program 0-axis id = m_block * n_rblocks + r_block
    so programs sharing an x tile run next to each other.  K split s covers
    [s*k_per_split, min((s+1)*k_per_split, K)).  M_BUCKET is an autotune key only.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = pid // n_rblocks
    pid_r = pid % n_rblocks
    cdt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    offs_m64 = offs_m.to(tl.int64)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_rows = x_ptr + offs_m64[:, None] * stride_xm
    a_cols = a_ptr + offs_r.to(tl.int64)[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_hi
        offs_k64 = offs_k.to(tl.int64)
        x = tl.load(x_rows + offs_k64[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            flat = offs_m64[:, None] * K + offs_k64[None, :]
            x = (x.to(tl.float32) * dropout_keep_scale(seed, flat, p, inv_keep)).to(cdt)
        a = tl.load(a_cols + offs_k64[:, None] * stride_ak, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = _mma(x, a.to(cdt), acc, IEEE)
    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m64[:, None] * stride_om + offs_r[None, :] * stride_or
    tl.store(out, acc, mask=m_mask[:, None] & r_mask[None, :])


# ----------------------------------------------------------------------------------------------
@_tune(DY_CONFIGS, DY_INTERP_CONFIG, key=["M_BUCKET", "N", "BLOCK_R"], prune=prune_dy)
@triton.jit(do_not_specialize=["M_BUCKET"])
def dy_pass_kernel(
    dy_ptr, b_ptr, xa_ptr, dyb_ptr, db_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,
    stride_dybg, stride_dybm, stride_dybr,
    stride_dbs, stride_dbn, stride_dbr,
    rows_per_split, cols_per_group, n_groups, n_rblocks, scaling, M_BUCKET,
    IEEE: tl.constexpr, STREAM: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dy_pass_kernel(dy_ptr, b_ptr, xa_ptr, dyb_ptr, db_ptr, M, N, R, stride_dym, stride_dyn,
    stride_bn, stride_br, stride_xam, stride_xar, stride_dybg, stride_dybm, stride_dybr,
    stride_dbs, stride_dbn, stride_dbr, rows_per_split, cols_per_group, n_groups, n_rblocks,
    scaling, M_BUCKET, IEEE, STREAM, BLOCK_R, [autotuned:] BLOCK_M, BLOCK_N)

    One read of dy (M, N) gives both
        dyb[g, m, r] = sum_{n in group g} dy[m, n] * B[n, r]                  (fp32, (G, M, R))
        db[s, n, r]  = sum_{m in split s} dy[m, n] * (scaling * XA[m, r])      (fp32, (S, N, R))
    B: (N, R) any float dtype and scaling*XA (XA: (M, R) fp32, scaled in fp32) are cast to dy's
    dtype for the MMA (the launcher passes scaling = 1 for fp16 dy, whose range s*XA could
    exceed, and scales the fp32 result instead; scaling in the epilogue spills).  A stride of 0
    (stride_dybg with one group, stride_dbs with one split) lets the launcher pass the final
    2-D result as the workspace.
    grid = (S * G * n_rblocks,), id = (s * G + g) * n_rblocks + r_block.  Program (s, g) owns
    rows [s*rows_per_split, ...) x columns [g*cols_per_group, ...): for each BLOCK_M row block it
    loops over its columns, keeping the dYB tile in registers (stored once per row block), and
    read-modify-writes its private slice db[s, its columns] (the first row block of the split
    stores without reading, so the workspace needs no zeroing and re-launches are idempotent).
    The launcher sizes cols_per_group so these slices of all resident programs stay in L2.
    The B tile and the dB slice of the next column block are prefetched into registers one
    iteration ahead; dy itself is software-pipelined by Triton (num_stages).  A barrier after
    each row block orders the slice's stores before the next row block's reads.
    STREAM loads dy with evict_first (set when nothing else re-reads dy).
    """
    pid = tl.program_id(0)
    pid_r = pid % n_rblocks
    pid_sg = pid // n_rblocks
    pid_g = pid_sg % n_groups
    pid_s = pid_sg // n_groups
    cdt = dy_ptr.dtype.element_ty
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    m_lo = pid_s * rows_per_split
    m_hi = tl.minimum(m_lo + rows_per_split, M)
    n_lo = pid_g * cols_per_group
    n_hi = tl.minimum(n_lo + cols_per_group, N)
    db_base = db_ptr + pid_s.to(tl.int64) * stride_dbs + offs_r[None, :] * stride_dbr
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        offs_m64 = offs_m.to(tl.int64)
        xa = tl.load(xa_ptr + offs_m64[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        xa = (xa.to(tl.float32) * scaling).to(cdt)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        dy_rows = dy_ptr + offs_m64[:, None] * stride_dym
        # B tile of the first column block; later ones are prefetched one iteration ahead
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        b_next = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                         mask=(offs_n < n_hi)[:, None] & r_mask[None, :], other=0.0)
        # dB rows of this split accumulated by earlier row blocks (none for the first one): also
        # prefetched one column block ahead
        not_first = (offs_n * 0 + m0) > m_lo
        part_next = tl.load(db_base + offs_n.to(tl.int64)[:, None] * stride_dbn,
                            mask=((offs_n < n_hi) & not_first)[:, None] & r_mask[None, :], other=0.0)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_hi
            offs_n64 = offs_n.to(tl.int64)
            b = b_next
            offs_nn = offs_n + BLOCK_N
            nn_mask = (offs_nn < n_hi)[:, None] & r_mask[None, :]
            b_next = tl.load(b_ptr + offs_nn.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                             mask=nn_mask, other=0.0)
            part = part_next
            part_next = tl.load(db_base + offs_nn.to(tl.int64)[:, None] * stride_dbn,
                                mask=nn_mask & not_first[:, None], other=0.0)
            dy_ptrs = dy_rows + offs_n64[None, :] * stride_dyn
            dy_mask = m_mask[:, None] & n_mask[None, :]
            if STREAM:
                dy = tl.load(dy_ptrs, mask=dy_mask, other=0.0, eviction_policy="evict_first")
            else:
                dy = tl.load(dy_ptrs, mask=dy_mask, other=0.0)
            acc = _mma(dy, b.to(cdt), acc, IEEE)
            db_ptrs = db_base + offs_n64[:, None] * stride_dbn
            db_mask = n_mask[:, None] & r_mask[None, :]
            # (the elementwise select gives dy a register use besides the MMA operands; without
            # it Triton 3.9 does not software-pipeline this loop -- the value is unchanged)
            dy_t = tl.trans(tl.where(dy_mask, dy, 0.0).to(cdt))
            part = _mma(dy_t, xa, part, IEEE)
            tl.store(db_ptrs, part, mask=db_mask)
        dyb = dyb_ptr + pid_g.to(tl.int64) * stride_dybg + offs_m64[:, None] * stride_dybm + offs_r[None, :] * stride_dybr
        tl.store(dyb, acc, mask=m_mask[:, None] & r_mask[None, :])
        # the dB slice stored above is read back (possibly by other threads) in the next row block
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
@_tune(DA_CONFIGS, DA_INTERP_CONFIG, key=["M_BUCKET", "K", "BLOCK_R", "HAS_DROPOUT"], prune=prune_da)
@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def da_kernel(
    dyb_ptr, x_ptr, out_ptr,
    M, K, R,
    stride_dm, stride_dr, stride_xm, stride_xk,
    stride_os, stride_or, stride_ok,
    m_per_split, n_rblocks, scaling, seed, p, inv_keep, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """da_kernel(dyb_ptr, x_ptr, out_ptr, M, K, R, stride_dm, stride_dr, stride_xm, stride_xk,
    stride_os, stride_or, stride_ok, m_per_split, n_rblocks, scaling, seed, p, inv_keep, M_BUCKET,
    HAS_DROPOUT, IEEE, BLOCK_R, [autotuned:] BLOCK_M, BLOCK_K)

    out[s, r, k] = scaling * sum_{m in split s} dYB[m, r] * drop(x)[m, k], stored in out's dtype
    (fp32 workspace (S, R, K) when S > 1, else the final (1, R, K) result in any float dtype).
    dYB: (M, R) fp32, cast to x's dtype for the MMA.  x: (M, K) any strides.
    grid = (cdiv(K, BLOCK_K) * n_rblocks, S), id0 = k_block * n_rblocks + r_block.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_k = pid // n_rblocks
    pid_r = pid % n_rblocks
    cdt = x_ptr.dtype.element_ty
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    offs_k64 = offs_k.to(tl.int64)
    m_lo = pid_s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        offs_m64 = offs_m.to(tl.int64)
        d_t = tl.load(dyb_ptr + offs_r[:, None] * stride_dr + offs_m64[None, :] * stride_dm,
                      mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m64[:, None] * stride_xm + offs_k64[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            flat = offs_m64[:, None] * K + offs_k64[None, :]
            x = (x.to(tl.float32) * dropout_keep_scale(seed, flat, p, inv_keep)).to(cdt)
        acc = _mma(d_t.to(cdt), x, acc, IEEE)
    acc = acc * scaling
    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_r[:, None] * stride_or + offs_k64[None, :] * stride_ok
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------
@_tune(MERGE_CONFIGS, MERGE_INTERP_CONFIG, key=["N", "K", "BLOCK_R", "NF4", "HAS_MERGE", "IEEE"], prune=prune_merge)
@triton.jit
def merge_kernel(
    w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
    a_ptr, b_ptr, out_ptr,
    N, K, R, scaling,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_on, stride_ok,
    NF4: tl.constexpr, NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr,
    HAS_MERGE: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """merge_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, a_ptr, b_ptr,
    out_ptr, N, K, R, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_on, stride_ok, NF4, NESTED, QBLOCK, QBLOCK2, HAS_MERGE, IEEE, BLOCK_R,
    [autotuned:] BLOCK_N, BLOCK_K)

    out[n, k] = W0[n, k] + scaling * sum_r B[n, r] * A[r, k]   (fp32 sum, one rounding to out)
    W0 is dense (NF4=False: w_ptr (N, K) any float dtype/strides; the NF4 pointers are unused)
    or NF4 (NF4=True: w_ptr = packed uint8 in the bitsandbytes layout, QBLOCK = blocksize,
    QBLOCK2 = nested blocksize, NESTED = absmax is uint8 codes into code2 scaled by absmax2,
    plus offset); decoded with ``common.nf4_dequant_flat`` at flat index n*K + k.
    A: (R, K), B: (N, R) any float dtypes.  IEEE: cast to fp32, exact fp32 products (FMA);
    otherwise (out fp16/bf16, factors of out's dtype or fp32) both are cast to out's dtype in
    registers for the tensor cores.  R is looped over in BLOCK_R chunks.  HAS_MERGE=False skips the product.
    grid = (cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K),), id = n_block * cdiv(K, BLOCK_K) + k_block.
    """
    pid = tl.program_id(0)
    n_kblocks = tl.cdiv(K, BLOCK_K)
    pid_n = pid // n_kblocks
    pid_k = pid % n_kblocks
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    mask = n_mask[:, None] & k_mask[None, :]
    offs_n64 = offs_n.to(tl.int64)
    if NF4:
        flat = offs_n64[:, None] * K + offs_k[None, :]
        w = nf4_dequant_flat(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
                             flat, mask, QBLOCK, QBLOCK2, NESTED)
    else:
        w = tl.load(w_ptr + offs_n64[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask, other=0.0).to(tl.float32)
    if HAS_MERGE:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            b = tl.load(b_ptr + offs_n64[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:
                acc = _mma(b.to(tl.float32), a.to(tl.float32), acc, True)
            else:
                # tensor cores in the output's 16-bit dtype (fp32 factors are rounded in registers)
                acc = _mma(b.to(out_ptr.dtype.element_ty), a.to(out_ptr.dtype.element_ty), acc, False)
        w = w + scaling * acc
    tl.store(out_ptr + offs_n64[:, None] * stride_on + offs_k[None, :] * stride_ok,
             w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
@_tune(DEQUANT_CONFIGS, DEQUANT_INTERP_CONFIG, key=["numel", "NESTED"])
@triton.jit
def nf4_dequant_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset, out_ptr, numel,
    NESTED: tl.constexpr, QBLOCK: tl.constexpr, QBLOCK2: tl.constexpr, FLAT64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """nf4_dequant_kernel(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
    out_ptr, numel, NESTED, QBLOCK, QBLOCK2, FLAT64, [autotuned:] BLOCK)

    out[f] = code[nibble(f)] * absmax_fp32[f // QBLOCK] for f < numel, out contiguous (N*K,);
    each program decodes one contiguous run of BLOCK elements (BLOCK/2 packed bytes).
    FLAT64: index in int64 (numel >= 2**31 - BLOCK).  grid = (cdiv(numel, BLOCK),).
    """
    pid = tl.program_id(0)
    if FLAT64:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    flat = start + tl.arange(0, BLOCK)
    mask = flat < numel
    w = nf4_dequant_flat(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
                         flat, mask, QBLOCK, QBLOCK2, NESTED)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])
def dropout_mask_kernel(out_ptr, numel, seed, p, inv_keep, BLOCK: tl.constexpr):
    """dropout_mask_kernel(out_ptr, numel, seed, p, inv_keep, BLOCK)

    out[f] = dropout_keep_scale(seed, f, p, inv_keep) for the int64 flat index f = m*K + k of a
    contiguous (M, K) fp32 tensor, numel = M*K.  grid = (cdiv(numel, BLOCK),).
    """
    pid = tl.program_id(0)
    flat = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + flat, dropout_keep_scale(seed, flat, p, inv_keep), mask=flat < numel)
