"""The direct-launch path (lora_fast/_launch.py) must give exactly what Triton's own launch path
gives, for every kernel of a training step, whichever launch key repeats."""
import pytest
import torch

from lora_fast import LoRALinear, NF4LoRALinear, _launch

CUDA = torch.cuda.is_available()


def test_status_off_under_interpreter_or_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _launch.status() == (False, "TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("LORA_FAST_FAST_LAUNCH", "0")
    assert _launch.status() == (False, "LORA_FAST_FAST_LAUNCH=0")


def _steps(layer, x, dy, n):
    outs = []
    for i in range(n):
        torch.manual_seed(100 + i)  # the dropout seed comes from the CPU generator
        for p in (x, layer.lora_A, layer.lora_B):
            p.grad = None
        y = layer(x)
        y.backward(dy)
        outs.append([y.detach().clone(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()])
    return outs


@pytest.mark.skipif(not CUDA, reason="compiled Triton kernels need a GPU (the interpreter never takes the direct path)")
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("regime,dropout", [("merged", 0.0), ("dequant", 0.1), ("fused", 0.0)])
@pytest.mark.parametrize("m", [33, 512])
def test_direct_launch_equals_triton_launch(nf4, regime, dropout, m, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    monkeypatch.setenv("LORA_FAST_TRITON_PATH", regime)
    torch.manual_seed(0)
    k, n, r = 320, 192, 8
    lin = torch.nn.Linear(k, n, bias=True, device="cuda", dtype=torch.bfloat16)
    layer = (NF4LoRALinear if nf4 else LoRALinear).from_linear(lin, r=r, lora_alpha=16, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("LORA_FAST_FAST_LAUNCH", "0")
    slow = _steps(layer, x, dy, 3)
    monkeypatch.setenv("LORA_FAST_FAST_LAUNCH", "1")
    _launch.clear()
    fast = _steps(layer, x, dy, 3)  # the first call fills the table, the others launch directly
    assert any(info.table for info in _launch._INFO.values()), "no launch key was remembered"
    for i, (a, b) in enumerate(zip(slow, fast)):
        for what, u, v in zip(("y", "dx", "dA", "dB"), a, b):
            assert torch.equal(u, v), f"call {i}: {what} differs between Triton's launch and the direct launch"


def test_launch_key_is_at_least_as_fine_as_tritons_specialisation():
    """Integers are keyed by == 1, % 16 and 32/64-bit range (unless do_not_specialize, then by
    range only), tensors by dtype and 16-byte alignment, constexprs by value."""

    class Info:
        constexpr = frozenset({"BLOCK"})
        dns = frozenset({"seed"})

    k = lambda name, v: _launch._arg_key(name, v, Info)  # noqa: E731
    assert k("n", 1) != k("n", 2)                 # == 1 specialisation
    assert k("n", 32) != k("n", 33)               # divisibility by 16
    assert k("n", 32) == k("n", 48)               # same class
    assert k("n", 2**31) != k("n", 16)            # 64-bit argument
    assert k("seed", 1) == k("seed", 7)           # not specialised
    assert k("seed", 1) != k("seed", 2**40)       # ... except for its width
    assert k("BLOCK", 64) != k("BLOCK", 128)      # constexpr value
    assert k("p", 0.1) == k("p", 0.5)             # floats are not specialised
    buf = torch.zeros(64, dtype=torch.float16)
    assert k("x", buf) != k("x", buf[1:])         # 16-byte alignment
    assert k("x", buf) != k("x", buf.float())     # dtype
    assert k("flag", True) != k("flag", False)


def test_inline_key_equals_the_per_argument_key():
    """_launch._key classifies common argument types inline (it runs on every launch); it must
    give exactly the tuple the reference per-argument _arg_key gives, for every kind of value."""
    import enum

    import numpy as np

    class Small(enum.IntEnum):
        A = 1
        B = 32

    class Info:
        constexpr = frozenset({"BLOCK", "FLAG", "DT"})
        dns = frozenset({"seed", "M_BUCKET"})

    buf = torch.zeros(64, dtype=torch.float16)
    values = [0, 1, 2, 8, 15, 16, 17, 24, 48, -16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, 2**64,
              True, False, 0.0, 0.5, np.float64(0.5), np.int64(32), Small.A, Small.B, None, "s", (1, 2),
              buf, buf[1:], buf.float(), torch.nn.Parameter(buf.clone()), torch.float16]
    names = ["n", "seed", "BLOCK", "FLAG", "M_BUCKET", "DT", "x"]
    Info.name_kinds = tuple((n, 0 if n in Info.constexpr else (1 if n in Info.dns else 2)) for n in names)
    for v in values:
        for n in names:
            bound = {n: v, "x": buf}
            want = tuple(_launch._arg_key(m, bound[m], Info) for m in names if m in bound)
            got = _launch._key(Info, bound)
            assert got == want and [type(a) for a in got] == [type(b) for b in want], (n, v, got, want)
