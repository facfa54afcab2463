"""Edge cases of the public API found by black-box review (session 7): each test failed on the
code before its fix.  CPU: the torch backend, and the Triton kernels in the interpreter."""
import numpy as np
import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import NF4LoRALinear, nf4

bnb = pytest.importorskip("bitsandbytes")


# ---- NF4 format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("src_dq", [True, False])
def test_nf4_state_dict_with_other_double_quant_is_refused_even_non_strict(src_dq):
    # strict=False used to copy the uint8 codes of a double-quantised absmax as values into the
    # fp32 scales of a plain layer (weights off by ~200), or truncate fp32 scales into codes
    torch.manual_seed(0)
    lin = nn.Linear(128, 16)
    src = NF4LoRALinear.from_linear(lin, r=4, double_quant=src_dq)
    dst = NF4LoRALinear.from_linear(lin, r=4, double_quant=not src_dq)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match="double-quantised"):
        dst.load_state_dict(src.state_dict(), strict=False)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_nf4_numpy_integer_blocksize_accepted():
    w = torch.randn(8, 128)
    q = nf4.quantize(w, blocksize=np.int64(128))
    assert q.blocksize == 128 and type(q.blocksize) is int
    ref = nf4.quantize(w, blocksize=128)
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.absmax, ref.absmax)
    layer = NF4LoRALinear.from_linear(nn.Linear(128, 8), r=2, blocksize=np.int32(64))
    assert layer.blocksize == 64
    with pytest.raises(ValueError, match="unsupported blocksize"):
        nf4.quantize(w, blocksize=np.float64(64.0))
    with pytest.raises(ValueError, match="unsupported blocksize"):
        nf4.quantize(w, blocksize=True)


def test_from_bnb_and_apply_lora_take_a_cpu_repacked_linear4bit():
    # bitsandbytes' first CPU inference forward (AVX512-BF16 hosts) repacks a Linear4bit's weight
    # in place; apply_lora / from_bnb used to refuse it, pointing at a private bitsandbytes call
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(128, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin.load_state_dict(nn.Linear(128, 32).state_dict())
    lin = lin.to("cpu")
    model = nn.Sequential(lin)
    x = torch.randn(3, 128)
    w = lin.weight
    std = w.data.clone()
    want = nf4.NF4Tensor.from_bnb(w).dequantize(torch.float32)
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu
    assert lora_fast.apply_lora(model, target_modules=["0"], r=4) is model
    layer = model[0]
    assert isinstance(layer, NF4LoRALinear)
    assert torch.equal(layer.nf4_packed.reshape(-1), std.reshape(-1))
    # bitsandbytes' repacking keeps absmax in bf16: the restored scales carry its rounding
    torch.testing.assert_close(layer.weight.dequantize(torch.float32), want, rtol=1e-2, atol=1e-3)
    y = layer(x)
    assert y.shape == (3, 32) and torch.isfinite(y).all()


def test_nf4_unmerge_after_a_device_move_keeps_the_base_on_the_new_device():
    # merge() kept the original NF4 tensors in a plain attribute that .to() did not move
    layer = NF4LoRALinear.from_linear(nn.Linear(64, 32), r=4)
    with pytest.warns(UserWarning):
        layer.merge()
    layer.to("meta")
    layer.unmerge()
    assert {b.device.type for b in layer.buffers()} == {"meta"}
    assert layer(torch.randn(2, 64, device="meta")).device.type == "meta"


def test_grouped_call_input_errors_name_the_problem():
    layers = [lora_fast.LoRALinear.from_linear(nn.Linear(16, 8), r=2) for _ in range(2)]
    with pytest.raises(ValueError, match="at least one dimension"):
        lora_fast.lora_linear_grouped(torch.tensor(1.0), layers)
    with pytest.raises(ValueError, match="input is on meta but the weights of layer 0 are on cpu"):
        lora_fast.lora_linear_grouped(torch.randn(2, 16, device="meta"), layers)


# ---- PEFT models: adapters added or loaded after patch ------------------------------------------

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from lora_fast.patch import _FastForwardMixin  # noqa: E402

from test_patch import batch, peft_model, tiny_llama  # noqa: E402


def test_layers_added_by_add_adapter_after_patch_are_converted(monkeypatch):
    # add_adapter on modules without LoRA used to create PEFT layers that silently ran PEFT's
    # forward; they are now converted as patch() would
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert len(lora_fast.patch(pm).converted) == 2
    pm.add_adapter("new", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"]))
    pm.set_adapter("new")
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 6 and all(isinstance(m, _FastForwardMixin) for m in layers)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B.new" in n:
                p.normal_()
    b = batch()
    lora_fast.dispatch_stats(reset=True)
    out = pm(**b).logits
    assert sum(v for k, v in lora_fast.dispatch_stats().items() if k.startswith("torch:")) == 6
    lora_fast.unpatch(pm)
    assert type(pm.base_model).__name__ == "LoraModel"
    assert not any(isinstance(m, _FastForwardMixin) for m in pm.modules())
    torch.testing.assert_close(pm(**b).logits, out, rtol=1e-5, atol=1e-5)


def test_patched_peft_model_pickles_and_copies(tmp_path):
    import copy
    import io

    pm = peft_model()
    lora_fast.patch(pm)
    b = batch()
    want = pm(**b).logits
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    torch.testing.assert_close(back(**b).logits, want)
    assert type(back.base_model).__name__ == "LoraFastLoraModel"
    torch.testing.assert_close(copy.deepcopy(pm)(**b).logits, want)


def test_load_adapter_updates_the_peft_config_that_save_pretrained_writes(tmp_path):
    # the layers took the file's alpha / rsLoRA / dropout but peft_config kept the old ones, so
    # save_pretrained -> PeftModel.from_pretrained gave other outputs (rel 0.26)
    src = peft_model(lora_alpha=8, use_rslora=True, lora_dropout=0.1, seed=0).eval()
    lora_fast.save_adapter(src, tmp_path / "a")
    dst = peft_model(lora_alpha=32, seed=0).eval()
    lora_fast.patch(dst)
    lora_fast.load_adapter(dst, tmp_path / "a")
    cfg = dst.peft_config["default"]
    assert (cfg.lora_alpha, cfg.use_rslora, cfg.lora_dropout) == (8, True, 0.1)
    b = batch()
    want = src(**b).logits
    torch.testing.assert_close(dst(**b).logits, want)
    dst.save_pretrained(tmp_path / "b")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b").eval()
    torch.testing.assert_close(back(**b).logits, want, rtol=1e-5, atol=1e-5)


def test_partial_load_with_other_hyper_parameters_is_refused(tmp_path):
    src = peft_model(lora_alpha=8, target_modules=["q_proj"])
    lora_fast.save_adapter(src, tmp_path / "a")
    dst = peft_model(lora_alpha=32, target_modules=["q_proj", "v_proj"])
    before = {n: p.clone() for n, p in dst.named_parameters()}
    with pytest.raises(lora_fast.AdapterLoadError, match="partial load"):
        lora_fast.load_adapter(dst, tmp_path / "a", strict=False)
    assert dst.peft_config["default"].lora_alpha == 32
    for n, p in dst.named_parameters():
        assert torch.equal(p, before[n]), n
    # the same hyper-parameters: the partial load goes through
    same = peft_model(lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=3)
    assert len(lora_fast.load_adapter(same, tmp_path / "a", strict=False)) == 2


def test_load_adapter_takes_peft_lm_head_base_weights(tmp_path):
    # PEFT writes lm_head.base_layer.weight beside an lm_head adapter; lora_fast refused the file
    src = get_peft_model(tiny_llama(seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    src.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    assert "base_model.model.lm_head.base_layer.weight" in load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    base = tiny_llama(seed=1)
    with torch.no_grad():
        base.lm_head.weight.zero_()  # PEFT's loader overwrites it from the file: so must lora_fast
    lora_fast.apply_lora(base, target_modules=["q_proj", "lm_head"], r=4, lora_alpha=8)
    lora_fast.load_adapter(base, tmp_path / "a")
    b = batch()
    torch.testing.assert_close(base(**b).logits, src(**b).logits, rtol=1e-5, atol=1e-5)


def test_save_adapter_bias_config_on_a_model_without_biases(tmp_path):
    # bias="lora_only" / "all" on a Llama (no bias parameters) trains nothing but A/B: PEFT saves
    # A/B only, and so may lora_fast (it refused, naming a bias that does not exist)
    for bias in ("lora_only", "all"):
        pm = peft_model(bias=bias)
        lora_fast.save_adapter(pm, tmp_path / bias)
        back = PeftModel.from_pretrained(tiny_llama(), tmp_path / bias)
        b = batch()
        torch.testing.assert_close(back(**b).logits, pm(**b).logits, rtol=1e-5, atol=1e-5)


def test_qlora_fp32_activations_bf16_compute_dtype_tolerance():
    # the documented precision (README): with fp32 x into a compute_dtype=bf16 QLoRA layer and no
    # autocast, x is rounded to bf16 once for the whole patched layer; PEFT keeps the adapter
    # path in fp32.  Y and dX are as close to fp32 as PEFT's; dA/dB within the bf16 rounding.
    import copy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(128, 96, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = Net()
    q = bnb.nn.Linear4bit(128, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(net.proj.weight.data.clone(), requires_grad=False, quant_type="nf4")
    net.proj = q.to("cpu")
    net.is_loaded_in_4bit = True
    ref = get_peft_model(net, LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    with torch.no_grad():
        ref.base_model.model.proj.lora_B.default.weight.normal_(std=1e-2)
    truth = copy.deepcopy(ref)
    truth.base_model.model.proj.base_layer.compute_dtype = torch.float32
    fast = copy.deepcopy(ref)
    lora_fast.patch(fast)
    x0, g = torch.randn(4, 32, 128), torch.randn(4, 32, 96)
    res = {}
    for tag, m in (("truth", truth), ("peft", ref), ("fast", fast)):
        x = x0.clone().requires_grad_(True)
        y = m(x)
        (y * g).sum().backward()
        layer = m.base_model.model.proj
        res[tag] = (y.detach(), x.grad, layer.lora_A.default.weight.grad, layer.lora_B.default.weight.grad)
    assert res["fast"][0].dtype == torch.float32

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    t = res["truth"]
    for i in (0, 1):  # Y, dX: bounded by the bf16 base GEMM, as PEFT's
        assert rel(res["fast"][i], t[i]) <= 2 * rel(res["peft"][i], t[i]) + 1e-4
    for i in (2, 3):  # dA, dB: x rounded to bf16 once (PEFT: exact here)
        assert rel(res["fast"][i], t[i]) < 1e-2


# ---- review of the session's own fixes ------------------------------------------------------------

def _repacked_linear4bit(nested: bool):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    lin = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                            compress_statistics=nested)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=nested)
    lin = lin.to("cpu")
    std = nf4.NF4Tensor.from_bnb(lin.weight).dequantize(torch.float32)
    p = lin.weight
    p.data, p.quant_state = _convert_weight_packed_for_cpu(p.data, p.quant_state)
    return lin, std


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_repacked_weight_restores_scales_with_and_without_double_quant(nested):
    # bitsandbytes' inverse leaves non-nested scales transposed (K/blocksize, N) in bf16: read as
    # they were, the weights were off by ~100% of max|W|
    lin, std = _repacked_linear4bit(nested)
    got = nf4.NF4Tensor.from_bnb(lin.weight).dequantize(torch.float32)
    assert not lin.weight.quant_state.packing_format_for_cpu
    # the repacking rounded the scales to bf16 (2^-9 relative)
    torch.testing.assert_close(got, std, rtol=0, atol=4e-3 * std.abs().max().item())
    x = torch.randn(3, 128)
    torch.testing.assert_close(lin(x), x @ got.t(), rtol=1e-4, atol=1e-5)


def test_from_bnb_pair_form_leaves_the_callers_state_alone():
    lin, std = _repacked_linear4bit(nested=True)
    p = lin.weight
    data, qs = p.data, p.quant_state
    before = data.clone()
    fields = dict(vars(qs))
    got = nf4.NF4Tensor.from_bnb((data, qs)).dequantize(torch.float32)
    torch.testing.assert_close(got, std, rtol=0, atol=4e-3 * std.abs().max().item())
    assert p.quant_state is qs and p.data.data_ptr() == data.data_ptr() and torch.equal(p.data, before)
    assert qs.packing_format_for_cpu
    assert set(vars(qs)) == set(fields) and all(vars(qs)[k] is v for k, v in fields.items())


def test_load_adapter_into_one_adapter_leaves_a_shared_config_alone(tmp_path):
    # add_adapter("b", cfg) with the first adapter's cfg: PEFT stores one object for both;
    # load_adapter(adapter_name="b") used to rewrite the "default" adapter's config through it
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    pm = get_peft_model(tiny_llama(), cfg)
    pm.add_adapter("b", cfg)
    assert pm.peft_config["default"] is pm.peft_config["b"]
    src = peft_model(lora_alpha=32, target_modules=["q_proj", "v_proj"], seed=0)
    lora_fast.save_adapter(src, tmp_path / "a")
    lora_fast.load_adapter(pm, tmp_path / "a", adapter_name="b")
    assert pm.peft_config["b"].lora_alpha == 32 and pm.peft_config["default"].lora_alpha == 8


def test_save_adapter_refuses_bias_all_with_frozen_biases(tmp_path):
    # PEFT saves bias="all" biases whether or not they still require grad: a model with biases
    # cannot be written by save_adapter (A/B only), frozen or not
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"))
    pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias = nn.Parameter(torch.zeros(64))
    for n, p in pm.named_parameters():
        if n.endswith(".bias"):
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="bias='all', which trains biases"):
        lora_fast.save_adapter(pm, tmp_path / "a")


def test_add_adapter_after_unpatch_of_the_inner_model_converts_nothing():
    pm = peft_model(target_modules=["q_proj"])
    lora_fast.patch(pm)
    assert len(lora_fast.unpatch(pm.get_base_model())) == 2
    pm.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]))
    assert not any(isinstance(m, _FastForwardMixin) for m in pm.modules())


def test_add_adapter_after_patch_warns_only_about_the_new_layers(recwarn):
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(RuntimeWarning, match="embed_tokens"):
        lora_fast.patch(pm)
    recwarn.clear()
    pm.add_adapter("x", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"]))
    assert not [w for w in recwarn if "lora_fast" in str(w.message)]
    assert sum(isinstance(m, _FastForwardMixin) for m in pm.modules()) == 4


def test_add_adapter_after_a_patch_that_skipped_every_layer_still_converts():
    # a model whose only adapter patch() had to skip (DoRA) got no conversion of later adapters
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    with pytest.warns(RuntimeWarning, match="DoRA"):
        report = lora_fast.patch(pm)
    assert report.converted == []
    pm.add_adapter("plain", LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]))
    assert sum(isinstance(m, _FastForwardMixin) for m in pm.modules()) == 4


# ---- torch.compile ---------------------------------------------------------------------------------

def test_compile_dynamic_fullgraph_on_lora_layers(monkeypatch):
    # the finite-scaling check called math.isfinite on the symbolic scaling of dynamic=True:
    # fullgraph=True failed, and without it every LoRA layer broke the graph
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    lora_fast.apply_lora(model, target_modules=["0", "2"], r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    compiled = torch.compile(model, backend="eager", dynamic=True, fullgraph=True)
    for m in (3, 7):
        x = torch.randn(m, 32)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("dynamic", [None, True])
def test_non_finite_scaling_is_refused_in_a_compiled_model(dynamic, monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    layer = lora_fast.LoRALinear.from_linear(nn.Linear(16, 8), r=2)
    layer.scaling = float("nan")
    compiled = torch.compile(layer, backend="eager", dynamic=dynamic)
    with pytest.raises(ValueError, match="scaling must be finite"):
        compiled(torch.randn(3, 16))


def test_compiled_qlora_model_survives_merge_and_unmerge(monkeypatch):
    # PEFT's unmerge re-quantises the 4-bit base into a new Params4bit: the compiled model met a
    # stale NF4 view and stopped with "Observed exception"; the patched layer now rebuilds it
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    pm = peft_model(nf4=True, target_modules=["q_proj", "v_proj"]).eval()
    lora_fast.patch(pm)
    ids = batch()["input_ids"]
    compiled = torch.compile(pm, backend="eager", fullgraph=True)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, want)
        pm.merge_adapter()
        torch.testing.assert_close(compiled(input_ids=ids).logits, pm(input_ids=ids).logits)  # (re-quantised)
        pm.unmerge_adapter()
        torch.testing.assert_close(compiled(input_ids=ids).logits, pm(input_ids=ids).logits)


@pytest.mark.parametrize("needs", [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]])
def test_lora_bwd_unneeded_gradients_match_the_fake_kernel(needs, monkeypatch):
    # fp16 activations with fp32 adapters: an unneeded gradient's placeholder was fp16 in the real
    # op and fp32 in the fake one (opcheck's test_faketensor failed)
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    x = torch.randn(7, 64, dtype=torch.float16)
    w = torch.randn(33, 64, dtype=torch.float16) * 0.1
    A, B = torch.randn(4, 64) * 0.1, torch.randn(33, 4) * 0.1
    seed = torch.tensor(0)
    y, xa = torch.ops.lora_fast.lora_fwd(x, w, None, None, None, None, None, A, B, seed, 2.0, 0.0, [], 0.0)
    args = (torch.randn_like(y), x, xa, w, None, None, None, None, A, B, seed, 2.0, 0.0, [], 0.0, needs)
    torch.library.opcheck(torch.ops.lora_fast.lora_bwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
