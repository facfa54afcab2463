"""The PyTorch reference and the torch backend of the op: forward and every gradient vs fp64."""
import pytest
import torch

import lora_fast
from lora_fast import reference as ref
from parity import assert_parity


def _inputs(m, k, n, r, dtype, bias=True):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(r, k) / k**0.5
    bb = torch.randn(n, r) / r**0.5
    return x, w, b, a, bb


def _grads64(x, w, b, a, bb, s, mask, dy):
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = bb.detach().double().requires_grad_()
    y = ref.lora_linear_ref(x64, w, b, a64, b64, s, mask=mask, compute_dtype=torch.float64)
    y.backward(dy.double())
    return y.detach(), x64.grad, a64.grad, b64.grad


@pytest.mark.parametrize("m,k,n,r", [(37, 200, 72, 8), (1, 16, 5, 1), (64, 128, 96, 16), (5, 33, 17, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_matches_fp64(m, k, n, r, dtype, bias, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    x, w, b, a, bb = _inputs(m, k, n, r, dtype, bias)
    s = 2.0
    x.requires_grad_()
    a_p = torch.nn.Parameter(a.clone())
    b_p = torch.nn.Parameter(bb.clone())
    y = lora_fast.lora_linear(x, w, b, a_p, b_p, s)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, dx64, da64, db64 = _grads64(x, w, b, a, bb, s, None, dy)
    # Same-dtype plain PyTorch sets the error bar.
    xs = x.detach().requires_grad_()
    a_s = a.clone().to(dtype).requires_grad_()
    b_s = bb.clone().to(dtype).requires_grad_()
    ys = ref.lora_linear_ref(xs, w, b, a_s, b_s, s)
    ys.backward(dy)
    assert y.dtype == dtype
    assert_parity(y, y64, ys, dtype=dtype, what="y")
    assert_parity(x.grad, dx64, xs.grad, dtype=dtype, what="dx")
    assert_parity(a_p.grad, da64, a_s.grad, dtype=dtype, what="dA")
    assert_parity(b_p.grad, db64, b_s.grad, dtype=dtype, what="dB")
    assert a_p.grad.dtype == torch.float32 and b_p.grad.dtype == torch.float32


def test_dropout_mask_regenerated_in_backward(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    m, k, n, r, p = 29, 40, 24, 4, 0.3
    x, w, b, a, bb = _inputs(m, k, n, r, torch.float32)
    x.requires_grad_()
    a_p, b_p = torch.nn.Parameter(a.clone()), torch.nn.Parameter(bb.clone())
    torch.manual_seed(1234)
    y = lora_fast.lora_linear(x, w, b, a_p, b_p, 1.5, dropout_p=p)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    mask = ref.dropout_scale_mask(seed, m, k, p, x.device)
    assert 0.5 < (mask > 0).float().mean().item() < 0.9
    y64, dx64, da64, db64 = _grads64(x, w, b, a, bb, 1.5, mask, dy)
    for got, want, what in [(y, y64, "y"), (x.grad, dx64, "dx"), (a_p.grad, da64, "dA"), (b_p.grad, db64, "dB")]:
        assert_parity(got, want, dtype=torch.float32, what=what)


def test_no_grad_for_frozen_base_and_bias_grad_when_trainable(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    x, w, b, a, bb = _inputs(8, 12, 6, 2, torch.float32)
    w.requires_grad_(False)
    b.requires_grad_(True)
    a_p, b_p = torch.nn.Parameter(a), torch.nn.Parameter(bb)
    lora_fast.lora_linear(x, w, b, a_p, b_p, 1.0).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(b.grad, torch.full_like(b, 8.0))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "fastest")
    x, w, b, a, bb = _inputs(2, 4, 3, 1, torch.float32)
    with pytest.raises(lora_fast.BackendUnavailableError, match="not a backend"):
        lora_fast.lora_linear(x, w, b, a, bb, 1.0)


@pytest.mark.parametrize("name", ["cuda"])
def test_unavailable_backend_raises(name, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", name)
    x, w, b, a, bb = _inputs(2, 4, 3, 1, torch.float32)
    with pytest.raises(lora_fast.BackendUnavailableError, match=f"LORA_FAST_BACKEND={name}"):
        lora_fast.lora_linear(x, w, b, a, bb, 1.0)


def test_triton_backend_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    # (not via the environment: triton reads TRITON_INTERPRET once, when it is first imported)
    monkeypatch.setattr(lora_fast._backend, "_interpreting", lambda: False)
    x, w, b, a, bb = _inputs(2, 4, 3, 1, torch.float32)
    with pytest.raises(lora_fast.BackendUnavailableError, match="Triton"):
        lora_fast.lora_linear(x, w, b, a, bb, 1.0)


def test_dispatch_stats_counts_calls(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    lora_fast.dispatch_stats(reset=True)
    x, w, b, a, bb = _inputs(2, 4, 3, 1, torch.float32)
    lora_fast.lora_linear(x, w, b, a, bb, 1.0)
    assert lora_fast.dispatch_stats().get("torch:reference") == 1
