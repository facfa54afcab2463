"""Edge cases of the public API found by black-box review (session 6): each test failed on the
code before its fix.  CPU: the torch backend, and the Triton kernels in the interpreter."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoRALinear, NF4LoRALinear, nf4
from lora_fast._backend import BackendUnavailableError

bnb = pytest.importorskip("bitsandbytes")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter / CPU bitsandbytes")


def _nf4_layer(seed=0, scale=1.0):
    torch.manual_seed(seed)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(scale)
    layer = NF4LoRALinear.from_linear(lin, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


# ---- the NF4 double-quantisation offset -------------------------------------------------------

def test_nf4_offset_loaded_in_inference_mode_reaches_the_forward(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    src = _nf4_layer(0)
    x = torch.randn(3, 64)
    want = src(x)
    sd = src.state_dict()
    with torch.inference_mode():
        dst = _nf4_layer(1, scale=5.0)
        assert dst.nf4_offset.item() != src.nf4_offset.item()
        dst.load_state_dict(sd)  # in place into inference tensors (no version counter)
        got = dst(x)
    assert torch.equal(got, want)


def test_nf4_offset_loaded_after_compile_reaches_the_compiled_forward(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    src, dst = _nf4_layer(0), _nf4_layer(1, scale=5.0)
    x = torch.randn(3, 64)
    compiled = torch.compile(dst, backend="aot_eager")
    compiled(x)
    dst.load_state_dict(src.state_dict())  # resume from a checkpoint after compiling
    assert torch.equal(compiled(x), src(x))


def test_nf4_offset_buffer_data_swap_reaches_the_forward(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    src, dst = _nf4_layer(0), _nf4_layer(1, scale=5.0)
    x = torch.randn(3, 64)
    dst(x)  # caches the old offset
    for name in ("nf4_packed", "nf4_absmax", "nf4_absmax2", "nf4_code2", "nf4_offset"):
        getattr(dst, name).data = getattr(src, name).data.clone()
    for name in ("lora_A", "lora_B", "bias"):
        getattr(dst, name).data = getattr(src, name).data.clone()
    assert torch.equal(dst(x), src(x))


# ---- the grouped call --------------------------------------------------------------------------

@CPU_ONLY
def test_grouped_trainable_base_gets_its_gradient(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    q = LoRALinear.from_linear(nn.Linear(64, 32), r=4)
    k = LoRALinear.from_linear(nn.Linear(64, 16), r=4)
    q.weight.requires_grad_(True)
    x = torch.randn(5, 64)
    lora_fast.dispatch_stats(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yq, yk = lora_fast.lora_linear_grouped(x, [q, k])
        (yq.sum() + yk.sum()).backward()
    assert q.weight.grad is not None
    want = torch.ones(5, 32).t() @ x
    torch.testing.assert_close(q.weight.grad, want)
    assert lora_fast.dispatch_stats().get("grouped:per_layer(trainable base weight)") == 1


def test_grouped_compiles_fullgraph(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch._dynamo.reset()
    torch.manual_seed(0)
    q = LoRALinear.from_linear(nn.Linear(16, 8), r=2)
    k = LoRALinear.from_linear(nn.Linear(16, 4), r=2)
    x = torch.randn(3, 16)
    fn = torch.compile(lambda t: lora_fast.lora_linear_grouped(t, [q, k]), fullgraph=True, backend="aot_eager")
    got = fn(x)
    for g, layer in zip(got, (q, k)):
        torch.testing.assert_close(g, layer(x))


def test_grouped_names_a_layer_that_is_not_lora():
    q = LoRALinear.from_linear(nn.Linear(16, 8), r=2)
    with pytest.raises(TypeError, match="layer 1 is a Linear"):
        lora_fast.lora_linear_grouped(torch.randn(3, 16), [q, nn.Linear(16, 8)])


# ---- torch.func -------------------------------------------------------------------------------

@pytest.mark.parametrize("nf4_base", [False, True])
def test_torch_func_grad_and_vmap_run_the_reference(monkeypatch, nf4_base):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    layer = NF4LoRALinear.from_linear(lin, r=3) if nf4_base else LoRALinear.from_linear(lin, r=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p, xb):
        return torch.func.functional_call(layer, p, (xb,)).pow(2).sum()

    g = torch.func.grad(loss)(params, x)
    want = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in layer.named_parameters()}
    ref_loss = torch.func.functional_call(layer, want, (x,)).pow(2).sum()
    ref_loss.backward()
    for n in ("lora_A", "lora_B"):
        torch.testing.assert_close(g[n], want[n].grad)
    per_sample = torch.func.vmap(lambda xb: layer(xb))(x.view(4, 1, 12))
    torch.testing.assert_close(per_sample.view(4, 6), layer(x))


# ---- the kernels' input checks ----------------------------------------------------------------

@CPU_ONLY
@pytest.mark.parametrize("what", ["base", "bias"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fp64_base_or_bias_is_refused_by_the_kernels_and_falls_back_under_auto(monkeypatch, what, p):
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64 if what == "base" else torch.float32)
    bias = torch.randn(6, dtype=torch.float64) if what == "bias" else None
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    x = torch.randn(4, 8)
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=f"the {'base weight' if what == 'base' else 'bias'} is "
                                                       "torch.float64"):
        lora_fast.lora_linear(x, w, bias, A, B, 2.0, p)
    # a kernel-side refusal under ``auto`` is the visible fallback to the reference (on CPU ``auto``
    # is the reference already): same numbers as the reference either way
    monkeypatch.setenv("LORA_FAST_BACKEND", "auto")
    torch.manual_seed(1)
    y = lora_fast.lora_linear(x, w, bias, A, B, 2.0, 0.0)
    want = (x.double() @ w.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
            + (0 if bias is None else bias.double()))
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_nf4_tensor_base_must_be_2d():
    q3 = nf4.quantize(torch.randn(4, 6, 5))
    with pytest.raises(ValueError, match="must be 2-D"):
        lora_fast.lora_linear(torch.randn(2, 6), q3, None, torch.randn(2, 6), torch.randn(4, 2), 1.0)
    q1 = nf4.quantize(torch.randn(64))
    with pytest.raises(ValueError, match="must be 2-D"):
        lora_fast.lora_linear(torch.randn(2, 64), q1, None, torch.randn(2, 64), torch.randn(1, 2), 1.0)


def test_nan_scaling_is_refused():
    with pytest.raises(ValueError, match="scaling must be finite"):
        lora_fast.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 4), torch.randn(3, 2),
                              float("nan"))


# ---- fp16 adapter gradients on the torch backend ----------------------------------------------

def test_torch_backend_fp16_adapter_grads_do_not_overflow(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    m, k, n, r = 512, 64, 64, 4
    x = torch.randn(m, k).half()
    w = (torch.randn(n, k) * 0.05).half()
    A = (torch.randn(r, k) * 0.5).requires_grad_(True)
    B = (torch.randn(n, r) * 0.5).requires_grad_(True)
    dy = torch.full((m, n), 256.0).half()  # a loss-scaled gradient
    y = lora_fast.lora_linear(x, w, None, A, B, 2.0)
    y.backward(dy)
    xd, Ad, Bd, dyd = x.double(), A.detach().double(), B.detach().double(), dy.double()
    want_da = 2.0 * (dyd @ Bd).t() @ xd
    want_db = 2.0 * dyd.t() @ (xd @ Ad.t())
    assert want_da.abs().max() > 65504  # the fp16 product would overflow
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
    torch.testing.assert_close(A.grad.double(), want_da, rtol=2e-3, atol=1.0)
    torch.testing.assert_close(B.grad.double(), want_db, rtol=2e-3, atol=1.0)


# ---- construction errors ----------------------------------------------------------------------

def test_from_linear_points_a_bitsandbytes_layer_to_from_bnb():
    m = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")
    m = m.to("cpu")
    for cls in (LoRALinear, NF4LoRALinear):
        with pytest.raises(TypeError, match="from_bnb"):
            cls.from_linear(m, r=4)


def test_quantising_a_meta_weight_names_the_meta_device():
    with pytest.raises(ValueError, match="meta device"):
        NF4LoRALinear.from_linear(nn.Linear(64, 32, device="meta"), r=4)


def test_numpy_integer_rank_is_accepted():
    layer = LoRALinear.from_linear(nn.Linear(16, 8), r=np.int64(4))
    assert layer.r == 4 and type(layer.r) is int
    assert layer.lora_A.shape == (4, 16)


# ---- patch() of PEFT models ---------------------------------------------------------------------

peft = pytest.importorskip("peft")


class _Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(16, 8, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def _peft_net(dtype=torch.float32, **cfg):
    torch.manual_seed(0)
    kw = dict(r=2, lora_alpha=4, target_modules=["proj"])
    kw.update(cfg)
    pm = peft.get_peft_model(_Net(dtype), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return pm


@pytest.mark.parametrize("where", ["base_layer", "lora_A", "lora_B", "lora_dropout"])
def test_patched_layer_runs_peft_forward_when_its_submodules_have_hooks(monkeypatch, where):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    import copy

    pm = _peft_net()
    fast = copy.deepcopy(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora_fast.patch(fast)
    x = torch.randn(3, 16)
    calls = {"peft": 0, "fast": 0}

    def hook(tag):
        def h(mod, inp, out):
            calls[tag] += 1
            return out * 0.5  # the hook changes the output, as activation steering does

        return h

    for tag, m in (("peft", pm), ("fast", fast)):
        layer = m.base_model.model.proj
        sub = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        sub.register_forward_hook(hook(tag))
    lora_fast.dispatch_stats(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_fast = fast(x)
    y_peft = pm(x)
    assert calls == {"peft": 1, "fast": 1}
    torch.testing.assert_close(y_fast, y_peft)
    assert any(k.startswith("peft:fallback(hooks") for k in lora_fast.dispatch_stats())


def test_patched_float64_peft_model_runs_like_peft(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    import copy

    pm = _peft_net(torch.float64)
    fast = copy.deepcopy(pm)
    rep = lora_fast.patch(fast)
    assert rep.converted == ["base_model.model.proj"]
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = fast(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, pm(x))
    y.sum().backward()
    assert fast.base_model.model.proj.lora_A["default"].weight.grad.dtype == torch.float64


def test_group_siblings_is_checked_before_anything_changes():
    pm = _peft_net()
    for bad, exc, msg in ((["q_proj", "k_proj", "v_proj"], TypeError, "list of sets"),
                          ([("q_proj", "k_proj"), ("v_proj", "k_proj")], ValueError, "'k_proj' is named in two"),
                          ([("q_proj",)], ValueError, "fewer than two")):
        with pytest.raises(exc, match=msg):
            lora_fast.patch(pm, group_siblings=bad)
        assert type(pm.base_model.model.proj).__name__ == "Linear"  # nothing converted


def test_multi_adapter_dropout_in_eval_converts(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    pm = _peft_net(lora_dropout=0.1)
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], lora_dropout=0.1))
    pm.base_model.set_adapter(["default", "b"])
    pm.eval()
    rep = lora_fast.patch(pm)
    assert rep.converted == ["base_model.model.proj"] and not rep.skipped


def test_count_parameters_counts_bnb_4bit_weights_like_peft():
    m = _Net()
    q = bnb.nn.Linear4bit(16, 8, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(m.proj.weight.data.clone(), requires_grad=False, quant_type="nf4")
    m.proj = q.to("cpu")
    trainable, total = lora_fast.count_parameters(m)
    assert total == 16 * 8 + 8 and trainable == 8  # the weight's logical elements, and the bias


def test_apply_lora_names_a_bad_target_modules():
    with pytest.raises(TypeError, match="target_modules"):
        lora_fast.apply_lora(_Net(), target_modules=None)


# ---- fused cross entropy ----------------------------------------------------------------------

@pytest.mark.parametrize("shift", [0.0, 1e6, -1e7, 1e30])
def test_cross_entropy_is_shift_invariant_for_large_logits(monkeypatch, shift):
    monkeypatch.setenv("LORA_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    base = torch.randn(6, 300) * 3
    target = torch.randint(0, 300, (6,))
    want = torch.nn.functional.cross_entropy(base.double(), target)
    logits = (base.double() + shift).float().requires_grad_(True)  # exact softmax is unchanged by the shift
    exact = torch.nn.functional.cross_entropy(logits.detach().double(), target)
    loss = lora_fast.cross_entropy(logits, target)
    loss.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(ref_logits, target).backward()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-7)
    assert abs(logits.grad.sum().item()) < 1e-5  # each row's gradient sums to 0
    if shift == 0.0:
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_int32_targets_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    logits = torch.randn(5, 11)
    t = torch.randint(0, 11, (5,))
    torch.testing.assert_close(lora_fast.cross_entropy(logits, t.int()), lora_fast.cross_entropy(logits, t))


# ---- adapter I/O ------------------------------------------------------------------------------

def _tiny_llama_peft():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    m = transformers.LlamaForCausalLM(cfg)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return pm


def test_load_adapter_refuses_meta_layers_and_save_names_them(tmp_path):
    src = _tiny_llama_peft()
    lora_fast.save_adapter(src, str(tmp_path / "a"))
    with torch.device("meta"):
        dst = _tiny_llama_peft()
    with pytest.raises(lora_fast.AdapterLoadError, match="meta device"):
        lora_fast.load_adapter(dst, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="meta device"):
        lora_fast.save_adapter(dst, str(tmp_path / "b"))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_save_adapter_of_a_compiled_model_has_peft_keys(tmp_path):
    from safetensors.torch import load_file

    src = _tiny_llama_peft()
    lora_fast.save_adapter(torch.compile(src), str(tmp_path / "a"))
    keys = list(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert keys and not any("_orig_mod" in k for k in keys)
    dst = _tiny_llama_peft()
    with torch.no_grad():
        for n, p in dst.named_parameters():
            if "lora_" in n:
                p.zero_()
    loaded = lora_fast.load_adapter(torch.compile(dst), str(tmp_path / "a"))
    assert len(loaded) == 4
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("edit", [{"lora_alpha": float("nan")}, {"lora_alpha": float("inf")},
                                  {"target_modules": ["q_proj"]}, {"layers_to_transform": [0]},
                                  {"exclude_modules": ["v_proj"]}])
def test_load_adapter_checks_config_against_the_weights(tmp_path, edit):
    import json as _json

    src = _tiny_llama_peft()
    d = tmp_path / "a"
    lora_fast.save_adapter(src, str(d))
    cfg = _json.loads((d / "adapter_config.json").read_text())
    cfg.update(edit)
    (d / "adapter_config.json").write_text(_json.dumps(cfg))
    dst = _tiny_llama_peft()
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    with pytest.raises(lora_fast.AdapterLoadError, match="lora_alpha must be a finite|do not select them"):
        lora_fast.load_adapter(dst, str(d))
    for n, p in dst.named_parameters():
        assert torch.equal(p, before[n]), n  # unchanged


def test_load_adapter_path_errors(tmp_path):
    src = _tiny_llama_peft()
    lora_fast.save_adapter(src, str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="is a file; pass the adapter directory"):
        lora_fast.load_adapter(src, str(tmp_path / "a" / "adapter_model.safetensors"))
    m = nn.Sequential(LoRALinear.from_linear(nn.Linear(8, 4), r=2))
    lora_fast.save_adapter(m, tmp_path / "b")  # a pathlib.Path works
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        lora_fast.load_adapter(m, tmp_path / "b", adapter_name="zzz")
    with pytest.raises(ValueError, match="LoRALinear itself"):
        lora_fast.save_adapter(m[0], tmp_path / "c")


# ---- fuse_ops on GPT-2 style heads ------------------------------------------------------------

def test_fuse_ops_installs_the_loss_of_an_lm_head_model(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("LORA_FAST_BACKEND", "torch")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                                             n_positions=16)).eval()
    ids = torch.randint(0, 64, (2, 8))
    want = m(input_ids=ids, labels=ids).loss
    rep = lora_fast.fuse_ops(m)
    assert "loss_function" in rep.converted and not rep.skipped
    torch.testing.assert_close(m(input_ids=ids, labels=ids).loss, want)
    lora_fast.unfuse_ops(m)


# ---- bench CLI arguments ----------------------------------------------------------------------

@pytest.mark.parametrize("args,msg", [(["--cases", ""], "names nothing"), (["--budget", "-5"], "positive"),
                                      (["--interpret"], "interpreter"), (["--providers", "nope"], "unknown provider"),
                                      (["--out", "/proc/lora_fast_nope/x"], "cannot create the results folder")])
def test_bench_cli_refuses_bad_arguments_before_running(args, msg, capsys):
    from bench import cli

    with pytest.raises(SystemExit) as exc:
        cli.run(args, log=lambda *a: None)
    text = str(exc.value.code) + capsys.readouterr().err
    assert msg in text


# ---- review of the session's own changes --------------------------------------------------------

def test_nf4_rows_configs_hold_whole_quantisation_blocks():
    from kernels import nf4 as knf4

    assert all(c.kwargs["BLOCK_K"] % knf4.ROWS_MAX_QBLOCK == 0 for c in knf4.ROWS_CONFIGS)
    odd = [*knf4.ROWS_CONFIGS, type(knf4.ROWS_CONFIGS[0])({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=8)]
    kept = knf4.prune_rows(odd, {}, QBLOCK=256, HAS_MERGE=False, IEEE=False)
    assert kept and all(c.kwargs["BLOCK_K"] % 256 == 0 for c in kept)


@pytest.mark.parametrize("impl", ["peft", "fallback"])
@pytest.mark.parametrize("cfg,path,want", [
    ({"target_modules": ["model.layers.0.q_proj"], "layers_to_transform": [1]}, "model.layers.0.q_proj", True),
    ({"target_modules": ["proj"], "layers_to_transform": [1]}, "model.layers.1.experts.0.proj", True),
    ({"target_modules": ["proj"], "layers_to_transform": [0]}, "model.layers.1.experts.0.proj", False),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "layers"}, "layers.0.q_proj", True),
    ({"target_modules": ["q_proj"], "layers_to_transform": []}, "model.layers.3.q_proj", True),
    ({"target_modules": ["q_proj"], "layers_to_transform": 2}, "model.layers.2.q_proj", True),
    ({"target_modules": ["q_proj"], "exclude_modules": ["layers.1.q_proj"]}, "model.layers.1.q_proj", False),
    ({"target_modules": r".*\.(q|v)_proj"}, "model.layers.1.v_proj", True),
    ({"target_modules": r".*\.(q|v)_proj"}, "model.layers.1.k_proj", False),
])
def test_adapter_config_target_rules_follow_peft(impl, cfg, path, want):
    from lora_fast import adapter_io

    full = {"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, **cfg}
    fn = adapter_io._config_targets if impl == "peft" else adapter_io._targets_fallback
    assert fn(full, path) is want


def test_adapter_of_compiled_submodules_round_trips_with_peft(tmp_path):
    from safetensors.torch import load_file

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.q_proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([torch.compile(Block()) for _ in range(2)])

        def forward(self, x):
            for b in self.layers:
                x = b(x)
            return x

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(str(tmp_path / "peft"))
    lora_fast.save_adapter(pm, str(tmp_path / "lf"))
    assert set(load_file(str(tmp_path / "lf" / "adapter_model.safetensors"))) == set(
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert len(lora_fast.load_adapter(pm, str(tmp_path / "peft"))) == 2


def test_apply_lora_takes_a_generator_of_names():
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lora_fast.apply_lora(m, target_modules=(n for n in ["0", "1"]), r=2)
    assert isinstance(m[0], LoRALinear) and isinstance(m[1], LoRALinear)
