"""Parity of the low-rank Triton launchers (lora_fast/_lowrank.py) against fp64 torch.

On a machine without CUDA the kernels run in Triton's interpreter (fp16/fp32 only: the
interpreter's bf16 MMA and bf16 rounding are not faithful, so bf16 runs only on CUDA).
Tolerance (tests/parity.py): err(kernel) <= 2 * err(same-dtype torch) + atol[dtype], measured
against fp64; NF4 dequantisation must equal bitsandbytes bit for bit.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity import assert_parity  # noqa: E402

from lora_fast import _lowrank as L  # noqa: E402
from lora_fast._operand import NF4Operand  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
RANKS = [1, 8, 16, 64, 128]
SHAPES = [(37, 200, 72), (1, 96, 40), (5, 33, 17)]  # (M, K, N)
SEED = 1234
F64 = torch.float64


def _ids(v):
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


def _act(M, K, dtype, layout="contig"):
    """An (M, K) activation, contiguous or addressed through non-trivial strides."""
    if layout == "contig":
        return torch.randn(M, K, device=DEV).to(dtype)
    if layout == "transposed":
        return torch.randn(K, M, device=DEV).to(dtype).t()
    if layout == "strided":
        return torch.randn(M, 2 * K + 3, device=DEV).to(dtype)[:, 1:2 * K + 1:2]
    raise AssertionError(layout)


def _mask(M, K, p):
    return L.dropout_mask(SEED, M, K, p, DEV) if p > 0 else torch.ones(M, K, device=DEV)


def _drop_same(x, mask):
    # what a framework does in the working dtype: fp32 multiply, one rounding
    return (x.float() * mask).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# dropout mask
# ----------------------------------------------------------------------------------------------
def test_dropout_mask_rate_and_determinism():
    p = 0.25
    m = L.dropout_mask(7, 256, 1000, p, DEV)
    assert m.shape == (256, 1000) and m.dtype == torch.float32
    vals = torch.unique(m.cpu())
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert set(vals.tolist()) <= {0.0, scale.item()}, vals
    keep = (m > 0).double().mean().item()
    assert abs(keep - (1 - p)) < 0.006, keep  # ~7 sigma for 256k Bernoulli draws
    # rows and columns are not degenerate (no stripes)
    assert (m > 0).double().mean(0).std().item() < 0.05
    assert (m > 0).double().mean(1).std().item() < 0.05
    assert torch.equal(m, L.dropout_mask(7, 256, 1000, p, DEV))
    other = L.dropout_mask(8, 256, 1000, p, DEV)
    assert not torch.equal(m, other)
    assert ((m > 0) != (other > 0)).double().mean().item() > 0.2
    # element (m, k) depends only on m*K + k: a (K, M) mask is the same stream reshaped
    assert torch.equal(L.dropout_mask(7, 1000, 256, p, DEV).reshape(-1), m.reshape(-1))
    assert torch.equal(L.dropout_mask(7, 4, 5, 0.0, DEV), torch.ones(4, 5, device=DEV))
    assert torch.equal(L.dropout_mask(7, 4, 5, 1.0, DEV), torch.zeros(4, 5, device=DEV))


# ----------------------------------------------------------------------------------------------
# XA = drop(x) @ Aᵀ
# ----------------------------------------------------------------------------------------------
def _check_xa(M, K, r, dtype, p, layout="contig", a_dtype=None, splits=None):
    x = _act(M, K, dtype, layout)
    A = (torch.randn(r, K, device=DEV) / K**0.5).to(a_dtype or dtype)
    mask = _mask(M, K, p)
    got = L.xa_forward(x, A, dropout_p=p, seed=SEED, _splits=splits)
    assert got.dtype == torch.float32 and got.shape == (M, r)
    ref = (x.to(F64) * mask.to(F64)) @ A.to(F64).t()
    same = _drop_same(x, mask) @ A.to(dtype).t()
    assert_parity(got, ref, same, dtype, what=f"xa M={M} K={K} r={r} {dtype} p={p} {layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_xa_forward(shape, r, dtype, p):
    M, K, _ = shape
    _check_xa(M, K, r, dtype, p)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_xa_forward_strided_mixed(layout, dtype):
    _check_xa(37, 200, 16, dtype, 0.25, layout=layout, a_dtype=torch.float32)


@pytest.mark.parametrize("splits", [2, 5])
def test_xa_forward_split_k(splits):
    _check_xa(37, 200, 8, torch.float16, 0.25, splits=splits)


def test_xa_forward_stacked_ranks():
    # a stack of adapters is just a bigger r: > 128 ranks are tiled over the grid
    _check_xa(21, 72, 300, torch.float16, 0.25)


# ----------------------------------------------------------------------------------------------
# dYB = dy @ B, dB = s·dyᵀ @ XA
# ----------------------------------------------------------------------------------------------
def _check_dy(M, N, r, dtype, layout="contig", b_dtype=None, splits=None, scaling=0.75):
    dy = _act(M, N, dtype, layout)
    B = (torch.randn(N, r, device=DEV) / N**0.5).to(b_dtype or dtype)
    xa = torch.randn(M, r, device=DEV)
    dyb, db = L.dy_pass(dy, B, xa, scaling=scaling, _splits=splits)
    assert dyb.dtype == torch.float32 and dyb.shape == (M, r)
    assert db.dtype == B.dtype and db.shape == (N, r)
    what = f"M={M} N={N} r={r} {dtype} {layout} splits={splits}"
    ref_dyb = dy.to(F64) @ B.to(F64)
    assert_parity(dyb, ref_dyb, dy @ B.to(dtype), dtype, what="dYB " + what)
    ref_db = scaling * (dy.to(F64).t() @ xa.to(F64))
    same_db = (scaling * (dy.t() @ xa.to(dtype)).float()).to(dtype)
    assert_parity(db, ref_db, same_db, dtype, what="dB " + what)
    return dyb, db


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_dy_pass(shape, r, dtype):
    M, _, N = shape
    _check_dy(M, N, r, dtype)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_dy_pass_strided_mixed(layout, dtype):
    _check_dy(37, 72, 16, dtype, layout=layout, b_dtype=torch.float32)


@pytest.mark.parametrize("splits", [(1, 1), (2, 1), (1, 3), (3, 2)], ids=_ids)
def test_dy_pass_splits_deterministic(splits):
    dyb, db = _check_dy(37, 72, 8, torch.float16, splits=splits)
    torch.manual_seed(0)
    dyb2, db2 = _check_dy(37, 72, 8, torch.float16, splits=splits)
    assert torch.equal(dyb, dyb2) and torch.equal(db, db2)


def test_dy_pass_large_rank():
    _check_dy(21, 40, 160, torch.float16)


# ----------------------------------------------------------------------------------------------
# dA = s·dYBᵀ @ drop(x)
# ----------------------------------------------------------------------------------------------
def _check_da(M, K, r, dtype, p, layout="contig", splits=None, out_dtype=None, scaling=1.5):
    x = _act(M, K, dtype, layout)
    dyb = torch.randn(M, r, device=DEV)
    mask = _mask(M, K, p)
    out_dtype = out_dtype or dtype
    got = L.da_pass(dyb, x, scaling=scaling, dropout_p=p, seed=SEED, out_dtype=out_dtype, _splits=splits)
    assert got.dtype == out_dtype and got.shape == (r, K)
    ref = scaling * (dyb.to(F64).t() @ (x.to(F64) * mask.to(F64)))
    same = (scaling * (dyb.to(dtype).t() @ _drop_same(x, mask)).float()).to(out_dtype)
    assert_parity(got, ref, same, out_dtype, what=f"dA M={M} K={K} r={r} {dtype} p={p} {layout} splits={splits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_da_pass(shape, r, dtype, p):
    M, K, _ = shape
    _check_da(M, K, r, dtype, p)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_da_pass_strided(layout, dtype):
    _check_da(37, 200, 16, dtype, 0.25, layout=layout)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_da_pass_splits_fp32_out(splits):
    _check_da(37, 200, 8, torch.float16, 0.25, splits=splits, out_dtype=torch.float32)


def test_da_pass_large_rank():
    _check_da(21, 72, 160, torch.float16, 0.25)


# ----------------------------------------------------------------------------------------------
# NF4 dequant (bit-exact vs bitsandbytes) and merges
# ----------------------------------------------------------------------------------------------
bnbF = pytest.importorskip("bitsandbytes.functional")


def _nf4(N, K, blocksize, nested):
    w = torch.randn(N, K, device=DEV)
    q, st = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    op = NF4Operand(
        packed=q.reshape(-1),
        absmax=st.absmax,
        absmax2=st.state2.absmax if nested else None,
        code2=st.state2.code if nested else None,
        offset=float(st.offset) if nested else 0.0,
        blocksize=st.blocksize,
        nested_blocksize=st.state2.blocksize if nested else 256,
        shape=(N, K),
        code=st.code.to(DEV),
    )
    return q, st, op


NF4_SHAPES = [(64, 128), (17, 33), (40, 50)]  # numel 8192, 561 (odd), 2000 (not a multiple of 64/128)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", NF4_SHAPES, ids=_ids)
def test_dequant_nf4_bit_exact(shape, blocksize, nested, dtype):
    q, st, op = _nf4(*shape, blocksize, nested)
    st.dtype = dtype
    want = bnbF.dequantize_4bit(q, st)
    got = L.dequant_nf4(op, out_dtype=dtype)
    assert got.shape == want.shape and got.dtype == dtype
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        i = int(diff.reshape(-1).argmax())
        raise AssertionError(f"NF4 dequant differs from bitsandbytes at flat {i}: "
                             f"{got.reshape(-1)[i].item()} vs {want.reshape(-1)[i].item()} "
                             f"({int((diff > 0).sum())} elements)")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("r", [1, 16, 128])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(40, 50), (17, 33)], ids=_ids)
def test_dequant_nf4_merge(shape, nested, r, dtype):
    N, K = shape
    q, st, op = _nf4(N, K, 64, nested)
    st.dtype = torch.float32
    w32 = bnbF.dequantize_4bit(q, st)
    A = (torch.randn(r, K, device=DEV) / 4).to(dtype)
    B = (torch.randn(N, r, device=DEV) / 4).to(dtype)
    s = 0.5
    got = L.dequant_nf4(op, out_dtype=dtype, merge=(A, B, s))
    ref = w32.to(F64) + s * (B.to(F64) @ A.to(F64))
    same = w32.to(dtype) + s * (B @ A)
    assert_parity(got, ref, same, dtype, what=f"nf4 merge {shape} nested={nested} r={r} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("r", [1, 8, 64, 128])
@pytest.mark.parametrize("shape", [(72, 200), (17, 33), (1, 40)], ids=_ids)
def test_dense_merge(shape, r, dtype):
    N, K = shape
    W0 = torch.randn(N, K, device=DEV).to(dtype)
    A = (torch.randn(r, K, device=DEV) / 4).to(dtype)
    B = (torch.randn(N, r, device=DEV) / 4).to(dtype)
    s = 2.0
    got = L.dense_merge(W0, A, B, scaling=s, out_dtype=dtype)
    ref = W0.to(F64) + s * (B.to(F64) @ A.to(F64))
    same = W0 + s * (B @ A)
    assert_parity(got, ref, same, dtype, what=f"dense merge {shape} r={r} {dtype}")


@pytest.mark.parametrize("out_dtype", DTYPES, ids=_ids)
def test_dense_merge_strided_mixed(out_dtype):
    # transposed fp32 base, fp32 A with bf16/fp16 B -> fp32 products; output in another dtype
    N, K, r = 40, 72, 8
    W0 = torch.randn(K, N, device=DEV).t()
    A = torch.randn(r, 2 * K, device=DEV)[:, ::2] / 4
    B = (torch.randn(N, r, device=DEV) / 4).to(torch.float16)
    got = L.dense_merge(W0, A, B, scaling=0.3, out_dtype=out_dtype)
    ref = W0.to(F64) + 0.3 * (B.to(F64) @ A.to(F64))
    same = (W0 + 0.3 * (B.float() @ A)).to(out_dtype)
    assert_parity(got, ref, same, out_dtype, what=f"dense merge strided -> {out_dtype}")


HALF = [torch.float16] + ([torch.bfloat16] if CUDA else [])  # bf16 tl.dot is wrong under the interpreter


@pytest.mark.parametrize("splits", [(1, 1), (3, 2)], ids=["one-split", "split"])
def test_dy_pass_scale_is_applied_in_fp32(splits):
    # dB = s·dyᵀ·XA with s applied to the fp32 sum: s·XA may exceed fp16's range (here 64 x 2000)
    # while dB itself fits; scaling XA before its fp16 cast would overflow to inf
    M, N, r, s = 48, 40, 8, 64.0
    dy = (torch.randn(M, N, device=DEV) * 1e-3).to(torch.float16)
    B = torch.randn(N, r, device=DEV)
    xa = torch.randn(M, r, device=DEV) * 2000
    _, db = L.dy_pass(dy, B, xa, scaling=s, _splits=splits)
    ref = s * (dy.double().t() @ xa.to(torch.float16).double())
    assert torch.isfinite(db).all()
    torch.testing.assert_close(db.double(), ref, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("out_dtype", HALF, ids=_ids)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_merge_round_factors_equals_host_rounding(nf4, out_dtype):
    # round_factors=True: fp32 factors rounded to out_dtype in registers == rounded on the host
    N, K, r = 72, 200, 16
    A = torch.randn(r, K, device=DEV) / 4
    B = torch.randn(N, r, device=DEV) / 4
    if nf4:
        _, _, op = _nf4(N, K, 64, True)
        merge = lambda a, b, **kw: L.dequant_nf4(op, out_dtype=out_dtype, merge=(a, b, 0.5), **kw)  # noqa: E731
    else:
        W0 = torch.randn(N, K, device=DEV).to(out_dtype)
        merge = lambda a, b, **kw: L.dense_merge(W0, a, b, scaling=0.5, out_dtype=out_dtype, **kw)  # noqa: E731
    got = merge(A, B, round_factors=True)
    want = merge(A.to(out_dtype), B.to(out_dtype))
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


def test_merge_on_tensor_cores_rule():
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    t = lambda dt: torch.empty(1, 1, dtype=dt)  # noqa: E731
    assert L.merge_on_tensor_cores(t(f16), t(f16), f16, False)
    assert not L.merge_on_tensor_cores(t(f32), t(f32), f16, False)  # exact fp32 products by default
    assert L.merge_on_tensor_cores(t(f32), t(f32), bf16, True)
    assert L.merge_on_tensor_cores(t(bf16), t(f32), bf16, True)
    assert not L.merge_on_tensor_cores(t(bf16), t(bf16), f16, True)  # bf16 -> fp16 would lose range
    assert not L.merge_on_tensor_cores(t(f16), t(f16), f32, True)  # an fp32 output never rounds
    assert not L.merge_on_tensor_cores(t(torch.float64), t(f32), bf16, True)


# ----------------------------------------------------------------------------------------------
# edge cases and argument checks
# ----------------------------------------------------------------------------------------------
def test_empty_dims():
    x = torch.randn(0, 16, device=DEV)
    assert L.xa_forward(x, torch.randn(4, 16, device=DEV)).shape == (0, 4)
    dyb, db = L.dy_pass(torch.randn(0, 8, device=DEV), torch.randn(8, 4, device=DEV),
                        torch.randn(0, 4, device=DEV), scaling=1.0)
    assert dyb.shape == (0, 4) and torch.equal(db, torch.zeros(8, 4, device=DEV))
    dA = L.da_pass(torch.randn(0, 4, device=DEV), x, scaling=1.0, out_dtype=torch.float32)
    assert torch.equal(dA, torch.zeros(4, 16, device=DEV))
    assert torch.equal(L.xa_forward(torch.randn(3, 0, device=DEV), torch.randn(4, 0, device=DEV)),
                       torch.zeros(3, 4, device=DEV))


def test_bad_arguments():
    x = torch.randn(4, 16, device=DEV)
    A = torch.randn(2, 16, device=DEV)
    with pytest.raises(ValueError, match="A must be"):
        L.xa_forward(x, torch.randn(2, 15, device=DEV))
    with pytest.raises(ValueError, match="2-D"):
        L.xa_forward(x[None], A)
    with pytest.raises(ValueError, match="dtype"):
        L.xa_forward(x.to(torch.int32), A)
    with pytest.raises(ValueError, match="dropout_p"):
        L.xa_forward(x, A, dropout_p=1.5)
    with pytest.raises(ValueError, match="seed"):
        L.xa_forward(x, A, dropout_p=0.1, seed=-1)
    with pytest.raises(ValueError, match="xa must be"):
        L.dy_pass(torch.randn(4, 8, device=DEV), torch.randn(8, 2, device=DEV), torch.randn(4, 3, device=DEV),
                  scaling=1.0)
    with pytest.raises(ValueError, match="B must be"):
        L.dy_pass(torch.randn(4, 8, device=DEV), torch.randn(7, 2, device=DEV), torch.randn(4, 2, device=DEV),
                  scaling=1.0)
    with pytest.raises(ValueError, match="dyb must be"):
        L.da_pass(torch.randn(3, 2, device=DEV), x, scaling=1.0, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        L.da_pass(torch.randn(4, 2, device=DEV), x, scaling=1.0, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="B must be"):
        L.dense_merge(torch.randn(8, 16, device=DEV), A, torch.randn(8, 3, device=DEV), scaling=1.0,
                      out_dtype=torch.float32)
    with pytest.raises(ValueError, match="NF4Operand"):
        L.dequant_nf4(object(), out_dtype=torch.float16)
    if CUDA:
        with pytest.raises(ValueError, match="is on"):
            L.xa_forward(x, A.cpu())
    else:
        os.environ["TRITON_INTERPRET"] = "0"
        try:
            with pytest.raises(ValueError, match="CUDA"):
                L.xa_forward(x, A)
        finally:
            os.environ["TRITON_INTERPRET"] = "1"
