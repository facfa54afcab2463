"""Where one projection's training step spends its time on a GPU (diagnostic, not the suite).

    python -m bench.breakdown [--m 8192] [--r 16] [--shapes q,k,gate,down] [--lowrank triton,cublas]

For each Llama-3-8B projection shape it runs a full NF4 LoRA step (forward + backward to x, A, B)
through ``NF4LoRALinear`` and reports:

* ``wall``: the step between two CUDA events with a synchronise after it (as the suite times it);
* ``host``: how long Python takes to issue the step (no synchronise; if it is close to ``wall``
  the step is CPU-bound);
* ``gpu``: the sum of the step's CUDA kernel times from ``torch.profiler``, and each kernel's
  time per step next to its bytes floor where one is known;
* ``ceiling``: the two unavoidable bf16 cuBLAS GEMMs (``X·Wᵀ`` and ``dY·W``), timed the same way;
* the grouped q/k/v and gate/up calls (``lora_linear_grouped``) against the layers one by one.

Writes ``$OUT/breakdown.json`` (or ``--json``) and prints a table per shape.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict, List

import torch

SHAPES = {  # name: (K, N), Llama-3-8B
    "q": (4096, 4096),
    "k": (4096, 1024),
    "gate": (4096, 14336),
    "down": (14336, 4096),
}


def _events_ms(fn: Callable[[], object], reps: int) -> List[float]:
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def _host_ms(fn: Callable[[], object], reps: int) -> List[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return out


def _kernels(fn: Callable[[], object], steps: int) -> Dict[str, Dict[str, float]]:
    """Per-kernel CUDA time (ms per step) and launches per step from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg: Dict[str, Dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "calls": 0.0})
    for ev in prof.events():
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name
        dur_us = ev.time_range.elapsed_us()
        agg[name]["ms"] += dur_us / 1e3 / steps
        agg[name]["calls"] += 1.0 / steps
    return dict(sorted(agg.items(), key=lambda kv: -kv[1]["ms"]))


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def measure(fn: Callable[[], object], reps: int, prof_steps: int) -> Dict[str, object]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall = _events_ms(fn, reps)
    host = _host_ms(fn, reps)
    kern = _kernels(fn, prof_steps)
    return {
        "wall_ms": statistics.median(wall),
        "host_ms": statistics.median(host),
        "gpu_ms": sum(v["ms"] for v in kern.values()),
        "launches": sum(v["calls"] for v in kern.values()),
        "kernels": kern,
    }


def _layer(K: int, N: int, r: int, dtype, gen):
    import lora_fast

    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=gen)
    layer = lora_fast.NF4LoRALinear.from_linear(lin, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01, generator=gen)
    return layer


def _cprofile(args, gen) -> int:
    import cProfile
    import pstats

    name = args.shapes.split(",")[0]
    K, N = SHAPES[name]
    layer = _layer(K, N, args.r, torch.bfloat16, gen)
    x = torch.randn(args.m, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(args.m, N, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step():
        x.grad = None
        layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(dy)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(args.cprofile):
        step()
        torch.cuda.synchronize()
    pr.disable()
    print(f"{name}: {(time.perf_counter() - t0) * 1e3 / args.cprofile:.3f} ms per synchronised step under cProfile")
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(45)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--shapes", default="q,k,gate,down")
    ap.add_argument("--lowrank", default="triton,cublas")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--prof-steps", type=int, default=5)
    ap.add_argument("--no-grouped", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cprofile", type=int, default=0, metavar="STEPS",
                    help="instead of the tables: cProfile STEPS host-side steps of the first shape")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.breakdown needs a CUDA GPU")
        return 1
    import lora_fast

    dtype, M, r = torch.bfloat16, args.m, args.r
    gen = torch.Generator(device="cuda").manual_seed(0)
    res: Dict[str, object] = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "M": M, "r": r,
        "commit": os.environ.get("BENCH_COMMIT", ""), "shapes": {},
    }
    import triton

    res["triton"] = triton.__version__
    lines: List[str] = []
    if args.cprofile:
        return _cprofile(args, gen)
    for name in [s for s in args.shapes.split(",") if s]:
        K, N = SHAPES[name]
        layer = _layer(K, N, r, dtype, gen)
        W = layer.dense_weight(dtype).contiguous()
        x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=gen)
        xd = x.detach()
        entry: Dict[str, object] = {"K": K, "N": N}

        def ceiling():
            xd @ W.t()
            dy @ W

        entry["ceiling"] = measure(ceiling, args.reps, args.prof_steps)

        def step():
            x.grad = None
            layer.lora_A.grad = None
            layer.lora_B.grad = None
            layer(x).backward(dy)

        for lr in [s for s in args.lowrank.split(",") if s]:
            os.environ["LORA_FAST_LOWRANK"] = lr
            entry[f"step_{lr}"] = measure(step, args.reps, args.prof_steps)
            entry[f"step_{lr}"]["dispatch"] = dict(lora_fast.dispatch_stats())
        os.environ.pop("LORA_FAST_LOWRANK", None)
        res["shapes"][name] = entry
        xb, yb = M * K * 2, M * N * 2
        floors = {"X pass (ms)": xb / 3.0e9, "dY pass (ms)": yb / 3.0e9, "W_eff build (ms)": (N * K * 2.5) / 3.0e9}
        entry["floors_ms_at_3TBps"] = floors
        c = entry["ceiling"]
        lines.append(f"== {name} K={K} N={N} M={M} r={r}: ceiling wall {c['wall_ms']:.3f} ms (gpu {c['gpu_ms']:.3f})")
        lines.append("   floors at 3.0 TB/s: " + ", ".join(f"{k} {v * 1e3:.0f} us" for k, v in floors.items()))
        for lr in [s for s in args.lowrank.split(",") if s]:
            s = entry[f"step_{lr}"]
            lines.append(f"   lowrank={lr:7s} wall {s['wall_ms']:.3f} ms  host {s['host_ms']:.3f}  gpu {s['gpu_ms']:.3f}"
                         f"  launches {s['launches']:.0f}  (x ceiling {s['wall_ms'] / c['wall_ms']:.2f})")
            for kname, kv in list(s["kernels"].items())[:12]:
                lines.append(f"      {kv['ms'] * 1e3:8.1f} us  x{kv['calls']:.0f}  {_short(kname)}")
        del layer, W, x, dy, xd
        torch.cuda.empty_cache()

    if not args.no_grouped:
        groups = {"qkv": [(4096, 4096), (4096, 1024), (4096, 1024)], "gate_up": [(4096, 14336), (4096, 14336)]}
        res["grouped"] = {}
        for gname, shapes in groups.items():
            layers = [_layer(K, N, r, dtype, gen) for K, N in shapes]
            K = shapes[0][0]
            x = torch.randn(M, K, device="cuda", dtype=dtype, generator=gen).requires_grad_()
            dys = [torch.randn(M, N, device="cuda", dtype=dtype, generator=gen) for _, N in shapes]

            def zero():
                x.grad = None
                for l in layers:
                    l.lora_A.grad = l.lora_B.grad = None

            def one_by_one():
                zero()
                torch.autograd.backward([l(x) for l in layers], dys)

            def grouped():
                zero()
                torch.autograd.backward(lora_fast.lora_linear_grouped(x, layers), dys)

            g = {"one_by_one": measure(one_by_one, args.reps, args.prof_steps),
                 "grouped": measure(grouped, args.reps, args.prof_steps)}
            res["grouped"][gname] = g
            lines.append(f"== grouped {gname}: one by one wall {g['one_by_one']['wall_ms']:.3f} ms"
                         f" (gpu {g['one_by_one']['gpu_ms']:.3f}); grouped {g['grouped']['wall_ms']:.3f} ms"
                         f" (gpu {g['grouped']['gpu_ms']:.3f})")
            del layers, x, dys
            torch.cuda.empty_cache()

    path = args.json or os.path.join(os.environ.get("OUT", "/tmp"), "breakdown.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
