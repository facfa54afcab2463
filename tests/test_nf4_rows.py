"""Row-tiled NF4 dequantisation: bit-exact with bitsandbytes; merge vs fp64."""
import pytest
import torch

from lora_fast import nf4
from lora_fast import _nf4_rows
from lora_fast.reference import nf4_dequantize
from parity import assert_parity

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _operand(n, k, blocksize, nested, dtype=torch.float32):
    w = torch.randn(n, k, dtype=dtype, device=DEV)
    w[0, :7] = 0.0
    w[-1, -1] = 9.0
    q = nf4.quantize(w, blocksize=blocksize, double_quant=nested)
    from lora_fast._operand import NF4Operand

    return NF4Operand(q.packed, q.absmax, q.absmax2, q.code2, float(q.offset), q.blocksize, q.nested_blocksize,
                      (n, k), nf4.NF4_CODE.to(DEV))


@pytest.mark.parametrize("n,k", [(24, 256), (37, 320), (1, 64), (50, 512)])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_dequant_bit_exact(n, k, blocksize, nested, dtype):
    if k % blocksize:
        pytest.skip("row-tiled kernel needs K % blocksize == 0")
    op = _operand(n, k, blocksize, nested)
    assert _nf4_rows.supported(op)
    got = _nf4_rows.dequant_rows(op, dtype)
    want = nf4_dequantize(op, dtype)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("r", [1, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_merge(r, dtype):
    n, k = 40, 384
    op = _operand(n, k, 64, True)
    A = torch.randn(r, k, device=DEV, dtype=dtype)
    B = torch.randn(n, r, device=DEV, dtype=dtype) * 0.1
    got = _nf4_rows.dequant_rows(op, dtype, merge=(A, B, 1.5))
    w64 = nf4_dequantize(op, torch.float64)
    want = w64 + 1.5 * (B.double() @ A.double())
    same = (nf4_dequantize(op, torch.float32) + 1.5 * (B.float() @ A.float())).to(dtype)
    assert_parity(got, want, same, dtype=dtype, what="W_eff")


HALF = [torch.float16] + ([torch.bfloat16] if CUDA else [])  # bf16 tl.dot is wrong under the interpreter


@pytest.mark.parametrize("dtype", HALF)
def test_rows_merge_rounds_fp32_factors_in_registers(dtype):
    # round_factors: fp32 A/B are rounded to the output dtype inside the kernel (tensor cores),
    # which must equal rounding them on the host first -- the Triton backend relies on it
    n, k, r = 40, 384, 16
    op = _operand(n, k, 64, True)
    A = torch.randn(r, k, device=DEV)
    B = torch.randn(n, r, device=DEV) * 0.1
    got = _nf4_rows.dequant_rows(op, dtype, merge=(A, B, 1.5), round_factors=True)
    want = _nf4_rows.dequant_rows(op, dtype, merge=(A.to(dtype), B.to(dtype), 1.5))
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    # without round_factors, fp32 factors give exact fp32 products (not the rounded ones)
    exact = _nf4_rows.dequant_rows(op, torch.float32, merge=(A, B, 1.5))
    w64 = nf4_dequantize(op, torch.float64) + 1.5 * (B.double() @ A.double())
    assert (exact.double() - w64).abs().max() < 1e-4


def test_unsupported_shapes_are_refused():
    assert not _nf4_rows.supported(_operand(8, 96, 64, True))  # 96 % 64 != 0
    assert not _nf4_rows.supported(_operand(8, 1024, 512, True))  # blocksize > 256
