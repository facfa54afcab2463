"""Launchers of the low-rank Triton kernels (``kernels/lowrank.py``).

    xa_forward(x, A, *, dropout_p=0.0, seed=0)                 -> XA = drop(x) @ Aᵀ       (M, r) fp32
    dy_pass(dy, B, xa, *, scaling)                             -> (dY@B (M, r) fp32, s·dYᵀ@XA (N, r) B.dtype)
    da_pass(dyb, x, *, scaling, dropout_p=0.0, seed=0, out_dtype) -> s·dYBᵀ @ drop(x)     (r, K) out_dtype
    dequant_nf4(op, *, out_dtype, merge=None)                  -> deq(W0) [+ s·B@A]       (N, K) out_dtype
    dense_merge(W0, A, B, *, scaling, out_dtype)               -> W0 + s·B@A              (N, K) out_dtype
    dropout_mask(seed, M, K, p, device)                        -> (M, K) fp32 of 0 or 1/(1-p)

Every input is addressed through its strides (nothing is copied), any M/N/K >= 0 and any rank
are accepted (ranks above 128 are tiled over the grid; for xa/dy that re-reads x/dy once per
128 ranks, from L2 when possible).  Split reductions go through an fp32 workspace summed by
torch, so all results are deterministic.  Split counts use the SM count and L2 size of the
device, queried on first launch (never at import).

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); otherwise every tensor
must be on one CUDA device.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Tuple

import torch

from ._launch import launch
from ._operand import NF4Operand, kernel_module

__all__ = ["NF4Operand", "xa_forward", "dy_pass", "da_pass", "dequant_nf4", "dense_merge", "dropout_mask"]

Tensor = torch.Tensor

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1



def _kernels():
    return kernel_module("lowrank")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_r(r: int, cap: int) -> int:
    return min(cap, max(16, _next_pow2(r)))


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0) or 40 * 1024 * 1024
    return int(props.multi_processor_count), l2


def _device_info(device: torch.device) -> Tuple[int, int]:
    """(SM count, L2 bytes).  Small fixed values on the CPU interpreter."""
    if device.type != "cuda":
        return 4, 1 << 20
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_info(index)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_tensor(t, name: str, dtypes, ndim: int = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {names}")


def _check_device(device: torch.device, **tensors) -> None:
    if device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"lowrank kernels need CUDA tensors (got {device}); CPU tensors run only under TRITON_INTERPRET=1"
        )
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


def _check_out_dtype(dtype) -> None:
    if dtype not in _ACT_DTYPES:
        raise ValueError(f"out_dtype must be one of float16, bfloat16, float32, got {dtype}")


def _dropout_args(p) -> Tuple[float, float]:
    p = float(p)
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"dropout_p must be in [0, 1], got {p}")
    return p, (0.0 if p >= 1.0 else 1.0 / (1.0 - p))


def _check_seed(seed) -> int:
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not (0 <= seed < 2**63):
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _check_scaling(s) -> float:
    if isinstance(s, torch.Tensor):
        s = s.item()
    s = float(s)
    if not math.isfinite(s):
        raise ValueError(f"scaling must be finite, got {s}")
    return s


def _check_strides(t: Tensor, name: str) -> None:
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name} has a negative stride {tuple(t.stride())}; pass a materialised tensor")


# ---------------------------------------------------------------------------------------------
# split heuristics
# ---------------------------------------------------------------------------------------------
# Split choice: a small traffic model.  A launch moves the streamed operand once plus the fp32
# partials of every split (written, then read by the torch sum); it runs at a fraction
# min(1, _SM_BW_FACTOR * programs / SMs) of the DRAM bandwidth (one SM can stream a few times
# its fair share).  The split with the least modelled time wins.
_SM_BW_FACTOR = 2.0


def _eff(programs: int, sm: int) -> float:
    return min(1.0, _SM_BW_FACTOR * programs / sm)


def _counts(n: int) -> list:
    """Candidate split counts 1..n, roughly geometric."""
    out, v = set(), 1.0
    while v < n:
        out.add(int(v))
        v *= 1.25
    out.add(n)
    return sorted(c for c in out if c >= 1)


@functools.lru_cache(maxsize=4096)
def _xa_splits_cached(M: int, K: int, r: int, n_rb: int, sm: int, es: int, gran: int) -> int:
    best, best_t = 1, None
    m_blocks = _cdiv(M, 64)  # nominal BLOCK_M
    for s in _counts(_cdiv(K, gran)):
        nbytes = es * M * K + es * r * K * m_blocks + (8 * s * M * r if s > 1 else 0)
        t = nbytes / _eff(m_blocks * n_rb * s, sm)
        if best_t is None or t < best_t * 0.98:
            best, best_t = s, t
    return best


def _xa_splits(M: int, K: int, r: int, n_rb: int, device: torch.device, es: int, gran: int) -> int:
    sm, _ = _device_info(device)
    return _xa_splits_cached(M, K, r, n_rb, sm, es, gran)


@functools.lru_cache(maxsize=4096)
def _dy_splits_cached(M, N, r, block_r, n_rb, sm, l2, es, m_gran, n_gran):
    best, best_t = (1, 1), None
    for g in _counts(_cdiv(N, n_gran)):
        cols = _round_up(_cdiv(N, g), n_gran)
        for s in _counts(_cdiv(M, m_gran)):
            rows = _round_up(_cdiv(M, s), m_gran)
            programs = s * g * n_rb
            nbytes = es * M * N + (8 + es) * s * N * r + (8 * g * M * r if g > 1 else 0)
            # the private dB slices of the resident programs must stay in L2, else every row
            # block re-reads and re-writes its slice from DRAM
            if min(programs, 2 * sm) * cols * block_r * 4 > l2 // 2 and rows > 128:
                nbytes += 8 * r * N * (M // 128)
            t = nbytes / _eff(programs, sm)
            if best_t is None or t < best_t * 0.98:
                best, best_t = (rows, cols), t
    return best


def _dy_splits(M: int, N: int, r: int, block_r: int, n_rb: int, device: torch.device, es: int,
               m_gran: int, n_gran: int):
    """(rows_per_split, cols_per_group) for dy_pass.  Each program read-modify-writes its private
    dB slice (cols x BLOCK_R fp32) once per row block, so those slices should stay in L2; each
    column group beyond one costs an fp32 dYB partial, each row split an fp32 dB partial."""
    sm, l2 = _device_info(device)
    return _dy_splits_cached(M, N, r, block_r, n_rb, sm, l2, es, m_gran, n_gran)


@functools.lru_cache(maxsize=4096)
def _da_splits_cached(M: int, K: int, r: int, n_rb: int, sm: int, es: int, gran: int) -> int:
    best, best_t = 1, None
    k_blocks = _cdiv(K, 128)  # nominal BLOCK_K
    for s in _counts(_cdiv(M, gran)):
        nbytes = es * M * K + 8 * s * r * K + (4 * M * r) * k_blocks
        t = nbytes / _eff(k_blocks * n_rb * s, sm)
        if best_t is None or t < best_t * 0.98:
            best, best_t = s, t
    return best


def _da_splits(M: int, K: int, r: int, n_rb: int, device: torch.device, es: int, gran: int) -> int:
    sm, _ = _device_info(device)
    return _da_splits_cached(M, K, r, n_rb, sm, es, gran)


def _workspace(n: int, shape: Tuple[int, int], dtype: torch.dtype, device) -> Tuple[Tensor, Tuple[int, int, int]]:
    """The (n, *shape) workspace of a pass whose n programs along a split dimension write
    partial results, and its three strides.  For n == 1 it is the final (*shape) result itself,
    addressed with a 0 stride over the split dimension: no view op per step (the host ops of a
    step are counted, tests/test_host_ops.py)."""
    if n == 1:
        ws = torch.empty(shape, dtype=dtype, device=device)
        return ws, (0,) + ws.stride()
    ws = torch.empty((n,) + tuple(shape), dtype=dtype, device=device)
    return ws, ws.stride()


def _bucket(M: int) -> int:
    return _next_pow2(max(1, M))


def _interp_or(value: int, interp_config, key: str) -> int:
    # Under the interpreter the granules follow the single small config so splits get exercised.
    return interp_config.kwargs[key] if _interpreting() else value


# ---------------------------------------------------------------------------------------------
# XA = drop(x) @ Aᵀ
# ---------------------------------------------------------------------------------------------
def xa_forward(x: Tensor, A: Tensor, *, dropout_p: float = 0.0, seed: int = 0,
               _splits: Optional[int] = None) -> Tensor:
    """XA = drop(x) @ Aᵀ as fp32 (M, r) from one pass over x (per 128 ranks).

    x: (M, K) fp16/bf16/fp32, any strides.  A: (r, K) any float dtype (cast to x's dtype for the
    MMA, fp32 accumulation); r may be a stack of several adapters (any r >= 1).
    ``_splits`` (testing) forces the number of K splits.
    """
    _check_tensor(x, "x", _ACT_DTYPES)
    _check_tensor(A, "A", _PARAM_DTYPES)
    _check_device(x.device, A=A)
    M, K = x.shape
    r = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A must be (r, K={K}) to match x {tuple(x.shape)}, got {tuple(A.shape)}")
    _check_strides(x, "x")
    _check_strides(A, "A")
    p, inv_keep = _dropout_args(dropout_p)
    seed = _check_seed(seed)
    if M == 0 or r == 0 or K == 0:
        return torch.zeros((M, r), dtype=torch.float32, device=x.device)
    k = _kernels()
    block_r = _block_r(r, k.MAX_BLOCK_R_IEEE if x.dtype == torch.float32 else k.MAX_BLOCK_R)
    n_rb = _cdiv(r, block_r)
    gran = _interp_or(k.XA_K_GRANULE, k.XA_INTERP_CONFIG, "BLOCK_K")
    splits = _splits if _splits is not None else _xa_splits(M, K, r, n_rb, x.device, x.element_size(), gran)
    k_per = _round_up(_cdiv(K, max(1, int(splits))), gran)
    splits = _cdiv(K, k_per)
    ws, st = _workspace(splits, (M, r), torch.float32, x.device)

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * n_rb, splits)

    launch(k.xa_kernel, grid,
        x, A, ws, M, K, r,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        st[0], st[1], st[2],
        k_per, n_rb, seed, p, inv_keep, _bucket(M),
        HAS_DROPOUT=p > 0.0, IEEE=x.dtype == torch.float32, BLOCK_R=block_r,
    )
    return ws if splits == 1 else ws.sum(dim=0)


# ---------------------------------------------------------------------------------------------
# dYB = dy @ B, dB = s·dyᵀ @ XA
# ---------------------------------------------------------------------------------------------
def dy_pass(dy: Tensor, B: Tensor, xa: Tensor, *, scaling: float,
            _splits: Optional[Tuple[int, int]] = None) -> Tuple[Tensor, Tensor]:
    """(dYB, dB) = (dy @ B as fp32 (M, r), scaling · dyᵀ @ xa as B.dtype (N, r)), one read of dy.

    dy: (M, N) fp16/bf16/fp32 any strides.  B: (N, r) any float dtype.  xa: (M, r) fp32 (any
    float dtype accepted).  B and xa are cast to dy's dtype for the MMA (fp32 accumulation).
    ``_splits=(row_splits, col_groups)`` (testing) forces the decomposition.
    """
    _check_tensor(dy, "dy", _ACT_DTYPES)
    _check_tensor(B, "B", _PARAM_DTYPES)
    _check_tensor(xa, "xa", _PARAM_DTYPES)
    _check_device(dy.device, B=B, xa=xa)
    M, N = dy.shape
    r = B.shape[1]
    if B.shape[0] != N:
        raise ValueError(f"B must be (N={N}, r) to match dy {tuple(dy.shape)}, got {tuple(B.shape)}")
    if tuple(xa.shape) != (M, r):
        raise ValueError(f"xa must be (M={M}, r={r}), got {tuple(xa.shape)}")
    for t, name in ((dy, "dy"), (B, "B"), (xa, "xa")):
        _check_strides(t, name)
    s = _check_scaling(scaling)
    if M == 0 or N == 0 or r == 0:
        return (torch.zeros((M, r), dtype=torch.float32, device=dy.device),
                torch.zeros((N, r), dtype=B.dtype, device=dy.device))
    k = _kernels()
    block_r = _block_r(r, k.MAX_BLOCK_R_IEEE if dy.dtype == torch.float32 else k.MAX_BLOCK_R)
    n_rb = _cdiv(r, block_r)
    m_gran = _interp_or(k.DY_M_GRANULE, k.DY_INTERP_CONFIG, "BLOCK_M")
    n_gran = _interp_or(k.DY_N_GRANULE, k.DY_INTERP_CONFIG, "BLOCK_N")
    if _splits is not None:
        rows = _round_up(_cdiv(M, max(1, int(_splits[0]))), m_gran)
        cols = _round_up(_cdiv(N, max(1, int(_splits[1]))), n_gran)
    else:
        rows, cols = _dy_splits(M, N, r, block_r, n_rb, dy.device, dy.element_size(), m_gran, n_gran)
    splits, groups = _cdiv(M, rows), _cdiv(N, cols)
    # the kernel scales XA in fp32 before its cast to dy's dtype (no host op); for fp16 dy, whose
    # range s·XA could exceed (e.g. 64 x 2000), the fp32 dB is scaled here instead
    scale_after = dy.dtype == torch.float16 and s != 1.0
    # fp32 partials (the dB slices are read back and accumulated in place, so always fp32)
    ws_dyb, sg = _workspace(groups, (M, r), torch.float32, dy.device)
    ws_db, ss = _workspace(splits, (N, r), torch.float32, dy.device)
    launch(k.dy_pass_kernel, (splits * groups * n_rb,),
        dy, B, xa, ws_dyb, ws_db, M, N, r,
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), xa.stride(0), xa.stride(1),
        sg[0], sg[1], sg[2], ss[0], ss[1], ss[2],
        rows, cols, groups, n_rb, 1.0 if scale_after else s, _bucket(M),
        IEEE=dy.dtype == torch.float32, STREAM=n_rb == 1, BLOCK_R=block_r,
    )
    dyb = ws_dyb if groups == 1 else ws_dyb.sum(dim=0)
    db = ws_db if splits == 1 else ws_db.sum(dim=0)
    if scale_after:
        db = db.mul_(s)
    return dyb, db.to(B.dtype)


# ---------------------------------------------------------------------------------------------
# dA = s·dYBᵀ @ drop(x)
# ---------------------------------------------------------------------------------------------
def da_pass(dyb: Tensor, x: Tensor, *, scaling: float, dropout_p: float = 0.0, seed: int = 0,
            out_dtype: torch.dtype, _splits: Optional[int] = None) -> Tensor:
    """dA = scaling · dybᵀ @ drop(x) as (r, K) ``out_dtype``, one pass over x (per 128 ranks).

    dyb: (M, r) fp32 (any float dtype accepted; cast to x's dtype for the MMA).  x: (M, K)
    fp16/bf16/fp32 any strides.  The dropout mask is regenerated from (seed, m*K + k) exactly as
    in ``xa_forward``.  ``_splits`` (testing) forces the number of M splits.
    """
    _check_tensor(dyb, "dyb", _PARAM_DTYPES)
    _check_tensor(x, "x", _ACT_DTYPES)
    _check_device(x.device, dyb=dyb)
    _check_out_dtype(out_dtype)
    M, K = x.shape
    if dyb.shape[0] != M:
        raise ValueError(f"dyb must be (M={M}, r) to match x {tuple(x.shape)}, got {tuple(dyb.shape)}")
    r = dyb.shape[1]
    _check_strides(x, "x")
    _check_strides(dyb, "dyb")
    s = _check_scaling(scaling)
    p, inv_keep = _dropout_args(dropout_p)
    seed = _check_seed(seed)
    if M == 0 or K == 0 or r == 0:
        return torch.zeros((r, K), dtype=out_dtype, device=x.device)
    k = _kernels()
    block_r = _block_r(r, k.MAX_BLOCK_R_IEEE if x.dtype == torch.float32 else k.MAX_BLOCK_R)
    n_rb = _cdiv(r, block_r)
    gran = _interp_or(k.DA_M_GRANULE, k.DA_INTERP_CONFIG, "BLOCK_M")
    splits = _splits if _splits is not None else _da_splits(M, K, r, n_rb, x.device, x.element_size(), gran)
    m_per = _round_up(_cdiv(M, max(1, int(splits))), gran)
    splits = _cdiv(M, m_per)
    # one split: the kernel writes the (r, K) result in out_dtype; otherwise fp32 partials
    ws, st = _workspace(splits, (r, K), out_dtype if splits == 1 else torch.float32, x.device)

    def grid(meta):
        return (_cdiv(K, meta["BLOCK_K"]) * n_rb, splits)

    launch(k.da_kernel, grid,
        dyb, x, ws, M, K, r,
        dyb.stride(0), dyb.stride(1), x.stride(0), x.stride(1),
        st[0], st[1], st[2],
        m_per, n_rb, s, seed, p, inv_keep, _bucket(M),
        HAS_DROPOUT=p > 0.0, IEEE=x.dtype == torch.float32, BLOCK_R=block_r,
    )
    if splits == 1:
        return ws
    return ws.sum(dim=0).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# W = deq(W0) [+ s·B@A]
# ---------------------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)


def merge_on_tensor_cores(A: Tensor, B: Tensor, out_dtype: torch.dtype, round_factors: bool) -> bool:
    """Whether the merge product ``B@A`` runs on the tensor cores in ``out_dtype`` (the kernels'
    ``IEEE=False``) rather than as exact fp32 products.  Only for a 16-bit output whose factors are
    already in that dtype, or, with ``round_factors``, fp32 factors rounded to it in registers (the
    merged weight is rounded to ``out_dtype`` anyway: the Triton backend's choice; fp32 factors
    would otherwise take the FMA path, ~10x slower on sm_90)."""
    if out_dtype not in _HALF:
        return False
    ok = (out_dtype, torch.float32) if round_factors else (out_dtype,)
    return A.dtype in ok and B.dtype in ok


def _merge_operands(A: Tensor, B: Tensor, N: int, K: int, device: torch.device, out_dtype: torch.dtype,
                    round_factors: bool):
    _check_tensor(A, "A", _PARAM_DTYPES)
    _check_tensor(B, "B", _PARAM_DTYPES)
    _check_device(device, A=A, B=B)
    r = A.shape[0]
    if A.shape[1] != K:
        raise ValueError(f"A must be (r, K={K}), got {tuple(A.shape)}")
    if tuple(B.shape) != (N, r):
        raise ValueError(f"B must be (N={N}, r={r}), got {tuple(B.shape)}")
    _check_strides(A, "A")
    _check_strides(B, "B")
    ieee = not merge_on_tensor_cores(A, B, out_dtype, round_factors)
    if ieee:
        if A.dtype == torch.float64:
            A = A.float()
        if B.dtype == torch.float64:
            B = B.float()
    return A, B, r, ieee


def _launch_merge(k, w, nf4, N, K, out, A, B, r, scaling, ieee):
    """One merge_kernel launch; ``nf4`` = (absmax, absmax2, code2, code, offset, qblock, qblock2, nested) or None."""
    has_merge = A is not None and r > 0
    if has_merge:
        block_r = _block_r(r, k.MERGE_MAX_BLOCK_R_IEEE if ieee else k.MERGE_MAX_BLOCK_R)
    else:
        A = B = out
        r, block_r, ieee = 0, 16, False
    if nf4 is not None:
        absmax, absmax2, code2, code, offset, qblock, qblock2, nested = nf4
        s_wn = s_wk = 0
    else:
        absmax = absmax2 = code2 = code = w
        offset, qblock, qblock2, nested = 0.0, 1, 1, False
        s_wn, s_wk = w.stride(0), w.stride(1)

    def grid(meta):
        return (_cdiv(N, meta["BLOCK_N"]) * _cdiv(K, meta["BLOCK_K"]),)

    launch(k.merge_kernel, grid,
        w, absmax, absmax2, code2, code, float(offset),
        A, B, out, N, K, r, float(scaling),
        s_wn, s_wk, A.stride(0), A.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        NF4=nf4 is not None, NESTED=bool(nested), QBLOCK=int(qblock), QBLOCK2=int(qblock2),
        HAS_MERGE=has_merge, IEEE=bool(ieee), BLOCK_R=block_r,
        enable_fp_fusion=False,
    )
    return out


def _check_nf4(op, device_check: bool = True):
    for f in ("packed", "absmax", "absmax2", "code2", "offset", "blocksize", "nested_blocksize", "shape", "code"):
        if not hasattr(op, f):
            raise ValueError(f"op must be an NF4Operand (missing field {f!r}), got {type(op).__name__}")
    try:
        N, K = (int(v) for v in op.shape)
    except Exception:
        raise ValueError(f"NF4Operand.shape must be (N, K), got {op.shape!r}") from None
    if N < 0 or K < 0:
        raise ValueError(f"NF4Operand.shape must be non-negative, got {op.shape}")
    packed = op.packed
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"NF4Operand.packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    device = packed.device
    _check_device(device)
    if not packed.is_contiguous():
        raise ValueError("NF4Operand.packed must be contiguous")
    numel = N * K
    if packed.numel() < _cdiv(numel, 2):
        raise ValueError(f"NF4Operand.packed has {packed.numel()} bytes, shape {(N, K)} needs {_cdiv(numel, 2)}")
    bs, nbs = int(op.blocksize), int(op.nested_blocksize)
    if bs <= 0:
        raise ValueError(f"NF4Operand.blocksize must be positive, got {op.blocksize}")
    nblocks = _cdiv(numel, bs)

    def vec(t, name, dtype, n):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise ValueError(f"NF4Operand.{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != device:
            raise ValueError(f"NF4Operand.{name} is on {t.device}, packed on {device}")
        if not t.is_contiguous():
            raise ValueError(f"NF4Operand.{name} must be contiguous")
        if t.numel() < n:
            raise ValueError(f"NF4Operand.{name} has {t.numel()} elements, needs at least {n}")
        return t.reshape(-1)

    code = vec(op.code, "code", torch.float32, 16)
    nested = op.absmax2 is not None
    if nested:
        if nbs <= 0:
            raise ValueError(f"NF4Operand.nested_blocksize must be positive, got {op.nested_blocksize}")
        if op.code2 is None:
            raise ValueError("NF4Operand.absmax2 is set but code2 is None")
        absmax = vec(op.absmax, "absmax", torch.uint8, nblocks)
        absmax2 = vec(op.absmax2, "absmax2", torch.float32, _cdiv(nblocks, nbs))
        code2 = vec(op.code2, "code2", torch.float32, 256)
    else:
        if isinstance(op.absmax, torch.Tensor) and op.absmax.dtype == torch.uint8:
            raise ValueError("NF4Operand.absmax is uint8 (nested) but absmax2 is None")
        absmax = vec(op.absmax, "absmax", torch.float32, nblocks)
        absmax2 = code2 = absmax
        nbs = 1
    offset = float(op.offset.item() if isinstance(op.offset, torch.Tensor) else (op.offset or 0.0))
    return N, K, device, packed.reshape(-1), (absmax, absmax2, code2, code, offset if nested else 0.0, bs, nbs, nested)


def dequant_nf4(op, *, out_dtype: torch.dtype, merge=None, round_factors: bool = False) -> Tensor:
    """W = dequantize_4bit(op) as (N, K) ``out_dtype`` (fp32 code*absmax, one rounding), equal to
    bitsandbytes; with ``merge=(A (r, K), B (N, r), scaling)`` W = deq(W0) + scaling·B@A summed
    in fp32 and rounded once.  ``op`` is an :class:`NF4Operand` (any object with its fields).
    ``round_factors``: fp32 A/B are rounded to a 16-bit ``out_dtype`` (in registers) for the
    product, which then runs on the tensor cores (:func:`merge_on_tensor_cores`); otherwise
    factors not already in ``out_dtype`` give exact fp32 products."""
    _check_out_dtype(out_dtype)
    N, K, device, packed, meta = _check_nf4(op)
    out = torch.empty((N, K), dtype=out_dtype, device=device)
    if N == 0 or K == 0:
        return out
    k = _kernels()
    if merge is None:
        absmax, absmax2, code2, code, offset, bs, nbs, nested = meta
        numel = N * K
        grid = lambda meta_: (_cdiv(numel, meta_["BLOCK"]),)  # noqa: E731
        launch(k.nf4_dequant_kernel, grid,
            packed, absmax, absmax2, code2, code, float(offset), out, numel,
            NESTED=bool(nested), QBLOCK=int(bs), QBLOCK2=int(nbs), FLAT64=numel > _INT32_MAX - 16384,
            enable_fp_fusion=False,
        )
        return out
    try:
        A, B, scaling = merge
    except (TypeError, ValueError):
        raise ValueError("merge must be a tuple (A, B, scaling)") from None
    A, B, r, ieee = _merge_operands(A, B, N, K, device, out_dtype, round_factors)
    return _launch_merge(k, packed, meta, N, K, out, A, B, r, _check_scaling(scaling), ieee)


def dense_merge(W0: Tensor, A: Tensor, B: Tensor, *, scaling: float, out_dtype: torch.dtype,
                round_factors: bool = False) -> Tensor:
    """W0 + scaling·B@A as (N, K) ``out_dtype`` (fp32 sum, one rounding).  W0 (N, K) any float
    dtype and strides; A (r, K), B (N, r) any float dtypes (``round_factors``: as in
    :func:`dequant_nf4`)."""
    _check_tensor(W0, "W0", _PARAM_DTYPES)
    _check_out_dtype(out_dtype)
    _check_device(W0.device)
    _check_strides(W0, "W0")
    N, K = W0.shape
    A, B, r, ieee = _merge_operands(A, B, N, K, W0.device, out_dtype, round_factors)
    s = _check_scaling(scaling)
    out = torch.empty((N, K), dtype=out_dtype, device=W0.device)
    if N == 0 or K == 0:
        return out
    if W0.dtype == torch.float64:
        W0 = W0.float()
    return _launch_merge(_kernels(), W0, None, N, K, out, A, B, r, s, ieee)


# ---------------------------------------------------------------------------------------------
def dropout_mask(seed: int, M: int, K: int, p: float, device) -> Tensor:
    """(M, K) fp32 mask of 0 / 1/(1-p), element (m, k) exactly ``dropout_keep_scale(seed, m*K + k,
    p, 1/(1-p))`` as regenerated inside xa_forward / da_pass (and the fused GEMMs)."""
    device = torch.device(device)
    seed = _check_seed(seed)
    p, inv_keep = _dropout_args(p)
    M, K = int(M), int(K)
    if M < 0 or K < 0:
        raise ValueError(f"M and K must be non-negative, got {(M, K)}")
    _check_device(device)
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    numel = M * K
    if numel == 0:
        return out
    k = _kernels()
    k.dropout_mask_kernel[(_cdiv(numel, k.MASK_BLOCK),)](out, numel, seed, p, inv_keep, BLOCK=k.MASK_BLOCK)
    return out
