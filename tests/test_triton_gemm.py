"""Parity of the Triton GEMM with a LoRA epilogue (``lora_fast._gemm.lora_gemm``).

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported) with fp16/fp32 only (bf16 ``tl.dot`` is wrong in the interpreter); with
CUDA the autotuned kernel runs and bf16 cases are added.

Every result is checked with the project's single tolerance rule (``tests/parity.py``):
``err(kernel) <= 2 * err(same-dtype torch) + atol[dtype]`` against an fp64 reference.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import lora_fast._gemm as gemm_mod  # noqa: E402
from lora_fast._gemm import NF4Operand, lora_gemm  # noqa: E402
from parity import assert_parity, report  # noqa: E402

try:
    from lora_fast.kernels import lora_gemm as kmod
    from lora_fast.kernels.common import dropout_keep_scale
except ImportError:
    from kernels import lora_gemm as kmod
    from kernels.common import dropout_keep_scale

bnbf = pytest.importorskip("bitsandbytes.functional")

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _mask_kernel(out_ptr, n, seed, p, inv_keep, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, dropout_keep_scale(seed, offs, p, inv_keep), mask=offs < n)


def dropout_scale(M, N, p, seed):
    """fp32 (M, N) tensor of keep/(1-p), regenerated from ``(seed, m*N + n)``."""
    out = torch.empty(M * N, device=DEV, dtype=torch.float32)
    BLOCK = 1024
    _mask_kernel[(triton.cdiv(M * N, BLOCK),)](out, M * N, seed, p, 1.0 / (1.0 - p), BLOCK=BLOCK)
    return out.view(M, N)


def make_nf4(W, blocksize, nested):
    """Quantise the fp32 (N, K) ``W`` with bitsandbytes (on CPU) -> (NF4Operand, dequantised W)."""
    qw, st = bnbf.quantize_4bit(W.float().cpu(), blocksize=blocksize, quant_type="nf4",
                                compress_statistics=nested)
    Wd = bnbf.dequantize_4bit(qw, st).float()
    op = NF4Operand(
        packed=qw.view(-1).to(DEV),
        absmax=st.absmax.to(DEV),
        absmax2=st.state2.absmax.to(DEV) if nested else None,
        code2=st.state2.code.to(DEV) if nested else None,
        offset=float(st.offset) if nested else 0.0,
        blocksize=blocksize,
        nested_blocksize=int(st.state2.blocksize) if nested else 256,
        shape=tuple(W.shape),
        code=st.code.to(DEV),
    )
    assert (op.absmax.dtype == torch.uint8) == nested
    return op, Wd.to(DEV)


def make_act(rows, cols, dtype, layout):
    """(rows, cols) activation: contiguous, a column slice of a wider tensor, or a transposed view."""
    if layout == "contig":
        return torch.randn(rows, cols, device=DEV).to(dtype)
    if layout == "colslice":
        return torch.randn(rows, cols + 7, device=DEV).to(dtype)[:, 3:3 + cols]
    if layout == "transposed":
        return torch.randn(cols, rows, device=DEV).to(dtype).t()
    raise AssertionError(layout)


def run_case(M, K, N, *, dtype, orient, wkind, r, bias, dropout, a_layout="contig",
             use_out=None, w_layout="contig", w_dtype=None, seed=1234, scaling=0.5):
    """Weight stored (N, K).  fwd: (M,K) @ W^T -> (M,N); bwd: (M,N) @ W -> (M,K)."""
    W = torch.randn(N, K, device=DEV) / K ** 0.5
    if wkind == "dense":
        wd = w_dtype or dtype
        if w_layout == "contig":
            w = W.to(wd)
        else:  # stored transposed in memory: (N, K) view of a (K, N) buffer
            w = W.t().contiguous().to(wd).t()
        W64 = w.double()
    else:
        _, bs, nested = wkind  # ("nf4", blocksize, nested)
        w, Wd = make_nf4(W, bs, nested)
        W64 = Wd.double()
    Wop64 = W64.t() if orient == "fwd" else W64
    Kred, Nout = Wop64.shape

    a = make_act(M, Kred, dtype, a_layout)
    if r:
        p = torch.randn(M, r, device=DEV)  # fp32 left factor (e.g. X@A kept in fp32)
        if orient == "fwd":  # q = B^T of B (Nout, r): a transposed view, as the forward passes it
            q = (torch.randn(Nout, r, device=DEV) / r ** 0.5).to(dtype).t()
        else:  # q = A (r, Kout) contiguous
            q = (torch.randn(r, Nout, device=DEV) / r ** 0.5).to(dtype)
    else:
        p = q = None
    b = torch.randn(Nout, device=DEV).to(dtype) if bias else None

    out = None
    if use_out == "contig":
        out = torch.full((M, Nout), float("nan"), device=DEV, dtype=dtype)
    elif use_out == "transposed":
        out = torch.full((Nout, M), float("nan"), device=DEV, dtype=dtype).t()

    got = lora_gemm(a, w, w_transposed=(orient == "bwd"), p=p, q=q, scaling=scaling, bias=b,
                    dropout_p=dropout, seed=seed, out=out)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()
    assert got.dtype == dtype and tuple(got.shape) == (M, Nout)

    # fp64 reference and plain torch in the working dtype
    ref = a.double() @ Wop64
    same = a @ Wop64.to(dtype)
    if r:
        mask = dropout_scale(M, Nout, dropout, seed) if dropout > 0 else torch.ones(M, Nout, device=DEV)
        ref = ref + scaling * (p.double() @ q.double()) * mask.double()
        same = same + scaling * (p.to(dtype) @ q) * mask.to(dtype)
    if bias:
        ref = ref + b.double()
        same = same + b
    assert_parity(got, ref, same, dtype=dtype,
                  what=f"M={M} K={K} N={N} {orient} {wkind} r={r} bias={bias} p={dropout} {dtype}")
    return got


NF4_64N = ("nf4", 64, True)
NF4_128 = ("nf4", 128, False)
NF4_64 = ("nf4", 64, False)
NF4_128N = ("nf4", 128, True)


# ----------------------------------------------------------------------------- parity

# Odd shape (K=200 is not a multiple of either blocksize, every dim has a tail), LoRA + bias +
# dropout, over dtype x orientation x weight kind, with the activation layout cycling.
_CORE = []
_layouts = ["contig", "colslice", "transposed"]
_i = 0
for _dt in DTYPES:
    for _orient in ("fwd", "bwd"):
        for _wk in ("dense", NF4_64N, NF4_128):
            _CORE.append(pytest.param(_dt, _orient, _wk, _layouts[_i % 3],
                                      id=f"{str(_dt)[6:]}-{_orient}-{_wk if _wk == 'dense' else '%s%d%s' % (_wk[0], _wk[1], 'n' if _wk[2] else '')}-{_layouts[_i % 3]}"))
            _i += 1


@pytest.mark.parametrize("dtype,orient,wkind,a_layout", _CORE)
def test_core_odd_shape(dtype, orient, wkind, a_layout):
    run_case(37, 200, 72, dtype=dtype, orient=orient, wkind=wkind, r=8, bias=True, dropout=0.3,
             a_layout=a_layout)


# Ranks (1 .. 200; R is padded to 16-chunks with masking) on the typical small shape.
@pytest.mark.parametrize(
    "r,orient,wkind,bias,dropout,dtype",
    [
        (1, "fwd", "dense", False, 0.0, torch.float16),
        (16, "bwd", NF4_64, False, 0.3, torch.float16),
        (64, "fwd", NF4_128N, True, 0.0, torch.float16),
        (128, "bwd", "dense", True, 0.3, torch.float32),
        (128, "fwd", NF4_64N, False, 0.3, torch.float16),
        (200, "bwd", "dense", False, 0.0, torch.float16),
    ],
)
def test_ranks(r, orient, wkind, bias, dropout, dtype):
    run_case(64, 128, 96, dtype=dtype, orient=orient, wkind=wkind, r=r, bias=bias, dropout=dropout)


@pytest.mark.parametrize(
    "M,K,N,orient,wkind,r,bias,dropout,dtype",
    [
        # no LoRA term at all (dropout must then be a no-op)
        (64, 128, 96, "fwd", "dense", 0, True, 0.0, torch.float32),
        (64, 128, 96, "bwd", NF4_64N, 0, False, 0.3, torch.float16),
        # a single row
        (1, 200, 72, "fwd", NF4_64N, 8, True, 0.0, torch.float16),
        (1, 128, 96, "bwd", "dense", 16, False, 0.3, torch.float32),
        # tiny odd shape: K=33 < blocksize, odd number of NF4 elements (N*K = 561)
        (5, 33, 17, "fwd", "dense", 1, True, 0.0, torch.float16),
        (5, 33, 17, "bwd", NF4_64, 8, False, 0.3, torch.float32),
        (5, 33, 17, "fwd", NF4_128N, 0, False, 0.0, torch.float32),
        (5, 33, 17, "bwd", NF4_128N, 64, True, 0.3, torch.float16),
        # more M blocks than one launch group (grouped-order tail)
        (70, 96, 40, "fwd", "dense", 8, False, 0.3, torch.float16),
    ],
)
def test_shapes(M, K, N, orient, wkind, r, bias, dropout, dtype):
    run_case(M, K, N, dtype=dtype, orient=orient, wkind=wkind, r=r, bias=bias, dropout=dropout)


@pytest.mark.parametrize(
    "orient,wkind,use_out,dtype",
    [
        ("fwd", "dense", "transposed", torch.float16),
        ("bwd", NF4_64N, "contig", torch.float32),
        ("bwd", "dense", "transposed", torch.float32),
    ],
)
def test_out_poisoned(orient, wkind, use_out, dtype):
    """``out=`` prefilled with NaN (any strides) must be fully overwritten."""
    got = run_case(37, 72, 40, dtype=dtype, orient=orient, wkind=wkind, r=8, bias=True, dropout=0.3,
                   use_out=use_out)
    assert torch.isfinite(got).all(), report(got, torch.zeros_like(got))


@pytest.mark.parametrize("orient", ["fwd", "bwd"])
def test_dense_weight_strided_and_other_dtype(orient):
    """Weight stored with transposed strides and in fp32 while activations are fp16."""
    run_case(37, 72, 40, dtype=torch.float16, orient=orient, wkind="dense", r=8, bias=False,
             dropout=0.0, w_layout="transposed", w_dtype=torch.float32, a_layout="transposed")


def test_empty_and_zero_k():
    a = torch.randn(0, 16, device=DEV, dtype=torch.float32)
    w = torch.randn(8, 16, device=DEV)
    assert lora_gemm(a, w, w_transposed=False).shape == (0, 8)
    # Kred = 0: only the LoRA term and the bias remain
    a = torch.randn(4, 0, device=DEV)
    w = torch.randn(8, 0, device=DEV)
    p, q, b = torch.randn(4, 3, device=DEV), torch.randn(3, 8, device=DEV), torch.randn(8, device=DEV)
    got = lora_gemm(a, w, w_transposed=False, p=p, q=q, scaling=2.0, bias=b)
    ref = 2.0 * (p.double() @ q.double()) + b.double()
    assert_parity(got, ref, (2.0 * (p @ q) + b), dtype=torch.float32, what="Kred=0")


def test_dropout_mask_properties():
    """The mask depends on the seed, drops about p of the elements, and the kernel uses it."""
    m1 = dropout_scale(64, 96, 0.3, 7)
    m2 = dropout_scale(64, 96, 0.3, 8)
    frac = (m1 == 0).double().mean().item()
    assert 0.25 < frac < 0.35, frac
    assert not torch.equal(m1, m2)
    assert torch.allclose(m1[m1 != 0], torch.full_like(m1[m1 != 0], 1 / 0.7))
    # zero base weight: output is exactly the masked LoRA term
    M, K, N, r = 20, 16, 24, 4
    a = torch.randn(M, K, device=DEV)
    w = torch.zeros(N, K, device=DEV)
    p, q = torch.randn(M, r, device=DEV), torch.randn(r, N, device=DEV)
    got = lora_gemm(a, w, w_transposed=False, p=p, q=q, dropout_p=0.5, seed=99)
    mask = dropout_scale(M, N, 0.5, 99)
    assert torch.equal(got == 0, (mask == 0) | ((p @ q) == 0))


@pytest.mark.parametrize(
    "meta",
    [
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8},
    ],
    ids=["blk16", "blk64"],
)
def test_other_block_sizes(meta, monkeypatch):
    """Same kernel with other tile sizes (EVEN_K true for blk16, several K steps, one group)."""
    monkeypatch.setattr(gemm_mod, "_FORCE_CONFIG", dict(meta, num_warps=4, num_stages=2))
    run_case(37, 64, 40, dtype=torch.float16, orient="fwd", wkind=NF4_64N, r=20, bias=True, dropout=0.3)
    run_case(37, 64, 40, dtype=torch.float32, orient="bwd", wkind="dense", r=8, bias=False, dropout=0.3)


# --- GPU only: the autotuned path, bf16, and every autotune config on its own.

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="autotuned path and bf16 need a GPU")
@pytest.mark.parametrize(
    "dtype,wkind,orient",
    [
        (torch.float16, "dense", "fwd"),
        (torch.bfloat16, "dense", "bwd"),
        (torch.bfloat16, NF4_64N, "fwd"),
        (torch.float16, NF4_128, "bwd"),
    ],
)
def test_gpu_autotuned(dtype, wkind, orient):
    run_case(300, 1000, 520, dtype=dtype, orient=orient, wkind=wkind, r=16, bias=True, dropout=0.1)
    # a second M in the same power-of-two bucket reuses the tuned config
    run_case(280, 1000, 520, dtype=dtype, orient=orient, wkind=wkind, r=16, bias=True, dropout=0.1)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("idx", range(len(kmod.CONFIGS)))
def test_gpu_each_config(idx, monkeypatch):
    """Every autotune config that fits this GPU compiles and is correct (bf16 and fp16)."""
    c = kmod.CONFIGS[idx]
    if any(c is f for f in kmod.FP32_CONFIGS):
        pytest.skip("fp32-activation config: covered by the fp32 parity tests through the autotuner")
    nf4 = any(c is f for f in kmod.NF4_CONFIGS)
    kw = c.kwargs
    limit, major = kmod._device_info(DEV)
    est = kmod.estimate_smem(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, 2, nf4, True, major)
    if est > limit:
        pytest.skip(f"config needs ~{est} B of shared memory")
    monkeypatch.setattr(gemm_mod, "_FORCE_CONFIG", dict(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    wkind = NF4_64N if nf4 else "dense"
    run_case(300, 1000, 520, dtype=torch.bfloat16, orient="fwd", wkind=wkind, r=16, bias=True, dropout=0.1)
    run_case(300, 520, 1000, dtype=torch.float16, orient="bwd", wkind=wkind, r=64, bias=False, dropout=0.1)


# ----------------------------------------------------------------------------- configs / validation

def _est(c, act_bytes, nf4, nested=True, major=None):
    kw = c.kwargs
    return kmod.estimate_smem(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, act_bytes, nf4,
                              nested, major)


def test_configs_and_prune():
    assert kmod.CONFIGS == kmod.DENSE_CONFIGS + kmod.NF4_CONFIGS + kmod.FP32_CONFIGS
    keys = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kmod.CONFIGS]
    assert len(set(keys)) == len(keys)  # a config key names one list (compile_check's table)
    for c in kmod.CONFIGS:
        kw = c.kwargs
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"):
            assert kw[key] & (kw[key] - 1) == 0
        assert kw["BLOCK_M"] >= 16 and kw["BLOCK_N"] >= 16 and kw["BLOCK_K"] >= 16
        assert 2 <= c.num_stages <= 4 and c.num_warps in (4, 8)
        # no more than 64 fp32 accumulators per thread: larger tiles spill with the LoRA epilogue
        assert kw["BLOCK_M"] * kw["BLOCK_N"] <= 64 * 32 * c.num_warps
    # every config fits an H100 (227 KB) with 16-bit activations; enough fit an RTX 3060 (99 KB)
    assert all(_est(c, 2, False) <= 227 * 1024 for c in kmod.DENSE_CONFIGS)
    assert all(_est(c, 2, True) <= 227 * 1024 for c in kmod.NF4_CONFIGS)
    assert all(_est(c, 4, True) <= 99 * 1024 for c in kmod.FP32_CONFIGS)
    assert sum(_est(c, 2, False) <= 99 * 1024 for c in kmod.DENSE_CONFIGS) >= 6
    assert sum(_est(c, 2, True) <= 99 * 1024 for c in kmod.NF4_CONFIGS) >= 3
    a16 = torch.empty(1, 1, dtype=torch.float16)
    a32 = torch.empty(1, 1, dtype=torch.float32)
    # triton 3.6 and 3.9 compile results (shared bytes, nested NF4, bf16, sm_90) bound the estimate
    measured = {(64, 128, 32, 4): 159744, (128, 64, 32, 2): 36864, (32, 64, 32, 3): 55296}
    seen = 0
    for c in kmod.NF4_CONFIGS:
        kw = c.kwargs
        key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages)
        if key in measured:
            seen += 1
            assert measured[key] <= _est(c, 2, True, True, major=9) <= 1.25 * measured[key]
    assert seen == len(measured)
    for limit, major in ((99 * 1024, 8), (163 * 1024, 8), (227 * 1024, 9), (99 * 1024, None)):
        kmod._DEVICE_INFO[0] = (limit, major)  # pretend a GPU (the CPU has no device to query)
        try:
            for a, nf4, nested, mb in ((a16, False, False, 4096), (a32, False, False, 16),
                                       (a16, True, True, 128), (a32, True, False, 4096), (a32, True, True, 1)):
                kept = kmod.prune_configs(kmod.CONFIGS, {"a_ptr": a, "M_BUCKET": mb}, W_NF4=nf4, NESTED=nested)
                assert kept
                family = kmod.FP32_CONFIGS if a is a32 else (kmod.NF4_CONFIGS if nf4 else kmod.DENSE_CONFIGS)
                for c in kept:
                    assert any(c is f for f in family)
                    assert _est(c, a.element_size(), nf4, nested, major) <= limit
                    if mb <= 64:
                        assert c.kwargs["BLOCK_M"] <= 64
        finally:
            kmod._DEVICE_INFO.pop(0, None)
    assert kmod.HEURISTICS["EVEN_K"]({"K": 128, "BLOCK_K": 64})
    assert not kmod.HEURISTICS["EVEN_K"]({"K": 200, "BLOCK_K": 64})
    assert kmod.HEURISTICS["BLOCK_R"]({"R": 256, "BLOCK_K": 32}) >= 16


def test_validation_errors(monkeypatch):
    a = torch.randn(4, 16, device=DEV)
    w = torch.randn(8, 16, device=DEV)
    p, q = torch.randn(4, 3, device=DEV), torch.randn(3, 8, device=DEV)
    with pytest.raises(ValueError, match="columns"):
        lora_gemm(a, w, w_transposed=True)  # Kred would be 8
    with pytest.raises(ValueError, match="together"):
        lora_gemm(a, w, w_transposed=False, p=p)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_gemm(a, w, w_transposed=False, p=p, q=torch.randn(2, 8, device=DEV))
    with pytest.raises(ValueError, match="q has"):
        lora_gemm(a, w, w_transposed=False, p=p, q=torch.randn(3, 9, device=DEV))
    with pytest.raises(ValueError, match="p has"):
        lora_gemm(a, w, w_transposed=False, p=torch.randn(5, 3, device=DEV), q=q)
    with pytest.raises(ValueError, match="bias"):
        lora_gemm(a, w, w_transposed=False, bias=torch.randn(7, device=DEV))
    with pytest.raises(ValueError, match="dropout_p"):
        lora_gemm(a, w, w_transposed=False, p=p, q=q, dropout_p=1.0)
    with pytest.raises(ValueError, match="out must have dtype"):
        lora_gemm(a, w, w_transposed=False, out=torch.empty(4, 8, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must have shape"):
        lora_gemm(a, w, w_transposed=False, out=torch.empty(8, 4, device=DEV))
    with pytest.raises(ValueError, match="a must be fp16/bf16/fp32"):
        lora_gemm(a.double(), w, w_transposed=False)
    with pytest.raises(ValueError, match="2-D"):
        lora_gemm(a[None], w, w_transposed=False)
    op, _ = make_nf4(torch.randn(8, 16), 64, True)
    with pytest.raises(ValueError, match="absmax2"):
        bad = NF4Operand(op.packed, op.absmax, None, None, 0.0, 64, 256, (8, 16), op.code)
        lora_gemm(a, bad, w_transposed=False)
    with pytest.raises(ValueError, match="packed"):
        bad = NF4Operand(op.packed[:10], op.absmax, op.absmax2, op.code2, op.offset, 64, 256, (8, 16), op.code)
        lora_gemm(a, bad, w_transposed=False)
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            lora_gemm(a, w, w_transposed=False)
