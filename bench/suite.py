"""The run: providers side by side over the cases of a profile, fail-soft.

An exception in one provider/case is recorded (row status ``error`` with the message) and the
run goes on; a provider that cannot run here is listed once with its reason and skipped; a case
reached after the profile's time budget is recorded as skipped.  See bench/README.md for the
cases and the meaning of every field.
"""
from __future__ import annotations

import collections
import gc
import time
import traceback
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import harness
from .env import Dev, GraphUnsupported
from .profiles import Profile, Shape
from .providers import Assets, Built, LayerSpec, Provider, Unavailable, all_providers, check_available, probe

Tensor = torch.Tensor

TRAIN_MODES = ("fwd", "bwd", "step")
# most important first: the time budget skips from the end
ORDER = ("hw", "parity", "main", "e2e", "decode", "msweep", "variants", "rsweep")


def lora_flops(mode: str, M: int, K: int, N: int, r: int) -> float:
    """Useful floating-point work of a LoRA layer: fwd x·W0ᵀ + x·Aᵀ + xa·Bᵀ; bwd dY·W0, dY·B,
    (dY·B)·A, dA, dB; step both (4MNK + 6Mr(N+K), as shared/measure/anchors.py counts)."""
    gemm = 2.0 * M * N * K
    low = 2.0 * M * r * (N + K)
    return {"fwd": gemm + low, "bwd": gemm + 2 * low, "step": 2 * gemm + 3 * low}.get(mode, gemm + low)


def ceiling_flops(mode: str, M: int, K: int, N: int) -> float:
    gemm = 2.0 * M * N * K
    return 2 * gemm if mode == "step" else gemm


def _short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}"
    msg = " ".join(msg.split())
    return msg[:500]


def _lora_fast_dispatch() -> Dict[str, int]:
    try:
        import lora_fast

        return dict(lora_fast.dispatch_stats())
    except Exception:
        return {}


def make_inputs(shape: Shape, M: int, device: torch.device, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """X (M, K) bf16 requiring grad and dY (M, N) bf16, random (never zeros), reproducible: drawn
    on the CPU from a seed of (shape, M) and copied to the device once, shared by all providers."""
    g = torch.Generator(device="cpu")
    g.manual_seed(1000003 * M + shape.K + 7 * shape.N + seed)
    X = torch.randn(M, shape.K, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    dY = torch.randn(M, shape.N, generator=g).to(device, torch.bfloat16)
    return X, dY


def make_callables(built: Built, X: Tensor, dY: Tensor) -> Dict[str, Callable[[], object]]:
    """The timed callables of a provider's layer:

    fwd   the training forward (autograd records the graph, X requires grad);
    bwd   backward alone: ``autograd.grad`` of one forward's output, graph retained between calls;
    step  forward + backward for dX, dA, dB (``autograd.grad``, so no .grad accumulation is timed).
    """
    if built.custom is not None:
        return built.custom(X, dY)
    params = [X] + list(built.trainables)
    held: Dict[str, Tensor] = {}

    def fwd():
        return built.forward(X)

    def step():
        return torch.autograd.grad(built.forward(X), params, dY)

    def bwd():
        if "out" not in held:
            held["out"] = built.forward(X)
        return torch.autograd.grad(held["out"], params, dY, retain_graph=True)

    def release():
        held.clear()

    return {"fwd": fwd, "bwd": bwd, "step": step, "_release": release}


class Runner:
    def __init__(self, profile: Profile, dev: Dev, provider_names: Sequence[str], *, allow_interpret: bool = False,
                 budget_s: Optional[float] = None, log: Callable[[str], None] = print) -> None:
        self.profile = profile
        self.dev = dev
        self.device = dev.torch_device
        self.t0 = time.perf_counter()
        self.budget_s = profile.budget_s if budget_s is None else budget_s
        self._print = log
        self.rows: List[Dict[str, object]] = []
        self.parity: List[Dict[str, object]] = []
        self.errors: List[Dict[str, object]] = []
        self.skipped: List[Dict[str, object]] = []
        self.case_times: Dict[str, float] = {}
        self.hw: Dict[str, object] = {}
        self.e2e: Optional[Dict[str, object]] = None
        self.dispatch: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.assets = Assets(self.device)
        registry = all_providers()
        self.providers: Dict[str, Provider] = {}
        self.status: Dict[str, Dict[str, object]] = {}
        for name in provider_names:
            if name not in registry:
                raise ValueError(f"unknown provider {name!r}; known: {', '.join(registry)}")
            self.providers[name] = registry[name]
        self.allow_interpret = allow_interpret

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        self._print(f"[{self.elapsed():7.1f}s] {msg}")

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget_s

    def skip(self, case: str, what: str, why: str) -> None:
        self.skipped.append({"case": case, "what": what, "why": why})
        self.log(f"{case}: skipped {what}: {why}")

    def error(self, case: str, what: str, exc: BaseException) -> str:
        msg = _short_error(exc)
        self.errors.append({"case": case, "what": what, "error": msg,
                            "traceback": "".join(traceback.format_exception(exc))[-4000:]})
        self.log(f"{case}: ERROR in {what}: {msg}")
        self._recover()
        return msg

    def _recover(self) -> None:
        gc.collect()
        if self.dev.is_cuda:
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
            torch.cuda.empty_cache()

    def available(self, case: str) -> List[Provider]:
        return [p for p in self.providers.values() if self.status[p.name]["available"] and case in p.cases]

    def add_row(self, case: str, spec: LayerSpec, M: int, provider: str, mode: str, *,
                timing: Optional[harness.Timing] = None, status: str = "ok", error: str = "",
                peak_mb: Optional[float] = None, note: str = "", ms: Optional[float] = None) -> Dict[str, object]:
        sh = spec.shape
        row: Dict[str, object] = {
            "case": case, "model": sh.model.replace("@dry", ""), "proj": sh.key, "count": sh.count,
            "K": sh.K, "N": sh.N, "M": M, "r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout,
            "bias": spec.bias, "adapter_dtype": spec.adapter_dtype, "provider": provider, "mode": mode,
            "status": status, "ms": None, "p20_ms": None, "p80_ms": None, "min_ms": None, "n": None,
            "tflops": None, "peak_extra_MB": None if peak_mb is None else round(peak_mb, 2),
            "note": note, "error": error,
        }
        if timing is not None:
            row.update(ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, min_ms=timing.min_ms,
                       n=timing.n)
        elif ms is not None:
            row["ms"] = ms
        if row["ms"] and mode in TRAIN_MODES:
            fl = (ceiling_flops(mode, M, sh.K, sh.N) if provider == "ceiling"
                  else lora_flops(mode, M, sh.K, sh.N, spec.r))
            row["tflops"] = fl / (row["ms"] * 1e-3) / 1e12
        self.rows.append(row)
        return row

    # ------------------------------------------------------------------ providers
    def check_providers(self) -> None:
        """List every provider with its availability; probe each runnable one on a tiny layer."""
        for p in self.providers.values():
            entry: Dict[str, object] = {"available": False, "reason": "", "description": p.description}
            t = time.perf_counter()
            try:
                check_available(p, self.device, self.allow_interpret)
                probe(p, self.device)
                entry["available"] = True
            except Unavailable as exc:
                entry["reason"] = f"unavailable: {exc}"
            except Exception as exc:
                entry["reason"] = f"broken (probe failed): {_short_error(exc)}"
                self.errors.append({"case": "probe", "what": p.name, "error": _short_error(exc),
                                    "traceback": "".join(traceback.format_exception(exc))[-4000:]})
                self._recover()
            entry["probe_s"] = round(time.perf_counter() - t, 2)  # first use: imports, JIT builds, compiles
            self.status[p.name] = entry
            self.log(f"provider {p.name:<24} {'ok' if entry['available'] else entry['reason']} "
                     f"({entry['probe_s']:.1f}s)")

    def _build(self, p: Provider, spec: LayerSpec) -> Built:
        return p.build(spec, self.assets)

    def _inputs(self, shape: Shape, M: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
        return make_inputs(shape, M, self.device, seed)

    def _callables(self, built: Built, X: Tensor, dY: Tensor) -> Dict[str, Callable[[], object]]:
        return make_callables(built, X, dY)

    # ------------------------------------------------------------------ the generic grid
    def grid(self, case: str, units: Iterable[Tuple[LayerSpec, Sequence[int]]], modes: Sequence[str],
             memory: bool = False, providers: Optional[List[Provider]] = None) -> None:
        """For each (spec, Ms) unit: build every provider's layer once, then for each M time the
        requested modes (and the peak memory of one step).  Fail-soft per provider and M."""
        providers = self.available(case) if providers is None else providers
        for spec, Ms in units:
            what = f"{spec.shape.label} r={spec.r} p={spec.dropout} bias={spec.bias} {spec.adapter_dtype}"
            if self.over_budget():
                self.skip(case, what, f"time budget of {self.budget_s:.0f}s spent")
                continue
            built: Dict[str, Optional[Built]] = {}
            build_err: Dict[str, str] = {}
            for M in Ms:
                try:
                    X, dY = self._inputs(spec.shape, M)
                except Exception as exc:  # OOM for the inputs themselves
                    msg = self.error(case, f"{what} M={M} inputs", exc)
                    for p in providers:
                        for mode in modes:
                            self.add_row(case, spec, M, p.name, mode, status="error", error=msg)
                    continue
                for p in providers:
                    self._measure(case, spec, M, p, X, dY, modes, memory, built, build_err)
                del X, dY
            built.clear()
            self._recover()

    def _measure(self, case: str, spec: LayerSpec, M: int, p: Provider, X: Tensor, dY: Tensor,
                 modes: Sequence[str], memory: bool, built: Dict[str, Optional[Built]],
                 build_err: Dict[str, str]) -> None:
        what = f"{p.name} {spec.shape.label} M={M} r={spec.r}"
        before = _lora_fast_dispatch() if p.lora_fast_backend else {}
        parts = []
        with p.active():
            if p.name not in built and p.name not in build_err:
                try:
                    built[p.name] = self._build(p, spec)
                except Exception as exc:
                    build_err[p.name] = "build: " + self.error(case, what + " build", exc)
            if p.name in build_err:
                for mode in modes:
                    self.add_row(case, spec, M, p.name, mode, status="error", error=build_err[p.name])
                return
            b = built[p.name]
            fns = self._callables(b, X, dY)
            for mode in modes:
                peak = None
                try:
                    t = harness.time_fn(fns[mode], self.dev, self.profile.timing)
                    if mode == "step" and memory:
                        peak = harness.peak_extra_mb(fns[mode], self.dev)
                    self.add_row(case, spec, M, p.name, mode, timing=t, peak_mb=peak, note=b.note)
                    parts.append(f"{mode} {t.median_ms:8.3f}")
                except Exception as exc:
                    msg = self.error(case, f"{what} {mode}", exc)
                    self.add_row(case, spec, M, p.name, mode, status="error", error=msg)
                    parts.append(f"{mode} error")
                finally:
                    if mode == "bwd" and "_release" in fns:
                        fns["_release"]()
                if peak is not None:
                    parts.append(f"mem {peak:7.1f} MB")
            fns.clear()
        if p.lora_fast_backend:
            self._note_dispatch(p, before)
        self.log(f"{case:<8} {spec.shape.label:<32} M={M:<6} r={spec.r:<3} {p.name:<24} " + "  ".join(parts)
                 + (" ms" if parts else ""))

    def _note_dispatch(self, p: Provider, before: Dict[str, int]) -> None:
        after = _lora_fast_dispatch()
        for k, v in after.items():
            d = v - before.get(k, 0)
            if d > 0:
                self.dispatch[p.name][k] += d

    # ------------------------------------------------------------------ cases
    def case_hw(self) -> None:
        """Measured matmul rate (n³ bf16, TFLOP/s) and copy bandwidth (TB/s, bytes read + written)."""
        n = self.profile.matmul_n
        try:
            a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            t = harness.time_fn(lambda: a @ b, self.dev, self.profile.timing)
            self.hw.update(matmul_n=n, matmul_ms=t.median_ms, matmul_tflops=2 * n**3 / (t.median_ms * 1e-3) / 1e12)
            del a, b
        except Exception as exc:
            self.hw["matmul_error"] = self.error("hw", "matmul", exc)
        try:
            numel = self.profile.copy_bytes // 2
            x = torch.empty(numel, device=self.device, dtype=torch.bfloat16).normal_()
            y = torch.empty_like(x)
            t = harness.time_fn(lambda: y.copy_(x), self.dev, self.profile.timing)
            self.hw.update(copy_bytes=2 * numel, copy_ms=t.median_ms,
                           copy_TBps=2 * 2 * numel / (t.median_ms * 1e-3) / 1e12)
            del x, y
        except Exception as exc:
            self.hw["copy_error"] = self.error("hw", "copy", exc)
        self._recover()
        self.log(f"hw       matmul {self.hw.get('matmul_tflops', float('nan')):.1f} TFLOP/s ({n}³ bf16), "
                 f"copy {self.hw.get('copy_TBps', float('nan')):.3f} TB/s")

    def _spec(self, shape: Shape, r: Optional[int] = None, dropout: float = 0.0, bias: bool = False,
              adapter_dtype: str = "bf16") -> LayerSpec:
        r = self.profile.r if r is None else r
        alpha = self.profile.alpha * r / self.profile.r  # keep s = alpha/r fixed across the rank sweep
        return LayerSpec(shape, r, alpha, dropout, bias, adapter_dtype)

    def case_main(self) -> None:
        shapes = self.profile.shapes()
        units = [(self._spec(s), [self.profile.main_M]) for s in shapes]
        self.grid("main", units, TRAIN_MODES, memory=True)

    def case_msweep(self, skip_main_M: bool) -> None:
        shapes = self.profile.shapes(self.profile.msweep_models or (self.profile.primary,))
        Ms = [m for m in self.profile.msweep_M if not (skip_main_M and m == self.profile.main_M)]
        self.grid("msweep", [(self._spec(s), Ms) for s in shapes], ("step",))

    def case_rsweep(self, skip_main_r: bool) -> None:
        shapes = self.profile.shapes((self.profile.primary,))
        units = [(self._spec(s, r=r), [self.profile.main_M]) for s in shapes for r in self.profile.rsweep_r
                 if not (skip_main_r and r == self.profile.r)]
        self.grid("rsweep", units, ("step",))

    def case_variants(self) -> None:
        shapes = [s for s in self.profile.shapes((self.profile.primary,)) if s.key in self.profile.variant_keys]
        units = [(self._spec(s, dropout=p, bias=b, adapter_dtype=dt), [self.profile.main_M])
                 for s in shapes for (p, b, dt) in self.profile.variants]
        self.grid("variants", units, ("fwd", "step"), memory=True)

    def case_decode(self) -> None:
        """Inference forward at M = 1, 16 (input (1, M, K), no grad): eager, and under CUDA-graph
        replay (decode_graph.py's method), against the NF4 bytes floor."""
        providers = self.available("decode")
        bw = self.hw.get("copy_TBps")
        for shape in self.profile.shapes((self.profile.primary,)):
            spec = self._spec(shape)
            if self.over_budget():
                self.skip("decode", shape.label, f"time budget of {self.budget_s:.0f}s spent")
                continue
            nbytes = shape.N * shape.K / 2 + shape.N * shape.K / 64  # nibbles + one byte of absmax per block
            for m in self.profile.decode_M:
                if bw:
                    self.add_row("decode", spec, m, "nf4_floor", "decode_floor", ms=nbytes / (bw * 1e12) * 1e3,
                                 note="NF4 bytes / measured copy bandwidth")
            built: Dict[str, Optional[Built]] = {}
            for p in providers:
                before = _lora_fast_dispatch() if p.lora_fast_backend else {}
                with p.active():
                    try:
                        built[p.name] = self._build(p, spec)
                    except Exception as exc:
                        msg = self.error("decode", f"{p.name} {shape.label} build", exc)
                        for m in self.profile.decode_M:
                            self.add_row("decode", spec, m, p.name, "decode_eager", status="error", error=msg)
                        continue
                    b = built[p.name]
                    infer = b.infer or b.forward
                    for m in self.profile.decode_M:
                        self._decode_one(spec, m, p, infer)
                if p.lora_fast_backend:
                    self._note_dispatch(p, before)
            built.clear()
            self._recover()

    def _decode_one(self, spec: LayerSpec, m: int, p: Provider, infer: Callable[[Tensor], Tensor]) -> None:
        g = torch.Generator(device="cpu")
        g.manual_seed(m)
        x = torch.randn(1, m, spec.shape.K, generator=g).to(self.device, torch.bfloat16)
        parts = []

        def fn():
            return infer(x)

        with torch.no_grad():
            try:
                t = harness.time_fn(fn, self.dev, self.profile.timing)
                self.add_row("decode", spec, m, p.name, "decode_eager", timing=t)
                parts.append(f"eager {t.median_ms * 1e3:8.1f} us")
            except Exception as exc:
                msg = self.error("decode", f"{p.name} {spec.shape.label} M={m} eager", exc)
                self.add_row("decode", spec, m, p.name, "decode_eager", status="error", error=msg)
                parts.append("eager error")
            if self.dev.gpu_path:
                try:
                    t = harness.graph_time(fn, self.dev, self.profile.decode_inner, self.profile.decode_rep)
                    self.add_row("decode", spec, m, p.name, "decode_graph", timing=t)
                    parts.append(f"graph {t.median_ms * 1e3:8.1f} us")
                except GraphUnsupported as exc:
                    self.add_row("decode", spec, m, p.name, "decode_graph", status="unavailable", error=str(exc))
                except Exception as exc:
                    msg = self.error("decode", f"{p.name} {spec.shape.label} M={m} graph", exc)
                    self.add_row("decode", spec, m, p.name, "decode_graph", status="error", error=msg)
                    parts.append("graph error")
        self.log(f"decode   {spec.shape.label:<32} M={m:<6} {p.name:<24} " + "  ".join(parts))

    def case_parity(self) -> None:
        """Output and gradients (y, dX, dA, dB) of every provider against an fp64 reference on the
        same base weights (dense W0, or W0 dequantised from NF4 for the NF4 providers); the bar
        is twice plain PyTorch's own bf16 error plus 1e-2.  Dropout 0, bias off and on."""
        providers = [p for p in self.available("parity") if p.name != "ceiling"]
        M = self.profile.parity_M
        for shape in self.profile.shapes():
            for bias in (False, True):
                spec = self._spec(shape, bias=bias)
                what = f"{shape.label} bias={bias}"
                if self.over_budget():
                    self.skip("parity", what, f"time budget of {self.budget_s:.0f}s spent")
                    continue
                try:
                    X, dY = self._inputs(shape, M, seed=1)
                    refs = {kind: self._reference(spec, X, dY, kind) for kind in ("dense", "nf4")
                            if any(self._base_kind(p) == kind for p in providers)}
                except Exception as exc:
                    self.error("parity", f"{what} reference", exc)
                    continue
                for p in providers:
                    self._parity_one(spec, M, p, X, dY, refs)
                del X, dY, refs
                self._recover()

    @staticmethod
    def _base_kind(p: Provider) -> str:
        return "dense" if p.name in ("torch_ref", "ceiling") or p.name.startswith("lora_fast_dense") else "nf4"

    def _reference(self, spec: LayerSpec, X: Tensor, dY: Tensor, kind: str) -> Dict[str, Dict[str, Tensor]]:
        K, N = spec.shape.K, spec.shape.N
        W = self.assets.dense(K, N) if kind == "dense" else self.assets.nf4_dense(K, N)
        A, B = self.assets.adapter(K, N, spec.r, spec.adapter_dtype)
        bias = self.assets.bias(N) if spec.bias else None
        s = spec.scaling
        # fp64 oracle
        x, w, a, b, dy = (t.detach().double() for t in (X, W, A, B, dY))
        xa = x @ a.t()
        y = x @ w.t() + s * (xa @ b.t())
        if bias is not None:
            y = y + bias.double()
        dyb = dy @ b
        ref64 = {"y": y, "dX": dy @ w + s * (dyb @ a), "dA": s * (dyb.t() @ x), "dB": s * (dy.t() @ xa)}
        # plain PyTorch in the working dtype: its error sets the bar
        xt = X.detach().clone().requires_grad_(True)
        at = A.detach().clone().requires_grad_(True)
        bt = B.detach().clone().requires_grad_(True)
        yt = torch.nn.functional.linear(xt, W, bias) + (xt @ at.to(xt.dtype).t()) @ bt.to(xt.dtype).t() * s
        gx, ga, gb = torch.autograd.grad(yt, [xt, at, bt], dY)
        same = {"y": yt.detach(), "dX": gx, "dA": ga, "dB": gb}
        return {"ref64": ref64, "same": same}

    def _parity_one(self, spec: LayerSpec, M: int, p: Provider, X: Tensor, dY: Tensor,
                    refs: Dict[str, Dict[str, Dict[str, Tensor]]]) -> None:
        entry: Dict[str, object] = {
            "proj": spec.shape.key, "K": spec.shape.K, "N": spec.shape.N, "M": M, "r": spec.r,
            "bias": spec.bias, "adapter_dtype": spec.adapter_dtype, "provider": p.name, "ok": False,
            "base": self._base_kind(p),
        }
        before = _lora_fast_dispatch() if p.lora_fast_backend else {}
        with p.active():
            try:
                b = self._build(p, spec)
                x = X.detach().clone().requires_grad_(True)
                y = b.forward(x)
                grads = torch.autograd.grad(y, [x] + list(b.trainables), dY)
                got = {"y": y.detach(), "dX": grads[0], "dA": grads[1], "dB": grads[2]}
                ref = refs[entry["base"]]
                worst_ok = True
                for k in ("y", "dX", "dA", "dB"):
                    dt = torch.bfloat16 if k in ("y", "dX") else spec.a_dtype
                    c = harness.compare(got[k], ref["ref64"][k], ref["same"][k], dt)
                    entry[k] = c
                    worst_ok = worst_ok and bool(c["ok"])
                entry["ok"] = worst_ok
            except Exception as exc:
                entry["error"] = self.error("parity", f"{p.name} {spec.shape.label} bias={spec.bias}", exc)
        if p.lora_fast_backend:
            self._note_dispatch(p, before)
        self.parity.append(entry)
        detail = "  ".join(
            f"{k} {entry[k]['rel_err']:.1e}{'' if entry[k]['ok'] else '!'}" for k in ("y", "dX", "dA", "dB")
            if isinstance(entry.get(k), dict) and "rel_err" in entry[k]
        )
        self.log(f"parity   {spec.shape.label:<32} M={M:<6} bias={str(spec.bias):<5} {p.name:<24} "
                 f"{'PASS' if entry['ok'] else 'FAIL'}  {detail}")

    def case_e2e(self, config) -> None:
        from . import e2e

        self.e2e = e2e.run_e2e(config, self.dev, self.log)

    # ------------------------------------------------------------------ driver
    def run(self, cases: Sequence[str]) -> None:
        self.log(f"profile {self.profile.name}: {self.profile.description}")
        self.log(f"device: {self.dev.name}; cases: {', '.join(cases)}; budget {self.budget_s:.0f}s")
        if not self.dev.timings_meaningful:
            self.log("timings are NOT meaningful on CPU: this run checks that everything runs and agrees")
        self.check_providers()
        order = list(ORDER)
        for case in order:
            if case not in cases:
                continue
            if case != "hw" and self.over_budget():
                self.skip(case, "whole case", f"time budget of {self.budget_s:.0f}s spent")
                continue
            t = time.perf_counter()
            self.log(f"--- case {case}")
            try:
                if case == "hw":
                    self.case_hw()
                elif case == "parity":
                    self.case_parity()
                elif case == "main":
                    self.case_main()
                elif case == "e2e":
                    if self.profile.e2e is None:
                        self.skip("e2e", "whole case", "this profile has no end-to-end configuration")
                    else:
                        self.case_e2e(self.profile.e2e)
                elif case == "msweep":
                    self.case_msweep(skip_main_M="main" in cases)
                elif case == "rsweep":
                    self.case_rsweep(skip_main_r="main" in cases)
                elif case == "variants":
                    self.case_variants()
                elif case == "decode":
                    self.case_decode()
            except Exception as exc:  # a bug in a case itself: record, go on with the next case
                self.error(case, "case", exc)
            self.case_times[case] = round(time.perf_counter() - t, 2)
        self.assets.clear()
        self._recover()
