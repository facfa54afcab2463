"""Tests of the CUDA backend (lora_fast.cuda_ext, csrc/).

GPU tests (parity of the fused NF4+LoRA GEMV against an fp64 reference, NF4 quantisation
byte-equality with bitsandbytes' CUDA kernel) are skipped with "needs a CUDA GPU" on machines
without one; the CPU tests check that the backend reports itself unavailable without raising.
"""
from __future__ import annotations

import pytest
import torch

from lora_fast import _backend, cuda_ext

HAS_GPU = torch.cuda.is_available() and torch.version.cuda is not None
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------------- CPU side

def test_status_returns_tuple_without_raising():
    ok, why = cuda_ext.status()
    assert isinstance(ok, bool) and isinstance(why, str)
    if not HAS_GPU:
        assert ok is False
        assert why  # a reason is given


def test_status_is_stable_and_reason_mentions_cause():
    first = cuda_ext.status()
    assert cuda_ext.status() == first
    if not HAS_GPU:
        reason = first[1].lower()
        assert any(w in reason for w in ("cpu", "cuda", "nvcc", "device")), reason


def test_backend_cuda_status_on_cpu_tensors():
    ok, why = _backend.cuda_status(torch.device("cpu"))
    assert ok is False and why


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-only behaviour")
def test_load_raises_clear_error_without_gpu():
    with pytest.raises(cuda_ext.CudaExtUnavailable):
        cuda_ext.load()


def test_unsupported_reasons_cpu():
    from bench.cuda_selfcheck import make_nf4_operand

    W = torch.randn(48, 64) * 0.02
    op = make_nf4_operand(W, 64, nested=False)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    A = torch.randn(4, 64, dtype=torch.bfloat16)
    B = torch.randn(48, 4, dtype=torch.bfloat16)
    assert cuda_ext.gemv_unsupported_reason(x, W, None, A, B, 0.0) == "dense base weight"
    assert "M=65" in cuda_ext.gemv_unsupported_reason(torch.randn(65, 64, dtype=torch.bfloat16), op, None, A, B, 0.0)
    assert cuda_ext.gemv_unsupported_reason(x, op, None, A, B, 0.1) == "dropout"
    assert "dtype" in cuda_ext.gemv_unsupported_reason(x.float(), op, None, A, B, 0.0)
    assert cuda_ext.gemv_unsupported_reason(x, op, None, A, B, 0.0) == "x not on a CUDA device"


def test_cpu_reference_operand_roundtrip():
    """The test operand builder used on GPU produces what lora_fast.reference dequantises."""
    from bench.cuda_selfcheck import make_nf4_operand
    from lora_fast import reference as ref

    torch.manual_seed(0)
    W = torch.randn(37, 96) * 0.02
    for nested in (False, True):
        op = make_nf4_operand(W, 64, nested=nested)
        deq = ref.nf4_dequantize(op, torch.float32)
        assert deq.shape == W.shape
        # NF4 is coarse: the error is bounded by half the largest code gap times absmax
        assert float((deq - W).abs().max()) <= 0.2 * float(W.abs().max()) + 1e-3


# ------------------------------------------------------------------------------------- GPU side

_PARITY = []
for _dt in (torch.bfloat16, torch.float16):
    for _m in (1, 3, 16, 64):
        for _i, (_n, _k) in enumerate(((333, 4096), (129, 800), (77, 200))):
            for _r in (1, 16, 64):
                _j = len(_PARITY)
                _PARITY.append((_m, _n, _k, _r, _dt, 64 if _j % 4 < 2 else 128, bool(_j % 2),
                                torch.float32 if _j % 3 == 0 else _dt, _j % 4 != 1))


def _id(c):
    m, n, k, r, dt, bs, nested, adt, bias = c
    return (f"M{m}-N{n}-K{k}-r{r}-{str(dt)[6:]}-bs{bs}-{'nested' if nested else 'plain'}-A{str(adt)[6:]}"
            f"{'-bias' if bias else ''}")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", _PARITY, ids=[_id(c) for c in _PARITY])
def test_gemv_parity(case):
    from bench.cuda_selfcheck import check_parity

    m, n, k, r, dt, bs, nested, adt, bias = case
    row = check_parity(m, n, k, r, dt, bs, nested, adt, bias)
    assert row["ok"], row
    if k % 32 == 0:  # the same case through the reference-exact scalar kernel
        row = check_parity(m, n, k, r, dt, bs, nested, adt, bias, force_scalar=True)
        assert row["ok"], row


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_gemv_blocksizes(blocksize, nested):
    from bench.cuda_selfcheck import check_parity

    row = check_parity(5, 272, 4096, 16, torch.bfloat16, blocksize, nested, torch.float32, True)
    assert row["ok"], row


@needs_gpu
@pytest.mark.gpu
def test_gemv_records_dispatch_and_delegates():
    from bench.cuda_selfcheck import make_case

    x, op, bias, A, B = make_case(2, 64, 128, 8, torch.bfloat16, 64, False, torch.bfloat16, True, "cuda")
    _backend.dispatch_stats(reset=True)
    cuda_ext.forward(x, op, bias, A, B, 1.0, 0.0, 0)
    stats = _backend.dispatch_stats()
    assert stats.get("cuda:nf4_gemv_mma", 0) == 1, stats
    cuda_ext.forward(x, op, bias, A, B, 1.0, 0.0, 0, force_scalar=True)
    assert _backend.dispatch_stats().get("cuda:nf4_gemv_scalar", 0) == 1
    # dense base -> delegated (to Triton, or to torch when the Triton backend is missing)
    _backend.dispatch_stats(reset=True)
    w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    y, xa = cuda_ext.forward(x, w, bias, A, B, 1.0, 0.0, 0)
    assert y.shape == (2, 64) and xa.shape == (2, 8)
    assert any("delegated_to" in k and "dense base weight" in k for k in _backend.dispatch_stats()), \
        _backend.dispatch_stats()


@needs_gpu
@pytest.mark.gpu
def test_gemv_strided_rows_and_cuda_graph():
    from bench.cuda_selfcheck import make_case, reference_forward

    x, op, bias, A, B = make_case(4, 160, 512, 16, torch.float16, 64, True, torch.float32, False, "cuda")
    big = torch.zeros(4, 512 + 64, device="cuda", dtype=torch.float16)
    big[:, :512] = x
    xs = big[:, :512]  # row stride 576, unit column stride
    y, xa = cuda_ext.forward(xs, op, bias, A, B, 0.25, 0.0, 0)
    y_ref, _ = reference_forward(x, op, bias, A, B, 0.25)
    assert float((y.double() - y_ref).abs().max()) <= 3e-3 * float(y_ref.abs().max())
    # capture in a CUDA graph (PDL launch inside stream capture) and replay
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cuda_ext.forward(x, op, bias, A, B, 0.25, 0.0, 0)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg, _ = cuda_ext.forward(x, op, bias, A, B, 0.25, 0.0, 0)
    x.mul_(2.0)
    g.replay()
    torch.cuda.synchronize()
    y2_ref, _ = reference_forward(x, op, bias, A, B, 0.25)
    assert float((yg.double() - y2_ref).abs().max()) <= 3e-3 * float(y2_ref.abs().max())


def _bnb_cuda():
    try:
        import bitsandbytes.functional as F

        w = torch.randn(64, device="cuda", dtype=torch.float16)
        F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        return F
    except Exception:
        return None


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_quantize_bytes_equal_bitsandbytes(dtype, blocksize):
    F = _bnb_cuda()
    if F is None:
        pytest.skip("bitsandbytes with CUDA kernels is not importable")
    from bench.cuda_selfcheck import quantize_inputs

    for name, W in quantize_inputs("cuda"):
        W = W.to(dtype) if W.dtype != dtype else W
        packed, absmax = cuda_ext.quantize_nf4_cuda(W, blocksize)
        qb, st = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        assert torch.equal(qb.reshape(-1).view(torch.uint8), packed), (name, blocksize, dtype)
        assert torch.equal(st.absmax.float().reshape(-1), absmax), (name, blocksize, dtype)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [64, 128])
def test_quantize_matches_lora_fast_nf4(blocksize):
    nf4 = pytest.importorskip("lora_fast.nf4")
    from bench.cuda_selfcheck import quantize_inputs

    for name, W in quantize_inputs("cuda"):
        packed, absmax = cuda_ext.quantize_nf4_cuda(W, blocksize)
        t = nf4.quantize(W, blocksize=blocksize, double_quant=False)
        assert torch.equal(t.packed.reshape(-1), packed), name
        assert torch.equal(t.absmax.float().reshape(-1), absmax), name


@needs_gpu
@pytest.mark.gpu
def test_quantize_operand_roundtrip_through_gemv():
    from bench.cuda_selfcheck import check_parity  # noqa: F401  (module import check)
    from lora_fast import reference as ref

    torch.manual_seed(0)
    W = (torch.randn(256, 512, device="cuda") * 0.02).to(torch.bfloat16)
    op = cuda_ext.quantize_nf4_operand_cuda(W, 64, double_quant=False)
    deq = ref.nf4_dequantize(op, torch.float32)
    assert float((deq - W.float()).abs().max()) <= 0.2 * float(W.float().abs().max())
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16) * 0.05
    B = torch.randn(256, 8, device="cuda", dtype=torch.bfloat16) * 0.05
    y, _ = cuda_ext.forward(x, op, None, A, B, 1.0, 0.0, 0)
    y_ref = x.double() @ ref.nf4_dequantize(op, torch.bfloat16).double().t() + \
        (x.double() @ A.double().t()) @ B.double().t()
    assert float((y.double() - y_ref).abs().max()) <= 1.6e-2 * float(y_ref.abs().max())
