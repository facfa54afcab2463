"""Edge cases of the public API found by black-box review (session 5): each test failed on the
code before its fix.  CPU: the torch backend, and the Triton kernels in the interpreter."""
import copy
import tempfile
import warnings

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear, nf4
from lora_fast._backend import BackendUnavailableError

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter / CPU bitsandbytes")


def _nf4_layer(seed=0, scale=1.0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(scale)
    layer = NF4LoRALinear.from_linear(lin, r=4, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def _bnb4(in_f=64, out_f=64, quant_type="nf4", compute=torch.float32, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=False)
    m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=compute, quant_type=quant_type)
    m.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    return m.to("cpu")  # quantises


class _One(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = isinstance(proj, bnb.nn.Linear4bit)

    def forward(self, x):
        return self.proj(x)


# ---- NF4 module state -------------------------------------------------------------------------

def test_nf4_state_dict_carries_the_double_quant_offset(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    a, b = _nf4_layer(0), _nf4_layer(1, scale=5.0)
    assert a.weight.offset != b.weight.offset
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(b(x), a(x))
    assert torch.equal(b.dense_weight(torch.float32), a.dense_weight(torch.float32))


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_nf4_dtype_cast_keeps_fp32_statistics(cast):
    layer = _nf4_layer()
    before = layer.dense_weight(torch.float32)
    layer = layer.half() if cast == "half" else layer.to(torch.bfloat16)
    for name in ("nf4_absmax2", "nf4_code2", "nf4_offset"):
        assert getattr(layer, name).dtype == torch.float32, name
    assert layer.nf4_absmax.dtype == torch.uint8
    assert torch.equal(layer.dense_weight(torch.float32), before)
    assert layer.lora_A.dtype == layer.lora_B.dtype == (torch.float16 if cast == "half" else torch.bfloat16)


@pytest.mark.parametrize("scale", [1e-45, 1e-40])
def test_quantize_subnormal_weights(scale):
    W = torch.randn(4, 64) * scale
    q = nf4.quantize(W, blocksize=64, double_quant=True)
    assert torch.isfinite(q.dequantize()).all()


# ---- kernels that cannot take a call ------------------------------------------------------------

@CPU_ONLY
def test_bf16_on_the_interpreter_is_refused_not_wrong(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    layer = LoRALinear.from_linear(nn.Linear(64, 32, dtype=torch.bfloat16), r=4)
    with pytest.raises(BackendUnavailableError, match="bf16 activations in the Triton CPU interpreter"):
        layer(torch.randn(8, 64, dtype=torch.bfloat16))


@CPU_ONLY
def test_fp64_adapters_are_refused_by_the_kernels(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    layer = LoRALinear.from_linear(nn.Linear(64, 32), r=4, adapter_dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="lora_A is torch.float64"):
        layer(torch.randn(8, 64))
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    x = torch.randn(8, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_A.grad.dtype == torch.float64


def test_lora_linear_argument_checks(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    W, A, B, x = torch.randn(32, 64), torch.randn(4, 64), torch.randn(32, 4), torch.randn(5, 64)
    ll = lora_fast.lora_linear
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            ll(x, W, None, A, B, 2.0, p)
    with pytest.raises(ValueError, match=r"bias has shape \(31,\), expected \(32,\)"):
        ll(x, W, torch.zeros(31), A, B, 2.0)
    with pytest.raises(ValueError, match="0-d"):
        ll(torch.tensor(1.0), W, None, A, B, 2.0)
    with pytest.raises(ValueError, match="must be 2-D"):
        ll(x, torch.randn(64), None, A, B, 2.0)
    with pytest.raises(TypeError, match="lora_A has dtype torch.int64"):
        ll(x, W, None, A.long(), B, 2.0)
    with pytest.raises(TypeError, match="floating-point weight"):
        ll(x, W.long(), None, A, B, 2.0)


def test_lora_linear_takes_the_public_nf4_tensor(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    layer = _nf4_layer()
    x = torch.randn(5, 64)
    got = lora_fast.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    assert torch.equal(got, layer(x))


def test_zero_in_features(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = LoRALinear.from_linear(nn.Linear(0, 8), r=1)
    y = layer(torch.randn(3, 0))
    assert y.shape == (3, 8)
    torch.testing.assert_close(y, layer.bias.expand(3, 8))


@CPU_ONLY
def test_grouped_unused_output_gives_no_gradient(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    q = LoRALinear.from_linear(nn.Linear(64, 32), r=4)
    k = LoRALinear.from_linear(nn.Linear(64, 16), r=4)
    with torch.no_grad():
        k.lora_B.normal_()
    lora_fast.dispatch_stats(reset=True)
    yq, yk = lora_fast.lora_linear_grouped(torch.randn(5, 64), [q, k])
    yk.sum().backward()
    assert any(key.startswith("triton:bwd_grouped") for key in lora_fast.dispatch_stats())
    assert q.lora_A.grad is None and q.lora_B.grad is None
    assert k.lora_A.grad is not None and k.lora_B.grad is not None


# ---- base weights that train --------------------------------------------------------------------

def test_trainable_base_weight_gets_its_gradient(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    ref = peft.get_peft_model(_One(nn.Linear(16, 16)), peft.LoraConfig(r=4, target_modules=["proj"]))
    fast = copy.deepcopy(ref)
    for m in (ref, fast):
        m.base_model.model.proj.base_layer.weight.requires_grad_(True)
    lora_fast.patch(fast)
    x = torch.randn(4, 16)
    ref(x).pow(2).sum().backward()
    lora_fast._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="base weight requires grad"):
        fast(x).pow(2).sum().backward()
    g_ref = ref.base_model.model.proj.base_layer.weight.grad
    g_fast = fast.base_model.model.proj.base_layer.weight.grad
    assert g_fast is not None
    torch.testing.assert_close(g_fast, g_ref)


# ---- QLoRA under autocast, torch.compile --------------------------------------------------------

def test_patched_qlora_fp32_compute_under_bf16_autocast(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    pm = peft.get_peft_model(_One(_bnb4()), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    x = torch.randn(2, 8, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = pm(x)
    lora_fast.patch(pm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pm(x)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)  # PEFT's adapter runs in bf16


def test_compile_fullgraph_patched_qlora_layer(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    layer = peft.get_peft_model(_One(_bnb4()), peft.LoraConfig(r=4, target_modules=["proj"])).base_model.model.proj
    lora_fast.patch(layer)
    x = torch.randn(4, 64)
    want = layer(x)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)


# ---- apply_lora and adapter files ---------------------------------------------------------------

def test_apply_lora_failure_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), _bnb4(quant_type="nf4"), _bnb4(quant_type="fp4"),
                          nn.Linear(64, 8))
    kinds = [type(m) for m in model]
    trainable = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="fp4"):
        lora_fast.apply_lora(model, target_modules=["0", "2", "3"], r=4)
    assert [type(m) for m in model] == kinds
    assert [p.requires_grad for p in model.parameters()] == trainable


def test_save_adapter_refuses_trained_biases(tmp_path):
    torch.manual_seed(0)
    model = lora_fast.apply_lora(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)), target_modules=["0"], r=2,
                                 bias="lora_only")
    with pytest.raises(ValueError, match="train their bias"):
        lora_fast.save_adapter(model, str(tmp_path / "a"))
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    model[0].bias.requires_grad_(False)
    lora_fast.save_adapter(model, str(tmp_path / "a"))


def _saved_peft_adapter(p=0.1):
    torch.manual_seed(0)
    src = peft.get_peft_model(_One(nn.Linear(16, 16)),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=p))
    torch.nn.init.normal_(src.base_model.model.proj.lora_B["default"].weight)
    d = tempfile.mkdtemp()
    src.save_pretrained(d)
    return d


@pytest.mark.parametrize("patched", [False, True])
def test_load_adapter_keeps_eval_mode_dropout_off(patched, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    d = _saved_peft_adapter(p=0.1)
    torch.manual_seed(0)
    dst = peft.get_peft_model(_One(nn.Linear(16, 16)),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    if patched:
        lora_fast.patch(dst)
    dst.eval()
    lora_fast.load_adapter(dst, d)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert torch.equal(dst(x), dst(x))
    dst.train()
    assert dst.base_model.model.proj.lora_dropout["default"].training


def test_load_adapter_into_a_merged_layer_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    a = lora_fast.apply_lora(nn.Sequential(nn.Linear(16, 16)), target_modules=["0"], r=2)
    with torch.no_grad():
        a[0].lora_B.normal_()
    lora_fast.save_adapter(a, str(tmp_path / "ad"))
    b = lora_fast.apply_lora(nn.Sequential(nn.Linear(16, 16)), target_modules=["0"], r=2)
    b[0].merge()
    w = b[0].weight.detach().clone()
    with pytest.raises(lora_fast.AdapterLoadError, match="is merged"):
        lora_fast.load_adapter(b, str(tmp_path / "ad"))
    assert torch.equal(b[0].weight, w)


# ---- second review round -------------------------------------------------------------------------

@CPU_ONLY
def test_double_backward_with_dropout_uses_the_forward_mask(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 32), r=4, lora_dropout=0.3)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.train()
    x = torch.randn(8, 64, requires_grad=True)
    torch.manual_seed(5)  # the dropout seed is drawn from torch's CPU generator
    y = layer(x)
    plain = torch.autograd.grad(y.pow(2).sum(), (x, layer.lora_A, layer.lora_B), retain_graph=True)
    lora_fast._backend._warned.clear()
    with pytest.warns(RuntimeWarning, match="double backward"):
        graph = torch.autograd.grad(y.pow(2).sum(), (x, layer.lora_A, layer.lora_B), create_graph=True)
    for a, b in zip(graph, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_nf4_offset_buffer_changes_reach_the_forward(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    a, b = _nf4_layer(0), _nf4_layer(1, scale=5.0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
            tb.copy_(ta)  # in place, as accelerate's loaders and parameter copies do
    assert torch.equal(b(x), a(x))
    c = _nf4_layer(2, scale=3.0)
    for name, t in a.state_dict().items():  # buffers replaced by new tensor objects
        if name.startswith("nf4_"):
            c._buffers[name] = t.clone()
    with torch.no_grad():
        c.lora_A.copy_(a.lora_A)
        c.lora_B.copy_(a.lora_B)
        c.bias.copy_(a.bias)
    assert torch.equal(c(x), a(x))


def test_compile_refuses_a_stale_nf4_view(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    pm = peft.get_peft_model(_One(_bnb4(seed=0)), peft.LoraConfig(r=4, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    lora_fast.patch(pm)
    x = torch.randn(4, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x)
    layer.base_layer.weight = _bnb4(seed=1).weight  # a new Params4bit (as PEFT's merge/unmerge makes)
    with pytest.raises(Exception, match="built for another weight"):
        compiled(x)
    want = layer(x)  # an eager call rebuilds the view
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), want)


def test_patch_skips_layers_with_offloaded_weights(monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                             peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 50, (2, 6))
    want = pm(input_ids=ids).logits.detach()
    accelerate.cpu_offload(pm, execution_device=torch.device("cpu"))
    report = lora_fast.patch(pm)
    assert not report.converted and all("offloaded" in why for why in report.skipped.values())
    torch.testing.assert_close(pm(input_ids=ids).logits, want)


# ---- final review ----------------------------------------------------------------------------------

@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_state_dict_from_before_the_offset_buffer(double_quant):
    a, b = _nf4_layer(0, double_quant=double_quant), _nf4_layer(1, double_quant=double_quant)
    old = {k: v for k, v in a.state_dict().items() if k != "nf4_offset"}  # as saved before the buffer existed
    if double_quant:
        with pytest.raises(RuntimeError, match="cannot be recovered"):
            b.load_state_dict(old)
    else:
        b.load_state_dict(old)
        x = torch.randn(3, 64)
        assert torch.equal(b(x), a(x))


def test_nf4_layer_built_and_run_in_inference_mode(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    with torch.inference_mode():
        layer = _nf4_layer()
        y = layer(torch.randn(3, 64))
    assert y.shape == (3, 32)
    with torch.no_grad():
        assert layer(torch.randn(3, 64)).shape == (3, 32)


def test_fuse_ops_with_functional_silu():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    model = transformers.LlamaForCausalLM(cfg)
    mlp = model.model.layers[0].mlp
    del mlp.act_fn  # a plain function instead of the SiLU module
    mlp.act_fn = torch.nn.functional.silu
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        want = model(ids).logits
    report = lora_fast.fuse_ops(model)
    assert "model.layers.0.mlp" in report.converted
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)
    lora_fast.unfuse_ops(model)


def test_unpatch_reports_a_layer_it_cannot_restore(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    pm = peft.get_peft_model(_One(nn.Linear(16, 16)), peft.LoraConfig(r=4, target_modules=["proj"]))
    lora_fast.patch(pm)
    layer = pm.base_model.model.proj
    layer.forward = lambda x: x  # replaced on the instance after patching
    with pytest.warns(RuntimeWarning, match="keeps its patched class"):
        restored = lora_fast.unpatch(pm)
    assert "base_model.model.proj" not in restored
