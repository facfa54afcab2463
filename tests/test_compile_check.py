"""Tests of the kernel compile check (bench/compile_check.py) and the perf-regression checker
(bench/regress.py).  No GPU needed; the Triton subset compiles for sm_90 only, one config
per kernel (about a minute on a 2-core CPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from bench import compile_check as cc  # noqa: E402
from bench import regress  # noqa: E402


# ------------------------------------------------------------------------------- compile check

def _run_cli(tmp_path_factory, *args):
    """Run ``python -m bench.compile_check`` in a clean process (the test session may run
    Triton's interpreter, which replaces @triton.jit); returns (exit code, JSON report)."""
    out = tmp_path_factory.mktemp("cc") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--no-cuda", "--quiet", "--json", str(out),
                           *args], cwd=cc.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout + proc.stderr
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    # sm_90, the first applicable config of the first variant of every kernel
    return _run_cli(tmp_path_factory, "--arch", "90", "--max-configs", "1", "--variants", "1", "--jobs", "2")


def test_table_lists_every_kernel(subset):
    code, report, log = subset
    results = report["triton_results"]
    labels = {r["kernel"] for r in results}
    assert labels == {row.label for row in cc.KERNELS}, log
    compiled = {r["kernel"] for r in results if r["status"].startswith("ok")}
    assert compiled == {row.label for row in cc.KERNELS}, log


def test_subset_has_no_failures(subset):
    code, report, log = subset
    bad = [r for r in report["triton_results"] if r["status"] == "FAIL"]
    assert not bad, cc.format_table(bad)
    assert code == 0, log
    for r in report["triton_results"]:
        if r["status"].startswith("ok"):
            assert r["shared"] <= cc.ARCH_SMEM[90]
            assert r["regs"] is None or 0 < r["regs"] <= 255
            assert not r["spill_bytes"]


def test_table_formatting(subset):
    text = cc.format_table(subset[1]["triton_results"])
    for row in cc.KERNELS:
        assert row.label in text
    assert "smem KB" in text and "regs" in text and "spill" in text


def test_every_kernel_of_the_modules_is_in_the_table():
    """A new ``*_kernel`` defined in a listed kernels/ module must get a row in KERNELS."""
    import importlib

    listed = {(row.module, row.kernel) for row in cc.KERNELS}
    for modname in sorted({row.module for row in cc.KERNELS}):
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if name.startswith("_") or not name.endswith("_kernel"):
                continue
            try:
                fn = cc._jit_fn(obj)
            except TypeError:
                continue
            if cc._py_fn(fn).__module__ != mod.__name__:
                continue  # imported helper
            same = any(r.module == modname and cc._jit_fn(getattr(mod, r.kernel)) is fn for r in cc.KERNELS)
            assert (modname, name) in listed or same, f"{modname}.{name} is not in bench.compile_check.KERNELS"


def test_config_too_big_for_sm86_is_reported_pruned(tmp_path_factory):
    """The largest NF4 config needs > 99 KB: on sm_86 lora_gemm's prune drops it -> 'pruned'."""
    mod = cc._import("kernels.lora_gemm")
    row = next(r for r in cc.KERNELS if r.kernel == "lora_gemm_kernel")
    variant = next(v for v in row.variants if v.name == "nf4-nested-bf16")
    big = max(mod.NF4_CONFIGS, key=lambda c: mod.estimate_smem(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                               c.kwargs["BLOCK_K"], c.num_stages, 2, True, True))
    fn = cc._jit_fn(getattr(mod, row.kernel))
    kept86 = cc.kept_by_prune(row, mod, fn, variant, mod.CONFIGS, cc.ARCH_SMEM[86], 86)
    kept90 = cc.kept_by_prune(row, mod, fn, variant, mod.CONFIGS, cc.ARCH_SMEM[90], 90)
    key = cc._cfg_key(big)
    assert key not in kept86
    assert key in kept90
    code, report, log = _run_cli(tmp_path_factory, "--arch", "86", "--kernel", "lora_gemm_kernel",
                                 "--variant", "nf4-nested-bf16", "--config", key, "--jobs", "1")
    rows = [r for r in report["triton_results"] if r["config"] == key]
    assert len(rows) == 1, log
    r = rows[0]
    assert r["status"] in ("pruned on sm_86", "ok (pruned)"), r
    if r["status"] == "pruned on sm_86":
        assert "shared memory" in r["note"]
    assert code == 0, log


def test_overflow_not_pruned_fails(monkeypatch):
    """A config over the arch limit that the prune function would keep is a failure, one it
    drops is 'pruned'; spills fail too."""
    mod = cc._import("kernels.lowrank")
    row = next(r for r in cc.KERNELS if r.kernel == "nf4_dequant_kernel")  # no prune function
    outcomes = iter([
        dict(ok=True, shared=cc.ARCH_SMEM[86] + 1, regs=40, spill_bytes=0),
        dict(ok=True, shared=1024, regs=255, spill_bytes=64),
        dict(ok=False, error="boom"),
        dict(ok=True, shared=1024, regs=32, spill_bytes=0),
    ])
    monkeypatch.setattr(cc, "_compile_job", lambda args: next(outcomes))
    res = cc.run_triton_checks([row], archs=(86,), max_configs=4, variants_per_kernel=1, log=lambda *a: None)
    statuses = [r["status"] for r in res]
    assert statuses.count("FAIL") == 3, res
    assert statuses.count("ok") == 1
    errs = " ".join(r.get("error", "") for r in res)
    assert "shared memory" in errs and "spills" in errs and "boom" in errs
    # with a prune function that drops everything, the same overflow is only 'pruned'
    outcomes2 = iter([dict(ok=True, shared=cc.ARCH_SMEM[86] + 1, regs=40, spill_bytes=0)] * 8)
    monkeypatch.setattr(cc, "_compile_job", lambda args: next(outcomes2))
    monkeypatch.setattr(mod, "_test_prune_none", lambda configs, named_args, **kw: [configs[0]], raising=False)
    sub = cc.KernelRow(row.module, row.kernel, row.configs, row.variants[:1], prune="_test_prune_none")
    res = cc.run_triton_checks([sub], archs=(86,), max_configs=2, log=lambda *a: None)
    st = sorted(r["status"] for r in res)
    assert st.count("FAIL") == 1 and "n/a" in st or st.count("FAIL") == 1, res


PTXAS_SAMPLE = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN9lora_fast12_GLOBAL__N_119nf4_quantize_kernelIfEEvPKflPhPf' for 'sm_90'
ptxas info    : Function properties for _ZN9lora_fast12_GLOBAL__N_119nf4_quantize_kernelIfEEvPKflPhPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 23 registers, used 1 barriers, 36 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 12 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 128 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_parse_res_usage_reads_the_kernels_stack_frame():
    """Spilled registers live in the stack frame: STACK counts, per function block."""
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function helper:
  REG:32 STACK:4096 SHARED:0 LOCAL:0 CONSTANT[0]:0 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function lora_gemm_kernel:
  REG:255 STACK:2872 SHARED:1024 LOCAL:16 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert cc.parse_res_usage(text, "lora_gemm_kernel") == (255, 2872, 16)
    assert cc.parse_res_usage(text, "missing") == (32, 4096, 0)  # first block
    assert cc.parse_res_usage("no blocks here", "x") is None


def test_parse_ptxas():
    rows = cc.parse_ptxas(PTXAS_SAMPLE)
    assert len(rows) == 2
    a, b = rows
    assert a["arch"] == "sm_90" and a["regs"] == 23 and a["spill_stores"] == 0 and a["smem"] == 36
    assert b["arch"] == "sm_80" and b["regs"] == 128 and (b["spill_stores"], b["spill_loads"]) == (12, 24)
    if shutil.which("c++filt"):
        assert "nf4_quantize_kernel<float>" in a["kernel"]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs nvcc")
def test_cuda_sources_compile_without_spills():
    src = os.path.join(cc.REPO, "csrc", "nf4_quantize.cu")
    res = cc.compile_cuda((90,), [src])
    (f,) = res["files"]
    assert f["returncode"] == 0, f["errors"]
    assert f["kernels"] and all(k["arch"] == "sm_90" for k in f["kernels"])
    assert f["ok"] and f["spills"] == 0
    assert "nf4_quantize.cu" in cc.format_cuda(res)


# ------------------------------------------------------------------------------------ regress

def _result(gpu="NVIDIA H100 80GB HBM3", lf=1.30, peft=1.60, lf_speedup=1.23, proj_lf=1.4):
    return {
        "schema": 1,
        "meta": {"gpu": gpu},
        "summary": {
            "sum7": {"ceiling": 10.0, "lora_fast_triton": 10.0 * lf, "peft_bnb": 10.0 * peft},
            "ratio_to_ceiling": {"ceiling": 1.0, "lora_fast_triton": lf, "peft_bnb": peft},
            "speedup_vs_peft": {"lora_fast_triton": lf_speedup, "peft_bnb": 1.0},
            "per_projection": {"q": {"ceiling": 1.0, "lora_fast_triton": proj_lf, "peft_bnb": 1.7}},
        },
    }


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_regress_ok_within_tolerance(tmp_path, capsys):
    base = _write(tmp_path, "base.json", _result())
    new = _write(tmp_path, "new.json", _result(lf=1.35, lf_speedup=1.20, proj_lf=1.45))  # +3.8%
    assert regress.main([new, "--baseline", base, "--tolerance", "0.10"]) == 0
    out = capsys.readouterr().out
    assert "ratio_to_ceiling[lora_fast_triton]" in out and "OK" in out
    assert "peft_bnb" not in out  # only lora_fast providers by default


def test_regress_detects_regression(tmp_path, capsys):
    base = _write(tmp_path, "base.json", _result())
    new = _write(tmp_path, "new.json", _result(lf=1.50))  # +15%
    assert regress.main([new, "--baseline", base, "--tolerance", "0.10"]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    # a looser tolerance accepts it
    assert regress.main([new, "--baseline", base, "--tolerance", "0.20"]) == 0


def test_regress_speedup_is_higher_is_better(tmp_path):
    base = _write(tmp_path, "base.json", _result())
    worse = _write(tmp_path, "worse.json", _result(lf_speedup=1.0))   # -19%
    better = _write(tmp_path, "better.json", _result(lf_speedup=1.6))
    assert regress.main([worse, "--baseline", base]) == 1
    assert regress.main([better, "--baseline", base]) == 0


def test_regress_per_projection(tmp_path):
    base = _write(tmp_path, "base.json", _result())
    new = _write(tmp_path, "new.json", _result(proj_lf=1.8))
    assert regress.main([new, "--baseline", base]) == 1
    assert regress.main([new, "--baseline", base, "--no-per-projection"]) == 0


def test_regress_other_gpu_is_not_compared(tmp_path, capsys):
    base = _write(tmp_path, "base.json", _result(gpu="NVIDIA A100-SXM4-80GB"))
    new = _write(tmp_path, "new.json", _result())
    assert regress.main([new, "--baseline", base]) == 2
    assert "different GPUs" in capsys.readouterr().err


def test_regress_missing_provider(tmp_path):
    base = _write(tmp_path, "base.json", _result())
    data = _result()
    for key in ("ratio_to_ceiling", "speedup_vs_peft", "sum7"):
        data["summary"][key].pop("lora_fast_triton")
    data["summary"]["per_projection"]["q"].pop("lora_fast_triton")
    new = _write(tmp_path, "new.json", data)
    assert regress.main([new, "--baseline", base]) == 1
    assert regress.main([new, "--baseline", base, "--allow-missing"]) == 0


def test_regress_all_providers_and_bad_input(tmp_path):
    base = _write(tmp_path, "base.json", _result())
    new = _write(tmp_path, "new.json", _result(peft=2.0))
    assert regress.main([new, "--baseline", base]) == 0                       # peft not ours
    assert regress.main([new, "--baseline", base, "--providers", "all"]) == 1  # ...unless asked
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert regress.main([str(bad), "--baseline", base]) == 2
    assert regress.main([new, "--baseline", str(tmp_path / "nope.json")]) == 2
    nosum = _write(tmp_path, "nosum.json", {"meta": {"gpu": "NVIDIA H100 80GB HBM3"}})
    assert regress.main([nosum, "--baseline", base]) == 2


def test_regress_default_baseline_is_the_newest_committed_run_of_that_gpu_and_shape(tmp_path, capsys):
    committed = os.path.join(regress.REPO, "bench", "data", "h100-20261123T065908Z.json")
    with open(committed) as fh:
        data = json.load(fh)
    new = _write(tmp_path, "new.json", data)
    path = regress.default_baseline(data, new)
    assert os.path.basename(path) == "h100-20261123T065908Z.json"  # the older h100 runs lack lora_fast figures
    assert regress.main([new]) == 0
    # no committed run of that GPU, or of those shapes: a clear refusal, not a missing-file error
    other = dict(data, meta=dict(data["meta"], gpu="NVIDIA GeForce RTX 3060"))
    assert regress.main([_write(tmp_path, "other.json", other)]) == 2
    assert "no committed baseline" in capsys.readouterr().err
    small = dict(data, summary=dict(data["summary"], M=2048))
    assert regress.main([_write(tmp_path, "small.json", small)]) == 2
    assert regress.main([_write(tmp_path, "cpu.json", dict(data, meta={}))]) == 2
    assert "meta.gpu missing" in capsys.readouterr().err


def test_regress_refuses_other_shapes_nan_tolerance_and_fails_on_nan(tmp_path, capsys):
    base = _result()
    base["summary"].update(model="llama3_8b", M=8192)
    other = _result()
    other["summary"].update(model="llama2_7b", M=2048)
    b = _write(tmp_path, "base.json", base)
    assert regress.main([_write(tmp_path, "other.json", other), "--baseline", b]) == 2
    assert "different shapes" in capsys.readouterr().err
    slower = _result(lf=2.6)
    slower["summary"].update(model="llama3_8b", M=8192)
    s = _write(tmp_path, "slower.json", slower)
    assert regress.main([s, "--baseline", b, "--tolerance", "nan"]) == 2
    assert regress.main([s, "--baseline", b, "--tolerance", "inf"]) == 2
    bad = _result(lf=float("nan"))
    bad["summary"].update(model="llama3_8b", M=8192)
    assert regress.main([_write(tmp_path, "nan.json", bad), "--baseline", b]) == 1
    assert "REGRESSION (not finite)" in capsys.readouterr().out


def test_compile_check_that_compiles_nothing_fails(capsys):
    # a typo in a filter (or --no-triton without nvcc) used to print "compile_check: OK"
    assert cc.main(["--kernel", "no_such_kernel", "--no-cuda", "--quiet"]) == 1
    assert cc.main(["--no-triton", "--no-cuda"]) == 1
    # a config the prune function never offers to the variant ("n/a") is not a compilation
    assert cc.main(["--kernel", "lowrank.dy_pass_kernel", "--variant", "fp32-r32", "--config",
                    "BLOCK_M=64,BLOCK_N=64,w4,s3", "--arch", "80", "--jobs", "1", "--no-cuda", "--quiet"]) == 1
