"""Fused RMSNorm and gated SiLU (lora_fast/norm_mlp.py, kernels/rmsnorm.py, kernels/swiglu.py):
kernel parity against Hugging Face's expressions and fp64, the model patch (fuse_ops), and
its behaviour with PEFT, pickling, gradient checkpointing and torch.compile.  On the CPU the
kernels run in the Triton interpreter (``LORA_FAST_BACKEND=triton``)."""
import copy
import io
import warnings

import pytest
import torch
from torch import nn

from parity import assert_parity

import lora_fast
from lora_fast import norm_mlp
from lora_fast.norm_mlp import rms_norm, rms_norm_reference, silu_mul, silu_mul_reference

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _restore_rope():
    """fuse_ops replaces a modeling module's apply_rotary_pos_emb process-wide: put it back."""
    yield
    import sys

    for modname, fn in list(norm_mlp._ROPE_ORIGINALS.items()):
        setattr(sys.modules[modname], "apply_rotary_pos_emb", fn)
        del norm_mlp._ROPE_ORIGINALS[modname]
    norm_mlp._ROPE_OWNERS.clear()


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    lora_fast.dispatch_stats(reset=True)


def _ulp_diff_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def _rms64(x, w, eps):
    x64, w64 = x.double(), w.double()
    return w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


# (rows, cols): one row, odd widths, a width past the single-block limit (chunked rows)
NORM_SHAPES = [(1, 8), (37, 200), (5, 6000), (3, 16400)] + ([(4096, 4096), (64, 8192)] if CUDA else [(6, 4096)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_fp32", [False, True], ids=["w-same", "w-fp32"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("w_grad", [False, True], ids=["w-frozen", "w-grad"])
def test_rms_norm_parity(dtype, w_fp32, shape, w_grad, triton_backend):
    m, n = shape
    eps = 1e-6
    x = (torch.randn(m, n, device=DEV) * 3).to(dtype)
    w = (torch.randn(n, device=DEV) * 0.5 + 1).to(torch.float32 if w_fp32 else dtype)
    xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_(w_grad)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_(w_grad)
    yk, yr = rms_norm(xk, wk, eps), rms_norm_reference(xr, wr, eps)
    assert yk.dtype == yr.dtype == torch.promote_types(w.dtype, dtype) and yk.shape == yr.shape
    dy = torch.randn_like(yr)
    yk.backward(dy)
    yr.backward(dy)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y64 = _rms64(x64, w64, eps)
    y64.backward(dy.double())
    assert_parity(yk, y64, yr, dtype=yk.dtype, what="y")
    if dtype != torch.float32:  # Hugging Face's rounding points: all but a few elements bit-equal
        assert _ulp_diff_fraction(yk, yr) <= 0.01, "forward rounds differently from LlamaRMSNorm"
    assert_parity(xk.grad, x64.grad, xr.grad, dtype=dtype, what="dx")
    if w_grad:
        assert wk.grad is not None and wk.grad.dtype == w.dtype
        assert_parity(wk.grad, w64.grad, wr.grad, dtype=w.dtype, what="dw")
    else:
        assert wk.grad is None
    assert lora_fast.dispatch_stats().get("triton:rms_norm", 0) == 1


def test_rms_norm_3d_noncontiguous_and_empty(triton_backend):
    base = torch.randn(2, 5, 130, device=DEV, dtype=torch.float16)
    x = base[:, :, 1:129:2]  # last-dim stride 2
    w = torch.rand(64, device=DEV, dtype=torch.float16) + 0.5
    xk = x.detach().clone().requires_grad_()
    y = rms_norm(x, w, 1e-5)
    assert y.shape == (2, 5, 64)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5), rtol=2e-3, atol=2e-3)
    rms_norm(xk, w, 1e-5).sum().backward()
    assert xk.grad.shape == x.shape
    e = torch.empty(0, 64, device=DEV, dtype=torch.float16, requires_grad=True)
    out = rms_norm(e, w, 1e-5)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert e.grad.shape == (0, 64)


def test_rms_norm_errors(triton_backend):
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match=r"weight has shape \(9,\).*last dim is 8"):
        rms_norm(x, torch.ones(9, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="need"):
        rms_norm(x, torch.ones(2, 4, device=DEV), 1e-6)


def test_rms_norm_fp64_falls_back_visibly(triton_backend):
    x = torch.randn(3, 16, dtype=torch.float64, device=DEV)
    w = torch.ones(16, dtype=torch.float64, device=DEV)
    with pytest.warns(RuntimeWarning, match="rms_norm runs the PyTorch reference"):
        norm_mlp._backend._warned.discard("rms_norm-fallback:dtype torch.float64 / weight torch.float64 "
                                          "(kernels take fp16, bf16, fp32)")
        y = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6))
    assert any(k.startswith("torch:rms_norm_fallback") for k in lora_fast.dispatch_stats())


SILU_SHAPES = [(1,), (37, 300), (2, 3, 2049)] + ([(4096, 14336)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SILU_SHAPES, ids=str)
def test_silu_mul_parity(dtype, shape, triton_backend):
    g = (torch.randn(shape, device=DEV) * 4).to(dtype)
    u = torch.randn(shape, device=DEV).to(dtype)
    gk, uk = g.clone().requires_grad_(), u.clone().requires_grad_()
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    hk, hr = silu_mul(gk, uk), silu_mul_reference(gr, ur)
    assert hk.dtype == dtype and hk.shape == g.shape
    dh = torch.randn_like(hr)
    hk.backward(dh)
    hr.backward(dh)
    g64, u64 = g.double().requires_grad_(), u.double().requires_grad_()
    h64 = torch.nn.functional.silu(g64) * u64
    h64.backward(dh.double())
    assert_parity(hk, h64, hr, dtype=dtype, what="h")
    assert_parity(gk.grad, g64.grad, gr.grad, dtype=dtype, what="dg")
    assert_parity(uk.grad, u64.grad, ur.grad, dtype=dtype, what="du")
    if dtype != torch.float32:  # the two-op expression's rounding points: bit-equal but for exp's last bits
        for a, b in ((hk, hr), (gk.grad, gr.grad), (uk.grad, ur.grad)):
            assert _ulp_diff_fraction(a, b) <= 0.01
    assert lora_fast.dispatch_stats().get("triton:silu_mul", 0) == 1


def test_silu_mul_mixed_inputs_fall_back_visibly(triton_backend):
    g = torch.randn(4, 8, device=DEV)
    u = torch.randn(4, 8, device=DEV, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm_mlp._backend._warned.clear()
        h = silu_mul(g, u)
    assert any("silu_mul runs the PyTorch reference" in str(w.message) for w in caught)
    torch.testing.assert_close(h, silu_mul_reference(g, u))
    assert any(k.startswith("torch:silu_mul_fallback") for k in lora_fast.dispatch_stats())


def test_torch_backend_runs_the_reference(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    lora_fast.dispatch_stats(reset=True)
    x, w = torch.randn(3, 16, device=DEV), torch.rand(16, device=DEV)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    assert torch.equal(silu_mul(x, w.expand(3, 16)), silu_mul_reference(x, w.expand(3, 16)))
    assert not any("rms_norm" in k or "silu_mul" in k for k in lora_fast.dispatch_stats())


# --------------------------------------------------------------------------------------------
# the model patch
# --------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _llama(hidden_act="silu", seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, hidden_act=hidden_act,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).to(DEV)


def _batch(seed=0, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, seq), generator=g).to(DEV)
    return {"input_ids": ids, "labels": ids}


ROPE_LABEL = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
FUSED_NAMES = ["loss_function", "model.layers.0.mlp", "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
               "model.layers.1.mlp", "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
               "model.norm"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fuse_ops_llama_matches_unfused(backend, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", backend)
    ref = _llama()
    fused = copy.deepcopy(ref)
    report = lora_fast.fuse_ops(fused)
    assert sorted(report.converted) == sorted(FUSED_NAMES + [ROPE_LABEL]) and not report.skipped
    assert type(fused.model.norm).__name__.startswith("LoraFastFused__")
    assert isinstance(fused.model.norm, type(ref.model.norm))  # a subclass: isinstance checks still hold
    assert list(fused.state_dict()) == list(ref.state_dict())
    b = _batch()
    lr, lf = ref(**b).loss, fused(**b).loss
    lr.backward()
    lf.backward()
    gr, gf = _grads(ref), _grads(fused)
    assert gr.keys() == gf.keys()
    if backend == "torch":  # the reference expressions: the same numbers
        assert torch.equal(lr, lf)
        for k in gr:
            assert torch.equal(gr[k], gf[k]), k
    else:
        torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
        for k in gr:
            torch.testing.assert_close(gf[k], gr[k], rtol=1e-4, atol=1e-5, msg=k)
        stats = lora_fast.dispatch_stats()
        assert stats.get("triton:rms_norm", 0) >= 5 and stats.get("triton:silu_mul", 0) >= 2
    assert sorted(lora_fast.unfuse_ops(fused)) == sorted(FUSED_NAMES + [ROPE_LABEL])
    assert type(fused.model.norm) is type(ref.model.norm) and type(fused.model.layers[0].mlp) is type(ref.model.layers[0].mlp)


def test_fuse_ops_skips_what_it_does_not_compute():
    model = _llama(hidden_act="gelu")

    class MyRMSNorm(nn.Module):  # Gemma-style (1 + w): another formula
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(n))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            h = hidden_states.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (h * (1.0 + self.weight.float())).type_as(hidden_states)

    model.model.norm = MyRMSNorm(64).to(DEV)
    report = lora_fast.fuse_ops(model)
    assert "gelu" not in report.converted
    assert "activation" in report.skipped["model.layers.0.mlp"] and "not SiLU" in report.skipped["model.layers.0.mlp"]
    assert "forward differs from LlamaRMSNorm" in report.skipped["model.norm"]
    assert "model.layers.0.input_layernorm" in report.converted
    assert type(model.model.norm) is MyRMSNorm


def test_fused_model_pickles_and_deepcopies(tmp_path):
    model = _llama()
    lora_fast.fuse_ops(model)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.model.norm) is type(model.model.norm)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
        assert torch.equal(clone(ids).logits, want)
    # the class is importable by name in a fresh interpreter too (module-level __getattr__)
    name = type(model.model.layers[0].mlp).__name__
    assert getattr(norm_mlp, name) is type(model.model.layers[0].mlp)


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_gradient_checkpointing(reentrant, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    ref = _llama()
    fused = copy.deepcopy(ref)
    lora_fast.fuse_ops(fused)
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    fused.enable_input_require_grads()
    fused.train()
    ref.train()
    b = _batch()
    ref(**b).loss.backward()
    fused(**b).loss.backward()
    gr, gf = _grads(ref), _grads(fused)
    assert gr.keys() == gf.keys()
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-4, atol=1e-5, msg=k)


def test_patch_with_fuse_ops_trains_like_peft(monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    t7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def make():
        m = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=t7))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(hash(n) % 1000))
        return m

    plain, fast = make(), make()
    report = lora_fast.patch(fast, fuse_ops=True)
    assert len(report.converted) == 14
    assert sorted(report.fused) == sorted(["base_model.model." + n for n in FUSED_NAMES] + [ROPE_LABEL])
    assert "9 norm/MLP/loss modules fused" in str(report)
    losses = []
    for model in (plain, fast):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curve = []
        for step in range(4):
            loss = model(**_batch(step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        losses.append(curve)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-4)
    restored = lora_fast.unpatch(fast)
    assert len(restored) == 14 + 9
    assert not any(isinstance(m, (norm_mlp._FusedMLP, norm_mlp._FusedRMSNorm)) for m in fast.modules())


def test_compile_fullgraph_fused_decoder_layer(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    torch._dynamo.reset()
    model = _llama(layers=1)
    lora_fast.fuse_ops(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 8, 64, device=DEV, requires_grad=True)
    pos = torch.arange(8, device=DEV).unsqueeze(0).expand(2, 8)
    emb = model.model.rotary_emb(x, pos)
    want = layer(x, position_embeddings=emb, position_ids=pos)
    want = want[0] if isinstance(want, tuple) else want
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, position_embeddings=emb, position_ids=pos)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backward,has_dw", [(False, False), (True, False), (True, True)])
def test_launcher_configs_are_the_compile_checked_ones(backward, has_dw):
    """bench.compile_check compiles the configs listed in kernels/rmsnorm.py (spill-free on
    sm_80/86/90); the launcher must only ever pick one of them."""
    from lora_fast._operand import kernel_module

    k = kernel_module("rmsnorm")
    listed = k.NORM_BWD_CONFIGS if backward else k.NORM_FWD_CONFIGS
    if backward:
        listed = k.prune_norm_bwd(listed, {}, HAS_DW=has_dw)
    keys = {(tuple(sorted(c.kwargs.items())), c.num_warps) for c in listed}
    for n in [1, 7, 127, 128, 129, 1000, 2048, 4095, 4096, 4097, 5120, 8192, 8193, 14336, 16384, 16385, 65536]:
        c = k.norm_config(n, backward=backward, has_dw=has_dw)
        assert (tuple(sorted(c.kwargs.items())), c.num_warps) in keys, (n, c)
        assert c.kwargs["SINGLE"] == (n <= c.kwargs["BLOCK_N"])


# --------------------------------------------------------------------------------------------
# causal-LM cross entropy
# --------------------------------------------------------------------------------------------

from lora_fast.norm_mlp import causal_lm_loss, cross_entropy, cross_entropy_reference  # noqa: E402

CE_SHAPES = [(1, 5), (37, 300), (6, 4097), (3, 9000)] + ([(4096, 32000), (512, 128256)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("num_items", [None, "int", "tensor"])
def test_cross_entropy_parity(dtype, shape, num_items, triton_backend):
    m, v = shape
    logits = (torch.randn(m, v, device=DEV) * 3).to(dtype)
    target = torch.randint(0, v, (m,), device=DEV)
    target[::3] = -100  # ignored rows
    if m == 1:
        target[0] = 2
    n = {None: None, "int": 7, "tensor": torch.tensor(7, device=DEV)}[num_items]
    lk, lr = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = cross_entropy(lk, target, n), cross_entropy_reference(lr, target, n)
    assert got.dtype == want.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    got.backward(torch.tensor(1.7, device=DEV))
    want.backward(torch.tensor(1.7, device=DEV))
    l64 = logits.double().requires_grad_()
    ref64 = torch.nn.functional.cross_entropy(l64, target, reduction="sum" if n is not None else "mean")
    if n is not None:
        ref64 = ref64 / 7
    (ref64 * 1.7).backward()
    assert_parity(lk.grad, l64.grad, lr.grad, dtype=dtype, what="dlogits")
    assert (lk.grad[target == -100] == 0).all()
    assert lora_fast.dispatch_stats().get("triton:cross_entropy", 0) == 1


def test_cross_entropy_edges(triton_backend):
    logits = torch.randn(4, 10, device=DEV)
    all_ignored = torch.full((4,), -100, device=DEV)
    assert torch.isnan(cross_entropy(logits, all_ignored)) and torch.isnan(cross_entropy_reference(logits, all_ignored))
    bad = torch.tensor([1, 2, 10, 3], device=DEV)  # 10 is outside the vocabulary
    assert torch.isnan(cross_entropy(logits, bad))
    with pytest.raises(ValueError, match=r"logits must be \(M, V\)"):
        cross_entropy(logits.view(2, 2, 10), bad)
    inf_row = logits.clone()
    inf_row[0, :5] = float("-inf")  # masked vocabulary entries
    tgt = torch.tensor([7, 2, 3, 4], device=DEV)
    torch.testing.assert_close(cross_entropy(inf_row, tgt), cross_entropy_reference(inf_row, tgt))


def test_causal_lm_loss_matches_transformers(triton_backend):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 9, 50, device=DEV, dtype=torch.float16)
    labels = torch.randint(0, 50, (2, 9), device=DEV)
    labels[0, :3] = -100
    for kw in ({}, {"num_items_in_batch": 11}, {"shift_labels": torch.roll(labels, -1, 1)}):
        torch.testing.assert_close(causal_lm_loss(logits, labels, 50, **kw), ForCausalLMLoss(logits, labels, 50, **kw),
                                   rtol=1e-5, atol=1e-5)


def test_fuse_ops_installs_the_loss_and_trains_the_same(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    ref = _llama()
    fused = copy.deepcopy(ref)
    report = lora_fast.fuse_ops(fused)
    assert "loss_function" in report.converted and fused.loss_function is causal_lm_loss
    lora_fast.dispatch_stats(reset=True)
    b = _batch()
    lr, lf = ref(**b).loss, fused(**b).loss
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    lr.backward()
    lf.backward()
    gr, gf = _grads(ref), _grads(fused)
    for k in gr:
        torch.testing.assert_close(gf[k], gr[k], rtol=1e-4, atol=1e-5, msg=k)
    assert lora_fast.dispatch_stats().get("triton:cross_entropy", 0) == 1
    assert "loss_function" in lora_fast.unfuse_ops(fused)
    assert "_loss_function" not in fused.__dict__
    from transformers.loss.loss_utils import ForCausalLMLoss
    assert fused.loss_function is ForCausalLMLoss
    # a model with its own loss function keeps it
    custom = copy.deepcopy(ref)
    custom.loss_function = lambda *a, **k: torch.tensor(0.0)
    report = lora_fast.fuse_ops(custom)
    assert "custom loss_function" in report.skipped["loss_function"]


# --------------------------------------------------------------------------------------------
# found by review (session 5): each failed before its fix
# --------------------------------------------------------------------------------------------

def test_rms_norm_strided_broadcast_and_empty_weights(triton_backend):
    x = torch.randn(5, 8, device=DEV)
    big = torch.rand(8, 2, device=DEV) + 0.5
    for w in (big[:, 0], torch.tensor([2.0], device=DEV).expand(8), torch.tensor([1.5], device=DEV)):
        torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    w1 = torch.tensor([1.5], device=DEV, requires_grad=True)
    rms_norm(x, w1, 1e-6).sum().backward()
    w2 = torch.tensor([1.5], device=DEV, requires_grad=True)
    rms_norm_reference(x, w2, 1e-6).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)
    assert rms_norm(torch.randn(4, 0, device=DEV), torch.ones(0, device=DEV), 1e-6).shape == (4, 0)


@pytest.mark.parametrize("op", ["rms_norm", "silu_mul", "cross_entropy", "lora_linear"])
def test_double_backward_is_right(op, triton_backend):
    torch.manual_seed(0)
    x0 = torch.randn(3, 8, device=DEV)
    w = torch.rand(8, device=DEV) + 0.5
    tgt = torch.tensor([1, 2, 3], device=DEV)
    lin = LoRALinear_for_test(w)
    fns = {
        "rms_norm": (lambda x: rms_norm(x, w, 1e-6), lambda x: rms_norm_reference(x, w, 1e-6)),
        "silu_mul": (lambda x: silu_mul(x, x0 * 2), lambda x: silu_mul_reference(x, x0 * 2)),
        "cross_entropy": (lambda x: cross_entropy(x, tgt), lambda x: cross_entropy_reference(x, tgt)),
        "lora_linear": (lin, lambda x: lin.reference(x)),
    }[op]
    out = []
    for f in fns:
        x = x0.clone().requires_grad_()
        y = f(x) + x.pow(3).sum()  # another differentiable path keeps the graph alive
        g, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        gg, = torch.autograd.grad(g.sum(), x)
        out.append(gg)
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert any("create_graph" in k for k in lora_fast.dispatch_stats())


class LoRALinear_for_test(nn.Module):
    def __init__(self, w):
        super().__init__()
        torch.manual_seed(1)
        self.layer = lora_fast.LoRALinear.from_linear(nn.Linear(8, 8, device=DEV), r=2)
        with torch.no_grad():
            self.layer.lora_B.normal_()

    def forward(self, x):
        return self.layer(x)

    def reference(self, x):
        l = self.layer
        return torch.nn.functional.linear(x, l.weight, l.bias) + l.scaling * (x @ l.lora_A.t()) @ l.lora_B.t()


def test_fuse_ops_respects_act_fn_hooks_and_silu_subclasses(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    model = _llama(layers=1)
    calls = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: calls.append(1))
    report = lora_fast.fuse_ops(model)
    assert "act_fn has forward hooks" in report.skipped["model.layers.0.mlp"]
    model(_batch()["input_ids"])
    assert calls == [1]

    class ClampedSiLU(nn.SiLU):
        def forward(self, x):
            return super().forward(x).clamp(max=0.1)

    model = _llama(layers=1)
    model.model.layers[0].mlp.act_fn = ClampedSiLU()
    assert "not SiLU" in lora_fast.fuse_ops(model).skipped["model.layers.0.mlp"]

    # a hook added after fusing: the MLP runs its own forward again
    model = _llama(layers=1)
    ids = _batch()["input_ids"]
    lora_fast.fuse_ops(model)
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: o * 0)
    norm_mlp._backend._warned.clear()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="act_fn has forward hooks"):
        fused_out = model(ids).logits
    assert any(k.startswith("torch:fused MLP_fallback") for k in lora_fast.dispatch_stats())
    lora_fast.unfuse_ops(model)
    with torch.no_grad():
        torch.testing.assert_close(fused_out, model(ids).logits)


def test_accelerate_hooks_reach_the_fused_and_patched_forward(monkeypatch):
    hooks = pytest.importorskip("accelerate.hooks")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    t7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(_llama(layers=1), peft.LoraConfig(r=4, target_modules=t7))
    ref = copy.deepcopy(model)
    for mod in model.modules():  # what accelerate's dispatch_model / cpu_offload attach
        hooks.add_hook_to_module(mod, hooks.ModelHook())
    report = lora_fast.patch(model, fuse_ops=True)
    assert len(report.converted) == 7 and len(report.fused) == 6 and not report.skipped
    lora_fast.dispatch_stats(reset=True)
    b = _batch()
    torch.testing.assert_close(model(**b).loss, ref(**b).loss, rtol=1e-5, atol=1e-5)
    stats = lora_fast.dispatch_stats()
    assert stats.get("triton:rms_norm", 0) == 3 and stats.get("triton:silu_mul", 0) == 1
    assert sum(v for k, v in stats.items() if k.startswith("triton:fwd_")) == 7
    lora_fast.unpatch(model)
    lora_fast.dispatch_stats(reset=True)
    model(**b)
    assert not any(k.startswith("triton:") for k in lora_fast.dispatch_stats())
    # an instance-level forward that is not accelerate's: reported, not silently ignored
    m2 = _llama(layers=1)
    m2.model.norm.forward = lambda h: h
    assert "replaced on the instance" in lora_fast.fuse_ops(m2).skipped["model.norm"]


def test_fused_class_names_round_trip():
    for mod_name, qual in (("a.b_c", "X"), ("norm_o_lib", "Outer.Inner_RMSNorm"), ("__main__", "My__C__Norm"),
                           ("x__y", "_Z")):
        cls = type(qual.rsplit(".", 1)[-1], (nn.Module,), {"__module__": mod_name})
        cls.__qualname__ = qual
        name = norm_mlp._class_name(cls)
        body = name[len(norm_mlp._PREFIX):]
        m, sep, q = body.partition(norm_mlp._SEP)
        assert sep and norm_mlp._dec(m) == mod_name and norm_mlp._dec(q) == qual, name


# --------------------------------------------------------------------------------------------
# rotary position embedding
# --------------------------------------------------------------------------------------------

from lora_fast.norm_mlp import rope, rope_reference  # noqa: E402


def _cos_sin(batch, seq, d, dtype):
    pos = torch.arange(seq, device=DEV).float()[None].expand(batch, seq)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
    emb = torch.cat([pos[..., None] * inv, pos[..., None] * inv], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


ROPE_SHAPES = [(2, 4, 2, 5, 8), (1, 3, 1, 7, 64), (2, 2, 2, 3, 6), (1, 4, 4, 9, 128)] + \
    ([(2, 32, 8, 2048, 128)] if CUDA else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("cos_batch", [1, "full"])
def test_rope_is_bit_equal_to_transformers(dtype, shape, cos_batch, triton_backend):
    b, h, hk, s, d = shape
    q0 = torch.randn(b, s, h, d, device=DEV).to(dtype).transpose(1, 2)  # strided, as the projections give it
    k0 = torch.randn(b, s, hk, d, device=DEV).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(1 if cos_batch == 1 else b, s, d, dtype)
    q1, k1, q2, k2 = (t.clone().requires_grad_() for t in (q0, k0, q0, k0))
    got, want = rope(q1, k1, cos, sin), rope_reference(q2, k2, cos, sin)
    gq, gk = torch.randn_like(want[0]), torch.randn_like(want[1])
    torch.autograd.backward(got, (gq, gk))
    torch.autograd.backward(want, (gq, gk))
    for a, r in zip((*got, q1.grad, k1.grad), (*want, q2.grad, k2.grad)):
        assert a.dtype == r.dtype and a.shape == r.shape
        if dtype == torch.float32 and CUDA:  # fp32 on a GPU: exp-free, but FMA-free only as far as ptxas keeps it
            torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, r)
    assert lora_fast.dispatch_stats().get("triton:rope", 0) == 1


def test_rope_fallbacks_and_double_backward(triton_backend):
    q = torch.randn(1, 2, 3, 8, device=DEV)
    k = torch.randn(1, 1, 3, 8, device=DEV)
    cos, sin = _cos_sin(1, 3, 8, torch.float16)  # another dtype than q: promotion, the reference runs
    norm_mlp._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="rope runs the PyTorch reference"):
        got = rope(q, k, cos, sin)
    for a, r in zip(got, rope_reference(q, k, cos, sin)):
        assert torch.equal(a, r)
    cos, sin = _cos_sin(1, 3, 8, torch.float32)
    x = q.clone().requires_grad_()
    y, _ = rope(x, k, cos, sin)
    g, = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    gg, = torch.autograd.grad(g.sum(), x)
    x2 = q.clone().requires_grad_()
    y2, _ = rope_reference(x2, k, cos, sin)
    g2, = torch.autograd.grad(y2.pow(2).sum(), x2, create_graph=True)
    torch.testing.assert_close(gg, torch.autograd.grad(g2.sum(), x2)[0])


def test_fuse_ops_leaves_other_rotary_layouts_alone():
    import sys
    import types

    mod = types.ModuleType("fake_modeling_rope")

    def rotate_half(x):  # GPT-J style interleaved pairs: the same apply body, another layout
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        q_embed = (q * cos) + (rotate_half(q) * sin)
        k_embed = (k * cos) + (rotate_half(k) * sin)
        return q_embed, k_embed

    mod.rotate_half, mod.apply_rotary_pos_emb = rotate_half, apply_rotary_pos_emb

    class FakeAttention(nn.Module):
        pass

    FakeAttention.__module__ = "fake_modeling_rope"
    sys.modules["fake_modeling_rope"] = mod
    try:
        report = lora_fast.fuse_ops(nn.Sequential(FakeAttention()))
        assert "rotate_half differs" in report.skipped["fake_modeling_rope.apply_rotary_pos_emb"]
        assert mod.apply_rotary_pos_emb is apply_rotary_pos_emb
    finally:
        del sys.modules["fake_modeling_rope"]


def test_rope_cos_and_sin_layouts(triton_backend):
    q = torch.randn(2, 3, 5, 8, device=DEV)
    k = torch.randn(2, 1, 5, 8, device=DEV)
    cos, sin = _cos_sin(2, 5, 8, torch.float32)
    cases = [(cos, sin[:1]),                                   # batch-broadcast sin only
             (cos, sin.transpose(0, 1).contiguous().transpose(0, 1)),  # sin with other strides than cos
             (cos[..., :1], sin[..., :1])]                       # broadcast over the head dim: reference
    for c, s_ in cases:
        for a, r in zip(rope(q, k, c, s_), rope_reference(q, k, c, s_)):
            assert torch.equal(a, r)


def test_rope_under_torch_func(triton_backend):
    cos, sin = _cos_sin(1, 5, 8, torch.float32)
    k = torch.randn(1, 1, 5, 8, device=DEV)

    def f(q):
        return rope(q, k, cos, sin)[0].pow(2).sum()

    q = torch.randn(1, 2, 5, 8, device=DEV)
    want = torch.func.grad(lambda q: rope_reference(q, k, cos, sin)[0].pow(2).sum())(q)
    torch.testing.assert_close(torch.func.grad(f)(q), want)


def test_fused_rotary_function_ownership():
    from transformers.models.llama import modeling_llama as ml

    original = ml.apply_rotary_pos_emb
    a, b = _llama(layers=1), _llama(layers=1, seed=1)
    lora_fast.fuse_ops(a)
    lora_fast.fuse_ops(b)
    assert ROPE_LABEL not in lora_fast.unfuse_ops(copy.deepcopy(a))  # a copy does not own it
    assert ROPE_LABEL not in lora_fast.unfuse_ops(_llama(layers=1))  # nor does a model never fused
    assert ROPE_LABEL in lora_fast.unfuse_ops(a)
    assert ml.apply_rotary_pos_emb is norm_mlp.fused_apply_rotary_pos_emb  # b still fused
    assert ROPE_LABEL in lora_fast.unfuse_ops(b)
    assert ml.apply_rotary_pos_emb is original


def test_rope_launcher_configs_are_the_compile_checked_ones():
    from lora_fast._operand import kernel_module

    k = kernel_module("rope")
    listed = {(c.kwargs["BLOCK_R"], c.kwargs["BLOCK_H"], c.num_warps) for c in k.ROPE_CONFIGS}
    for d in range(2, 1025, 2):
        block_r, block_h = norm_mlp._rope_block(k, d)
        assert (block_r, block_h, k.ROPE_WARPS) in listed and block_h >= d // 2, d
