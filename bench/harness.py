"""Timing, memory and parity primitives shared by every case.

Timing follows shared/measure/anchors.py: warm up, then time each call between two CUDA events
with a synchronise after it (so a call's time includes its launch overhead, as a training loop
sees it), and report the median with the 20th/80th percentiles.  The number of warm-up and
timed calls adapts to the call's length (bounded by :class:`TimingCfg`) so a slow provider
cannot eat the run's time budget.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from .env import Dev

Tensor = torch.Tensor


@dataclass(frozen=True)
class TimingCfg:
    warm_ms: float = 20.0  # warm up for about this long ...
    min_warm: int = 2  # ... but at least / at most this many calls (after the first call)
    max_warm: int = 10
    rep_ms: float = 100.0  # time about this long ...
    min_rep: int = 10
    max_rep: int = 50

    def scaled(self, factor: float) -> "TimingCfg":
        return TimingCfg(
            self.warm_ms * factor, max(1, int(self.min_warm * factor)), max(1, int(self.max_warm * factor)),
            self.rep_ms * factor, max(3, int(self.min_rep * factor)), max(3, int(self.max_rep * factor)),
        )


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    n: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _quantile(sorted_vals: List[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(times_ms: List[float]) -> Timing:
    t = sorted(times_ms)
    return Timing(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8), t[0], sum(t) / len(t), len(t))


def _clamp(v: float, lo: int, hi: int) -> int:
    if not math.isfinite(v):
        return hi
    return int(max(lo, min(hi, v)))


def time_fn(fn: Callable[[], object], dev: Dev, cfg: TimingCfg) -> Timing:
    """Median (and quantiles) of ``fn``'s time in ms, each call between two events."""
    fn()  # first call: compilation, autotuning, lazy allocations; raises early if broken
    dev.sync()
    a, b = dev.event(), dev.event()
    a.record()
    fn()
    b.record()
    dev.sync()
    est = max(a.elapsed_time(b), 1e-4)
    for _ in range(_clamp(cfg.warm_ms / est, cfg.min_warm, cfg.max_warm)):
        fn()
    dev.sync()
    n = _clamp(cfg.rep_ms / est, cfg.min_rep, cfg.max_rep)
    starts = [dev.event() for _ in range(n)]
    ends = [dev.event() for _ in range(n)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
        dev.sync()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def graph_time(fn: Callable[[], object], dev: Dev, inner: int = 10, rep: int = 20) -> Timing:
    """Per-call time of ``fn`` under CUDA-graph replay (see :meth:`Dev.graph_time_ms`)."""
    return summarize(dev.graph_time_ms(fn, inner, rep))


def peak_extra_mb(fn: Callable[[], object], dev: Dev) -> Optional[float]:
    """Peak memory allocated by one call of ``fn`` above what was allocated before it (MB).
    Inputs and the layer exist beforehand, so they are not counted; what the call returns
    (gradients) and what it frees again (saved activations, dequantised buffers) are."""
    if not dev.memory_supported():
        return None
    dev.sync()
    dev.free_cache()
    dev.reset_peak()
    base = dev.allocated()
    out = fn()
    dev.sync()
    peak = dev.max_allocated() - base
    del out
    return peak / 2**20


# ---------------------------------------------------------------------------------------------
# parity: err(provider) <= 2 * err(plain PyTorch in the same dtype) + atol, both against fp64
# ---------------------------------------------------------------------------------------------
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def compare(actual: Tensor, ref64: Tensor, same_dtype: Tensor, dtype: torch.dtype) -> Dict[str, object]:
    """Worst-element comparison of ``actual`` with the fp64 ``ref64``; the bar is twice the error
    plain PyTorch makes in ``dtype`` (``same_dtype``) plus an absolute floor."""
    a = actual.detach().to(torch.float64)
    r = ref64.detach().to(torch.float64)
    t = same_dtype.detach().to(torch.float64)
    out: Dict[str, object] = {"shape": list(a.shape)}
    if a.shape != r.shape:
        out.update(ok=False, why=f"shape {tuple(a.shape)} != reference {tuple(r.shape)}")
        return out
    fin_a, fin_r = torch.isfinite(a), torch.isfinite(r)
    if not torch.equal(fin_a, fin_r):
        idx = torch.nonzero(fin_a != fin_r)[0].tolist()
        out.update(ok=False, why=f"NaN/inf mismatch at {idx}: got {a[tuple(idx)].item()}, want {r[tuple(idx)].item()}")
        return out
    diff = (a - r).abs().nan_to_num(0.0)
    flat = int(diff.argmax()) if diff.numel() else 0
    err = diff.max().item() if diff.numel() else 0.0
    torch_err = (t - r).abs().nan_to_num(0.0).max().item() if t.numel() else 0.0
    bar = 2.0 * torch_err + ATOL.get(dtype, 1e-2)
    rnorm = r.norm().item()
    idx = [int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)] if diff.dim() else []
    out.update(
        ok=bool(err <= bar),
        max_err=err,
        bar=bar,
        torch_err=torch_err,
        rel_err=(diff.norm().item() / rnorm) if rnorm > 0 else err,
        worst=f"{idx}: got {a.reshape(-1)[flat].item():.6g}, want {r.reshape(-1)[flat].item():.6g}" if diff.numel() else "",
    )
    return out
