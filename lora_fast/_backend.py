"""Backend selection: ``LORA_FAST_BACKEND`` = auto | triton | cuda | torch.

``auto`` picks the fastest backend available for the tensors at hand; naming a backend that
cannot run raises :class:`BackendUnavailableError` (never a silent fallback).  Every time the
``auto`` choice falls back to a slower path the reason is recorded, warned about once, and
visible through :func:`dispatch_stats`.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
import threading
import warnings
from typing import Dict, Tuple

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

_lock = threading.Lock()
_stats: "collections.Counter[Tuple[str, str]]" = collections.Counter()
_warned: set = set()


class BackendUnavailableError(RuntimeError):
    """The backend named by ``LORA_FAST_BACKEND`` (or by the caller) cannot run here."""


def requested_backend() -> str:
    """The backend asked for in the environment (read on every call, so tests may change it)."""
    name = os.environ.get("LORA_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"LORA_FAST_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        )
    return name


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """(usable, reason) for the Triton backend on ``device``."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({exc})"
    if device.type == "cuda":
        major = _capability_major(device.index if device.index is not None else torch.cuda.current_device())
        if major < 8:
            return False, f"GPU compute capability {major}.x < 8.0 (bf16 tensor cores needed)"
        return True, ""
    if device.type == "cpu" and _interpreting():
        return True, ""
    return False, f"tensors on {device.type} (Triton needs CUDA, or TRITON_INTERPRET=1 on CPU)"


def cuda_status(device: torch.device) -> Tuple[bool, str]:
    """(usable, reason) for the CUDA C++ extension on ``device``."""
    if device.type != "cuda":
        return False, f"tensors on {device.type} (the CUDA extension needs a CUDA device)"
    try:
        from . import cuda_ext
    except Exception as exc:
        return False, f"CUDA extension module missing ({exc})"
    return cuda_ext.status()


def record(backend: str, path: str) -> None:
    if torch.compiler.is_compiling():
        return  # a lock cannot be traced; the compiled graph's calls are not counted
    with _lock:
        _stats[(backend, path)] += 1


def warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def dispatch_stats(reset: bool = False) -> Dict[str, int]:
    """How often each (backend, path) ran since start (or the last reset).

    Keys are ``"backend:path"``, e.g. ``"triton:fwd_merged_nf4"``, ``"triton:bwd_split_dense"``,
    ``"torch:reference"`` (the PyTorch reference: the CPU backend under ``auto``) or
    ``"torch:fallback(<reason>)"`` for a fallback from a fast path (also warned once).  Use it to
    confirm that training hits the fast path.
    """
    with _lock:
        out = {f"{b}:{p}": n for (b, p), n in sorted(_stats.items())}
        if reset:
            _stats.clear()
    return out


def select(device: torch.device, *, need_cuda_kernel: bool = False) -> str:
    """The backend to run on ``device``: 'triton', 'cuda' or 'torch'."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise BackendUnavailableError(f"LORA_FAST_BACKEND=triton but Triton cannot run: {why}")
        return "triton"
    if name == "cuda":
        ok, why = cuda_status(device)
        if not ok:
            raise BackendUnavailableError(f"LORA_FAST_BACKEND=cuda but the CUDA backend cannot run: {why}")
        return "cuda"
    # auto
    if device.type != "cuda":
        # CPU tensors: the reference is the CPU backend; that is the design, not a fallback.
        return "torch"
    ok, why = triton_status(device)
    if ok:
        return "triton"
    warn_once(f"auto-fallback:{why}", f"lora_fast: falling back to the PyTorch reference backend: {why}")
    record("torch", f"fallback({why})")
    return "torch"


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` when ``device`` is a CUDA device other than the current one:
    Triton launches on the current device and its stream, so tensors on ``cuda:1`` (a model split
    over GPUs by a device map) must make ``cuda:1`` current first."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def graph_backward(ref_fn, inputs, grad_outputs, op: str):
    """A kernel's backward reached with ``create_graph=True`` (grad mode on inside backward):
    recompute the op with differentiable PyTorch (``ref_fn(*inputs)``) and differentiate that, so
    higher-order gradients are right.  The kernels' own backward is not differentiable.  Slow
    path: warned once and counted.  Returns one gradient (or None) per input."""
    why = "double backward (create_graph=True)"
    warn_once(f"{op}:{why}", f"lora_fast: {op}: {why} runs a differentiable PyTorch backward (slower)")
    record("torch", f"{op}_{why}")
    ins = [t if (t is None or t.requires_grad) else t.detach() for t in inputs]
    with torch.enable_grad():
        out = ref_fn(*ins)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        wrt = [t for t in ins if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None and o.requires_grad]
        gs = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                 allow_unused=True) if wrt and pairs else [None] * len(wrt)
    it = iter(gs)
    return tuple(next(it) if (t is not None and t.requires_grad) else None for t in ins)
