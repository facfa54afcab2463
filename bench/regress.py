"""Performance-regression check of a benchmark run against a committed baseline.

    python -m bench.regress NEW.json --baseline bench/data/<gpu>.json --tolerance 0.10
    python -m bench.regress NEW.json        # baseline: the newest committed bench/data/*.json of
                                            # the same GPU and the same shapes (model, M, r, alpha, mode)

Both files are ``python -m bench`` results (schema 1, see bench/README.md).  Compared figures
(lower is better unless noted), for the lora_fast providers by default (``--providers``):

* ``summary.ratio_to_ceiling[provider]``  — seven-projection step time over the cuBLAS ceiling;
* ``summary.per_projection[proj][provider] / summary.per_projection[proj]["ceiling"]`` — the
  same ratio per projection shape (``--no-per-projection`` to skip);
* ``summary.speedup_vs_peft[provider]`` — higher is better.

Ratios are used rather than absolute times because they cancel most of a shared GPU's noise.
A figure regresses when it is worse than the baseline by more than ``--tolerance`` (relative).
The runs must come from the same GPU (``meta.gpu``) and measure the same shapes (``summary``'s
model, M, r, alpha and mode), else nothing is compared.  A figure that is not finite in the new
run is a regression.

Exit status: 0 no regression; 1 regression (or a baseline figure missing from the new run,
unless ``--allow-missing``); 2 unusable input (unreadable JSON, different GPUs or shapes, no
summary, no baseline found).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class InputError(Exception):
    """The inputs cannot be compared (exit status 2)."""


SHAPE_KEYS = ("model", "M", "r", "alpha", "mode")


def shape_key(result: Dict) -> Tuple:
    """What a result measured: ``summary``'s (model, M, r, alpha, mode)."""
    summ = result.get("summary")
    if not isinstance(summ, dict):
        raise InputError("the result has no 'summary' block")
    return tuple(summ.get(k) for k in SHAPE_KEYS)


def default_baseline(new: Dict, new_path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
                     per_projection: bool = True) -> str:
    """The newest committed result in bench/data/ from the same GPU with the same shapes and a
    figure to compare for ``providers`` (``new_path``, the new result itself, excluded)."""
    gpu = (new.get("meta") or {}).get("gpu")
    if not gpu:
        raise InputError("meta.gpu missing from the new result (a CPU run has no GPU baseline)")
    want = shape_key(new)
    skip = os.path.realpath(new_path) if new_path else None
    found = []
    for path in glob.glob(os.path.join(REPO, "bench", "data", "*.json")):
        if os.path.realpath(path) == skip:
            continue
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or data["meta"].get("gpu") != gpu:
            continue
        if not isinstance(data.get("summary"), dict) or shape_key(data) != want:
            continue
        if not figures(data, providers, per_projection):
            continue
        found.append((str(data["meta"].get("timestamp") or ""), path))
    if not found:
        shapes = ", ".join(f"{k}={v}" for k, v in zip(SHAPE_KEYS, want))
        raise InputError(f"no committed baseline in bench/data/ for GPU {gpu!r} with {shapes} "
                         "and a figure for the selected providers; pass one with --baseline")
    return max(found)[1]


def _load(path: str) -> Dict:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a benchmark result (top level is not an object)")
    return data


def _wanted(provider: str, providers: Optional[Sequence[str]]) -> bool:
    if providers is None:
        return provider.startswith("lora_fast")
    return "all" in providers or provider in providers


def figures(result: Dict, providers: Optional[Sequence[str]], per_projection: bool = True
            ) -> Dict[str, Tuple[float, bool]]:
    """{figure name: (value, higher_is_better)} of one result."""
    summ = result.get("summary")
    if not isinstance(summ, dict):
        raise InputError("the result has no 'summary' block")
    out: Dict[str, Tuple[float, bool]] = {}
    for prov, v in (summ.get("ratio_to_ceiling") or {}).items():
        if _wanted(prov, providers) and isinstance(v, (int, float)):
            out[f"ratio_to_ceiling[{prov}]"] = (float(v), False)
    for prov, v in (summ.get("speedup_vs_peft") or {}).items():
        if _wanted(prov, providers) and isinstance(v, (int, float)):
            out[f"speedup_vs_peft[{prov}]"] = (float(v), True)
    if per_projection:
        for proj, by_prov in (summ.get("per_projection") or {}).items():
            ceil = by_prov.get("ceiling") if isinstance(by_prov, dict) else None
            if not isinstance(ceil, (int, float)) or ceil <= 0:
                continue
            for prov, ms in by_prov.items():
                if prov != "ceiling" and _wanted(prov, providers) and isinstance(ms, (int, float)):
                    out[f"per_projection[{proj}][{prov}]/ceiling"] = (float(ms) / float(ceil), False)
    return out


def compare(new: Dict, base: Dict, tolerance: float, providers: Optional[Sequence[str]] = None,
            per_projection: bool = True, allow_missing: bool = False) -> Tuple[List[Dict], bool]:
    """Rows {figure, baseline, new, change, status} and whether the check failed."""
    g_new = (new.get("meta") or {}).get("gpu")
    g_base = (base.get("meta") or {}).get("gpu")
    if not g_new or not g_base:
        raise InputError("meta.gpu missing from " + ("the new result" if not g_new else "the baseline"))
    if g_new != g_base:
        raise InputError(f"different GPUs: new run on {g_new!r}, baseline on {g_base!r}")
    k_new, k_base = shape_key(new), shape_key(base)
    if k_new != k_base:
        diff = ", ".join(f"{k} {a!r} vs {b!r}" for k, a, b in zip(SHAPE_KEYS, k_new, k_base) if a != b)
        raise InputError(f"different shapes (new vs baseline: {diff}): the runs measured different things")
    f_new = figures(new, providers, per_projection)
    f_base = figures(base, providers, per_projection)
    if not f_base:
        raise InputError("the baseline has no comparable figure for the selected providers")
    rows, failed = [], False
    for name in sorted(set(f_base) | set(f_new)):
        if name not in f_new:
            status = "missing" if not allow_missing else "missing (allowed)"
            failed |= not allow_missing
            rows.append(dict(figure=name, baseline=f_base[name][0], new=None, change=None, status=status))
            continue
        if name not in f_base:
            rows.append(dict(figure=name, baseline=None, new=f_new[name][0], change=None, status="new"))
            continue
        b, higher = f_base[name]
        v = f_new[name][0]
        if not math.isfinite(b):
            rows.append(dict(figure=name, baseline=b, new=v, change=None, status="baseline not finite"))
            continue
        if not math.isfinite(v):
            failed = True
            rows.append(dict(figure=name, baseline=b, new=v, change=None, status="REGRESSION (not finite)"))
            continue
        change = (v - b) / b if b else 0.0
        worse = -change if higher else change  # > 0: worse
        if worse > tolerance:
            status = "REGRESSION"
            failed = True
        elif worse < -tolerance:
            status = "improved"
        else:
            status = "ok"
        rows.append(dict(figure=name, baseline=b, new=v, change=change, status=status))
    return rows, failed


def format_rows(rows: List[Dict]) -> str:
    w = max([len(r["figure"]) for r in rows] + [6])
    lines = [f"{'figure':<{w}} {'baseline':>10} {'new':>10} {'change':>8}  status", "-" * (w + 42)]
    for r in rows:
        b = "-" if r["baseline"] is None else f"{r['baseline']:.4f}"
        n = "-" if r["new"] is None else f"{r['new']:.4f}"
        c = "-" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        lines.append(f"{r['figure']:<{w}} {b:>10} {n:>10} {c:>8}  {r['status']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fail when a benchmark run regresses against a baseline.")
    ap.add_argument("new", help="the new result JSON (python -m bench)")
    ap.add_argument("--baseline", default=None, help="baseline JSON (default: the newest bench/data/*.json of the same GPU and shapes)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed relative worsening (default 0.10)")
    ap.add_argument("--providers", default=None,
                    help="comma-separated providers to compare, or 'all' (default: lora_fast*)")
    ap.add_argument("--no-per-projection", action="store_true", help="compare only the seven-projection sums")
    ap.add_argument("--allow-missing", action="store_true", help="a baseline figure absent from the new run is not a failure")
    args = ap.parse_args(argv)
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        print(f"bench.regress: --tolerance must be a finite number >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    try:
        new = _load(args.new)
        base_path = args.baseline or default_baseline(new, args.new, providers, not args.no_per_projection)
        base = _load(base_path)
        rows, failed = compare(new, base, args.tolerance, providers, not args.no_per_projection, args.allow_missing)
    except InputError as exc:
        print(f"bench.regress: {exc}", file=sys.stderr)
        return 2
    print(f"baseline: {base_path}  (GPU {base['meta']['gpu']}, tolerance {100 * args.tolerance:.0f}%)")
    print(format_rows(rows))
    n_reg = sum(r["status"].startswith("REGRESSION") for r in rows)
    n_miss = sum(r["status"] == "missing" for r in rows)
    print(f"bench.regress: {'FAILED' if failed else 'OK'} ({n_reg} regression(s), {n_miss} missing, "
          f"{sum(r['status'] == 'improved' for r in rows)} improved, {len(rows)} figures)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
