"""lora_linear_grouped: equal to calling the layers one by one, with one X pass on Triton."""
import pytest
import torch

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear
from parity import assert_parity

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _layers(nf4, dtype, k=96, ns=(64, 16, 16), rs=(8, 8, 4), bias=False, alphas=(2, 2, 2)):
    torch.manual_seed(3)
    out = []
    for n, r, a in zip(ns, rs, alphas):
        lin = torch.nn.Linear(k, n, bias=bias, device=DEV, dtype=dtype)
        layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=r, lora_alpha=a * r)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.3)
        out.append(layer)
    return out


def _grads(layers, x, dys, grouped):
    for t in [x] + [p for layer in layers for p in (layer.lora_A, layer.lora_B)]:
        t.grad = None
    ys = lora_fast.lora_linear_grouped(x, layers) if grouped else [layer(x) for layer in layers]
    torch.autograd.backward(ys, dys)
    return [y.detach() for y in ys] + [x.grad.clone()] + [
        p.grad.clone() for layer in layers for p in (layer.lora_A, layer.lora_B)
    ]


@pytest.mark.parametrize("backend", ["triton", "triton+merged", "torch"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_equals_per_layer(backend, nf4, bias, monkeypatch):
    backend, _, path = backend.partition("+")
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", path)
    dtype = torch.float32
    layers = _layers(nf4, dtype, bias=bias)
    x = torch.randn(2, 9, 96, device=DEV, dtype=dtype, requires_grad=True)
    dys = [torch.randn(2, 9, layer.out_features, device=DEV, dtype=dtype) for layer in layers]
    lora_fast.dispatch_stats(reset=True)
    got = _grads(layers, x, dys, grouped=True)
    stats = lora_fast.dispatch_stats()
    if backend == "triton":
        path = path or ("merged" if nf4 else "split")  # the default regime per base kind
        assert stats.get(f"triton:fwd_grouped3_{path}") == 1 and stats.get(f"triton:bwd_grouped3_{path}") == 1
    else:
        assert stats.get("grouped:per_layer(backend is not triton)") == 1
    want = _grads(layers, x, dys, grouped=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_parity(g, w.double(), dtype=dtype, what=f"output/grad #{i}")


@pytest.mark.parametrize("path", ["split", "merged"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("alphas", [(2, 2, 2), (2, 3, 0.5)], ids=["one-scaling", "mixed-scalings"])
def test_grouped_half_precision_and_scalings(path, nf4, alphas, monkeypatch):
    # 16-bit activations with fp32 adapters (the QLoRA setting: merged factors rounded in the
    # kernel's registers), and groups whose layers share one scaling or do not
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", path)
    dtype = torch.bfloat16 if CUDA else torch.float16  # bf16 tl.dot is wrong under the interpreter
    layers = _layers(nf4, dtype, alphas=alphas)
    for layer in layers:
        layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
    x = torch.randn(2, 9, 96, device=DEV, dtype=dtype, requires_grad=True)
    dys = [torch.randn(2, 9, layer.out_features, device=DEV, dtype=dtype) for layer in layers]
    got = _grads(layers, x, dys, grouped=True)
    want = _grads(layers, x, dys, grouped=False)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype, f"output/grad #{i}: {g.dtype} != {w.dtype}"
        assert_parity(g, w.double(), dtype=dtype, what=f"output/grad #{i}")


def test_grouped_dropout_runs_per_layer(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    layers = _layers(False, torch.float32)
    for layer in layers:
        layer.lora_dropout = 0.1
    lora_fast.dispatch_stats(reset=True)
    ys = lora_fast.lora_linear_grouped(torch.randn(4, 96, device=DEV), layers)
    assert [y.shape[-1] for y in ys] == [64, 16, 16]
    assert lora_fast.dispatch_stats().get("grouped:per_layer(dropout)") == 1


def test_grouped_bad_input():
    layers = _layers(False, torch.float32)
    with pytest.raises(ValueError, match="in_features=96"):
        lora_fast.lora_linear_grouped(torch.randn(3, 95, device=DEV), layers)
    other = LoRALinear.from_linear(torch.nn.Linear(32, 8, device=DEV), r=2)
    with pytest.raises(ValueError, match="share in_features"):
        lora_fast.lora_linear_grouped(torch.randn(3, 96, device=DEV), layers + [other])
    with pytest.raises(ValueError, match="at least one layer"):
        lora_fast.lora_linear_grouped(torch.randn(3, 96, device=DEV), [])
