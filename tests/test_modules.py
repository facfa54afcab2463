"""Drop-in modules: nn.Linear behaviour, init, trainability, merge, NF4 base, bad input."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear


def _linear(k=48, n=40, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    return lin


def _randomise_adapter(layer):
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_fresh_layer_equals_base_and_only_adapter_trains(cls):
    lin = _linear()
    layer = cls.from_linear(lin, r=4, lora_alpha=8)
    x = torch.randn(3, 5, 48)
    base_w = layer.dense_weight(torch.float32)
    torch.testing.assert_close(layer(x), x @ base_w.t() + lin.bias)
    assert layer.in_features == 48 and layer.out_features == 40
    names = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert names == ["lora_A", "lora_B"]
    assert layer.lora_A.shape == (4, 48) and layer.lora_B.shape == (40, 4)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert "r=4" in repr(layer) and "lora_alpha=8" in repr(layer)


def test_from_linear_shares_weight():
    lin = _linear()
    layer = LoRALinear.from_linear(lin, r=2)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()


def test_nf4_from_linear_matches_bitsandbytes():
    import bitsandbytes.functional as bf

    lin = _linear(64, 48)
    layer = NF4LoRALinear.from_linear(lin, r=4)
    q, st = bf.quantize_4bit(lin.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(layer.nf4_packed.reshape(-1), q.reshape(-1))
    torch.testing.assert_close(layer.dense_weight(torch.float32), bf.dequantize_4bit(q, st), rtol=0, atol=0)


def test_from_bnb_shares_storage_and_round_trips():
    import bitsandbytes as bnb

    lin4 = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin4 = lin4.to("cpu")
    x = torch.randn(4, 64)
    want = lin4(x)
    layer = NF4LoRALinear.from_bnb(lin4, r=4, lora_alpha=4)
    assert layer.nf4_packed.data_ptr() == lin4.weight.data.data_ptr()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    back = layer.to_bnb()
    torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_merge_unmerge_and_merged_linear(cls):
    lin = _linear(64, 32)
    layer = cls.from_linear(lin, r=4, lora_alpha=8)
    _randomise_adapter(layer)
    with torch.no_grad():
        layer.lora_B.mul_(0.01)
    x = torch.randn(6, 64)
    want = layer(x)
    merged = layer.merged_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = copy.deepcopy(layer.state_dict())
        layer.merge()
        # A merged NF4 base is re-quantised (lossy): compare against the NF4 rounding scale.
        tol = 1e-4 if cls is LoRALinear else 0.35
        torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol)
        layer.unmerge()
    for k, v in before.items():
        torch.testing.assert_close(layer.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_rslora_scaling():
    layer = LoRALinear.from_linear(_linear(), r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(2.0)


@pytest.mark.parametrize("r", [0, -3])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear.from_linear(_linear(), r=r)


def test_rank_above_min_dim_warns():
    with pytest.warns(UserWarning, match="exceeds min"):
        LoRALinear.from_linear(_linear(8, 6), r=7)


@pytest.mark.parametrize("cls", [LoRALinear, NF4LoRALinear])
def test_bad_inputs(cls):
    layer = cls.from_linear(_linear(48, 40), r=4)
    with pytest.raises(ValueError, match="in_features=48"):
        layer(torch.randn(2, 47))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        layer(torch.ones(2, 48, dtype=torch.int64))
    with pytest.raises(ValueError, match="is on meta"):
        layer(torch.empty(2, 48, device="meta"))


def test_bad_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear.from_linear(_linear(), r=2, lora_dropout=1.5)


def test_trains_and_matches_reference_gradients():
    lin = _linear(32, 24)
    layer = LoRALinear.from_linear(lin, r=4, lora_alpha=8)
    _randomise_adapter(layer)
    x = torch.randn(10, 32, requires_grad=True)
    layer(x).square().sum().backward()
    xr = x.detach().double().requires_grad_()
    a = layer.lora_A.detach().double().requires_grad_()
    b = layer.lora_B.detach().double().requires_grad_()
    yr = xr @ lin.weight.detach().double().t() + lin.bias.detach().double() + layer.scaling * (xr @ a.t()) @ b.t()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad, a.grad.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad.float(), rtol=1e-4, atol=1e-4)
    assert layer.weight.grad is None and lin.weight.grad is None


def test_print_trainable_parameters(capsys):
    model = nn.Sequential(LoRALinear.from_linear(_linear(16, 8), r=2), NF4LoRALinear.from_linear(_linear(8, 8), r=2))
    lora_fast.print_trainable_parameters(model)
    out = capsys.readouterr().out
    trainable = 2 * 16 + 8 * 2 + 2 * 8 + 8 * 2
    assert f"trainable params: {trainable:,d}" in out and "trainable%" in out


def test_state_dict_and_to():
    layer = NF4LoRALinear.from_linear(_linear(64, 16), r=2)
    sd = layer.state_dict()
    assert {"nf4_packed", "nf4_absmax", "lora_A", "lora_B"} <= set(sd)
    layer2 = layer.to(torch.device("cpu"))
    assert layer2.nf4_packed.device.type == "cpu"


def test_autocast_runs_in_autocast_dtype():
    layer = LoRALinear.from_linear(_linear(16, 8), r=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 16))
    assert y.dtype == torch.bfloat16


def test_from_linear_without_bias_has_no_bias():
    layer = LoRALinear.from_linear(_linear(16, 8, bias=False), r=2)
    assert layer.bias is None
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())
