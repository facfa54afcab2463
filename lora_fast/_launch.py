"""Cheap repeat launches of the Triton kernels.

Triton's own launch path (``kernel[grid](...)``) re-binds the arguments, re-computes the
specialisation and the autotune key and looks both up on every call.  On the H100 host of our
measurements that cost about 180 µs of CPU per launch (``python -m bench.breakdown --cprofile``:
``Autotuner.run`` + ``JITFunction.run``), more than the GPU time of most adapter kernels, so a
k_proj training step (five launches) was CPU-bound.

:func:`launch` keeps, per kernel, a table from a *launch key* to the compiled kernel the normal
path produced for it.  The launch key is at least as fine as Triton's own cache key: every
tensor's dtype and 16-byte alignment, every specialised integer's ``== 1`` / ``% 16 == 0`` /
i32-i64-u64 class, the value of every constexpr and autotune-key argument, the compile options
and the heuristics' values.  A new key goes through ``kernel[grid](...)`` (compiling and
autotuning as usual); a known key launches the compiled kernel directly with the same argument
list Triton itself passes.

``LORA_FAST_FAST_LAUNCH=0`` turns it off (every launch through Triton's path); it is never used
under ``TRITON_INTERPRET=1`` nor on Triton versions whose launcher convention this module does
not know (before 3.4), which :func:`status` reports.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import torch

_I32 = (-(2**31), 2**31 - 1)


def _triton_ok() -> Tuple[bool, str]:
    try:
        import triton
    except Exception as exc:  # pragma: no cover
        return False, f"triton not importable ({exc})"
    # From 3.4 (``triton.knobs``) on, JITFunction.run passes *all* bound arguments, constexprs
    # included, to ``CompiledKernel.run``; older versions pass the non-constexpr ones only.
    if not hasattr(triton, "knobs"):
        return False, f"triton {triton.__version__} predates the launcher convention this path uses (3.4+)"
    return True, ""


_OK = None


def status() -> Tuple[bool, str]:
    """(enabled, reason) of the direct-launch path for the current environment."""
    global _OK
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False, "TRITON_INTERPRET=1"
    if os.environ.get("LORA_FAST_FAST_LAUNCH", "1").strip().lower() in ("0", "off", "false", "no"):
        return False, "LORA_FAST_FAST_LAUNCH=0"
    if _OK is None:
        _OK = _triton_ok()
    return _OK


class _Info:
    """What :func:`launch` needs to know about one (possibly autotuned / heuristics-wrapped) kernel."""

    __slots__ = ("autotuner", "heuristics", "arg_names", "name_set", "constexpr", "dns", "tune_keys", "table",
                 "name_kinds")

    def __init__(self, kernel) -> None:
        import triton

        self.autotuner = kernel if isinstance(kernel, triton.runtime.Autotuner) else None
        fn = kernel.fn if self.autotuner is not None else kernel
        self.heuristics = fn if isinstance(fn, triton.runtime.Heuristics) else None
        jit = fn.fn if self.heuristics is not None else fn
        if not isinstance(jit, triton.runtime.JITFunction):
            raise TypeError(f"not a Triton kernel: {type(jit).__name__}")
        self.arg_names = list(jit.arg_names)
        self.name_set = frozenset(self.arg_names)
        self.constexpr = frozenset(p.name for p in jit.params if p.is_constexpr)
        self.dns = frozenset(p.name for p in jit.params if p.do_not_specialize)
        self.tune_keys = tuple(self.autotuner.keys) if self.autotuner is not None else ()
        self.table: Dict[tuple, Any] = {}
        # (name, kind) per argument for _key: 0 constexpr, 1 do_not_specialize, 2 specialised
        self.name_kinds = tuple((n, 0 if n in self.constexpr else (1 if n in self.dns else 2)) for n in self.arg_names)


_INFO: Dict[int, _Info] = {}


def _arg_key(name: str, v, info: _Info):
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.data_ptr() % 16 == 0)
    if name in info.constexpr:
        return v
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        wide = 0 if _I32[0] <= v <= _I32[1] else (1 if -(2**63) <= v < 2**63 else 2)  # i32 / i64 / u64
        if name in info.dns:
            return ("i", wide)
        return ("i", wide, v == 1, v % 16 == 0)
    if isinstance(v, float):
        return "f"
    if v is None:
        return None
    return (type(v).__name__, v)  # anything else: keyed by value


_I64 = (-(2**63), 2**63 - 1)
_Tensor = torch.Tensor


def _key(info: _Info, bound: Dict[str, Any]) -> tuple:
    """``tuple(_arg_key(n, bound[n], info) for n in info.arg_names if n in bound)``, the same
    tuple, with the common argument types (exact int, float, bool, None, tensors) classified inline:
    this runs on every launch, and per-argument calls made it ~10 µs of a ~16 µs launch on the CPU
    (tests/test_launch.py checks the two agree on every kind of argument)."""
    out = []
    app = out.append
    lo, hi = _I32
    lo64, hi64 = _I64
    for n, kind in info.name_kinds:
        if n not in bound:
            continue
        v = bound[n]
        t = type(v)
        if t is int:
            if kind == 0:
                app(v)
                continue
            wide = 0 if lo <= v <= hi else (1 if lo64 <= v <= hi64 else 2)
            app(("i", wide) if kind == 1 else ("i", wide, v == 1, v % 16 == 0))
        elif isinstance(v, _Tensor):
            app((v.dtype, v.data_ptr() % 16 == 0))
        elif kind == 0 or t is bool:
            app(v)
        elif t is float:
            app("f")
        elif v is None:
            app(None)
        else:
            app(_arg_key(n, v, info))
    return tuple(out)


def _meta(info: _Info, bound: Dict[str, Any], cfg: Dict[str, Any]):
    """Every argument value of a launch (the call's, the autotuned config's, the heuristics')
    and the heuristics' values as a key."""
    meta = {**bound, **cfg}
    if info.heuristics is None:
        return meta, ()
    for name, heur in info.heuristics.values.items():
        meta[name] = heur(meta)
    return meta, tuple(meta[n] for n in info.heuristics.values)


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, through the direct path when this launch key was seen."""
    if not status()[0]:
        kernel[grid](*args, **kwargs)
        return
    info = _INFO.get(id(kernel))
    if info is None:
        info = _INFO[id(kernel)] = _Info(kernel)
    names = info.arg_names
    bound = dict(zip(names, args))
    options = []
    for k, v in kwargs.items():
        if k in info.name_set:
            bound[k] = v
        else:
            options.append((k, v))
    key = _key(info, bound)
    key += tuple(bound[n] for n in info.tune_keys if n in bound)
    key += tuple(options)
    key += (torch.cuda.current_device(),)  # a compiled kernel is loaded per device
    entry = info.table.get(key)
    if entry is not None:
        cfg, kernels = entry
        meta, hkey = _meta(info, bound, cfg)
        ck = kernels.get(hkey)
        if ck is not None:
            g = grid(meta) if callable(grid) else grid
            ck[tuple(g) + (1,) * (3 - len(g))](*[meta[n] for n in names])
            return
    # new launch key: Triton's own path, then remember the compiled kernel
    ck = kernel[grid](*args, **kwargs)
    if ck is None or not hasattr(ck, "function"):
        return
    cfg = dict(info.autotuner.best_config.kwargs) if info.autotuner is not None else {}
    meta, hkey = _meta(info, bound, cfg)
    if any(n not in meta for n in names):
        return  # an argument left to its default: not worth special-casing
    if entry is None:
        entry = info.table[key] = (cfg, {})
    if entry[0] == cfg:
        entry[1][hkey] = ck


def clear() -> None:
    """Forget every remembered compiled kernel (tests)."""
    for info in _INFO.values():
        info.table.clear()
