"""``python -m bench``: argument parsing and the run → files pipeline (also called in-process by
tests/test_bench_smoke.py through :func:`run`)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

from . import profiles as P

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="lora_fast benchmark suite: providers side by side per projection, M/rank sweeps, decode, "
                    "memory, end-to-end step.  See bench/README.md.",
    )
    ap.add_argument("--profile", default="auto", choices=P.PROFILE_NAMES,
                    help="shapes and sizes (auto: smoke on CPU, h100 on sm_90, a100 on sm_80, rtx3060 on sm_86, "
                         "h100 otherwise)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="results folder (default bench/results/)")
    ap.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                    help=f"subset of cases ({', '.join(P.CASE_NAMES)}); commas allowed; default: the profile's")
    ap.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                    help="subset of providers (default: all that apply to the device); commas allowed")
    ap.add_argument("--quick", action="store_true", help="fewer sweep points, shorter timing loops")
    ap.add_argument("--dry-run", action="store_true",
                    help="run the profile's GPU code path on the CPU with shapes mapped down "
                         "(a self-check without a GPU; numbers mean nothing)")
    ap.add_argument("--interpret", action="store_true",
                    help="refused with the reason: the suite's activations are bf16, which the Triton CPU "
                         "interpreter computes wrongly (the kernels' CPU parity runs in the tests, fp16/fp32)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of benchmarking after which remaining cases are skipped (default: the profile's)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--list", action="store_true", help="print the profiles and providers, then exit")
    args = ap.parse_args(argv)
    if args.interpret:
        ap.error("--interpret: the suite times bf16 activations, and the Triton CPU interpreter computes bf16 "
                 "tl.dot wrongly (lora_fast refuses it); the kernels' CPU parity (fp16/fp32) runs in "
                 "`python -m pytest tests`")
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget must be a positive number of seconds, got {args.budget}")
    for flag in ("cases", "providers"):
        vals = getattr(args, flag)
        if vals is not None and not _split(vals):
            ap.error(f"--{flag} was given but names nothing")
    return args


def _split(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if values is None:
        return None
    out: List[str] = []
    for v in values:
        out += [x for x in v.split(",") if x]
    return out


def resolve_cases(profile: P.Profile, asked: Optional[List[str]]) -> List[str]:
    if asked is None:
        cases = list(profile.cases)
        if not profile.e2e_by_default:
            cases.remove("e2e")
        return cases
    bad = [c for c in asked if c not in P.CASE_NAMES and c != "all"]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; choose from {', '.join(P.CASE_NAMES)}")
    if "all" in asked:
        return list(profile.cases)
    cases = ["main" if c == "memory" else c for c in asked]
    return [c for c in profile.cases if c in cases]


def run(argv: Optional[Sequence[str]] = None, log=print) -> Dict[str, object]:
    """Run the suite; returns the results dict (with ``files``: the paths written)."""
    args = parse_args(argv)
    import torch

    from . import report
    from .env import auto_profile, make_dev, metadata
    from .providers import all_providers, default_names
    from .suite import Runner

    if args.list:
        for name, prof in P.PROFILES.items():
            log(f"{name:<8} {prof.description}")
            for s in prof.shapes():
                log(f"           {s.model:<11} {s.label} (x{s.count})")
        for name, prov in all_providers().items():
            log(f"{name:<24} {prov.description}")
        return {}

    unknown = [n for n in (_split(args.providers) or []) if n not in all_providers()]
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known: {', '.join(all_providers())}")
    # the results folder first: a benchmark must not run for minutes and then fail to write
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"--out {args.out!r}: cannot create the results folder ({exc})") from exc
    if not os.access(args.out, os.W_OK):
        raise SystemExit(f"--out {args.out!r}: the results folder is not writable")
    dev = make_dev(args.dry_run)
    name = auto_profile(dev) if args.profile == "auto" else args.profile
    profile = P.PROFILES[name]
    if args.quick:
        profile = P.quick(profile)
    if args.dry_run:
        profile = P.dry_run(profile)
    label = name + ("-dryrun" if args.dry_run else "") + ("-quick" if args.quick else "")
    cases = resolve_cases(P.PROFILES[name], _split(args.cases))
    if "e2e" in cases and profile.e2e is None:
        cases.remove("e2e")
    names = _split(args.providers) or default_names(dev.is_cuda)
    torch.backends.cuda.matmul.allow_tf32 = True

    runner = Runner(profile, dev, names, budget_s=args.budget, log=log)
    meta = metadata(dev, label, list(sys.argv[1:] if argv is None else argv))
    prev_threads = torch.get_num_threads()
    if not dev.is_cuda:
        # CPU timings mean nothing, and on a shared CPU torch's thread pool makes tiny ops
        # 40x slower (threads spin while descheduled): one thread keeps the smoke run short.
        torch.set_num_threads(1)
        meta["cpu_threads"] = 1
    interrupted = None
    old_term = None
    try:
        # a wall-clock limit (timeout, the lead's tool) sends SIGTERM: write what was measured
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not in the main thread (e.g. inside some test runners)
        pass
    try:
        runner.run(cases)
    except KeyboardInterrupt as exc:
        interrupted = f"interrupted ({exc or 'SIGINT'}) after {runner.elapsed():.0f}s: results are partial"
        log(f"!! {interrupted}")
    finally:
        torch.set_num_threads(prev_threads)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

    res: Dict[str, object] = {
        "schema": report.SCHEMA,
        "meta": meta,
        "profile": report.profile_dict(profile),
        "cases": cases,
        "providers": runner.status,
        "hw": runner.hw,
        "summary": None,
        "e2e": runner.e2e,
        "rows": runner.rows,
        "parity": runner.parity,
        "dispatch": {k: dict(v) for k, v in runner.dispatch.items()},
        "errors": runner.errors,
        "skipped": runner.skipped,
        "case_times_s": runner.case_times,
        "elapsed_s": round(runner.elapsed(), 2),
        "interrupted": interrupted,
        "files": {},
    }
    res["summary"] = report.summary(runner.rows, profile, runner.e2e)

    stamp = meta["timestamp"].replace("-", "").replace(":", "")
    prefix = os.path.join(args.out, f"{label}-{stamp}")
    files: Dict[str, str] = {"json": prefix + ".json", "csv": prefix + ".csv", "table": prefix + ".txt"}
    if not args.no_plots:
        try:
            files.update(report.plots(res, profile, prefix))
        except ImportError as exc:
            res["plots_error"] = f"plots skipped: {exc}"
        except Exception as exc:  # a plotting bug must not lose the measurements
            res["plots_error"] = f"plots failed: {type(exc).__name__}: {exc}"
    res["files"] = files
    text = report.render(res, profile)
    report.write_json(res, files["json"])
    report.write_csv(res, files["csv"])
    with open(files["table"], "w") as f:
        f.write(text + "\n")
    log("")
    log(text)
    log("")
    if res.get("plots_error"):
        log(res["plots_error"])
    log(f"wrote {', '.join(files.values())}")
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    t = time.perf_counter()
    res = run(argv, log=lambda s: print(s, flush=True))
    if res:
        print(f"total {time.perf_counter() - t:.1f} s", flush=True)
    return 0
