"""Results: the summary block, the text tables, JSON + CSV files and PNG plots.

JSON layout (stable keys; documented in bench/README.md)::

    {"schema": 1, "meta": {...}, "profile": {...}, "providers": {name: {available, reason, description}},
     "hw": {...}, "summary": {...}, "e2e": {...} | null, "rows": [...], "parity": [...],
     "dispatch": {...}, "errors": [...], "skipped": [...], "case_times_s": {...}, "elapsed_s": ..., "files": {...}}
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

SCHEMA = 1
BASELINE = "peft_bnb"
META_COLUMNS = ("profile", "gpu", "compute_capability", "torch", "triton", "bitsandbytes", "peft", "commit",
                "timestamp")
ROW_COLUMNS = ("case", "model", "proj", "count", "K", "N", "M", "r", "alpha", "dropout", "bias", "adapter_dtype",
               "provider", "mode", "status", "ms", "p20_ms", "p80_ms", "min_ms", "n", "tflops", "peak_extra_MB",
               "note", "error")


def _is_base_row(row: Dict, profile) -> bool:
    """A row of the headline setting: r = profile r, dropout 0, no bias, bf16 adapters."""
    return (row["r"] == profile.r and row["dropout"] == 0.0 and not row["bias"] and row["adapter_dtype"] == "bf16")


def _ok(row: Dict) -> bool:
    return row["status"] == "ok" and row["ms"] is not None


def _lookup(rows: Sequence[Dict], **kw) -> Optional[Dict]:
    for row in rows:
        if all(row.get(k) == v for k, v in kw.items()):
            return row
    return None


def sum7(rows: Sequence[Dict], profile, model: str, mode: str = "step") -> Tuple[Dict[str, float], Dict[str, str]]:
    """Seven-projection sums of the main case (``count`` × each shape's median) per provider;
    a provider missing any shape gets no sum, and the reason."""
    shapes = [s for s in profile.shapes() if s.model.replace("@dry", "") == model]
    main = [r for r in rows if r["case"] == "main" and r["mode"] == mode and r["model"] == model
            and _is_base_row(r, profile)]
    providers = sorted({r["provider"] for r in main})
    out: Dict[str, float] = {}
    missing: Dict[str, str] = {}
    for p in providers:
        total = 0.0
        for s in shapes:
            row = _lookup(main, provider=p, proj=s.key)
            if row is None or not _ok(row):
                missing[p] = f"{s.key}: {'not run' if row is None else row['status'] + ' ' + str(row['error'])[:120]}"
                break
            total += s.count * row["ms"]
        else:
            out[p] = total
    return out, missing


def summary(rows: Sequence[Dict], profile, e2e: Optional[Dict]) -> Dict[str, object]:
    """The block a regression checker compares between runs (keys fixed; see README)."""
    s7, missing = sum7(rows, profile, profile.primary.replace("@dry", ""))
    ceil = s7.get("ceiling")
    base = s7.get(BASELINE)
    out: Dict[str, object] = {
        "model": profile.primary.replace("@dry", ""),
        "M": profile.main_M,
        "r": profile.r,
        "alpha": profile.alpha,
        "mode": "step",
        "sum7": {k: round(v, 4) for k, v in s7.items()},
        "ratio_to_ceiling": {k: round(v / ceil, 4) for k, v in s7.items()} if ceil else {},
        "speedup_vs_peft": {k: round(base / v, 4) for k, v in s7.items()} if base else {},
        "missing": missing,
        "per_projection": {},
        "sum7_fwd": {k: round(v, 4) for k, v in sum7(rows, profile, profile.primary.replace("@dry", ""), "fwd")[0].items()},
        "sum7_bwd": {k: round(v, 4) for k, v in sum7(rows, profile, profile.primary.replace("@dry", ""), "bwd")[0].items()},
        "peak_extra_MB": {},
    }
    for model in {s.model.replace("@dry", "") for s in profile.shapes()} - {out["model"]}:
        out.setdefault("sum7_by_model", {})[model] = {k: round(v, 4) for k, v in sum7(rows, profile, model)[0].items()}
    for r in rows:
        if r["case"] == "main" and r["mode"] == "step" and _is_base_row(r, profile) and _ok(r) \
                and r["model"] == out["model"]:
            out["per_projection"].setdefault(r["proj"], {})[r["provider"]] = round(r["ms"], 4)
            if r["peak_extra_MB"] is not None:
                out["peak_extra_MB"].setdefault(r["proj"], {})[r["provider"]] = r["peak_extra_MB"]
    out["e2e"] = None
    if e2e:
        block = {}
        for v in ("peft_bnb", "lora_fast"):
            e = e2e.get(v) or {}
            block[v] = {k: e.get(k) for k in ("status", "tokens_per_s", "ms_per_step", "peak_GB")}
        block["speedup_tokens_per_s"] = e2e.get("speedup_tokens_per_s")
        block["max_abs_loss_diff"] = e2e.get("max_abs_loss_diff")
        out["e2e"] = block
    return out


# ------------------------------------------------------------------------------ text tables
def _fmt(v: Optional[float], unit: str = "ms") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if unit == "us":
        return f"{v * 1e3:.1f}"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "MB":
        return f"{v:.0f}"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    body = [list(map(str, r)) for r in body]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(str(h).rjust(w) if i else str(h).ljust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in body:
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def _cell(row: Optional[Dict], unit: str = "ms") -> str:
    if row is None:
        return "-"
    if row["status"] != "ok":
        return row["status"]
    return _fmt(row["ms"], unit)


def _provider_order(rows: Sequence[Dict], providers: Dict[str, Dict]) -> List[str]:
    seen = [p for p in providers if providers[p]["available"]]
    extra = sorted({r["provider"] for r in rows} - set(seen))
    return seen + extra


def render(res: Dict, profile) -> str:
    rows = res["rows"]
    providers = res["providers"]
    meta = res["meta"]
    lines: List[str] = []
    gpu = meta.get("gpu") or meta.get("device_kind")
    lines.append(f"lora_fast benchmark — profile {meta['profile']} on {gpu}"
                 f"{' (sm_' + meta['compute_capability'].replace('.', '') + ')' if meta.get('compute_capability') else ''}"
                 f" — torch {meta['torch']}, triton {meta['triton']}, bitsandbytes {meta['bitsandbytes']}, "
                 f"peft {meta['peft']} — commit {str(meta.get('commit'))[:10]}{'+dirty' if meta.get('dirty') else ''}")
    if res.get("interrupted"):
        lines.append(f"!! {res['interrupted']} !!")
    if not meta.get("timings_meaningful"):
        lines.append("!! timings not meaningful on CPU: this run checks that every provider runs and agrees !!")
    hw = res.get("hw") or {}
    if hw:
        lines.append(f"measured ceilings: bf16 matmul {hw.get('matmul_tflops', float('nan')):.1f} TFLOP/s "
                     f"({hw.get('matmul_n')}³), copy {hw.get('copy_TBps', float('nan')):.3f} TB/s (read+write)")
    lines.append("")
    lines.append("providers:")
    for name, st in providers.items():
        lines.append(f"  {name:<24} {'ok' if st['available'] else st['reason']}")
    order = _provider_order(rows, providers)

    models = []
    for s in profile.shapes():
        m = s.model.replace("@dry", "")
        if m not in models:
            models.append(m)
    for model in models:
        main = [r for r in rows if r["case"] == "main" and r["model"] == model and _is_base_row(r, profile)]
        if not main:
            continue
        ps = [p for p in order if any(r["provider"] == p for r in main)]
        shapes = [s for s in profile.shapes() if s.model.replace("@dry", "") == model]
        for mode, title in (("step", "full step (fwd + bwd for dX, dA, dB)"), ("fwd", "forward"), ("bwd", "backward")):
            lines.append("")
            lines.append(f"[{model}] {title}, ms (median), M={profile.main_M}, r={profile.r}, alpha={profile.alpha}, "
                         f"bf16")
            body = []
            for s in shapes:
                body.append([f"{s.key} {s.K}->{s.N} (x{s.count})"] +
                            [_cell(_lookup(main, provider=p, proj=s.key, mode=mode)) for p in ps])
            s7, _ = sum7(rows, profile, model, mode)
            body.append(["sum of the 7 projections"] + [_fmt(s7.get(p)) for p in ps])
            if s7.get("ceiling"):
                body.append(["ratio to ceiling"] + [_fmt(s7[p] / s7["ceiling"], "x") if p in s7 else "-" for p in ps])
            if s7.get(BASELINE):
                body.append([f"speed-up vs {BASELINE}"] + [_fmt(s7[BASELINE] / s7[p], "x") if p in s7 else "-"
                                                            for p in ps])
            lines.append(_table(["projection"] + ps, body))
        mem = [r for r in main if r["mode"] == "step" and r["peak_extra_MB"] is not None]
        if mem:
            lines.append("")
            lines.append(f"[{model}] peak extra memory of one step, MB (max_memory_allocated − before; inputs preallocated)")
            body = [[f"{s.key} {s.K}->{s.N}"] + [_fmt((_lookup(mem, provider=p, proj=s.key) or {}).get("peak_extra_MB"), "MB")
                                                for p in ps] for s in shapes]
            lines.append(_table(["projection"] + ps, body))

    sweep = [r for r in rows if r["case"] in ("msweep", "main") and r["mode"] == "step" and _is_base_row(r, profile)]
    if any(r["case"] == "msweep" for r in sweep):
        ps = [p for p in order if any(r["provider"] == p for r in sweep)]
        for s in profile.shapes(profile.msweep_models or (profile.primary,)):
            srows = [r for r in sweep if r["proj"] == s.key and r["model"] == s.model.replace("@dry", "")]
            Ms = sorted({r["M"] for r in srows})
            lines.append("")
            lines.append(f"M sweep, full step ms — {s.label} (r={profile.r}); last column: best lora_fast vs {BASELINE}")
            body = []
            for M in Ms:
                cells = [_cell(_lookup(srows, provider=p, M=M)) for p in ps]
                base = _lookup(srows, provider=BASELINE, M=M)
                lf = [x for x in srows if x["M"] == M and x["provider"].startswith("lora_fast") and _ok(x)]
                sp = (base["ms"] / min(x["ms"] for x in lf)) if lf and base and _ok(base) else None
                body.append([str(M)] + cells + [_fmt(sp, "x")])
            lines.append(_table(["M"] + ps + ["lf/peft"], body))

    rs = [r for r in rows if r["mode"] == "step" and r["case"] in ("rsweep", "main") and r["dropout"] == 0.0
          and not r["bias"] and r["adapter_dtype"] == "bf16" and r["model"] == profile.primary.replace("@dry", "")]
    if any(r["case"] == "rsweep" for r in rs):
        ps = [p for p in order if any(r["provider"] == p for r in rs if r["case"] == "rsweep")]
        lines.append("")
        lines.append(f"rank sweep, full step ms, M={profile.main_M}")
        body = []
        for s in profile.shapes((profile.primary,)):
            for r_ in sorted({r["r"] for r in rs}):
                body.append([f"{s.key} r={r_}"] + [_cell(_lookup(rs, provider=p, proj=s.key, r=r_)) for p in ps])
        lines.append(_table(["projection, rank"] + ps, body))

    var = [r for r in rows if r["case"] == "variants"]
    if var:
        ps = [p for p in order if any(r["provider"] == p for r in var)]
        lines.append("")
        lines.append(f"variants (dropout / bias / fp32 adapters), M={profile.main_M}, r={profile.r}: "
                     f"step ms [peak extra MB]")
        body = []
        keys = []
        for r in var:
            k = (r["proj"], r["dropout"], r["bias"], r["adapter_dtype"])
            if k not in keys:
                keys.append(k)
        for proj, p_, b_, dt in keys:
            cells = []
            for p in ps:
                row = _lookup(var, provider=p, proj=proj, dropout=p_, bias=b_, adapter_dtype=dt, mode="step")
                c = _cell(row)
                if row and row.get("peak_extra_MB") is not None:
                    c += f" [{row['peak_extra_MB']:.0f}]"
                cells.append(c)
            body.append([f"{proj} p={p_} bias={'on' if b_ else 'off'} {dt}"] + cells)
        lines.append(_table(["projection, variant"] + ps, body))

    dec = [r for r in rows if r["case"] == "decode"]
    if dec:
        ps = [p for p in order if any(r["provider"] == p for r in dec) and p != "nf4_floor"]
        lines.append("")
        lines.append("decode (inference forward, input (1, M, K)), µs: CUDA-graph replay [eager]")
        body = []
        for s in profile.shapes((profile.primary,)):
            if not any(r["proj"] == s.key for r in dec):
                continue  # skipped (time budget)
            for m in profile.decode_M:
                fl = _lookup(dec, proj=s.key, M=m, provider="nf4_floor")
                cells = [_fmt(fl["ms"], "us") if fl else "-"]
                for p in ps:
                    g = _lookup(dec, proj=s.key, M=m, provider=p, mode="decode_graph")
                    e = _lookup(dec, proj=s.key, M=m, provider=p, mode="decode_eager")
                    cells.append(f"{_cell(g, 'us')} [{_cell(e, 'us')}]")
                body.append([f"{s.key} M={m}"] + cells)
        lines.append(_table(["projection"] + ["NF4 floor"] + ps, body))

    par = res.get("parity") or []
    if par:
        lines.append("")
        lines.append("parity vs fp64 (y, dX, dA, dB; bar = 2 × plain-PyTorch bf16 error + 1e-2): "
                     "passed/checked, worst relative error")
        by: Dict[str, List[Dict]] = {}
        for e in par:
            by.setdefault(e["provider"], []).append(e)
        body = []
        for p, es in by.items():
            n_ok = sum(1 for e in es if e["ok"])
            worst = max((e[k]["rel_err"] for e in es for k in ("y", "dX", "dA", "dB")
                         if isinstance(e.get(k), dict) and "rel_err" in e[k]), default=None)
            fails = [f"{e['proj']} bias={e['bias']}: " + (e.get("error") or ", ".join(
                f"{k} {e[k].get('max_err', float('nan')):.2e}>{e[k].get('bar', float('nan')):.2e}"
                for k in ("y", "dX", "dA", "dB") if isinstance(e.get(k), dict) and not e[k].get("ok")))
                     for e in es if not e["ok"]]
            body.append([p, f"{n_ok}/{len(es)}", "-" if worst is None else f"{worst:.2e}",
                         "; ".join(fails)[:200]])
        lines.append(_table(["provider", "passed", "worst rel", "failures"], body))

    e2e = res.get("e2e")
    if e2e:
        cfg = e2e.get("config", {})
        lines.append("")
        lines.append(f"end to end: {cfg.get('name')} ({cfg.get('layers')} layers, hidden {cfg.get('hidden')}, "
                     f"inter {cfg.get('inter')}, batch {cfg.get('batch')}x{cfg.get('seq')}, r={cfg.get('r')}, "
                     f"grad ckpt {cfg.get('grad_ckpt')})")
        body = []
        for v in ("peft_bnb", "lora_fast"):
            e = e2e.get(v) or {}
            if e.get("status") == "ok":
                body.append([v, f"{e['tokens_per_s']:.0f}", f"{e['ms_per_step']:.1f}",
                             "-" if e.get("peak_GB") is None else f"{e['peak_GB']:.2f}",
                             f"{e['losses'][-1]:.4f}", str(e.get("method", ""))])
            else:
                body.append([v, "-", "-", "-", "-", str(e.get("error") or e2e.get("error") or "not run")[:120]])
        lines.append(_table(["variant", "tokens/s", "ms/step", "peak GB", "last loss", "note"], body))
        if e2e.get("speedup_tokens_per_s"):
            lines.append(f"speed-up {e2e['speedup_tokens_per_s']:.3f}x; max |loss difference| over the steps "
                         f"{e2e['max_abs_loss_diff']:.4g}")
        tb = e2e.get("lora_fast_torch_backend") or {}
        if tb.get("status") == "ok" and e2e.get("max_abs_loss_diff_torch_backend") is not None:
            tri = e2e.get("max_abs_loss_diff_triton_vs_torch_backend")
            lines.append(f"lora_fast on its PyTorch backend (same patched model): max |loss difference| to peft_bnb "
                         f"{e2e['max_abs_loss_diff_torch_backend']:.4g}"
                         + ("" if tri is None else f", to lora_fast's Triton run {tri:.4g}"))
        gr = e2e.get("lora_fast_grouped") or {}
        if gr.get("status") == "ok":
            lines.append(f"lora_fast with patch(group_siblings=True): {gr['tokens_per_s']:.0f} tokens/s, "
                         f"{gr['ms_per_step']:.1f} ms/step, last loss {gr['losses'][-1]:.4f}")
        elif gr:
            lines.append(f"lora_fast with patch(group_siblings=True): {str(gr.get('error'))[:120]}")
        fu = e2e.get("lora_fast_fused") or {}
        if fu.get("status") == "ok":
            pa = (e2e.get("peft_bnb") or {}).get("tokens_per_s")
            lines.append(f"lora_fast with patch(fuse_ops=True) ({fu.get('fused_modules')} norm/MLP/loss modules fused): "
                         f"{fu['tokens_per_s']:.0f} tokens/s, {fu['ms_per_step']:.1f} ms/step"
                         + (f" ({fu['tokens_per_s'] / pa:.3f}x peft_bnb)" if pa else "")
                         + ("" if fu.get("peak_GB") is None else f", peak {fu['peak_GB']:.2f} GB")
                         + f", last loss {fu['losses'][-1]:.4f}")
        elif fu:
            lines.append(f"lora_fast with patch(fuse_ops=True): {str(fu.get('error'))[:120]}")
        bd = {v: (e2e.get(v) or {}).get("breakdown")
              for v in ("peft_bnb", "lora_fast", "lora_fast_grouped", "lora_fast_fused")}
        bd = {v: b for v, b in bd.items() if isinstance(b, dict) and "ms_by_category" in b}
        if bd:
            cats = sorted({c for b in bd.values() for c in b["ms_by_category"]})
            body = []
            for v, b in bd.items():
                body.append([v, f"{b['wall_ms']:.1f}", f"{b['busy_ms']:.1f}", f"{b['idle_ms']:.1f}", str(b["kernels"])]
                            + [f"{b['ms_by_category'].get(c, 0.0):.1f}" for c in cats])
            lines.append("one profiled step (ms; torch.profiler, CUDA kernels by category; idle = wall - busy):")
            lines.append(_table(["variant", "wall", "busy", "idle", "kernels"] + cats, body))

    sm = res.get("summary") or {}
    if sm.get("sum7"):
        lines.append("")
        lines.append(f"summary (sum of 7 projections, full step, M={sm['M']}, r={sm['r']}):")
        body = [[p, _fmt(v), _fmt(sm["ratio_to_ceiling"].get(p), "x"), _fmt(sm["speedup_vs_peft"].get(p), "x")]
                for p, v in sorted(sm["sum7"].items(), key=lambda kv: kv[1])]
        lines.append(_table(["provider", "ms", "vs ceiling", "speed-up vs peft"], body))
    if res.get("dispatch"):
        lines.append("")
        lines.append("lora_fast dispatch (backend:path -> calls): " + "; ".join(
            f"{p}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for p, d in res["dispatch"].items()))
    if res.get("skipped"):
        lines.append("")
        lines.append("skipped: " + "; ".join(f"{s['case']} {s['what']} ({s['why']})" for s in res["skipped"]))
    if res.get("errors"):
        lines.append("")
        lines.append(f"errors ({len(res['errors'])}):")
        for e in res["errors"][:40]:
            lines.append(f"  {e['case']}: {e['what']}: {e['error'][:200]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ files
def write_json(res: Dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)


def write_csv(res: Dict, path: str) -> None:
    meta = res["meta"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(META_COLUMNS) + list(ROW_COLUMNS))
        for row in res["rows"]:
            w.writerow([meta.get(c) for c in META_COLUMNS] + [row.get(c) for c in ROW_COLUMNS])


def plots(res: Dict, profile, prefix: str) -> Dict[str, str]:
    """PNG plots (matplotlib Agg): speed-up over peft_bnb and fraction of ceiling vs M per
    projection; peak extra memory per provider; seven-projection step time per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    files: Dict[str, str] = {}
    cpu_note = "" if res["meta"].get("timings_meaningful") else " (CPU: not meaningful)"
    gpu = res["meta"].get("gpu") or res["meta"].get("device_kind")
    sweep = [r for r in rows if r["case"] in ("msweep", "main") and r["mode"] == "step" and _is_base_row(r, profile)
             and _ok(r)]
    shapes = profile.shapes(profile.msweep_models or (profile.primary,))
    if sweep and len({r["M"] for r in sweep}) > 1:
        for kind, ylabel, fname in (
            ("speedup", f"speed-up over {BASELINE} (×)", "msweep_speedup"),
            ("ceiling", "fraction of ceiling (ceiling ms / provider ms)", "msweep_ceiling"),
        ):
            n = len(shapes)
            cols = min(n, 2)
            nrows = (n + cols - 1) // cols
            fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
            for ax, s in zip(axes.flat, shapes):
                srows = [r for r in sweep if r["proj"] == s.key and r["model"] == s.model.replace("@dry", "")]
                ref_name = BASELINE if kind == "speedup" else "ceiling"
                ref = {r["M"]: r["ms"] for r in srows if r["provider"] == ref_name}
                # the ceiling is far above every provider at small M: it has its own plot
                for p in sorted({r["provider"] for r in srows} - {ref_name, "ceiling"}):
                    pts = sorted((r["M"], ref[r["M"]] / r["ms"]) for r in srows if r["provider"] == p and r["M"] in ref)
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xscale("log", base=2)
                ax.set_title(s.label)
                ax.set_xlabel("M (tokens)")
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            fig.suptitle(f"{profile.name}: full step, r={profile.r} — {gpu}{cpu_note}")
            fig.tight_layout()
            path = f"{prefix}-{fname}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files[fname] = path
    mem = [r for r in rows if r["case"] == "main" and r["mode"] == "step" and _is_base_row(r, profile)
           and r["peak_extra_MB"] is not None and _ok(r)]
    if mem:
        shapes_m = [s for s in profile.shapes() if any(r["proj"] == s.key and r["model"] == s.model.replace("@dry", "")
                                                       for r in mem)]
        ps = sorted({r["provider"] for r in mem})
        fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(shapes_m) * max(1, len(ps)) / 3), 4.5))
        width = 0.8 / max(1, len(ps))
        for i, p in enumerate(ps):
            vals = [(_lookup(mem, provider=p, proj=s.key, model=s.model.replace("@dry", "")) or {}).get("peak_extra_MB")
                    or 0 for s in shapes_m]
            ax.bar([j + i * width for j in range(len(shapes_m))], vals, width, label=p)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes_m))])
        ax.set_xticklabels([f"{s.key}\n{s.K}->{s.N}" for s in shapes_m], fontsize=7)
        ax.set_ylabel("peak extra memory of one step (MB)")
        ax.set_title(f"{profile.name}: M={profile.main_M}, r={profile.r} — {gpu}{cpu_note}")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = f"{prefix}-memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["memory"] = path
    s7 = (res.get("summary") or {}).get("sum7") or {}
    if s7:
        items = sorted(s7.items(), key=lambda kv: kv[1])
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.5))
        ax.barh([k for k, _ in items], [v for _, v in items])
        ax.set_xlabel("ms, sum of the 7 projections, full step")
        ax.set_title(f"{profile.name}: M={profile.main_M}, r={profile.r} — {gpu}{cpu_note}")
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        path = f"{prefix}-sum7.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["sum7"] = path
    return files


def profile_dict(profile) -> Dict[str, object]:
    d = dataclasses.asdict(profile)
    d["shapes"] = [dataclasses.asdict(s) for s in profile.shapes()]
    return d
