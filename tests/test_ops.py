"""The custom ops themselves: torch.library.opcheck and torch.compile(fullgraph=True)."""
import pytest
import torch

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear, ops


def _args(nf4: bool):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 64, requires_grad=True)
    if nf4:
        op = layer.operand()
        w, am, am2, c2, code, meta, off = op.packed, op.absmax, op.absmax2, op.code2, op.code, [32, 64, 64, 256], op.offset
    else:
        w, am, am2, c2, code, meta, off = layer.weight, None, None, None, None, [], 0.0
    seed = torch.zeros((), dtype=torch.int64)
    return (x, w, am, am2, c2, code, layer.bias, layer.lora_A, layer.lora_B, seed, 2.0, 0.0, meta, off)


@pytest.mark.parametrize("nf4", [False, True])
def test_opcheck(nf4, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.library.opcheck(ops.lora_fwd, _args(nf4), test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("nf4", [False, True])
def test_compile_fullgraph(nf4, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 32)
    layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=4, lora_dropout=0.1)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.eval()
    x = torch.randn(2, 3, 64, requires_grad=True)
    want = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
    layer.train()
    compiled(x).sum().backward()  # dropout path traces too
