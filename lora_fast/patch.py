"""Run existing PEFT LoRA models on lora_fast's kernels, or add LoRA without PEFT.

    report = lora_fast.patch(peft_model)      # in place; report.converted / report.skipped
    lora_fast.unpatch(peft_model)             # back to PEFT's own forward (weights are shared)
    model = lora_fast.apply_lora(model, target_modules="all-linear", r=8, lora_alpha=16)
    groups = lora_fast.loraplus_param_groups(model, lr=2e-4, lr_ratio=16.0)

How :func:`patch` works
-----------------------
Each convertible PEFT layer (``peft.tuners.lora.Linear`` over an ``nn.Linear``, or over a
bitsandbytes ``Linear4bit``; ``peft.tuners.lora.bnb.Linear4bit``) keeps its place, its
attributes and its parameters; only its class is swapped for a subclass
(``LoraFastLinear`` / ``LoraFastLinear4bit``) that overrides ``forward``.  So:

* no tensor is copied or re-quantised: the forward reads the base layer's weight (dense, or the
  bnb ``Params4bit`` bytes viewed as :class:`lora_fast.nf4.NF4Tensor`), and the active adapter's
  ``lora_A[name].weight`` / ``lora_B[name].weight`` — the very Parameters PEFT created, so an
  optimizer built before patching keeps training them;
* everything else is PEFT's own code, inherited unchanged: ``save_pretrained`` (same module
  paths and state-dict keys), ``set_adapter``, ``add_adapter``, ``add_weighted_adapter``,
  ``merge``/``unmerge``/``merge_and_unload``, ``disable_adapter``, ``delete_adapter``;
* with several active adapters (``base_model.set_adapter([...])``) the adapters are
  concatenated along the rank (``A = [A1; A2]``, ``B = [s1·B1, s2·B2]``, scaling 1) and run as
  one kernel call, which is exactly PEFT's sum; autograd carries the gradients back to each
  adapter.  This needs dropout off (PEFT draws an independent mask per adapter).

The forward falls back to PEFT's own forward — counted in :func:`lora_fast.dispatch_stats` as
``peft:fallback(<reason>)`` and warned about once per reason — whenever the fast path would not
compute what PEFT computes: mixed-adapter batches (``adapter_names=``), an active adapter
that is a LoRA variant (DoRA, …) or has ``lora_bias``, several active adapters with dropout,
extra forward arguments.  Disabled or merged adapters run the base layer only (PEFT's path,
nothing to accelerate, not counted).

PEFT's ``LoraModel`` (``peft_model.base_model``) gets a subclass too, whose ``inject_adapter``
converts the LoRA layers that ``add_adapter`` / ``load_adapter`` create after patching (and
warns about those it cannot).  transformers' own adapter API (``model.add_adapter`` on a
``PreTrainedModel``) has no such object: patch again after it.

Layers that cannot be converted at all are left alone and listed in ``report.skipped`` with
the reason (DoRA/variant adapters, ``lora_bias``, ``fan_in_fan_out`` (GPT-2 ``Conv1D``), a base
layer that is neither ``nn.Linear`` nor an NF4 ``Linear4bit``, embedding/conv LoRA layers, …);
:func:`patch` warns once, listing them.
"""
from __future__ import annotations

import collections
import re
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.modules.module as _nn_module

from . import _backend
from . import nf4 as nf4_mod
from ._operand import NF4Operand
from .modules import LoRALinear, NF4LoRALinear, _autocast_input
from .ops import grouped_call, lora_linear

Tensor = torch.Tensor

__all__ = ["PatchReport", "patch", "unpatch", "apply_lora", "loraplus_param_groups"]


@dataclass
class PatchReport:
    """What :func:`patch` did: ``converted`` module names, ``skipped`` name → reason."""

    converted: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    groups: List[List[str]] = field(default_factory=list)
    fused: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lora_fast.patch: {len(self.converted)} LoRA layers converted, {len(self.skipped)} skipped"]
        if self.fused:
            lines[0] += f", {len(self.fused)} norm/MLP/loss modules fused"
        by_reason = collections.defaultdict(list)
        for name, why in self.skipped.items():
            by_reason[why].append(name)
        for why, names in by_reason.items():
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            lines.append(f"  skipped {len(names)}: {why}: {', '.join(names[:3])}{more}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the patched PEFT layer classes (built lazily so that PEFT stays an optional dependency; the
# module-level __getattr__ makes them importable by name, e.g. for pickling)
# --------------------------------------------------------------------------------------------

_PATCHED: Dict[type, type] = {}
_NAMES = {"LoraFastLinear": ("peft.tuners.lora.layer", "Linear"),
          "LoraFastLinear4bit": ("peft.tuners.lora.bnb", "Linear4bit"),
          "LoraFastLoraModel": ("peft.tuners.lora.model", "LoraModel")}


def _is_bnb_4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def _fallback(layer: nn.Module, reason: str) -> None:
    _backend.record("peft", f"fallback({reason})")
    _backend.warn_once(f"patch-fallback:{reason}", f"lora_fast: a patched PEFT layer ran PEFT's own forward: {reason}")


class _FastForwardMixin:
    """forward() of a patched PEFT LoRA layer; everything else is the PEFT class's."""

    _lf_orig_cls: type

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        spec = self._lf_spec(x, args, kwargs)
        if spec is None:
            if args or any(v is not None for v in kwargs.values()):
                return self._lf_orig_cls.forward(self, x, *args, **kwargs)
            return self._lf_orig_cls.forward(self, x)
        group = self.__dict__.get("_lf_group")
        if group is not None:
            y = group.forward(self, x)
            if y is not None:
                return y
        return _run_spec(spec)

    def merge(self, *args, **kwargs):
        out = super().merge(*args, **kwargs)
        self._lf_refresh_nf4()
        return out

    def unmerge(self, *args, **kwargs):
        out = super().unmerge(*args, **kwargs)
        self._lf_refresh_nf4()
        return out

    def _lf_refresh_nf4(self) -> None:
        """PEFT's merge/unmerge of a 4-bit base re-quantises it into a new Params4bit: build its
        NF4 view now, eagerly, so that an already-compiled model traces the new weight's view
        instead of stopping at one built for the old weight."""
        self.__dict__.pop("_lf_nf4_cache", None)
        base = self.get_base_layer()
        if _is_bnb_4bit(base) and not torch.compiler.is_compiling():
            _nf4_operand(self, base)

    def _lf_spec(self, x: Tensor, args=(), kwargs=None):
        """What the fast path runs for input ``x``: ``(x in the compute dtype, base, bias, A, B,
        s, p, output dtype or None)``; None where PEFT's own forward must run (fallbacks are
        recorded and warned about here)."""
        kwargs = kwargs or {}
        if args or any(v is not None for v in kwargs.values()):
            if kwargs.get("adapter_names") is not None:
                _fallback(self, "mixed-adapter batch (adapter_names=...)")
            else:
                _fallback(self, "extra forward arguments")
            return None
        if self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return None
        for a in active:
            if a in self.lora_variant:
                _fallback(self, f"active adapter uses a LoRA variant ({type(self.lora_variant[a]).__name__})")
                return None
            if self.lora_bias.get(a, False):
                _fallback(self, "active adapter has lora_bias=True")
                return None
        base_layer = self.get_base_layer()
        if _hooked(base_layer, self, active):
            _fallback(self, "hooks on its base layer or LoRA submodules (PEFT's forward calls those modules; the "
                            "fused path reads their weights directly)")
            return None
        if "_hf_hook" in base_layer.__dict__ and _offload_reason(self, active):
            _fallback(self, "weights offloaded by accelerate hooks")
            return None
        ps = [_dropout_p(self.lora_dropout[a]) for a in active]
        if len(active) > 1 and any(p > 0 for p in ps):
            _fallback(self, "several active adapters with dropout")
            return None

        if len(active) == 1:
            a = active[0]
            A, B, s, p = self.lora_A[a].weight, self.lora_B[a].weight, self.scaling[a], ps[0]
        else:  # sum of adapters = one adapter of the concatenated rank
            A = torch.cat([self.lora_A[a].weight for a in active], dim=0)
            B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], dim=1)
            s, p = 1.0, 0.0
        bias = base_layer.bias
        if _is_bnb_4bit(base_layer):
            compute = getattr(base_layer, "compute_dtype", None)
            # as bnb's Linear4bit.forward: compute in compute_dtype, return the input's dtype
            xc = x.to(compute) if compute is not None else _autocast_input(x)
            return (xc, _nf4_operand(self, base_layer), None if bias is None else bias.to(xc.dtype), A, B, s, p, x.dtype)
        xc = _autocast_input(x)
        return (xc, base_layer.weight, None if bias is None else bias.to(xc.dtype), A, B, s, p, None)


def _hooked(base_layer: nn.Module, layer: nn.Module, active) -> bool:
    """Hooks that PEFT's forward would run and the fused path would bypass: on the base layer or
    an active adapter's lora_A / lora_B / lora_dropout module (e.g. DeepSpeed ZeRO-3's parameter
    gathering, activation probes), or global module hooks.  Runs on every call: plain dict
    lookups (no nn.Module.__getattr__), ~0.9 µs on the CPU machine (2.7 µs through attributes)."""
    g = _nn_module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return True
    m = base_layer
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return True
    mods = layer._modules
    subs = (mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules)
    for a in active:
        for d in subs:
            m = d[a]
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return True
    return False


def _run_spec(spec) -> Tensor:
    xc, base, bias, A, B, s, p, out_dtype = spec
    y = lora_linear(xc, base, bias, A, B, s, p)
    return y if out_dtype is None else y.to(out_dtype)


# sibling projections that read the same input in common architectures (Llama/Mistral/Qwen
# attention and MLP, Mixtral experts, BERT-style attention), each in its call order
SIBLING_SETS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"), ("query", "key", "value"))


class _SiblingGroup:
    """Patched sibling layers of one parent module that read the same input (q/k/v, gate/up):
    ``patch(model, group_siblings=True)``.

    When the group's first member is called with X, the whole group goes through
    :func:`lora_fast.ops.grouped_call` (X read once for all their XA and dA) and the other
    members' outputs wait in a stash, claimed when they are called with that very tensor.  The
    rule depends only on the calls inside one forward of the parent, so a checkpointed
    recompute does exactly what the forward did.  A member called with another tensor runs on
    its own (``grouped:stash_miss``); outputs nobody claimed are dropped when the parent returns
    (``grouped:unclaimed``); where the grouped call does not apply (dropout, other backends,
    torch.compile) every member runs on its own -- all counted in ``dispatch_stats``."""

    def __init__(self, members: List[nn.Module]):
        self.members = members
        self.stash: Dict[int, Tensor] = {}
        self.stash_x: Optional[Tensor] = None
        self.stash_grad = False
        self.active = 0  # inside a forward of the parent (only then is anything stashed or claimed)

    def _clear(self) -> None:
        self.stash.clear()
        self.stash_x = None

    def pre_hook(self, module, args) -> None:
        if not torch.compiler.is_compiling():
            self.active += 1
            self._clear()

    def post_hook(self, module, args, output) -> None:
        # registered with always_call=True: also runs when the parent's forward raises (e.g. the
        # early stop of a non-reentrant checkpoint recompute), so nothing stays referenced
        if torch.compiler.is_compiling():
            return
        self.active = max(0, self.active - 1)
        if self.stash:
            _backend.record("grouped", "unclaimed")
        self._clear()

    def forward(self, layer: nn.Module, x: Tensor) -> Optional[Tensor]:
        """The layer's output if the group provides it, else None (the layer runs alone)."""
        if torch.compiler.is_compiling() or self.active == 0:
            return None  # a member called on its own, outside its parent's forward
        key = id(layer)
        if key in self.stash:
            if x is self.stash_x and torch.is_grad_enabled() == self.stash_grad:
                y = self.stash.pop(key)
                if not self.stash:
                    self.stash_x = None
                return y
            _backend.record("grouped", "stash_miss")
            self._clear()
            return None
        if layer is not self.members[0]:
            return None
        self._clear()
        specs = [m._lf_spec(x) for m in self.members]
        if any(sp is None or sp[6] > 0 for sp in specs):
            _backend.record("grouped", "per_layer(dropout or a PEFT fallback)")
            return None
        xc, out_dtype = specs[0][0], specs[0][7]
        if any(sp[0].dtype != xc.dtype or sp[7] != out_dtype for sp in specs):
            _backend.record("grouped", "per_layer(members compute in different dtypes)")
            return None
        ys = grouped_call(xc, [sp[1:6] for sp in specs])
        if ys is None:
            return None
        if out_dtype is not None:
            ys = [y.to(out_dtype) for y in ys]
        self.stash_x = x
        self.stash_grad = torch.is_grad_enabled()
        for m, y in zip(self.members[1:], ys[1:]):
            self.stash[id(m)] = y
        return ys[0]


def _dropout_p(module: nn.Module) -> float:
    if isinstance(module, nn.Dropout):
        return float(module.p) if module.training else 0.0
    return 0.0


def _nf4_operand(layer: nn.Module, base_layer: nn.Module) -> NF4Operand:
    """The NF4 operand viewing the bnb weight's own tensors, cached while the weight is unchanged."""
    w = base_layer.weight
    qs = getattr(w, "quant_state", None)
    if qs is None and not hasattr(w, "bnb_quantized"):  # not a Params4bit any more (else from_bnb explains)
        kind = type(w).__name__
        try:
            from torch.distributed.tensor import DTensor

            sharded = isinstance(w, DTensor)
        except Exception:  # pragma: no cover - torch without torch.distributed
            sharded = False
        raise RuntimeError(
            f"lora_fast: the 4-bit base weight of {type(base_layer).__name__} is a {kind} without a bitsandbytes "
            f"quant_state{' (an FSDP2-sharded DTensor)' if sharded else ''}, so its NF4 layout is lost. "
            "This happens when FSDP2's fully_shard shards a bitsandbytes Linear4bit weight, which lora_fast "
            "does not support: keep the frozen NF4 weights out of sharding with "
            "fully_shard(module, ignored_params={m.weight for m in model.modules() "
            "if isinstance(m, bnb.nn.Linear4bit)}) (they stay replicated per rank; the LoRA weights shard), "
            "or convert the layers with lora_fast.apply_lora / NF4LoRALinear.from_bnb, whose NF4 bytes are buffers."
        )
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        nf4_mod.restore_bnb_layout(w)  # (before the cache key, which holds the QuantState)
        qs = w.quant_state
    cached = layer.__dict__.get("_lf_nf4_cache")
    if torch.compiler.is_compiling():
        # data pointers and the checks in NF4Tensor.from_bnb cannot be traced: take the view that
        # patch() (or the last eager call) built, if it belongs to this weight (a new Params4bit,
        # e.g. after PEFT's merge/unmerge, comes with a new quant_state object) and device
        if cached is not None and cached[2] is qs and cached[0][3] == w.device:
            return cached[1]
        raise RuntimeError(
            f"lora_fast: torch.compile reached a patched 4-bit layer ({type(base_layer).__name__}) whose NF4 view "
            "was built for another weight or device (the weight was replaced, e.g. by merge/unmerge, or moved): "
            "run one eager forward of the model (or lora_fast.patch it again), then compile"
        )
    key = (id(w), w.data_ptr(), id(qs), w.device)
    if cached is not None and cached[0] == key and cached[2] is qs:
        return cached[1]
    op = nf4_mod.NF4Tensor.from_bnb(w).operand()
    layer.__dict__["_lf_nf4_cache"] = (key, op, qs)
    return op


def swap_class(mod: nn.Module, new_cls: type) -> Optional[str]:
    """Give ``mod`` the class ``new_cls`` (a subclass of its class, or back), keeping a forward
    that was replaced on the instance working: accelerate's hooks (``dispatch_model``, CPU/disk
    offload) keep the class's bound ``forward`` in ``_old_forward`` and call it, so it is
    re-bound to the new class.  Returns why the swap cannot take effect (None: done)."""
    old_cls = type(mod)
    d = mod.__dict__
    rebind = []
    for attr in ("_old_forward", "forward"):
        f = d.get(attr)
        if f is None:
            continue
        if getattr(f, "__self__", None) is mod and getattr(f, "__func__", None) is old_cls.forward:
            rebind.append(attr)
        elif attr == "forward" and "_old_forward" in d:
            continue  # accelerate's wrapper: it calls _old_forward
        else:
            return f"its forward is replaced on the instance ({attr}={f!r:.80}), which a class swap would not reach"
    mod.__class__ = new_cls
    for attr in rebind:
        d[attr] = types.MethodType(new_cls.forward, mod)
    return None


def _patched_class(orig: type) -> type:
    cls = _PATCHED.get(orig)
    if cls is None:
        name = "LoraFast" + orig.__name__
        mixin = _TunerMixin if orig.__name__ == "LoraModel" else _FastForwardMixin
        cls = type(name, (mixin, orig), {"_lf_orig_cls": orig, "__module__": __name__})
        cls.__qualname__ = name
        _PATCHED[orig] = cls
        globals()[name] = cls
    return cls


def __getattr__(name: str):  # module attribute hook: LoraFastLinear / LoraFastLinear4bit on demand
    if name in _NAMES:
        import importlib

        mod, attr = _NAMES[name]
        return _patched_class(getattr(importlib.import_module(mod), attr))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _supported_classes() -> Dict[type, str]:
    from peft.tuners.lora.layer import Linear

    out = {Linear: "dense"}
    try:
        from peft.tuners.lora.bnb import Linear4bit

        out[Linear4bit] = "bnb4"
    except Exception:  # pragma: no cover - bitsandbytes missing
        pass
    return out


def _offloaded(module: nn.Module) -> bool:
    """An accelerate hook that loads the module's weights only when it is called (CPU/disk
    offload: ``cpu_offload``, ``device_map`` with "cpu"/"disk")."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return False
    hooks = getattr(hook, "hooks", None) or [hook]
    return any(getattr(h, "offload", False) for h in hooks)


def _offload_reason(mod: nn.Module, adapters) -> Optional[str]:
    subs = [mod.get_base_layer()] + [m for a in adapters for m in (mod.lora_A[a], mod.lora_B[a])]
    if any(_offloaded(m) for m in subs):
        return ("its weights are offloaded by accelerate hooks (loaded only when the submodules are called; "
                "the fused path reads them directly)")
    return None


def _skip_reason(mod: nn.Module) -> Optional[str]:
    """Why a PEFT LoRA layer cannot be converted (None: it can)."""
    supported = _supported_classes()
    cls = type(mod)
    if cls not in supported:
        return f"unsupported PEFT layer type {cls.__module__}.{cls.__name__} (only linear LoRA layers are patched)"
    if getattr(mod, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (Conv1D-style transposed weight) is not supported"
    base = mod.get_base_layer()
    if _is_bnb_4bit(base):
        try:
            nf4_mod.NF4Tensor.from_bnb(base.weight)  # (restores bitsandbytes' CPU packing in place)
        except Exception as exc:
            return f"unsupported 4-bit base layer: {exc}"
    elif type(base) is not nn.Linear:
        return f"unsupported base layer {type(base).__module__}.{type(base).__name__} (need nn.Linear or NF4 Linear4bit)"
    elif not base.weight.dtype.is_floating_point:
        return f"base weight dtype {base.weight.dtype} is not floating point"
    adapters = [a for a in mod.active_adapters if a in mod.lora_A]
    for a in adapters:
        if a in mod.lora_variant or mod.use_dora.get(a, False):
            variant = type(mod.lora_variant[a]).__name__ if a in mod.lora_variant else "DoraLinearVariant"
            label = "DoRA" if "Dora" in variant else variant
            return f"active adapter {a!r} uses {label}, which lora_fast does not implement"
        if mod.lora_bias.get(a, False):
            return f"active adapter {a!r} uses lora_bias=True"
    if len(adapters) > 1 and any(_dropout_p(mod.lora_dropout[a]) > 0 for a in adapters):
        # (in eval() dropout is off and the layer converts; a later train() runs PEFT's forward
        # for such a layer, warned and counted)
        return f"several active adapters {adapters} with dropout: PEFT mixes them with independent masks"
    return _offload_reason(mod, adapters)


def patch(model: nn.Module, group_siblings: Union[bool, Sequence[Sequence[str]]] = False,
          fuse_ops: bool = False) -> PatchReport:
    """Convert, in place, every PEFT LoRA linear layer of ``model`` to run on lora_fast.

    ``model`` is a ``PeftModel``, a ``LoraModel`` or any module holding PEFT LoRA layers (the
    model may also be wrapped by DDP: pass ``ddp.module``).  Tensors are shared, nothing is
    re-quantised; see the module docstring.  Returns a :class:`PatchReport`; layers that are
    skipped are listed there with a reason and warned about (once per call).

    ``group_siblings=True`` (opt-in, not yet measured faster on a GPU: bench/NOTES.md) also runs
    the patched sibling layers of one parent that read the same input as one grouped call
    (:func:`lora_fast.ops.grouped_call`; see ``_SiblingGroup``): the name sets of
    ``SIBLING_SETS`` (q/k/v, gate/up, ...), or the sets passed instead of True, each in its call
    order.  ``report.groups`` lists the groups formed.

    ``fuse_ops=True`` (opt-in, not yet measured on a GPU: bench/NOTES.md) also swaps the model's
    Llama-style RMSNorm and gated-SiLU MLP modules, and a causal LM's loss, for fused kernels
    (:func:`lora_fast.norm_mlp.fuse_ops`); ``report.fused`` lists them and ``report.skipped``
    says why any such module was left alone.
    """
    try:
        from peft.tuners.lora import LoraLayer
    except Exception as exc:  # pragma: no cover
        raise ImportError("lora_fast.patch needs PEFT installed") from exc
    sets = _sibling_sets(group_siblings) if group_siblings else None  # checked before anything changes
    report = PatchReport()
    _convert_layers(model, report, LoraLayer)
    _patch_tuners(model)
    if sets is not None:
        report.groups = _install_groups(model, sets)
    else:
        _remove_groups(model)  # patching again without grouping turns it off
    if fuse_ops:
        from .norm_mlp import fuse_ops as _fuse

        fused = _fuse(model)
        report.fused = fused.converted
        report.skipped.update(fused.skipped)
    if report.skipped:
        warnings.warn(str(report), RuntimeWarning, stacklevel=2)
    elif not report.converted:
        warnings.warn("lora_fast.patch: the model has no PEFT LoRA layers; nothing was converted",
                      RuntimeWarning, stacklevel=2)
    return report


def _convert_layers(model: nn.Module, report: PatchReport, LoraLayer: type, skip_ids=frozenset(),
                    prefix: str = "") -> None:
    """Swap the class of every convertible PEFT LoRA layer of ``model`` (except the modules whose
    id is in ``skip_ids``); fill ``report`` with their names (``prefix`` + path)."""
    for name, mod in model.named_modules(prefix=prefix):
        if not isinstance(mod, LoraLayer) or id(mod) in skip_ids:
            continue
        if isinstance(mod, _FastForwardMixin):
            report.converted.append(name)
            continue
        why = _skip_reason(mod)
        if why is None:
            why = swap_class(mod, _patched_class(type(mod)))
        if why is not None:
            report.skipped[name] = why
            continue
        mod.__dict__.pop("_lf_nf4_cache", None)
        mod.__dict__.pop("_lf_unpatched", None)
        base = mod.get_base_layer()
        if _is_bnb_4bit(base):
            _nf4_operand(mod, base)  # built eagerly: torch.compile traces the cached view
        report.converted.append(name)


def _patch_tuners(model: nn.Module) -> None:
    """Give PEFT's ``LoraModel`` (``peft_model.base_model``) a subclass whose ``inject_adapter``
    converts the LoRA layers that ``add_adapter`` / ``load_adapter`` create after patching."""
    try:
        from peft.tuners.lora.model import LoraModel
    except Exception:  # pragma: no cover - an old or partial PEFT
        return
    for mod in model.modules():
        if type(mod) is LoraModel:
            swap_class(mod, _patched_class(LoraModel))


class _TunerMixin:
    """``inject_adapter`` of a patched PEFT ``LoraModel``: a new adapter on modules that had no
    LoRA layer yet creates PEFT layers there; they are converted as :func:`patch` would, and
    those that cannot be are warned about (their reasons, as ``report.skipped`` gives them)."""

    _lf_orig_cls: type

    def inject_adapter(self, *args, **kwargs):
        from peft.tuners.lora import LoraLayer

        # only the layers this call creates: the others are as patch() or unpatch() left them
        old = [m for m in self.modules() if isinstance(m, LoraLayer)]
        before = {id(m) for m in old}
        out = super().inject_adapter(*args, **kwargs)
        if (old and not any(isinstance(m, _FastForwardMixin) for m in old)
                and any(m.__dict__.get("_lf_unpatched") for m in old)):
            return out  # the layers were unpatched since (unpatch of a submodule): leave the new ones too
        report = PatchReport()
        _convert_layers(self, report, LoraLayer, skip_ids=before, prefix="base_model")
        if report.skipped:
            warnings.warn(f"lora_fast: LoRA layers created by add_adapter/load_adapter after patch(): {report}",
                          RuntimeWarning, stacklevel=2)
        return out


def _sibling_sets(group_siblings) -> List[tuple]:
    """``patch``'s ``group_siblings`` as a list of name tuples: True gives :data:`SIBLING_SETS`;
    otherwise a list of sets of child names (each at least two names, no name in two sets)."""
    if group_siblings is True:
        return list(SIBLING_SETS)
    bad = TypeError(
        "group_siblings takes True or a list of sets of sibling names, e.g. [('q_proj', 'k_proj', 'v_proj'), "
        f"('gate_proj', 'up_proj')]; got {group_siblings!r}"
    )
    if isinstance(group_siblings, (str, bytes)) or not isinstance(group_siblings, Iterable):
        raise bad
    sets, seen = [], {}
    for g in group_siblings:
        if isinstance(g, (str, bytes)) or not isinstance(g, Iterable):
            raise bad
        names = tuple(g)
        if not all(isinstance(n, str) for n in names):
            raise bad
        if len(names) < 2:
            raise ValueError(f"group_siblings: the set {names!r} names fewer than two layers")
        for n in names:
            if n in seen:
                raise ValueError(f"group_siblings: {n!r} is named in two sibling sets ({seen[n]!r} and {names!r})")
            seen[n] = names
        sets.append(names)
    return sets


def _install_groups(model: nn.Module, sets: Sequence[Sequence[str]]) -> List[List[str]]:
    """Attach a :class:`_SiblingGroup` to every parent's patched children named by one of
    ``sets`` (at least two present, equal in_features), with the parent's forward hooks that
    clear its stash.  Returns their names.  ``sets`` are disjoint (:func:`_sibling_sets`), so a
    layer joins at most one group."""
    _remove_groups(model)
    names = []
    for pname, parent in model.named_modules():
        children = dict(parent.named_children())
        for names_in_set in sets:
            members = [(c, children[c]) for c in names_in_set
                       if isinstance(children.get(c), _FastForwardMixin)]
            if len(members) < 2 or len({int(m.in_features) for _, m in members}) != 1:
                continue
            group = _SiblingGroup([m for _, m in members])
            for _, m in members:
                m.__dict__["_lf_group"] = group
            handles = parent.__dict__.setdefault("_lf_group_handles", [])
            handles.append(parent.register_forward_pre_hook(group.pre_hook))
            handles.append(parent.register_forward_hook(group.post_hook, always_call=True))
            names.append([f"{pname}.{c}" if pname else c for c, _ in members])
    return names


def _remove_groups(model: nn.Module) -> None:
    for mod in model.modules():
        mod.__dict__.pop("_lf_group", None)
        for h in mod.__dict__.pop("_lf_group_handles", []):
            h.remove()


def unpatch(model: nn.Module) -> List[str]:
    """Give every patched layer its PEFT class back (weights are shared, so training is kept), and
    undo :func:`lora_fast.fuse_ops` on the model (``patch(..., fuse_ops=True)`` or a direct call).
    Returns the names restored (see :func:`lora_fast.unfuse_ops` for the fused labels); a layer whose
    forward was replaced on the instance since keeps its class, with a warning."""
    from .norm_mlp import unfuse_ops

    _remove_groups(model)
    restored = unfuse_ops(model)
    for mod in model.modules():
        if isinstance(mod, _TunerMixin):
            swap_class(mod, mod._lf_orig_cls)
    for name, mod in model.named_modules():
        if isinstance(mod, _FastForwardMixin):
            why = swap_class(mod, mod._lf_orig_cls)
            if why is not None:
                warnings.warn(f"lora_fast.unpatch: {name} keeps its patched class: {why}", RuntimeWarning, stacklevel=2)
                continue
            mod.__dict__.pop("_lf_nf4_cache", None)
            mod.__dict__["_lf_unpatched"] = True  # (read by a still-patched LoraModel's inject_adapter)
            restored.append(name)
    return restored


# --------------------------------------------------------------------------------------------
# LoRA without PEFT
# --------------------------------------------------------------------------------------------


def _output_layer_names(model: nn.Module) -> set:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except Exception:
            out = None
    for name, mod in model.named_modules():
        if (out is not None and mod is out) or name.rsplit(".", 1)[-1] == "lm_head":
            names.add(name)
    return names


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) and not isinstance(mod, (LoRALinear, NF4LoRALinear))


def apply_lora(
    model: nn.Module,
    target_modules: Union[str, Sequence[str]] = "all-linear",
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    use_rslora: bool = False,
) -> nn.Module:
    """Add LoRA to ``model`` without PEFT, in place, and return it.

    ``target_modules`` follows PEFT: a list of names (a module matches when its path equals a
    name or ends with ``"." + name``), a string regular expression (full match on the path),
    or ``"all-linear"`` (every linear layer except the output layer, ``lm_head`` /
    ``get_output_embeddings()``).  Matching ``nn.Linear`` layers become :class:`LoRALinear`
    (weight shared) and bitsandbytes NF4 ``Linear4bit`` layers :class:`NF4LoRALinear`
    (``from_bnb``: bytes shared).  Every other parameter is frozen; ``bias`` = ``"none"``,
    ``"all"`` (all biases train) or ``"lora_only"`` (biases of the LoRA layers train).
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {bias!r}")
    all_linear = isinstance(target_modules, str) and target_modules == "all-linear"
    excluded = _output_layer_names(model) if all_linear else set()
    if isinstance(target_modules, str) and not all_linear:
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression ({exc})") from exc
    else:
        pattern = None
    if not isinstance(target_modules, str) and isinstance(target_modules, Iterable):
        target_modules = list(target_modules)  # (a generator is read once)
    if not isinstance(target_modules, str) and (not isinstance(target_modules, list)
                                                or not all(isinstance(t, str) for t in target_modules)):
        raise TypeError(f"target_modules must be 'all-linear', a regular expression or a list of module names, "
                        f"got {target_modules!r}")
    names = None if isinstance(target_modules, str) else list(target_modules)
    if names is not None and not names:
        raise ValueError("target_modules is empty")

    def wanted(path: str, mod: nn.Module) -> bool:
        if all_linear:
            return _is_linear(mod) and path not in excluded
        if pattern is not None:
            return pattern.fullmatch(path) is not None
        return any(path == t or path.endswith("." + t) for t in names)

    matches = [(p, m) for p, m in model.named_modules() if p and wanted(p, m)]
    if not matches:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}")
    for path, mod in matches:
        if not _is_linear(mod):
            raise TypeError(f"target module {path} is a {type(mod).__name__}; only nn.Linear and NF4 "
                            f"bitsandbytes Linear4bit layers can get LoRA")
        if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear and not _is_bnb_4bit(mod):
            raise TypeError(f"target module {path} is a {type(mod).__module__}.{type(mod).__name__}, "
                            f"not nn.Linear or an NF4 Linear4bit")

    # build every new layer first (they share the old tensors, changing nothing): a layer that
    # cannot be converted (an fp4 Linear4bit, a bad rank) raises before the model is touched
    built = []
    for path, mod in matches:
        if _is_bnb_4bit(mod):
            new = NF4LoRALinear.from_bnb(mod, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                         use_rslora=use_rslora)
        else:
            new = LoRALinear.from_linear(mod, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                         use_rslora=use_rslora)
        new.train(mod.training)
        built.append((path, new))
    for p in model.parameters():
        p.requires_grad_(False)
    for path, new in built:
        parent_name, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    for mod in model.modules():
        if isinstance(mod, (LoRALinear, NF4LoRALinear)):
            mod.lora_A.requires_grad_(True)
            mod.lora_B.requires_grad_(True)
            if bias == "lora_only" and mod.bias is not None:
                mod.bias.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------
# LoRA+
# --------------------------------------------------------------------------------------------


def loraplus_param_groups(
    model: nn.Module, lr: float, lr_ratio: float = 16.0, weight_decay: float = 0.0
) -> List[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024): the B matrices learn at
    ``lr_ratio · lr``, everything else trainable at ``lr``.

    Works for lora_fast layers (``lora_B``) and PEFT layers (``lora_B.<adapter>.*``,
    ``lora_embedding_B``).  ``weight_decay`` applies to matrices; 1-D parameters (biases, norms)
    get none.  Only parameters with ``requires_grad`` are included, each once.  Empty groups are
    left out; each group carries a ``"name"`` key (ignored by torch optimizers)::

        opt = torch.optim.AdamW(lora_fast.loraplus_param_groups(model, lr=2e-4))
    """
    if lr <= 0 or lr_ratio <= 0:
        raise ValueError(f"lr and lr_ratio must be positive, got lr={lr}, lr_ratio={lr_ratio}")
    b_params = set()
    for mod in model.modules():
        if isinstance(mod, (LoRALinear, NF4LoRALinear)):
            b_params.add(id(mod.lora_B))
    groups = collections.OrderedDict(
        (k, []) for k in ("lora_B", "lora_B_no_decay", "other", "other_no_decay")
    )
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        is_b = id(p) in b_params or "lora_B" in parts or "lora_embedding_B" in parts
        decay = p.dim() >= 2
        key = ("lora_B" if is_b else "other") + ("" if decay else "_no_decay")
        groups[key].append(p)
    out = []
    for key, params in groups.items():
        if not params:
            continue
        out.append({
            "params": params,
            "lr": lr * lr_ratio if key.startswith("lora_B") else lr,
            "weight_decay": weight_decay if not key.endswith("no_decay") else 0.0,
            "name": key,
        })
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out
