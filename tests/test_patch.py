"""lora_fast.patch on PEFT models (tiny random Llama, dense and NF4 base), apply_lora without
PEFT, multi-adapter behaviour, and the LoRA+ helper.  CPU only: the torch reference backend."""
import copy
import warnings

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear
from lora_fast.patch import _FastForwardMixin

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

T7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 8


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def to_nf4(model):
    """Replace the seven projections by bitsandbytes NF4 Linear4bit layers, quantised on CPU."""
    import bitsandbytes as bnb

    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in T7 and type(mod) is nn.Linear:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to("cpu"))  # .to(device) quantises
    model.is_loaded_in_4bit = True  # PEFT then uses its bnb Linear4bit LoRA layer
    return model


def base_model(nf4=False, seed=0):
    m = tiny_llama(seed)
    return to_nf4(m) if nf4 else m


def randomise_B(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_model(nf4=False, seed=0, **cfg):
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=T7)
    kw.update(cfg)
    pm = get_peft_model(base_model(nf4, seed), LoraConfig(**kw))
    randomise_B(pm)
    return pm


def batch(n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def assert_grads_close(g1, g2, rtol=1e-4, atol=1e-6):
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=rtol, atol=atol, msg=k)


def patched_layers(model):
    return [m for m in model.modules() if isinstance(m, _FastForwardMixin)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*4-bit linear may get different generations.*")
        warnings.filterwarnings("ignore", message="Already unmerged")  # PEFT: layers without adapter "b"
        yield


# ------------------------------------------------------------------------------ patch basics


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_patch_shares_tensors_and_keeps_outputs(nf4):
    pm = peft_model(nf4).eval()
    b = batch()
    ref = pm(b["input_ids"]).logits
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    A, B, w = q.lora_A["default"].weight, q.lora_B["default"].weight, q.base_layer.weight
    wptr = w.data_ptr()
    lora_fast.dispatch_stats(reset=True)
    report = lora_fast.patch(pm)
    assert len(report.converted) == 14 and report.skipped == {}
    assert "14 LoRA layers converted, 0 skipped" in str(report)
    assert type(q).__name__ == ("LoraFastLinear4bit" if nf4 else "LoraFastLinear")
    assert isinstance(q, peft.tuners.lora.LoraLayer)
    # same Parameter objects, same base storage (no copy, no re-quantisation)
    assert q.lora_A["default"].weight is A and q.lora_B["default"].weight is B
    assert q.base_layer.weight is w and w.data_ptr() == wptr
    out = pm(b["input_ids"]).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert lora_fast.dispatch_stats()["torch:reference"] == 14
    # patching twice is harmless
    assert len(lora_fast.patch(pm).converted) == 14


def test_patch_restores_bnb_cpu_packed_weight():
    # bitsandbytes' Linear4bit.forward on an AVX512-BF16 CPU (eval, no grad) repacks its weight in
    # place into a private layout (tests/conftest.py switches that off for the other tests).  A
    # patched layer must read the standard NF4 layout again, not the repacked bytes.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    pm = peft_model(nf4=True).eval()
    b = batch()
    lora_fast.patch(pm)
    ref = pm(b["input_ids"]).logits
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    w = q.base_layer.weight
    packed = w.data.clone()
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    assert w.quant_state.packing_format_for_cpu and not torch.equal(w.data.reshape(-1), packed.reshape(-1))
    out = pm(b["input_ids"]).logits
    assert not getattr(w.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(w.data.reshape(-1), packed.reshape(-1))  # the standard bytes, restored in place
    # bitsandbytes' repacking stores absmax in bf16, so the restored scales carry a 2^-9 relative
    # rounding: the logits move by ~1e-5; reading the repacked bytes as NF4 would move them by O(1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)
    # the low-level wrapper restores it too (bitsandbytes does the same before saving or moving it)
    w.data, w.quant_state = _convert_weight_packed_for_cpu(w.data, w.quant_state)
    q4 = lora_fast.nf4.NF4Tensor.from_bnb(w)
    assert not getattr(w.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(q4.packed.reshape(-1), packed.reshape(-1))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_training_matches_peft_and_preexisting_optimizer_works(nf4):
    ref = peft_model(nf4)
    fast = copy.deepcopy(ref)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt_fast = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)  # before patch
    lora_fast.patch(fast)
    ref.train(), fast.train()
    curves = ([], [])
    for step in range(20):
        b = batch(seed=100 + step % 2)
        for model, opt, curve in ((ref, opt_ref, curves[0]), (fast, opt_fast, curves[1])):
            opt.zero_grad()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            curve.append(loss.item())
    assert curves[0][-1] < curves[0][0]  # it trains
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=2e-4, atol=1e-5)
    sd_ref = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    sd_fast = {k: v for k, v in fast.state_dict().items() if "lora_" in k}
    for k in sd_ref:
        torch.testing.assert_close(sd_fast[k], sd_ref[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_saved_adapter_loads_in_plain_peft(nf4, tmp_path):
    fast = peft_model(nf4, r=4, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    randomise_B(fast, seed=3)
    lora_fast.patch(fast)
    fast.eval()
    b = batch()
    out = fast(b["input_ids"]).logits
    fast.save_pretrained(tmp_path / "peft")
    lora_fast.save_adapter(fast, str(tmp_path / "lf"))
    for d in ("peft", "lf"):
        plain = PeftModel.from_pretrained(base_model(nf4), str(tmp_path / d)).eval()
        assert not patched_layers(plain)
        torch.testing.assert_close(plain(b["input_ids"]).logits, out, rtol=1e-5, atol=1e-5)
    # and a PEFT-saved adapter loads into the patched model through lora_fast.load_adapter
    other = peft_model(nf4, r=4, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    randomise_B(other, seed=4)
    other.save_pretrained(tmp_path / "other")
    lora_fast.load_adapter(fast, str(tmp_path / "other"))
    torch.testing.assert_close(fast(b["input_ids"]).logits, other.eval()(b["input_ids"]).logits,
                               rtol=1e-5, atol=1e-5)


def test_nf4_merge_unmerge_follows_the_requantised_weight():
    """PEFT's 4-bit merge/unmerge replaces the Params4bit: the patched forward must use the new one."""
    ref = peft_model(nf4=True).eval()
    fast = copy.deepcopy(ref)
    lora_fast.patch(fast)
    ids = batch()["input_ids"]
    before = fast(ids).logits
    for m in (ref, fast):
        m.base_model.merge_adapter()
        m.base_model.unmerge_adapter()  # re-quantised twice: no longer the original bytes
    after = fast(ids).logits
    torch.testing.assert_close(after, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-4)  # the NF4 rounding did change the base
    merged = copy.deepcopy(fast).merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    torch.testing.assert_close(merged(ids).logits, after, rtol=0.05, atol=0.3)  # re-quantised merge: lossy


def test_unpatch_restores_peft_with_trained_weights():
    pm = peft_model()
    lora_fast.patch(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    pm(**batch()).loss.backward()
    opt.step()
    pm.eval()
    out = pm(batch()["input_ids"]).logits
    A = pm.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight
    restored = lora_fast.unpatch(pm)
    assert len(restored) == 14 and not patched_layers(pm)
    layer = pm.base_model.model.model.layers[1].mlp.down_proj
    assert type(layer) is peft.tuners.lora.Linear and layer.lora_A["default"].weight is A
    lora_fast.dispatch_stats(reset=True)
    torch.testing.assert_close(pm(batch()["input_ids"]).logits, out, rtol=1e-5, atol=1e-5)
    assert "torch:reference" not in lora_fast.dispatch_stats()
    assert len(lora_fast.patch(pm).converted) == 14


# ------------------------------------------------------------------------------ training features


def test_hf_trainer_runs_on_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = peft_model()
    lora_fast.patch(pm)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    data = [batch(n=1, seed=s) for s in range(8)]
    data = [{k: v[0] for k, v in d.items()} for d in data]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                             logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    lora_fast.dispatch_stats(reset=True)
    result = Trainer(model=pm, args=args, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert lora_fast.dispatch_stats()["torch:reference"] > 0
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert len(patched_layers(pm)) == 14


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_same_grads(reentrant):
    ref = peft_model()
    fast = copy.deepcopy(ref)
    lora_fast.patch(fast)
    gc = copy.deepcopy(fast)
    gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    gc.enable_input_require_grads()
    assert gc.base_model.model.model.gradient_checkpointing
    b = batch()
    grads = []
    for model in (ref, fast, gc):
        model.train()
        model(**b).loss.backward()
        grads.append(lora_grads(model))
    assert_grads_close(grads[1], grads[0])
    assert_grads_close(grads[2], grads[1], rtol=1e-5, atol=1e-7)


def test_autocast_bf16():
    ref = peft_model()
    fast = copy.deepcopy(ref)
    lora_fast.patch(fast)
    b = batch()
    outs = []
    for model in (ref, fast):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**b)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        outs.append((out.logits.float(), out.loss.item(), lora_grads(model)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0.05, atol=0.05)
    assert abs(outs[1][1] - outs[0][1]) < 0.02
    for k, g in outs[1][2].items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        ref_g = outs[0][2][k]
        assert torch.nn.functional.cosine_similarity(g.flatten(), ref_g.flatten(), dim=0) > 0.98, k


def test_gradient_accumulation_equals_big_batch():
    pm = peft_model()
    lora_fast.patch(pm)
    big = batch(n=4, seed=9)
    pm(**big).loss.backward()
    g_big = lora_grads(pm)
    pm.zero_grad()
    for half in (slice(0, 2), slice(2, 4)):
        (pm(**{k: v[half] for k, v in big.items()}).loss / 2).backward()
    assert_grads_close(lora_grads(pm), g_big, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ multiple adapters


def _two_adapter_models():
    ref = peft_model(seed=0)
    ref.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_B(ref, seed=7)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    fast = copy.deepcopy(ref)
    report = lora_fast.patch(fast)
    assert len(report.converted) == 14
    return ref.eval(), fast.eval()


def test_set_adapter_multi_active_weighted_and_merge():
    ref, fast = _two_adapter_models()
    ids = batch()["input_ids"]

    def same(msg):
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5, msg=msg)

    same("default")
    for m in (ref, fast):
        m.set_adapter("b")
    same("b")
    out_b = fast(ids).logits
    for m in (ref, fast):
        m.base_model.set_adapter(["default", "b"])  # both active: summed
    lora_fast.dispatch_stats(reset=True)
    same("default+b")
    assert not any(k.startswith("peft:") for k in lora_fast.dispatch_stats())
    # gradients reach both adapters through the concatenated kernel call
    fast.train()
    fast(**batch()).loss.backward()
    q = fast.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_B["default"].weight.grad is not None and q.lora_B["b"].weight.grad is not None
    fast.eval()
    for m in (ref, fast):
        m.base_model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "mix", combination_type="cat")
        m.set_adapter("mix")
    same("weighted mix")
    with fast.disable_adapter(), ref.disable_adapter():
        same("disabled")
    # merge_and_unload gives the unmerged outputs (adapter "b")
    fast.set_adapter("b")
    merged = copy.deepcopy(fast).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, out_b, rtol=1e-4, atol=1e-5)
    # merge / unmerge in place on the patched layers
    fast.base_model.merge_adapter()
    torch.testing.assert_close(fast(ids).logits, out_b, rtol=1e-4, atol=1e-5)
    fast.base_model.unmerge_adapter()
    torch.testing.assert_close(fast(ids).logits, out_b, rtol=1e-4, atol=1e-5)


def test_mixed_batch_falls_back_to_peft_and_is_counted():
    from lora_fast import _backend

    ref, fast = _two_adapter_models()
    ids = batch(n=3)["input_ids"]
    names = ["default", "b", "__base__"]
    lora_fast.dispatch_stats(reset=True)
    _backend._warned.discard("patch-fallback:mixed-adapter batch (adapter_names=...)")  # warn once: re-arm
    with pytest.warns(RuntimeWarning, match="mixed-adapter batch"):
        out = fast(ids, adapter_names=names).logits
    torch.testing.assert_close(out, ref(ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)
    assert lora_fast.dispatch_stats()["peft:fallback(mixed-adapter batch (adapter_names=...))"] == 14


# ------------------------------------------------------------------------------ skipped layers


def test_dora_and_multi_active_dropout_are_skipped_with_reasons():
    pm = peft_model(use_dora=True)
    with pytest.warns(RuntimeWarning, match=r"0 LoRA layers converted, 14 skipped"):
        report = lora_fast.patch(pm)
    assert report.converted == [] and len(report.skipped) == 14
    assert all("DoRA" in why for why in report.skipped.values())

    pm = peft_model(lora_dropout=0.1)
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules=["q_proj"]))
    pm.base_model.set_adapter(["default", "b"])
    with pytest.warns(RuntimeWarning, match="skipped"):
        report = lora_fast.patch(pm)
    assert len(report.converted) == 12 and len(report.skipped) == 2
    assert all("several active adapters" in why for why in report.skipped.values())


def test_single_adapter_dropout_runs_on_lora_fast():
    ref = peft_model(lora_dropout=0.2)
    fast = copy.deepcopy(ref)
    assert len(lora_fast.patch(fast).converted) == 14
    ids = batch()["input_ids"]
    torch.testing.assert_close(fast.eval()(ids).logits, ref.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    fast.train()
    lora_fast.dispatch_stats(reset=True)
    torch.manual_seed(0)
    fast(**batch()).loss.backward()
    assert lora_fast.dispatch_stats()["torch:reference"] == 28  # 14 forward + 14 backward, no fallback
    grads = lora_grads(fast)
    assert len(grads) == 28 and all(torch.isfinite(g).all() for g in grads.values())


def test_fan_in_fan_out_and_unsupported_layers_are_skipped():
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.c_attn = Conv1D(8, 8)  # GPT-2 style (in, out) weight
            self.proj = nn.Linear(8, 8)

        def forward(self, ids):
            return self.proj(self.c_attn(self.emb(ids)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "c_attn", "proj"]))
    with pytest.warns(RuntimeWarning, match="2 skipped"):
        report = lora_fast.patch(pm)
    assert report.converted == ["base_model.model.proj"]
    assert "fan_in_fan_out" in report.skipped["base_model.model.c_attn"]
    assert "unsupported PEFT layer type" in report.skipped["base_model.model.emb"]
    pm(torch.tensor([[1, 2, 3]]))


# ------------------------------------------------------------------------------ apply_lora (no PEFT)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_apply_lora_all_linear_matches_peft(nf4):
    base = base_model(nf4)
    model = lora_fast.apply_lora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8)
    cls = NF4LoRALinear if nf4 else LoRALinear
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, NF4LoRALinear))}
    assert len(layers) == 14 and all(type(m) is cls for m in layers.values())
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{w}" for n in layers for w in "AB"}
    # same adapter in PEFT gives the same outputs
    with torch.no_grad():
        for m in layers.values():
            m.lora_B.normal_(0, 0.05)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=T7)).eval()
    with torch.no_grad():
        for n, m in layers.items():
            pl = pm.base_model.model.get_submodule(n)
            pl.lora_A["default"].weight.copy_(m.lora_A)
            pl.lora_B["default"].weight.copy_(m.lora_B)
    ids = batch()["input_ids"]
    torch.testing.assert_close(model.eval()(ids).logits, pm(ids).logits, rtol=1e-5, atol=1e-5)
    # trains
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(3):
        opt.zero_grad()
        loss = model(**batch(seed=1)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_apply_lora_targets_bias_and_errors():
    model = lora_fast.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, lora_alpha=4, lora_dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 4 and all(m.lora_dropout == 0.1 and m.scaling == 2.0 for m in layers)
    model = lora_fast.apply_lora(tiny_llama(), r"model\.layers\.0\.mlp\.(up|down)_proj")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2

    class WithBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

    m = lora_fast.apply_lora(WithBias(), ["a"], r=2, bias="lora_only")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"a.bias", "a.lora_A", "a.lora_B"}
    m = lora_fast.apply_lora(WithBias(), ["a"], r=2, bias="all")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "a.bias", "a.lora_A", "a.lora_B", "b.bias", "norm.bias"}
    with pytest.raises(ValueError, match="matched no module"):
        lora_fast.apply_lora(WithBias(), ["nope"])
    with pytest.raises(TypeError, match="norm is a LayerNorm"):
        lora_fast.apply_lora(WithBias(), ["norm"])
    with pytest.raises(ValueError, match="bias must be"):
        lora_fast.apply_lora(WithBias(), ["a"], bias="some")


# ------------------------------------------------------------------------------ LoRA+


def test_loraplus_param_groups():
    model = lora_fast.apply_lora(tiny_llama(), "all-linear", r=2)
    groups = lora_fast.loraplus_param_groups(model, lr=1e-3, lr_ratio=16.0, weight_decay=0.1)
    by = {g["name"]: g for g in groups}
    assert set(by) == {"lora_B", "other"}
    assert by["lora_B"]["lr"] == pytest.approx(1.6e-2) and by["other"]["lr"] == 1e-3
    assert by["lora_B"]["weight_decay"] == 0.1
    bs = {id(m.lora_B) for m in model.modules() if isinstance(m, LoRALinear)}
    assert {id(p) for p in by["lora_B"]["params"]} == bs and len(by["other"]["params"]) == 14
    opt = torch.optim.AdamW(groups)
    model(**batch()).loss.backward()
    opt.step()

    pm = peft_model()
    groups = lora_fast.loraplus_param_groups(pm, lr=2e-4, lr_ratio=4)
    by = {g["name"]: g for g in groups}
    assert len(by["lora_B"]["params"]) == 14 and by["lora_B"]["lr"] == pytest.approx(8e-4)
    assert all(p.shape[1] == 4 for p in by["lora_B"]["params"])


# ------------------------------------------------------------------------------ sibling groups


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_group_siblings_same_results_and_grouped_calls(nf4, monkeypatch):
    """patch(group_siblings=True) on the Triton backend (interpreter on the CPU): q/k/v and
    gate/up run as grouped calls, with the outputs and adapter gradients of the per-layer
    patched model."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    ref = peft_model(nf4)
    fast = copy.deepcopy(ref)
    lora_fast.patch(ref)
    report = lora_fast.patch(fast, group_siblings=True)
    assert sorted(tuple(n.rsplit(".", 1)[-1] for n in g) for g in report.groups) == \
        [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    ref.train(), fast.train()
    for step in range(2):
        b = batch(seed=200 + step)
        lora_fast.dispatch_stats(reset=True)
        loss_f = fast(**b).loss
        loss_f.backward()
        stats = lora_fast.dispatch_stats()
        loss_r = ref(**b).loss
        loss_r.backward()
        torch.testing.assert_close(loss_f, loss_r, rtol=1e-5, atol=1e-5)
        grouped = {k: v for k, v in stats.items() if "_grouped" in k}
        regime = "merged" if nf4 else "split"
        assert grouped == {f"triton:fwd_grouped3_{regime}": 2, f"triton:bwd_grouped3_{regime}": 2,
                           f"triton:fwd_grouped2_{regime}": 2, f"triton:bwd_grouped2_{regime}": 2}, stats
        assert not any(k.startswith("grouped:") for k in stats), stats
    assert_grads_close(lora_grads(fast), lora_grads(ref), rtol=1e-4, atol=1e-6)
    lora_fast.unpatch(fast)
    assert not any("_lf_group" in m.__dict__ or "_lf_group_handles" in m.__dict__ for m in fast.modules())


def test_group_siblings_called_apart_stay_right(monkeypatch):
    """A member called with another tensor than its group's runs on its own (recorded), and
    outputs computed ahead but never claimed are dropped when the parent returns (recorded)."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    model = peft_model(False)
    lora_fast.patch(model, group_siblings=True)
    mlp = model.base_model.model.model.layers[0].mlp
    x = torch.randn(2, SEQ, 64)
    with torch.no_grad():
        want_gate, want_up = mlp.gate_proj(x), mlp.up_proj(x)
        lora_fast.dispatch_stats(reset=True)
        mlp(x)
        assert lora_fast.dispatch_stats().get("triton:fwd_grouped2_split") == 1
        orig = type(mlp).forward

        def odd_forward(self, h):  # up_proj gets another tensor than gate_proj did
            g = self.gate_proj(h)
            u = self.up_proj(h * 1.0)
            return self.down_proj(self.act_fn(g) * u), g, u

        type(mlp).forward = odd_forward
        try:
            lora_fast.dispatch_stats(reset=True)
            _, g, u = mlp(x)
        finally:
            type(mlp).forward = orig
    torch.testing.assert_close(g, want_gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, want_up, rtol=1e-5, atol=1e-6)
    stats = lora_fast.dispatch_stats()
    assert stats.get("grouped:stash_miss") == 1, stats
    assert not mlp.gate_proj.__dict__["_lf_group"].stash
    # members called directly, outside their parent's forward, run on their own: nothing is
    # stashed that a later call (other weights, grad mode) could pick up
    attn = model.base_model.model.model.layers[0].self_attn
    lora_fast.dispatch_stats(reset=True)
    with torch.no_grad():
        attn.q_proj(x)
    k = attn.k_proj(x)
    assert k.requires_grad
    group = attn.q_proj.__dict__["_lf_group"]
    assert not group.stash and group.stash_x is None
    assert not any("_grouped" in key for key in lora_fast.dispatch_stats())
    # patching again without grouping removes the groups
    assert lora_fast.patch(model).groups == []
    assert not any("_lf_group" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("reentrant", [True, False])
def test_group_siblings_under_gradient_checkpointing(reentrant, monkeypatch):
    """Grouped siblings inside checkpointed decoder layers (the recompute runs the parent again:
    probe, grouped call and stash must give the same gradients as the plain patched model)."""
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    ref = peft_model()
    lora_fast.patch(ref)
    gc = copy.deepcopy(ref)
    lora_fast.unpatch(gc)
    lora_fast.patch(gc, group_siblings=True)
    gc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    gc.enable_input_require_grads()
    ref.train(), gc.train()
    for step in range(2):
        b = batch(seed=300 + step)
        for model in (ref, gc):
            for p in model.parameters():
                p.grad = None
        lora_fast.dispatch_stats(reset=True)
        gc(**b).loss.backward()
        stats = lora_fast.dispatch_stats()
        ref(**b).loss.backward()
        assert_grads_close(lora_grads(gc), lora_grads(ref), rtol=1e-4, atol=1e-6)
    assert any("_grouped3_" in k for k in stats) and not any(k.startswith("grouped:") for k in stats), stats
    # nothing stays referenced after backward (a non-reentrant recompute stops early, inside the
    # parent's forward: the parent's post-hook must still run)
    for m in gc.modules():
        group = m.__dict__.get("_lf_group")
        if group is not None:
            assert group.stash_x is None and not group.stash and group.active == 0
