"""Adapter files in PEFT's on-disk format (safetensors only, never pickle).

    lora_fast.save_adapter(model, path)   # writes path/adapter_model.safetensors + path/adapter_config.json
    lora_fast.load_adapter(model, path)   # reads them back (also files written by PEFT's save_pretrained)

A saved directory loads in PEFT with ``PeftModel.from_pretrained(base_model, path)``, where
``base_model`` is the model before its ``nn.Linear`` layers were replaced by lora_fast layers, and
a directory written by PEFT's ``save_pretrained`` loads into a lora_fast model that has
:class:`~lora_fast.LoRALinear` / :class:`~lora_fast.NF4LoRALinear` layers at the module paths where
the PEFT model had its LoRA layers.

Which layers count
------------------
``model`` may be

* any ``nn.Module`` holding ``LoRALinear`` / ``NF4LoRALinear`` layers (module paths are used as
  they are: ``<path>.lora_A.weight`` is stored as ``base_model.model.<path>.lora_A.weight``);
* a PEFT ``PeftModel`` or ``LoraModel`` (patched by :func:`lora_fast.patch` or not), whose
  module paths already start with ``base_model.model.`` (``model.`` for a bare ``LoraModel``);
  the prefix is not doubled.  Its PEFT LoRA layers are read and written through the adapter
  ``adapter_name`` (default: the one active adapter; several active adapters need an explicit
  name).  DoRA layers, ``lora_bias``, ``fan_in_fan_out`` and embedding/conv LoRA layers have no
  equivalent here and raise.

File format
-----------
Keys ``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r),
tensors in the adapter's own dtype.  ``adapter_config.json`` carries ``peft_type: "LORA"``,
the most common ``r``/``lora_alpha`` with ``rank_pattern``/``alpha_pattern`` for layers that
differ, ``target_modules`` (leaf names when those select exactly the adapted layers, else a
regular expression over the full paths), ``lora_dropout``, ``use_rslora``, ``bias: "none"``,
``fan_in_fan_out: false`` and ``task_type`` (null unless the model is a PEFT model with one).
If a layer's ``scaling`` was changed by hand so that it no longer equals ``lora_alpha / r``,
the alpha that gives that scaling is written, so PEFT computes the same outputs.

Loading: what the config decides
--------------------------------
``load_adapter`` checks everything before it changes anything; any problem raises
:class:`AdapterLoadError` (a ``ValueError``) or ``FileNotFoundError`` and leaves the model
exactly as it was.  Checked: both files exist (``adapter_model.bin`` is refused: pickle),
the JSON and the safetensors file parse, the config is a LoRA config without unsupported
features, every key names a ``lora_A``/``lora_B`` weight of an adapted layer, every adapted
layer has both weights (``strict=False`` allows layers without an entry; they are left
alone), every shape equals the layer's, and the rank the config gives each layer (``r`` or
``rank_pattern``) equals the rows of its ``lora_A`` in the file.

A lora_fast layer's rank is fixed by its parameter shapes, so a file of another rank raises
(the PEFT loader would rebuild the layer; lora_fast does not silently resize parameters).
``lora_alpha``, ``use_rslora`` and ``lora_dropout`` *are* taken from the config: each loaded
layer's ``lora_alpha``, ``use_rslora``, ``scaling`` (``alpha/r`` or ``alpha/√r``) and dropout
are set from it, as PEFT does when it builds layers from the config, so the loaded model
computes what the PEFT model computed.
"""
from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .modules import LoRALinear, NF4LoRALinear

Tensor = torch.Tensor

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Config fields that select PEFT features with no lora_fast equivalent: (field, value meaning "off").
_UNSUPPORTED_FIELDS = (
    ("use_dora", False),
    ("fan_in_fan_out", False),
    ("lora_bias", False),
    ("modules_to_save", None),
    ("layer_replication", None),
    ("trainable_token_indices", None),
    ("target_parameters", None),
    ("alora_invocation_tokens", None),
    ("arrow_config", None),
    ("velora_config", None),
    ("monteclora_config", None),
    ("kasa_config", None),
    ("use_bdlora", None),
    ("use_qalora", False),
)


class AdapterLoadError(ValueError):
    """An adapter directory cannot be loaded into this model (nothing was changed)."""


# --------------------------------------------------------------------------------------------
# Adapted layers ("slots") of a model, lora_fast or PEFT
# --------------------------------------------------------------------------------------------


def _peft_classes():
    """(PeftModel, BaseTuner, LoraLayer) or Nones when PEFT is not installed."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTuner
    except Exception:  # pragma: no cover - peft is optional
        return None, None, None
    return PeftModel, BaseTuner, LoraLayer


@dataclass
class _Slot:
    """One adapted linear layer: where its A/B live and how to read/set its hyper-parameters."""

    path: str  # module path relative to the base model (no base_model.model. prefix)
    module: nn.Module
    adapter: Optional[str]  # PEFT adapter name, None for a lora_fast layer

    @property
    def A(self) -> Tensor:
        return self.module.lora_A[self.adapter].weight if self.adapter is not None else self.module.lora_A

    @property
    def B(self) -> Tensor:
        return self.module.lora_B[self.adapter].weight if self.adapter is not None else self.module.lora_B

    def hparams(self) -> Tuple[int, float, bool, float, float]:
        """(r, lora_alpha, use_rslora, dropout p, scaling)."""
        m, a = self.module, self.adapter
        if a is None:
            return m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.scaling
        drop = m.lora_dropout[a]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        return m.r[a], m.lora_alpha[a], bool(m.use_rslora.get(a, False)), p, m.scaling[a]

    def snapshot(self):
        m, a = self.module, self.adapter
        if a is None:
            return (m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.scaling)
        return (m.r[a], m.lora_alpha[a], m.use_rslora.get(a, False), m.lora_dropout[a], m.scaling[a])

    def restore(self, snap) -> None:
        m, a = self.module, self.adapter
        if a is None:
            m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.scaling = snap
        else:
            m.r[a], m.lora_alpha[a], m.use_rslora[a], m.lora_dropout[a], m.scaling[a] = snap

    def set_hparams(self, r: int, alpha: float, use_rslora: bool, p: float) -> None:
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        m, a = self.module, self.adapter
        if a is None:
            m.r, m.lora_alpha, m.use_rslora, m.lora_dropout, m.scaling = r, alpha, use_rslora, float(p), scaling
            return
        m.r[a], m.lora_alpha[a], m.use_rslora[a], m.scaling[a] = r, alpha, use_rslora, scaling
        old = m.lora_dropout[a]
        old_p = float(old.p) if isinstance(old, nn.Dropout) else 0.0
        if old_p != float(p):
            # a new module in the layer's own train/eval mode (a fresh nn.Dropout is in training
            # mode: it would drop in an eval()-ed model)
            m.lora_dropout[a] = (nn.Dropout(p=p) if p > 0 else nn.Identity()).train(m.training)


def _root_prefix(model: nn.Module) -> str:
    PeftModel, BaseTuner, _ = _peft_classes()
    if PeftModel is not None and isinstance(model, PeftModel):
        return PEFT_PREFIX
    if BaseTuner is not None and isinstance(model, BaseTuner):
        return "model."
    return ""


def _relative(name: str, prefix: str) -> str:
    # (a torch.compile'd *submodule* keeps its "_orig_mod." segment: PEFT's keys have it too)
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's OptimizedModule and DDP/DataParallel wrappers (their
    ``_orig_mod.`` / ``module.`` prefixes are not part of an adapter's keys)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        break
    return model


def _default_adapter(model: nn.Module) -> Optional[str]:
    """The single active PEFT adapter of ``model`` (None if it has no PEFT layers)."""
    _, _, LoraLayer = _peft_classes()
    if LoraLayer is None:
        return None
    try:
        names = getattr(model, "active_adapters", None)
        if callable(names):  # PeftModel.active_adapters is a property, LoraModel's too; be safe
            names = names()
    except ValueError:
        # transformers' PeftAdapterMixin.active_adapters() raises when transformers did not load
        # the adapter itself (e.g. peft.inject_adapter_in_model): read the layers instead
        names = None
    if names is None:
        active = set()
        for mod in model.modules():
            if isinstance(mod, LoraLayer):
                active.update(mod.active_adapters)
        names = sorted(active)
    if not names:
        return None
    if isinstance(names, str):
        return names
    names = list(names)
    if len(names) > 1:
        raise ValueError(
            f"the model has several active PEFT adapters {names}; pass adapter_name= to choose one"
        )
    return names[0]


def _collect_slots(model: nn.Module, adapter_name: Optional[str]) -> Tuple[List[_Slot], str, Optional[str]]:
    """The adapted layers of ``model`` in module order, the path prefix, and the PEFT adapter used."""
    prefix = _root_prefix(model)
    _, _, LoraLayer = _peft_classes()
    slots: List[_Slot] = []
    peft_layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, (LoRALinear, NF4LoRALinear)):
            slots.append(_Slot(_relative(name, prefix), mod, None))
        elif LoraLayer is not None and isinstance(mod, LoraLayer):
            peft_layers.append((name, mod))
    adapter = None
    if peft_layers:
        adapter = adapter_name if adapter_name is not None else _default_adapter(model)
        for name, mod in peft_layers:
            if adapter not in mod.lora_A and adapter not in getattr(mod, "lora_embedding_A", {}):
                continue
            _check_peft_layer_supported(name, mod, adapter)
            slots.append(_Slot(_relative(name, prefix), mod, adapter))
        if adapter_name is not None and not any(s.adapter is not None for s in slots):
            raise ValueError(f"no PEFT LoRA layer of the model has an adapter named {adapter_name!r}")
    elif adapter_name is not None and slots:
        raise ValueError(f"adapter_name={adapter_name!r} was given, but the model has no PEFT LoRA layers "
                         "(lora_fast's LoRALinear / NF4LoRALinear layers hold one unnamed adapter)")
    return slots, prefix, adapter


def _check_peft_layer_supported(name: str, mod: nn.Module, adapter: str) -> None:
    if adapter not in mod.lora_A:
        raise ValueError(f"{name}: PEFT LoRA layer of type {type(mod).__name__} (not a linear layer) is not supported")
    if adapter in getattr(mod, "lora_variant", {}) or mod.use_dora.get(adapter, False):
        variant = type(mod.lora_variant.get(adapter)).__name__ if adapter in mod.lora_variant else "DoRA"
        raise ValueError(f"{name}: adapter {adapter!r} uses a LoRA variant ({variant}); only plain LoRA is supported")
    if getattr(mod, "fan_in_fan_out", False):
        raise ValueError(f"{name}: fan_in_fan_out=True layers are not supported")
    if mod.lora_bias.get(adapter, False):
        raise ValueError(f"{name}: adapter {adapter!r} uses lora_bias=True, which is not supported")
    if not isinstance(mod.lora_A[adapter], nn.Linear):
        raise ValueError(f"{name}: adapter {adapter!r} is not a linear LoRA layer ({type(mod.lora_A[adapter]).__name__})")


def _all_base_paths(model: nn.Module, prefix: str, slot_paths: Iterable[str]) -> List[str]:
    """Module paths of the base model (relative), without the insides of adapted layers."""
    slot_paths = set(slot_paths)
    out = []
    for name, _ in model.named_modules():
        if prefix and not name.startswith(prefix):
            continue
        rel = _relative(name, prefix)
        if not rel:
            continue
        parts = rel.split(".")
        if any(".".join(parts[:i]) in slot_paths for i in range(1, len(parts))):
            continue
        out.append(rel)
    return out


# --------------------------------------------------------------------------------------------
# PEFT's matching rules (reimplemented: first pattern key k with re.match(rf"(.*\.)?({k})$", path))
# --------------------------------------------------------------------------------------------


def _pattern_value(pattern: Dict[str, object], path: str, default):
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return pattern[key]
    return default


def _peft_targets(target_modules, paths: Iterable[str]) -> set:
    """The paths PEFT's ``target_modules`` would select (str: full match, list: path or leaf suffix)."""
    if isinstance(target_modules, str):
        return {p for p in paths if re.fullmatch(target_modules, p)}
    targets = set(target_modules)
    return {p for p in paths if p in targets or any(p.endswith("." + t) for t in targets)}


def _pattern_for(values: Dict[str, object], default, paths: List[str]) -> Dict[str, object]:
    """rank/alpha pattern giving each path its value under PEFT's matching rule."""
    pattern = {p: v for p, v in values.items() if v != default}
    if all(_pattern_value(pattern, p, default) == values[p] for p in paths):
        return pattern
    anchored = {"^" + re.escape(p): v for p, v in pattern.items()}
    assert all(_pattern_value(anchored, p, default) == values[p] for p in paths)
    return anchored


def _json_number(v: float):
    return int(v) if float(v).is_integer() else float(v)


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str, adapter_name: Optional[str] = None) -> None:
    """Write the LoRA weights of ``model`` to the directory ``path`` in PEFT's format
    (``adapter_model.safetensors`` + ``adapter_config.json``), creating it if needed.

    ``adapter_name`` picks the PEFT adapter when ``model`` holds PEFT LoRA layers (default:
    the one active adapter).  Each file is written to a temporary name and renamed, so a
    failed save never leaves a half-written file behind.
    """
    model = _unwrap(model)
    if isinstance(model, (LoRALinear, NF4LoRALinear)):
        raise ValueError(
            f"save_adapter needs a model holding the LoRA layer, got the {type(model).__name__} itself (its "
            "adapter keys are named by the layer's path in the model): wrap it, e.g. nn.Sequential(layer), or "
            "save the model it belongs to"
        )
    slots, prefix, adapter = _collect_slots(model, adapter_name)
    if not slots:
        raise ValueError(
            f"{type(model).__name__} holds no LoRA layers (lora_fast.LoRALinear / NF4LoRALinear or PEFT LoRA layers)"
        )
    for s_ in slots:
        if s_.A.device.type == "meta" or s_.B.device.type == "meta":
            raise ValueError(f"{s_.path}: the LoRA weights are on the meta device (no values to save); "
                             "materialise the model first")
    _check_peft_config_savable(model, adapter)
    _check_trainable_bias(model, slots)
    tensors: Dict[str, Tensor] = {}
    ranks: Dict[str, int] = {}
    alphas: Dict[str, float] = {}
    rslora = set()
    dropouts = collections.Counter()
    for s in slots:
        A, B = s.A, s.B
        if _is_sharded(A) or _is_sharded(B):
            raise ValueError(
                f"{s.path}: lora_A/lora_B are sharded DTensors (FSDP2's fully_shard), which save_adapter cannot "
                "write: gather a full state dict on every rank, e.g. torch.distributed.checkpoint.state_dict."
                "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)), "
                "and save its lora_A/lora_B entries on rank 0, or save with torch.distributed.checkpoint"
            )
        r, alpha, use_rslora, p, scaling = s.hparams()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] != r:
            raise ValueError(
                f"{s.path}: inconsistent adapter (lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}, r={r})"
            )
        # the alpha that reproduces the layer's current scaling (differs only if scaling was edited)
        denom = math.sqrt(r) if use_rslora else r
        if not math.isclose(alpha / denom, scaling, rel_tol=1e-6, abs_tol=0.0):
            alpha = scaling * denom
        ranks[s.path] = r
        alphas[s.path] = _json_number(alpha)
        rslora.add(bool(use_rslora))
        dropouts[p] += 1
        key = PEFT_PREFIX + s.path
        tensors[f"{key}.lora_A.weight"] = A.detach().to("cpu").contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = B.detach().to("cpu").contiguous().clone()
    if len(rslora) > 1:
        raise ValueError("some layers use rsLoRA and others do not; a PEFT config has one use_rslora flag")
    if len(dropouts) > 1:
        import warnings

        warnings.warn(
            f"layers use different lora_dropout values {sorted(dropouts)}; PEFT's config holds one, "
            f"the most common ({dropouts.most_common(1)[0][0]}) is written",
            UserWarning,
            stacklevel=2,
        )
    paths = [s.path for s in slots]
    r = collections.Counter(ranks[p] for p in paths).most_common(1)[0][0]
    alpha = collections.Counter(alphas[p] for p in paths).most_common(1)[0][0]

    base_paths = _all_base_paths(model, prefix, paths)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    if _peft_targets(leaves, base_paths) == set(paths):
        target_modules = leaves
    else:
        target_modules = "(?:" + "|".join(re.escape(p) for p in paths) + ")"

    config = {
        "peft_type": "LORA",
        "task_type": _task_type(model, adapter),
        "base_model_name_or_path": _base_name(model),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": target_modules,
        "exclude_modules": None,
        "rank_pattern": _pattern_for(ranks, r, paths),
        "alpha_pattern": _pattern_for(alphas, alpha, paths),
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_dora": False,
        "lora_bias": False,
    }
    try:
        import peft

        config["peft_version"] = peft.__version__
    except Exception:  # pragma: no cover
        pass

    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    _atomic_write(os.path.join(path, WEIGHTS_NAME), lambda f: save_file(tensors, f, metadata={"format": "pt"}))

    def write_json(f):
        with open(f, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")

    _atomic_write(os.path.join(path, CONFIG_NAME), write_json)


def _is_sharded(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch without torch.distributed
        return False
    return isinstance(t, DTensor) or isinstance(getattr(t, "data", None), DTensor)


def _slot_merged(slot) -> bool:
    m, a = slot.module, slot.adapter
    if a is None:
        return bool(getattr(m, "merged", False))
    return a in (getattr(m, "merged_adapters", None) or [])


def _check_trainable_bias(model: nn.Module, slots) -> None:
    """A model converted by ``apply_lora(bias="all" | "lora_only")`` trains biases: the writer
    saves A/B only, so they would be lost silently."""
    if not any(s.adapter is None for s in slots):  # PEFT models: _check_peft_config_savable
        return
    # a bias that trains beside a frozen weight (what apply_lora's bias= does); a layer that
    # trains as a whole is the user's own business, as in PEFT
    trained = []
    for name, mod in model.named_modules():
        b, w = mod._parameters.get("bias"), mod._parameters.get("weight")
        if isinstance(b, nn.Parameter) and b.requires_grad and not (isinstance(w, nn.Parameter) and w.requires_grad):
            trained.append(name)
    if trained:
        raise ValueError(
            f"layers {trained[:3]}{' (+%d more)' % (len(trained) - 3) if len(trained) > 3 else ''} train their "
            "bias (apply_lora(bias=...)); lora_fast.save_adapter writes only lora_A/lora_B, so the trained bias "
            "would be lost: save it with torch.save(model.state_dict()) or freeze it (bias.requires_grad_(False))"
        )


def _check_peft_config_savable(model: nn.Module, adapter: Optional[str]) -> None:
    """A PEFT model whose adapter trains more than lora_A/lora_B cannot be saved by this writer
    (the extra weights would be lost silently): point to save_pretrained instead."""
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict) or adapter not in cfgs:
        return
    cfg = cfgs[adapter]
    extras = []
    if getattr(cfg, "modules_to_save", None):
        extras.append(f"modules_to_save={cfg.modules_to_save!r}")
    if getattr(cfg, "trainable_token_indices", None):
        extras.append("trainable_token_indices")
    bias_mode = getattr(cfg, "bias", "none")
    if bias_mode != "none":
        # PEFT saves the biases this mode trains (whether or not they still require grad); a model
        # without such biases (a Llama) loses nothing: PEFT then saves A/B only too
        _, _, LoraLayer = _peft_classes()
        if bias_mode == "lora_only":
            biases = [f"{n}.base_layer.bias" for n, m in model.named_modules()
                      if LoraLayer is not None and isinstance(m, LoraLayer)
                      and getattr(m.get_base_layer(), "bias", None) is not None]
        else:
            biases = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if biases:
            extras.append(f"bias={bias_mode!r}, which trains biases such as {biases[0]}")
    if extras:
        raise ValueError(
            f"adapter {adapter!r} trains more than LoRA A/B ({', '.join(extras)}); lora_fast.save_adapter writes "
            "only A/B — use the PEFT model's save_pretrained()"
        )


def _atomic_write(target: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(target) or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _task_type(model: nn.Module, adapter: Optional[str]):
    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict) and cfgs:
        cfg = cfgs.get(adapter) if adapter in cfgs else next(iter(cfgs.values()))
        tt = getattr(cfg, "task_type", None)
        return None if tt is None else str(getattr(tt, "value", tt))
    return None


def _base_name(model: nn.Module):
    m = model
    for attr in ("base_model", "model"):
        cfg = getattr(m, "config", None)
        name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
        if name:
            return name
        m = getattr(m, attr, m)
    cfg = getattr(m, "config", None)
    return (getattr(cfg, "_name_or_path", None) or None) if cfg is not None else None


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _read_config(cfg_path: str) -> dict:
    try:
        with open(cfg_path, "r", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise AdapterLoadError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _validate_config(cfg: dict, cfg_path: str) -> dict:
    def bad(msg):
        return AdapterLoadError(f"{cfg_path}: {msg}")

    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise bad(f"peft_type is {ptype!r}, only 'LORA' adapters are supported")
    r = cfg.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise bad(f"r must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
    p = cfg.get("lora_dropout", 0.0)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise bad(f"lora_dropout must be a number in [0, 1), got {p!r}")
    rs = cfg.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise bad(f"use_rslora must be true or false, got {rs!r}")
    out = {"r": r, "lora_alpha": alpha, "lora_dropout": float(p), "use_rslora": rs}
    for field in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(field) or {}
        if not isinstance(pat, dict):
            raise bad(f"{field} must be an object, got {type(pat).__name__}")
        for k, v in pat.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if field == "rank_pattern":
                ok = ok and isinstance(v, int) and v > 0
            if not ok:
                raise bad(f"{field}[{k!r}] = {v!r} is not a valid {'rank' if field == 'rank_pattern' else 'alpha'}")
            try:
                re.compile(k)
            except re.error as exc:
                raise bad(f"{field} key {k!r} is not a valid regular expression ({exc})") from exc
        out[field] = pat
    for field in ("target_modules", "exclude_modules"):
        v = cfg.get(field)
        if v is not None and not isinstance(v, str) and not (
                isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise bad(f"{field} must be a string (regular expression) or a list of names, got {v!r}")
        if isinstance(v, str) and v != "all-linear":
            try:
                re.compile(v)
            except re.error as exc:
                raise bad(f"{field} {v!r} is not a valid regular expression ({exc})") from exc
        out[field] = v
    ltt = cfg.get("layers_to_transform")
    if ltt is not None and not (isinstance(ltt, int) and not isinstance(ltt, bool)) and not (
            isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)):
        raise bad(f"layers_to_transform must be an integer or a list of integers, got {ltt!r}")
    out["layers_to_transform"] = ltt
    lp = cfg.get("layers_pattern")
    if lp is not None and not isinstance(lp, str) and not (
            isinstance(lp, list) and all(isinstance(t, str) for t in lp)):
        raise bad(f"layers_pattern must be a string or a list of strings, got {lp!r}")
    out["layers_pattern"] = lp
    bias = cfg.get("bias", "none")
    if bias != "none":
        raise bad(f"bias={bias!r} is not supported (lora_fast trains no bias; use 'none')")
    for field, off in _UNSUPPORTED_FIELDS:
        v = cfg.get(field, off)
        if v not in (off, None, False, [], {}):
            raise bad(f"{field}={v!r} is not supported by lora_fast")
    return out


def _config_targets(cfg: dict, path: str) -> bool:
    """Whether PEFT would build an adapter at module ``path`` from this config (its
    ``target_modules``, ``exclude_modules``, ``layers_to_transform`` / ``layers_pattern``): PEFT's
    own ``check_target_module_exists`` when PEFT is installed, else the same rules.  None or
    'all-linear' target_modules: any adapted layer."""
    tm = cfg.get("target_modules")
    if tm is None or tm == "all-linear":
        return True
    try:
        from types import SimpleNamespace

        from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
    except Exception:  # pragma: no cover - PEFT missing or reorganised
        return _targets_fallback(cfg, path)
    ns = SimpleNamespace(target_modules=tm, exclude_modules=cfg.get("exclude_modules"), modules_to_save=None,
                         target_parameters=None, layers_to_transform=cfg.get("layers_to_transform"),
                         layers_pattern=cfg.get("layers_pattern"))
    try:
        found = check_target_module_exists(ns, path)
    except Exception:  # pragma: no cover - another PEFT's signature
        return _targets_fallback(cfg, path)
    return not isinstance(found, _ExcludedModule) and bool(found)


def _targets_fallback(cfg: dict, path: str) -> bool:
    """PEFT 0.21's ``check_target_module_exists`` rules, for when PEFT is not importable."""
    ex = cfg.get("exclude_modules")
    if ex and _peft_targets(ex, [path]):
        return False
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        return re.fullmatch(tm, path) is not None
    if path in tm:
        return True
    if not any(path.endswith("." + t) for t in tm):
        return False
    ltt = cfg.get("layers_to_transform")
    if ltt is None or (isinstance(ltt, list) and not ltt):
        return True
    patterns = cfg.get("layers_pattern")
    m = None
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pat in ([patterns] if isinstance(patterns, str) else patterns):
            m = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", path)
            if m is not None:
                break
    if m is None:
        return False
    idx = int(m.group("idx"))
    return idx == ltt if isinstance(ltt, int) else idx in ltt


def _read_weights(w_path: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(w_path, device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: truncated or not a safetensors file
        raise AdapterLoadError(f"{w_path}: cannot read safetensors file ({type(exc).__name__}: {exc})") from exc
    return tensors


_KEY_RE = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight$")
# PEFT's save_pretrained also writes the base weights of an adapted embedding / lm_head layer
# (save_embedding_layers="auto"), which its loader copies into the base layer
_BASE_KEY_RE = re.compile(r"^(?P<path>.+)\.base_layer\.(?P<which>weight|bias)$")


def _base_tensor(slot: "_Slot", which: str) -> Optional[Tensor]:
    """The dense base weight / bias of a LoRA layer (None: it has none, e.g. an NF4 base)."""
    m = slot.module
    base = m.get_base_layer() if slot.adapter is not None else m
    t = getattr(base, which, None)  # (an NF4LoRALinear's weight is an NF4Tensor, not a Tensor)
    if not isinstance(t, Tensor) or not t.is_floating_point() or hasattr(t, "quant_state"):
        return None
    return t


_CFG_FIELDS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern")


def _peft_config_of(model: nn.Module, slots: List["_Slot"]):
    """``(peft_config dict, adapter name, LoraConfig)`` of the adapter the PEFT slots belong to
    (None: no PEFT model)."""
    adapters = {s.adapter for s in slots if s.adapter is not None}
    if len(adapters) != 1:
        return None
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict):
        return None
    name = next(iter(adapters))
    cfg = cfgs.get(name)
    return (cfgs, name, cfg) if cfg is not None and all(hasattr(cfg, f) for f in _CFG_FIELDS) else None


def load_adapter(
    model: nn.Module, path: str, adapter_name: Optional[str] = None, *, strict: bool = True
) -> List[str]:
    """Load the adapter directory ``path`` (PEFT format) into ``model``'s LoRA layers.

    Everything is validated before the model is touched (see the module docstring); on any
    error the model is left exactly as it was.  Each loaded layer's ``lora_alpha``,
    ``use_rslora``, ``scaling`` and dropout are set from the config; its rank must already
    match.  A PEFT model's ``peft_config[adapter]`` takes the file's ``r``, ``lora_alpha``,
    ``lora_dropout``, ``use_rslora``, ``rank_pattern`` and ``alpha_pattern``, so a later
    ``save_pretrained`` writes what the layers compute.  Base-layer weights that PEFT saves beside
    an adapted ``lm_head`` / embedding (``<layer>.base_layer.weight``) are copied into that base
    layer, as PEFT's loader does.  ``strict=False`` allows adapted layers that the file has no
    entry for (they keep their weights); entries for layers the model does not adapt always raise.

    Returns the module paths (relative to the base model) that were loaded.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is a file; pass the adapter directory that holds it "
                                f"({CONFIG_NAME} and {WEIGHTS_NAME})")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    w_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found (an adapter directory needs {CONFIG_NAME})")
    if not os.path.isfile(w_path):
        if os.path.isfile(os.path.join(path, PICKLE_WEIGHTS_NAME)):
            raise AdapterLoadError(
                f"{w_path} not found; {PICKLE_WEIGHTS_NAME} exists but pickle files are never loaded "
                "(re-save the adapter with safe_serialization=True)"
            )
        raise FileNotFoundError(f"{w_path} not found")
    cfg = _validate_config(_read_config(cfg_path), cfg_path)
    tensors = _read_weights(w_path)

    model = _unwrap(model)
    slots, _, _ = _collect_slots(model, adapter_name)
    if not slots:
        raise AdapterLoadError(
            f"{type(model).__name__} holds no LoRA layers (lora_fast.LoRALinear / NF4LoRALinear or PEFT LoRA layers)"
        )
    by_path = {s.path: s for s in slots}

    # --- map file keys to layers
    entries: Dict[str, Dict[str, Tuple[str, Tensor]]] = collections.OrderedDict()
    base_entries: List[Tuple[str, str, str, Tensor]] = []  # (module path, weight|bias, key, tensor)
    bad_keys = []
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            mb = _BASE_KEY_RE.match(key)
            bpath = mb.group("path") if mb else None
            if bpath is not None and bpath.startswith(PEFT_PREFIX):
                bpath = bpath[len(PEFT_PREFIX):]
            if bpath in by_path:
                base_entries.append((bpath, mb.group("which"), key, t))
            else:
                bad_keys.append(key)
            continue
        mpath = m.group("path")
        if mpath.startswith(PEFT_PREFIX):
            mpath = mpath[len(PEFT_PREFIX):]
        if mpath in entries and m.group("which") in entries[mpath]:
            raise AdapterLoadError(f"{w_path}: two entries for {mpath}.{m.group('which')} ({key})")
        entries.setdefault(mpath, {})[m.group("which")] = (key, t)
    if bad_keys:
        raise AdapterLoadError(
            f"{w_path}: keys that are not LoRA lora_A/lora_B weights (unsupported content): {bad_keys[:5]}"
            + (f" (+{len(bad_keys) - 5} more)" if len(bad_keys) > 5 else "")
        )
    unknown = [p for p in entries if p not in by_path]
    if unknown:
        raise AdapterLoadError(
            f"{w_path}: entries for modules that are not LoRA layers of the model: {unknown[:5]}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            + f"; the model's LoRA layers are e.g. {list(by_path)[:3]}"
        )
    untargeted = [p for p in entries if not _config_targets(cfg, p)]
    if untargeted:
        raise AdapterLoadError(
            f"{cfg_path}: the weights file has entries for {untargeted[:5]}"
            + (f" (+{len(untargeted) - 5} more)" if len(untargeted) > 5 else "")
            + " but the config's target_modules / exclude_modules / layers_to_transform do not select them "
            "(PEFT would build no adapter there and ignore those weights)"
        )
    meta = [p for p in entries if by_path[p].A.device.type == "meta" or by_path[p].B.device.type == "meta"]
    if meta:
        raise AdapterLoadError(
            f"LoRA layers {meta[:5]} are on the meta device: a copy into them stores nothing; materialise the "
            "model first (e.g. model.to_empty(device=...) and load its weights), then load the adapter"
        )
    missing = [p for p in by_path if p not in entries]
    if missing and strict:
        raise AdapterLoadError(
            f"{w_path}: no weights for LoRA layers {missing[:5]}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            + " (pass strict=False to load a partial adapter)"
        )

    # --- per-layer checks
    plan = []
    for mpath, pair in entries.items():
        for which in ("lora_A", "lora_B"):
            if which not in pair:
                raise AdapterLoadError(f"{w_path}: {PEFT_PREFIX}{mpath}.{which}.weight is missing")
        slot = by_path[mpath]
        (ka, ta), (kb, tb) = pair["lora_A"], pair["lora_B"]
        for k, t, target in ((ka, ta, slot.A), (kb, tb, slot.B)):
            if not t.is_floating_point():
                raise AdapterLoadError(f"{w_path}: {k} has dtype {t.dtype}, expected a floating-point tensor")
            if tuple(t.shape) != tuple(target.shape):
                raise AdapterLoadError(
                    f"{w_path}: shape mismatch for {k}: file has {tuple(t.shape)}, model layer {mpath} has "
                    f"{tuple(target.shape)}"
                )
        rank = _pattern_value(cfg["rank_pattern"], mpath, cfg["r"])
        alpha = _pattern_value(cfg["alpha_pattern"], mpath, cfg["lora_alpha"])
        if ta.shape[0] != rank:
            raise AdapterLoadError(
                f"{cfg_path}: r mismatch for {mpath}: the config gives r={rank} but {ka} has {ta.shape[0]} rows"
            )
        if _slot_merged(slot):
            raise AdapterLoadError(
                f"LoRA layer {mpath} is merged (its update is folded into the base weight): loading new A/B "
                "would leave the old update in the base and unmerge() would then corrupt it; unmerge the "
                "model first (PEFT: unmerge_adapter(); lora_fast layers: unmerge())"
            )
        plan.append((slot, ta, tb, rank, alpha))
    base_plan = []
    for mpath, which, key, t in base_entries:
        target = _base_tensor(by_path[mpath], which)
        if target is None:
            raise AdapterLoadError(
                f"{w_path}: {key} holds a base-layer {which}, but the base layer of {mpath} has no dense "
                f"floating-point {which} to load it into (e.g. a 4-bit base)"
            )
        if tuple(t.shape) != tuple(target.shape) or not t.is_floating_point():
            raise AdapterLoadError(
                f"{w_path}: {key} has shape {tuple(t.shape)} and dtype {t.dtype}; the base layer of {mpath} has "
                f"{tuple(target.shape)} ({target.dtype})"
            )
        base_plan.append((target, t))

    # a PEFT model's peft_config must describe the loaded layers (save_pretrained writes it):
    # it takes the file's hyper-parameters, so layers the file leaves alone (strict=False) must
    # already have them
    peft_cfg = _peft_config_of(model, slots)
    if peft_cfg is not None:
        loaded = {slot.path for slot, *_ in plan}
        for slot in slots:
            if slot.adapter is None or slot.path in loaded:
                continue
            want = (_pattern_value(cfg["rank_pattern"], slot.path, cfg["r"]),
                    _pattern_value(cfg["alpha_pattern"], slot.path, cfg["lora_alpha"]),
                    cfg["use_rslora"], cfg["lora_dropout"])
            have = slot.hparams()[:4]
            if tuple(have) != tuple(want):
                raise AdapterLoadError(
                    f"{cfg_path}: a partial load (strict=False) would leave LoRA layer {slot.path} with r, lora_alpha, "
                    f"use_rslora, lora_dropout = {tuple(have)} while the adapter's config (which the PEFT model's "
                    f"peft_config takes, for save_pretrained) gives {want}; load a complete adapter or one with the "
                    "same hyper-parameters"
                )

    # --- apply (all checks passed); restore everything if anything still goes wrong
    saved = [(slot, slot.A.detach().clone(), slot.B.detach().clone(), slot.snapshot()) for slot, *_ in plan]
    saved_base = [(target, target.detach().clone()) for target, _ in base_plan]
    try:
        with torch.no_grad():
            for slot, ta, tb, rank, alpha in plan:
                slot.A.copy_(ta)
                slot.B.copy_(tb)
                slot.set_hparams(rank, alpha, cfg["use_rslora"], cfg["lora_dropout"])
            for target, t in base_plan:
                target.copy_(t)
        if peft_cfg is not None:
            # a new config object: PEFT models often share one LoraConfig between adapters
            # (add_adapter("b", cfg) with the first adapter's cfg), whose others must not change
            cfgs, name, old_cfg = peft_cfg
            new_cfg = copy.copy(old_cfg)
            for f in _CFG_FIELDS:
                setattr(new_cfg, f, copy.deepcopy(cfg[f]))
            cfgs[name] = new_cfg
    except BaseException:
        with torch.no_grad():
            for slot, a, b, snap in saved:
                slot.A.copy_(a)
                slot.B.copy_(b)
                slot.restore(snap)
            for target, old in saved_base:
                target.copy_(old)
        if peft_cfg is not None:
            cfgs, name, old_cfg = peft_cfg
            cfgs[name] = old_cfg
        raise
    return [slot.path for slot, *_ in plan]
