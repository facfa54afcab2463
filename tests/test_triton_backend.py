"""The Triton backend end to end through the public modules (both regimes, dense and NF4,
bias, dropout) against the fp64 reference.  On CPU it runs in Triton's interpreter (fp16/fp32);
on a GPU it adds bf16 and a Llama-sized shape."""
import os

import pytest
import torch

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear
from lora_fast import reference as ref
from parity import assert_parity

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])
# atol of the bar below: the kernels may round W_eff = W0 + s·B·A once (merged regime), which
# plain PyTorch does not do; that rounding is of the size of one ulp of the output.
SHAPES = [(37, 200, 72, 8), (1, 64, 48, 1), (16, 96, 40, 16)] + ([(1024, 4096, 1024, 16)] if CUDA else [])


def _run(layer, x, dy):
    for p in (x, layer.lora_A, layer.lora_B):
        p.grad = None
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def _ref64(layer, x, dy, mask):
    w = layer.dense_weight(torch.float64)
    x64 = x.detach().double().requires_grad_()
    a = layer.lora_A.detach().double().requires_grad_()
    b = layer.lora_B.detach().double().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().double()
    y = ref.lora_linear_ref(x64, w, bias, a, b, layer.scaling, mask=mask, compute_dtype=torch.float64)
    y.backward(dy.double())
    return y.detach(), x64.grad, a.grad, b.grad


@pytest.mark.parametrize("m,k,n,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("regime", ["fused", "merged", "dequant", "merged+cublas"])
def test_triton_backend_parity(m, k, n, r, dtype, nf4, regime, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    regime, _, lowrank = regime.partition("+")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", regime)
    monkeypatch.setenv("LORA_FAST_LOWRANK", lowrank or "triton")
    torch.manual_seed(1)
    lin = torch.nn.Linear(k, n, bias=(m % 2 == 1), device=DEV, dtype=dtype)
    layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    x = torch.randn(m, k, device=DEV, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=DEV, dtype=dtype)
    got = _run(layer, x, dy)
    want = _ref64(layer, x, dy, None)
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    same_dtype = _run(layer, x, dy)
    for g, w, t, what in zip(got, want, same_dtype, ("y", "dx", "dA", "dB")):
        assert_parity(g, w, t, dtype=dtype if what in ("y", "dx") else torch.float32, what=what)
    assert any(key.startswith(f"triton:fwd_{regime}") for key in lora_fast.dispatch_stats())


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("regime", ["", "fused"])
def test_triton_dropout_same_mask_forward_backward(nf4, regime, monkeypatch):
    from lora_fast._lowrank import dropout_mask

    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", regime)
    m, k, n, r, p = 33, 80, 24, 8, 0.25
    dtype = torch.float32
    lin = torch.nn.Linear(k, n, device=DEV, dtype=dtype)
    layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=r, lora_alpha=16, lora_dropout=p)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(m, k, device=DEV, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=DEV, dtype=dtype)
    torch.manual_seed(77)
    got = _run(layer, x, dy)
    torch.manual_seed(77)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    mask = dropout_mask(seed, m, k, p, x.device)
    assert 0.6 < (mask > 0).float().mean().item() < 0.9
    want = _ref64(layer, x, dy, mask)
    for g, w, what in zip(got, want, ("y", "dx", "dA", "dB")):
        assert_parity(g, w, dtype=dtype, what=what)
    # a second step draws a new mask
    got2 = _run(layer, x, dy)
    assert not torch.equal(got2[0], got[0])


def test_bad_triton_path(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", "fastest")
    layer = LoRALinear.from_linear(torch.nn.Linear(16, 8, device=DEV), r=2)
    with pytest.raises(ValueError, match="LORA_FAST_TRITON_PATH"):
        layer(torch.randn(2, 16, device=DEV))


@pytest.mark.skipif(not CUDA, reason="autotuning benchmarks configs on a GPU; the CPU interpreter runs one fixed config")
@pytest.mark.parametrize("regime", ["merged", "dequant"])
def test_autotuned_step_gpu(regime, monkeypatch):
    """The rest of the GPU run sets LORA_FAST_AUTOTUNE=0 (conftest); here every kernel of a
    full NF4 step benchmarks its whole pruned config list, and the result still has parity."""
    monkeypatch.setenv("LORA_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", regime)
    torch.manual_seed(3)
    m, k, n, r = 777, 1536, 640, 16  # a shape no other test uses: fresh autotune keys
    lin = torch.nn.Linear(k, n, bias=True, device=DEV, dtype=torch.bfloat16)
    layer = NF4LoRALinear.from_linear(lin, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    got = _run(layer, x, dy)
    want = _ref64(layer, x, dy, None)
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    same_dtype = _run(layer, x, dy)
    for g, w, t, what in zip(got, want, same_dtype, ("y", "dx", "dA", "dB")):
        assert_parity(g, w, t, dtype=torch.bfloat16 if what in ("y", "dx") else torch.float32, what=what)
