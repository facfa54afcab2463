import os
import sys

import pytest
import torch

# Kernel parity runs on CPU through Triton's interpreter; it must be set before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # On a GPU every kernel runs the first config its prune keeps (kernels/common.py): parity does
    # not depend on the config, and autotuning every kernel at every test shape costs minutes of
    # compilation.  test_triton_backend.py::test_autotuned_step_gpu runs with autotuning on.
    os.environ.setdefault("LORA_FAST_AUTOTUNE", "0")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _no_bnb_cpu_repack():
    """On a CPU with AVX512-BF16, bitsandbytes' Linear4bit.forward (eval, no grad) repacks its
    weight in place into a private CPU layout with bf16 absmax and computes from that: other
    numerics than its standard path, and it fails outright for K < 2 * blocksize.  The tests
    compare against the standard bitsandbytes path, so that repacking is switched off for every
    Linear4bit the tests build, whatever CPU runs them.  lora_fast's own handling of a repacked
    weight is tested on purpose (test_patch.py::test_patch_restores_bnb_cpu_packed_weight)."""
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except Exception:  # bitsandbytes missing or not importable: nothing to switch off
        return
    if hasattr(bnb_modules, "has_avx512bf16"):
        bnb_modules.has_avx512bf16 = lambda: False


def _bnb_cpu_dequant_fix():
    """bitsandbytes 0.50.2's native CPU ``dequantize_4bit`` (used wherever its CPU library loads)
    reads the packed weight row by row and so decodes quantisation blocks that straddle two rows
    (K % blocksize != 0) with the wrong absmax: errors of order 1 against the original weight
    (seen on this project's AVX512 machines).  Its own generic implementation is right.  When a
    probe shows the bug, the tests route bitsandbytes' CPU dequantisation (and with it the CPU
    forward of its Linear4bit and of PEFT's bnb layers, the tests' references) to that generic
    implementation, so the tests compare against correct bitsandbytes numerics on every CPU.
    lora_fast itself never calls bitsandbytes to dequantise."""
    try:
        import bitsandbytes.functional as bnbF
        from bitsandbytes.backends.default import ops as bnb_default
        from bitsandbytes.backends.utils import _get_4bit_code
    except Exception:
        return
    compute = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__", bnb_default._dequantize_4bit_compute)

    def generic(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    try:
        w = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        want = generic(packed, qs.absmax, 64, "nf4", qs.shape, torch.float32)
        if torch.equal(bnbF.dequantize_4bit(packed, qs), want):
            return
    except Exception:  # a bitsandbytes whose CPU path cannot even run the probe: leave it alone
        return

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", generic)


# both are about bitsandbytes' CPU path, which the tests use on GPU machines too
_no_bnb_cpu_repack()
_bnb_cpu_dequant_fix()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
