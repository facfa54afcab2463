"""lora_fast.nf4 against bitsandbytes 0.50.2: byte equality of every quantisation output,
bit equality of dequantisation, zero-copy interop with bnb objects, and input validation.

CPU tests compare with bnb's CPU backend; the ``gpu`` tests (skipped without CUDA) compare with
bnb's CUDA kernels, whose rounding differs in corner cases (see lora_fast/nf4.py)."""
from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

from lora_fast import nf4

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (72,200): blocks align with the tensor; (7,9): odd numel, a single partial block;
# (33,130): partial last block; (1,301): one odd-length row; (5,2,7): 3-D, odd.
SHAPES = ((72, 200), (7, 9), (33, 130), (1, 301), (5, 2, 7))
BLOCKSIZES = (32, 64, 128, 256, 4096)


@pytest.fixture(scope="module", autouse=True)
def _no_dynamo():
    # bnb's CPU fallback dequantisation (odd last dim) is wrapped in torch.compile and would
    # recompile for every shape/dtype; eager runs the same ops and keeps this file fast.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def weight(shape, dtype, device="cpu", scale=0.05) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale).to(dtype)


def fp16_ties(x32: torch.Tensor) -> torch.Tensor:
    """Mask of fp32 values lying exactly halfway between two fp16 values."""
    h = x32.to(torch.float16)
    other = torch.nextafter(h, torch.where(h.float() < x32, 70000.0, -70000.0).to(torch.float16))
    return (h.float() != x32) & ((x32 - h.float()).abs() == (other.float() - h.float()).abs() / 2)


def assert_dequant_matches_bnb(ours: torch.Tensor, packed: torch.Tensor, qs) -> None:
    """``ours`` equals ``F.dequantize_4bit(packed, qs)`` bit for bit.  One tolerated host quirk:
    bnb 0.50.2's CPU library on some x86 hosts (seen on AVX512 machines) converts fp32 -> fp16
    rounding exact ties away from zero instead of to even; there ``ours`` must be the IEEE
    (round-to-nearest-even) rounding of bnb's own fp32 result and differ only at ties."""
    ref = F.dequantize_4bit(packed, qs).reshape(ours.shape)  # (bnb transposes 1-byte inputs)
    if same_bits(ours, ref):
        return
    assert ours.dtype == torch.float16 and not ours.is_cuda, "dequantize differs from bnb"
    dtype, qs.dtype = qs.dtype, torch.float32
    ref32 = F.dequantize_4bit(packed, qs).reshape(ours.shape)
    qs.dtype = dtype
    assert same_bits(ours, ref32.to(torch.float16)), "dequantize is not the RNE rounding of bnb's fp32 values"
    differ = ours.view(torch.int16) != ref.view(torch.int16)
    assert not (differ & ~fp16_ties(ref32)).any(), "dequantize differs from bnb away from fp16 ties"


def assert_matches_bnb(W: torch.Tensor, blocksize: int, double_quant: bool) -> nf4.NF4Tensor:
    packed, qs = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    q = nf4.quantize(W, blocksize=blocksize, double_quant=double_quant)
    assert q.shape == W.shape and q.dtype == W.dtype and q.blocksize == blocksize
    assert same_bits(q.packed, packed.view(-1)), "packed bytes differ"
    assert same_bits(q.absmax, qs.absmax), "absmax differs"
    assert q.nested == double_quant
    if double_quant:
        assert same_bits(q.absmax2, qs.state2.absmax), "absmax2 differs"
        assert same_bits(q.code2, qs.state2.code), "code2 differs"
        assert same_bits(torch.tensor(q.offset, dtype=torch.float32), qs.offset.cpu()), "offset differs"
        assert q.nested_blocksize == qs.state2.blocksize
    assert_dequant_matches_bnb(q.dequantize(), packed, qs)
    return q


# ---- constants ----------------------------------------------------------------------------


def test_code_tables_match_bnb():
    assert same_bits(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert same_bits(nf4.dynamic_map(), F.create_dynamic_map())
    assert nf4.SUPPORTED_BLOCKSIZES == (32, 64, 128, 256, 512, 1024, 2048, 4096)


def test_cuda_thresholds_are_the_rounded_literals():
    # bnb's CUDA decision tree compares against decimal literals; four of them round to the
    # fp32 neighbour of the fp32 midpoint (exact ties in the codes).  Kernel writers must use
    # these when reproducing bnb-CUDA bytes.
    cuda_thr = nf4._nf4_thresholds(torch.device("cpu"), cuda=True)
    mids = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    differ = (cuda_thr != mids).nonzero().view(-1).tolist()
    assert differ == [0, 8, 12, 14]
    ulps = cuda_thr.view(torch.int32) - mids.view(torch.int32)
    assert ulps.abs().max().item() == 1


# ---- quantisation, byte for byte ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bnb(shape, blocksize, double_quant, dtype):
    assert_matches_bnb(weight(shape, dtype), blocksize, double_quant)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_zeros_and_outliers(blocksize, double_quant, dtype):
    W = torch.randn(40, 100)
    W[3] = 0.0                    # whole zero blocks
    W[:, 5] = 0.0                 # scattered exact zeros
    W[10, 10] = 300.0             # outliers
    W[20, 7] = -1e4
    W[30, :50] = 1e-3 * torch.randn(50)
    W.view(-1)[-37:] = 0.0        # an all-zero partial last block
    assert_matches_bnb(W.to(dtype), blocksize, double_quant)


@pytest.mark.parametrize("scale", [1e-45, 1e-40, 3e-38])
@pytest.mark.parametrize("K", [64, 100])
def test_subnormal_weights(scale, K):
    # the nested absmax is subnormal: its reciprocal is inf, 0 * inf = NaN (once crashed the LUT lookup)
    W = torch.randn(4, K) * scale
    W[2] = 0.0
    assert_matches_bnb(W, 64, True)


def test_many_blocks_nested():
    # > 256 absmax blocks: several nested blocks, the last one partial
    assert_matches_bnb(weight((300, 1000), torch.bfloat16), 64, True)


def test_cpu_quirks_are_reproduced():
    # bnb-CPU stores max(absmax, 1e-38) for the partial last block and codes an all-zero block
    # as index 7 (code 0.0); full zero blocks keep absmax 0.
    W = torch.randn(3, 50)
    W[0, :32] = 0.0
    W.view(-1)[128:] = 0.0
    q = assert_matches_bnb(W, 32, False)
    assert q.absmax[0].item() == 0.0
    assert q.absmax[-1].item() == pytest.approx(1e-38)
    assert q.packed[-5:].tolist() == [0x77] * 5


def test_nested_lut_matches_bnb_cpu():
    # bnb-CPU quantises nested statistics through a 65536-entry LUT: probe values on code
    # midpoints, LUT grid points and their fp32 neighbours, in blocks whose scale is 1.
    code = nf4.dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    grid = torch.arange(0, 65536, 7, dtype=torch.float32) * 2.0 / 65535 - 1.0
    probes = torch.cat([mids, code, grid, torch.randn(4000).clamp(-1, 1) * torch.rand(4000) ** 3])
    probes = torch.cat([probes, torch.nextafter(probes, torch.tensor(2.0)), torch.nextafter(probes, torch.tensor(-2.0))])
    probes = probes.clamp(-1, 1)
    chunks = [torch.cat([torch.ones(1), c]) for c in probes.split(255)]
    A = torch.cat(chunks + [torch.zeros(256), 1e-3 * torch.randn(300)])
    ref_q, ref_state = F.quantize_blockwise(A, blocksize=256)
    q, absmax = nf4._quantize_blockwise_8bit(A, 256, cuda=False)
    assert same_bits(absmax, ref_state.absmax)
    assert same_bits(q, ref_q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_to_other_dtypes(dtype):
    W = weight((33, 130), torch.float32)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize(W, 64, True)
    qs.dtype = dtype  # bnb dequantises to the QuantState's dtype
    out = q.dequantize(dtype)
    assert out.dtype == dtype and out.shape == (33, 130)
    assert_dequant_matches_bnb(out, packed, qs)


def test_absmax_fp32_matches_bnb_decode():
    W = weight((300, 1000), torch.float16)
    _, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    assert same_bits(nf4.quantize(W, 64, True).absmax_fp32(), ref)
    plain = nf4.quantize(W, 64, False)
    assert same_bits(plain.absmax_fp32(), plain.absmax)


def test_container_basics():
    W = weight((5, 2, 7), torch.bfloat16)
    q = nf4.quantize(W, 32, True)
    assert q.numel() == 70 and q.shape == torch.Size([5, 2, 7]) and q.device.type == "cpu"
    assert q.packed.shape == (35,) and q.packed.dtype == torch.uint8
    assert q.absmax.shape == (3,) and q.absmax.dtype == torch.uint8
    assert q.absmax2.shape == (1,) and q.code2.shape == (256,)
    assert same_bits(q.code, nf4.NF4_CODE)
    assert set(q.state_tensors()) == {"packed", "absmax", "absmax2", "code2"}
    assert set(nf4.quantize(W, 32, False).state_tensors()) == {"packed", "absmax"}
    assert q.dequantize().shape == (5, 2, 7) and q.dequantize().dtype == torch.bfloat16
    moved = q.to("cpu")
    assert same_bits(moved.dequantize(), q.dequantize()) and moved.offset == q.offset
    # rebuilding from the buffers (what a module does) shares them and decodes identically
    t = q.state_tensors()
    again = nf4.NF4Tensor(t["packed"], t["absmax"], q.shape, q.dtype, q.blocksize, t["absmax2"], t["code2"],
                          q.offset, q.nested_blocksize)
    assert again.packed.data_ptr() == q.packed.data_ptr()
    assert same_bits(again.dequantize(), q.dequantize())


# ---- interop with bitsandbytes objects ----------------------------------------------------


def _quantized_linear4bit(W: torch.Tensor, blocksize: int, double_quant: bool, quant_type: str = "nf4"):
    """A CPU Linear4bit quantised the way transformers' load_in_4bit does it: the weight is
    wrapped in a Params4bit and moved to the device, which triggers bnb's quantisation."""
    out_f, in_f = W.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=W.dtype, compress_statistics=double_quant,
                            quant_type=quant_type, device="meta")
    lin._parameters["weight"] = bnb.nn.Params4bit(W, requires_grad=False, blocksize=blocksize,
                                                  compress_statistics=double_quant, quant_type=quant_type).to("cpu")
    return lin


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_from_bnb_linear4bit_shares_storage(dtype, double_quant):
    W = weight((48, 96), dtype)
    lin = _quantized_linear4bit(W, 64, double_quant)
    p = lin.weight
    assert p.bnb_quantized
    q = nf4.NF4Tensor.from_bnb(p)
    qs = p.quant_state
    assert q.packed.data_ptr() == p.data_ptr()
    assert q.absmax.data_ptr() == qs.absmax.data_ptr()
    if double_quant:
        assert q.absmax2.data_ptr() == qs.state2.absmax.data_ptr()
        assert q.code2.data_ptr() == qs.state2.code.data_ptr()
    assert q.shape == W.shape and q.dtype == dtype and q.nested == double_quant
    assert_dequant_matches_bnb(q.dequantize(), p.data, qs)
    # the same bytes as quantising the original weight ourselves
    mine = nf4.quantize(W, 64, double_quant)
    assert same_bits(mine.packed, q.packed) and same_bits(mine.absmax, q.absmax)


def test_from_bnb_pair():
    W = weight((7, 9), torch.float32)
    packed, qs = F.quantize_4bit(W, blocksize=32, quant_type="nf4", compress_statistics=True)
    q = nf4.NF4Tensor.from_bnb((packed, qs))
    assert q.packed.data_ptr() == packed.data_ptr()
    assert_dequant_matches_bnb(q.dequantize(), packed, qs)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_to_bnb_roundtrip(double_quant):
    W = weight((33, 130), torch.bfloat16)
    q = nf4.quantize(W, 128, double_quant)
    p = q.to_bnb()
    assert isinstance(p, bnb.nn.Params4bit) and p.bnb_quantized and p.quant_type == "nf4"
    assert p.data_ptr() == q.packed.data_ptr() and p.shape == ((33 * 130 + 1) // 2, 1)
    qs = p.quant_state
    assert qs.shape == W.shape and qs.dtype == W.dtype and qs.blocksize == 128 and qs.nested == double_quant
    ref_packed, ref_qs = F.quantize_4bit(W, blocksize=128, quant_type="nf4", compress_statistics=double_quant)
    assert same_bits(p.data, ref_packed) and same_bits(qs.code, ref_qs.code)
    assert same_bits(F.dequantize_4bit(p.data, qs), F.dequantize_4bit(ref_packed, ref_qs))
    assert_dequant_matches_bnb(q.dequantize(), p.data, qs)
    qs.as_dict(packed=True)  # serialisable the way bnb saves state dicts
    back = nf4.NF4Tensor.from_bnb(p)
    assert back.packed.data_ptr() == q.packed.data_ptr() and back.offset == q.offset


def test_to_bnb_linear4bit_forward():
    W = weight((16, 64), torch.float32, scale=1.0)
    q = nf4.quantize(W, 64, True)
    lin = bnb.nn.Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    lin.weight = q.to_bnb()
    x = torch.randn(3, 64)
    torch.testing.assert_close(lin(x), x @ q.dequantize().t())


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "W, blocksize, match",
    [
        (torch.randint(0, 5, (4, 64)), 64, "non-floating"),
        (torch.zeros(4, 64, dtype=torch.bool), 64, "non-floating"),
        (torch.randn(4, 64, dtype=torch.float64), 64, "unsupported dtype"),
        (torch.randn(4, 64), 48, "unsupported blocksize"),
        (torch.randn(4, 64), 16, "unsupported blocksize"),
        (torch.randn(4, 64), 8192, "unsupported blocksize"),
        (torch.randn(4, 64), True, "unsupported blocksize"),
        (torch.randn(4, 64), 64.0, "unsupported blocksize"),
        (torch.randn(0, 64), 64, "empty"),
    ],
)
def test_quantize_rejects_bad_input(W, blocksize, match):
    with pytest.raises(ValueError, match=match):
        nf4.quantize(W, blocksize=blocksize)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_rejects_non_finite(bad, dtype):
    W = torch.randn(8, 100)
    W[5, 77] = bad
    with pytest.raises(ValueError, match="non-finite"):
        nf4.quantize(W.to(dtype), 64)


def test_quantize_rejects_non_tensor_and_bad_backend():
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize([[1.0, 2.0]])
    with pytest.raises(ValueError, match="backend"):
        nf4.quantize(torch.randn(4, 64), backend="tpu")


def test_from_bnb_rejects_unquantised_fp4_and_foreign():
    W = weight((16, 64), torch.float16)
    raw = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4")
    with pytest.raises(ValueError, match="not quantised yet"):
        nf4.NF4Tensor.from_bnb(raw)
    fp4 = _quantized_linear4bit(W, 64, True, quant_type="fp4").weight
    with pytest.raises(ValueError, match="fp4"):
        nf4.NF4Tensor.from_bnb(fp4)
    packed, qs = F.quantize_4bit(W, quant_type="fp4")
    with pytest.raises(ValueError, match="fp4"):
        nf4.NF4Tensor.from_bnb((packed, qs))
    with pytest.raises(ValueError, match="Params4bit"):
        nf4.NF4Tensor.from_bnb(W)
    with pytest.raises(ValueError, match="QuantState"):
        nf4.NF4Tensor.from_bnb((packed, None))


def test_nf4tensor_rejects_inconsistent_parts():
    q = nf4.quantize(weight((7, 9), torch.float32), 32, True)
    with pytest.raises(ValueError, match="packed has"):
        nf4.NF4Tensor(q.packed[:-1], q.absmax, q.shape, q.dtype, 32, q.absmax2, q.code2, q.offset)
    with pytest.raises(ValueError, match="packed must be uint8"):
        nf4.NF4Tensor(q.packed.to(torch.int32), q.absmax, q.shape, q.dtype, 32, q.absmax2, q.code2, q.offset)
    with pytest.raises(ValueError, match="absmax has"):
        nf4.NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 64, q.absmax2, q.code2, q.offset)
    with pytest.raises(ValueError, match="together"):
        nf4.NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 32, q.absmax2, None, q.offset)
    with pytest.raises(ValueError, match="uint8 codes"):
        nf4.NF4Tensor(q.packed, q.absmax.float(), q.shape, q.dtype, 32, q.absmax2, q.code2, q.offset)
    with pytest.raises(ValueError, match="code2 must have 256"):
        nf4.NF4Tensor(q.packed, q.absmax, q.shape, q.dtype, 32, q.absmax2, q.code2[:16], q.offset)


# ---- CUDA: bnb's kernels have their own rounding rules -------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_quantize_matches_bnb(dtype):
    for shape, blocksize, dq in itertools.product(SHAPES + ((300, 1000),), BLOCKSIZES, (False, True)):
        assert_matches_bnb(weight(shape, dtype, "cuda"), blocksize, dq)
    W = torch.randn(40, 100, device="cuda")
    W[3] = 0.0
    W[10, 10] = 300.0
    W.view(-1)[-37:] = 0.0
    for blocksize, dq in itertools.product((32, 64), (False, True)):
        assert_matches_bnb(W.to(dtype), blocksize, dq)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_cuda_threshold_neighbourhoods_match_bnb(blocksize):
    # values within 3 ulp of every threshold * absmax: sensitive to the approximate reciprocal
    # and to the exact threshold constants
    nb = 4096
    a = torch.rand(nb, device="cuda") * 2 + 1e-3
    thr = nf4._nf4_thresholds(torch.device("cuda"), cuda=True)
    v = thr[torch.randint(0, 15, (nb, blocksize - 1), device="cuda")] * a[:, None]
    k = torch.randint(-3, 4, v.shape, device="cuda")
    for step in range(3):
        up = torch.nextafter(v, torch.full_like(v, 10.0))
        dn = torch.nextafter(v, torch.full_like(v, -10.0))
        v = torch.where(k > step, up, torch.where(-k > step, dn, v))
    W = torch.cat([a[:, None], v], 1).reshape(-1)[:-3]
    assert_matches_bnb(W, blocksize, True)
