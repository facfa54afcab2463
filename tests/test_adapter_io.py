"""Adapter files in PEFT's format: PEFT <-> lora_fast round trips (dense and NF4 base) and
every malformed input raising before the model is touched."""
import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import AdapterLoadError, LoRALinear, NF4LoRALinear, load_adapter, save_adapter

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TARGETS = ["up", "mid.0", "down"]  # module paths adapted in every test model
RANKS = {"up": 4, "mid.0": 4, "down": 2}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.GELU())
        self.down = nn.Linear(32, 24, bias=False)
        self.head = nn.Linear(24, 4)  # never adapted

    def forward(self, x):
        return self.head(torch.tanh(self.down(self.mid(torch.relu(self.up(x))))))


def _get(model, path):
    return model.get_submodule(path)


def _set(model, path, module):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _lf_model(base, ranks=RANKS, alpha=16, use_rslora=False, nf4=False):
    """lora_fast model: the target Linears of a copy of ``base`` replaced (adapter random)."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    for path, r in ranks.items():
        lin = _get(model, path)
        if nf4:
            layer = NF4LoRALinear.from_bnb(lin, r=r, lora_alpha=alpha, use_rslora=use_rslora)
        else:
            layer = LoRALinear.from_linear(lin, r=r, lora_alpha=alpha, use_rslora=use_rslora)
        _set(model, path, layer)
    return model


def _randomise_lf(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (LoRALinear, NF4LoRALinear)):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.3)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)


def _peft_model(base, **cfg):
    kw = dict(r=4, lora_alpha=8, target_modules=["up", "0", "down"], rank_pattern={"down": 2}, alpha_pattern={"up": 3})
    kw.update(cfg)
    pm = get_peft_model(base, LoraConfig(**kw))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def _bnb_base(base):
    """``base`` with the target Linears replaced by bitsandbytes Linear4bit (NF4, quantised on CPU)."""
    import bitsandbytes as bnb

    model = copy.deepcopy(base)
    for path in TARGETS:
        lin = _get(model, path)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        _set(model, path, q.to("cpu"))  # .to(device) quantises
    model.is_loaded_in_4bit = True  # PEFT then wraps them with its bnb Linear4bit LoRA layer
    return model


@pytest.fixture
def base():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def x():
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------ round trips


def test_peft_to_lora_fast_dense(base, x, tmp_path):
    pm = _peft_model(copy.deepcopy(base))
    pm.save_pretrained(tmp_path)
    lf = _lf_model(base).eval()  # alpha=16 everywhere: must be replaced by the config's
    loaded = load_adapter(lf, str(tmp_path))
    assert sorted(loaded) == sorted(TARGETS)
    torch.testing.assert_close(lf(x), pm(x), rtol=1e-5, atol=1e-5)
    assert lf.up.lora_alpha == 3 and lf.up.scaling == 3 / 4
    assert lf.down.lora_alpha == 8 and lf.down.scaling == 8 / 2
    # weights are copied into the existing parameters (an optimizer keeps working)
    sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    torch.testing.assert_close(lf.mid[0].lora_B.data, sd["base_model.model.mid.0.lora_B.weight"])


def test_lora_fast_to_peft_dense(base, x, tmp_path):
    lf = _lf_model(base, ranks={"up": 4, "mid.0": 6, "down": 6}, alpha=12)
    lf.up.lora_alpha, lf.up.scaling = 5, 5 / 4
    _randomise_lf(lf)
    lf.eval()
    save_adapter(lf, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 6 and cfg["lora_alpha"] == 12
    assert cfg["rank_pattern"] == {"up": 4} and cfg["alpha_pattern"] == {"up": 5}
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["task_type"] is None
    assert sorted(cfg["target_modules"]) == ["0", "down", "up"]
    sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(sd) == sorted(f"base_model.model.{p}.lora_{w}.weight" for p in TARGETS for w in "AB")
    assert sd["base_model.model.up.lora_A.weight"].shape == (4, 16)
    assert sd["base_model.model.down.lora_B.weight"].shape == (24, 6)

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), lf(x), rtol=1e-5, atol=1e-5)
    assert pm.base_model.model.head.__class__ is nn.Linear  # nothing else targeted


def test_rslora_and_hand_edited_scaling_round_trip(base, x, tmp_path):
    lf = _lf_model(base, alpha=8, use_rslora=True)
    _randomise_lf(lf)
    lf.mid[0].scaling *= 0.5  # e.g. after scale_layer: saved as the alpha giving this scaling
    lf.eval()
    save_adapter(lf, str(tmp_path))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), lf(x), rtol=1e-5, atol=1e-5)
    lf2 = _lf_model(base, alpha=1).eval()
    load_adapter(lf2, str(tmp_path))
    assert lf2.up.use_rslora and lf2.up.scaling == pytest.approx(8 / 2)
    torch.testing.assert_close(lf2(x), lf(x), rtol=1e-6, atol=1e-6)


def test_target_modules_regex_when_leaf_names_are_ambiguous(base, x, tmp_path):
    # only mid.0 is adapted, but its leaf name "0" would also select other.0: a regex is written
    lf = _lf_model(base, ranks={"mid.0": 4})
    _randomise_lf(lf)
    lf.eval()
    lf.other = nn.Sequential(nn.Linear(3, 3))  # has a "0" leaf too
    base2 = copy.deepcopy(base)
    base2.other = copy.deepcopy(lf.other)
    save_adapter(lf, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert isinstance(cfg["target_modules"], str)
    pm = PeftModel.from_pretrained(base2, str(tmp_path)).eval()
    assert type(pm.base_model.model.other[0]) is nn.Linear
    torch.testing.assert_close(pm(x), lf(x), rtol=1e-5, atol=1e-5)


def test_peft_model_wrapper_prefix_not_doubled(base, x, tmp_path):
    pm = _peft_model(copy.deepcopy(base))
    save_adapter(pm, str(tmp_path / "a"))  # a PeftModel: paths already carry base_model.model.
    sd = load_file(os.path.join(tmp_path / "a", "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and not k.startswith("base_model.model.base_model") for k in sd)
    pm2 = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a")).eval()
    torch.testing.assert_close(pm2(x), pm(x), rtol=1e-6, atol=1e-6)
    # and a lora_fast-saved adapter loads into the PEFT wrapper (LoraModel too)
    lf = _lf_model(base, ranks={"up": 4, "mid.0": 4, "down": 2})
    _randomise_lf(lf, seed=7)
    lf.eval()
    save_adapter(lf, str(tmp_path / "b"))
    load_adapter(pm, str(tmp_path / "b"))
    torch.testing.assert_close(pm(x), lf(x), rtol=1e-5, atol=1e-5)
    load_adapter(pm.base_model, str(tmp_path / "a"))  # LoraModel: paths start with "model."
    torch.testing.assert_close(pm(x), pm2(x), rtol=1e-6, atol=1e-6)


def test_peft_to_lora_fast_nf4(base, x, tmp_path):
    bnb_base = _bnb_base(base)
    lf = _lf_model(bnb_base, nf4=True).eval()  # shares the same NF4 bytes as bnb_base's copy
    pm = _peft_model(bnb_base)
    assert type(pm.base_model.model.up).__name__ == "Linear4bit"  # PEFT's bnb LoRA layer
    pm.save_pretrained(tmp_path)
    load_adapter(lf, str(tmp_path))
    torch.testing.assert_close(lf(x), pm(x), rtol=1e-5, atol=1e-5)


def test_lora_fast_nf4_to_peft(base, x, tmp_path):
    bnb_base = _bnb_base(base)
    lf = _lf_model(bnb_base, nf4=True, alpha=8)
    _randomise_lf(lf)
    lf.eval()
    save_adapter(lf, str(tmp_path))
    pm = PeftModel.from_pretrained(bnb_base, str(tmp_path)).eval()
    assert type(pm.base_model.model.up).__name__ == "Linear4bit"
    torch.testing.assert_close(pm(x), lf(x), rtol=1e-5, atol=1e-5)


def test_partial_load_with_strict_false(base, x, tmp_path):
    pm = _peft_model(copy.deepcopy(base), target_modules=["up"], rank_pattern={}, alpha_pattern={})
    pm.save_pretrained(tmp_path)
    lf = _lf_model(base)
    before = lf.down.lora_A.detach().clone()
    with pytest.raises(AdapterLoadError, match=r"no weights for LoRA layers \['mid.0', 'down'\]"):
        load_adapter(lf, str(tmp_path))
    assert load_adapter(lf, str(tmp_path), strict=False) == ["up"]
    assert torch.equal(lf.down.lora_A, before)


def test_save_refuses_model_without_lora(base, tmp_path):
    with pytest.raises(ValueError, match="holds no LoRA layers"):
        save_adapter(base, str(tmp_path))


@pytest.mark.parametrize("cfg, pattern", [
    (dict(use_dora=True), r"uses a LoRA variant \(DoraLinearVariant\)"),
    (dict(modules_to_save=["head"]), r"trains more than LoRA A/B \(modules_to_save=\['head'\]\)"),
    (dict(bias="all"), r"trains more than LoRA A/B \(bias='all', which trains biases such as"),
])
def test_save_refuses_peft_features_it_cannot_write(base, tmp_path, cfg, pattern):
    pm = _peft_model(copy.deepcopy(base), **cfg)
    with pytest.raises(ValueError, match=pattern):
        save_adapter(pm, str(tmp_path))
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")


def test_several_active_peft_adapters_need_a_name(base, x, tmp_path):
    pm = _peft_model(copy.deepcopy(base))
    pm.add_adapter("other", LoraConfig(r=2, target_modules=["up"]))
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="several active PEFT adapters"):
        save_adapter(pm, str(tmp_path))
    save_adapter(pm, str(tmp_path), adapter_name="other")
    sd = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(sd) == ["base_model.model.up.lora_A.weight", "base_model.model.up.lora_B.weight"]
    assert sd["base_model.model.up.lora_A.weight"].shape == (2, 16)


# ------------------------------------------------------------------------------ bad input


def _state(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hp = [(m.r, m.lora_alpha, m.scaling, m.use_rslora, m.lora_dropout) for m in model.modules()
          if isinstance(m, LoRALinear)]
    return sd, hp


def _assert_unchanged(model, state):
    sd, hp = _state(model)
    assert sd.keys() == state[0].keys()
    for k in sd:
        assert torch.equal(sd[k], state[0][k]), k
    assert hp == state[1]


@pytest.fixture
def good_dir(base, tmp_path):
    lf = _lf_model(base)
    _randomise_lf(lf, seed=5)
    d = tmp_path / "good"
    save_adapter(lf, str(d))
    return d


def _edit_config(d, **changes):
    cfg = json.load(open(d / "adapter_config.json"))
    cfg.update(changes)
    json.dump(cfg, open(d / "adapter_config.json", "w"))


def _edit_weights(d, fn):
    sd = load_file(str(d / "adapter_model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "adapter_model.safetensors"))


KA = "base_model.model.up.lora_A.weight"
KB = "base_model.model.down.lora_B.weight"


def _corrupt_trunc(d):
    p = d / "adapter_model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _corrupt_garbage(d):
    (d / "adapter_model.safetensors").write_bytes(os.urandom(300))


def _json_trunc(d):
    p = d / "adapter_config.json"
    p.write_text(p.read_text()[:40])


def _pickle_only(d):
    os.remove(d / "adapter_model.safetensors")
    torch.save({}, d / "adapter_model.bin")


BAD_CASES = {
    "missing_config": (lambda d: os.remove(d / "adapter_config.json"), FileNotFoundError, r"adapter_config\.json not found"),
    "missing_weights": (lambda d: os.remove(d / "adapter_model.safetensors"), FileNotFoundError,
                        r"adapter_model\.safetensors not found"),
    "pickle_only": (_pickle_only, AdapterLoadError, r"pickle files are never loaded"),
    "truncated_safetensors": (_corrupt_trunc, AdapterLoadError, r"adapter_model\.safetensors: cannot read safetensors"),
    "garbage_safetensors": (_corrupt_garbage, AdapterLoadError, r"adapter_model\.safetensors: cannot read safetensors"),
    "truncated_json": (_json_trunc, AdapterLoadError, r"adapter_config\.json: not valid JSON"),
    "json_not_object": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), AdapterLoadError,
                        r"adapter_config\.json: expected a JSON object"),
    "not_lora": (lambda d: _edit_config(d, peft_type="IA3"), AdapterLoadError, r"peft_type is 'IA3'"),
    "dora": (lambda d: _edit_config(d, use_dora=True), AdapterLoadError, r"use_dora=True is not supported"),
    "bias_all": (lambda d: _edit_config(d, bias="all"), AdapterLoadError, r"bias='all' is not supported"),
    "bad_r": (lambda d: _edit_config(d, r=0), AdapterLoadError, r"r must be a positive integer"),
    "bad_dropout": (lambda d: _edit_config(d, lora_dropout=1.5), AdapterLoadError, r"lora_dropout must be"),
    "r_mismatch": (lambda d: _edit_config(d, rank_pattern={"down": 4}), AdapterLoadError,
                   r"r mismatch for down: the config gives r=4 but base_model\.model\.down\.lora_A\.weight has 2 rows"),
    "unknown_module": (lambda d: _edit_weights(d, lambda sd: sd.update({
        "base_model.model.head.lora_A.weight": torch.zeros(4, 24), "base_model.model.head.lora_B.weight": torch.zeros(4, 4)})),
        AdapterLoadError, r"entries for modules that are not LoRA layers of the model: \['head'\]"),
    "missing_module": (lambda d: _edit_weights(d, lambda sd: [sd.pop(k) for k in list(sd) if ".mid.0." in k]),
                       AdapterLoadError, r"no weights for LoRA layers \['mid\.0'\]"),
    "missing_B": (lambda d: _edit_weights(d, lambda sd: sd.pop(KB)), AdapterLoadError,
                  r"base_model\.model\.down\.lora_B\.weight is missing"),
    "shape_mismatch": (lambda d: _edit_weights(d, lambda sd: sd.update({KA: torch.zeros(4, 17)})), AdapterLoadError,
                       r"shape mismatch for base_model\.model\.up\.lora_A\.weight: file has \(4, 17\), "
                       r"model layer up has \(4, 16\)"),
    "non_lora_key": (lambda d: _edit_weights(d, lambda sd: sd.update({"base_model.model.up.lora_B.bias": torch.zeros(32)})),
                     AdapterLoadError, r"not LoRA lora_A/lora_B weights"),
    "int_tensor": (lambda d: _edit_weights(d, lambda sd: sd.update({KA: torch.zeros(4, 16, dtype=torch.int32)})),
                   AdapterLoadError, r"up\.lora_A\.weight has dtype torch\.int32"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_adapter_dirs_raise_and_leave_model_untouched(case, base, good_dir):
    corrupt, exc, pattern = BAD_CASES[case]
    corrupt(good_dir)
    lf = _lf_model(base)
    _randomise_lf(lf, seed=9)
    before = _state(lf)
    with pytest.raises(exc, match=pattern):
        load_adapter(lf, str(good_dir))
    _assert_unchanged(lf, before)


def test_missing_directory_and_rank_layer_mismatch(base, good_dir, tmp_path):
    lf = _lf_model(base)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(lf, str(tmp_path / "nope"))
    # a model whose layer has another rank than the file: shapes name both sides
    lf = _lf_model(base, ranks={"up": 8, "mid.0": 4, "down": 2})
    before = _state(lf)
    with pytest.raises(AdapterLoadError, match=r"up\.lora_A\.weight: file has \(4, 16\), model layer up has \(8, 16\)"):
        load_adapter(lf, str(good_dir))
    _assert_unchanged(lf, before)
    with pytest.raises(AdapterLoadError, match="holds no LoRA layers"):
        load_adapter(base, str(good_dir))


def test_failure_while_applying_rolls_back(base, good_dir, monkeypatch):
    """Even an error after validation (here: forced in the middle of applying) restores the model."""
    lf = _lf_model(base)
    _randomise_lf(lf, seed=11)
    before = _state(lf)
    calls = {"n": 0}
    from lora_fast import adapter_io

    orig = adapter_io._Slot.set_hparams

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return orig(self, *a, **k)

    monkeypatch.setattr(adapter_io._Slot, "set_hparams", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        load_adapter(lf, str(good_dir))
    _assert_unchanged(lf, before)
