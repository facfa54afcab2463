"""The benchmark suite's CPU smoke run, in-process: ``python -m bench --profile smoke``.

Checks that it writes JSON and CSV with the documented fields, that every provider able to run
on the CPU ran every case and passed parity (output and dX, dA, dB against fp64), and that the
providers that need a GPU are listed as unavailable with a reason instead of crashing.
"""
from __future__ import annotations

import csv
import json
import os
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import cli, report

GPU_ONLY = ("lora_fast_triton", "lora_fast_cuda", "lora_fast_dense_triton", "lora_fast_dense_cuda")
META_KEYS = ("gpu", "compute_capability", "torch", "triton", "bitsandbytes", "peft", "transformers", "commit",
             "timestamp", "profile", "timings_meaningful")
SUMMARY_KEYS = ("model", "M", "r", "mode", "sum7", "ratio_to_ceiling", "speedup_vs_peft", "e2e")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    lines = []
    t = time.perf_counter()
    res = cli.run(["--profile", "smoke", "--out", str(out)], log=lines.append)
    res["_wall_s"] = time.perf_counter() - t
    res["_log"] = lines
    return res


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke profile is the CPU check; a GPU runs the full suite")
def test_smoke_files_and_fields(smoke):
    files = smoke["files"]
    for key in ("json", "csv", "table"):
        assert os.path.isfile(files[key]), f"{key} not written: {files}"
    with open(files["json"]) as f:
        data = json.load(f)
    for key in ("schema", "meta", "profile", "providers", "hw", "summary", "e2e", "rows", "parity", "errors",
                "skipped", "files"):
        assert key in data, f"results JSON lacks {key!r}"
    for key in META_KEYS:
        assert key in data["meta"], f"meta lacks {key!r}"
    assert data["meta"]["profile"] == "smoke"
    assert data["meta"]["timings_meaningful"] is False
    for key in SUMMARY_KEYS:
        assert key in data["summary"], f"summary lacks {key!r}"
    for p in ("peft_bnb", "torch_ref", "ceiling", "dequant_cublas", "lora_fast_torch"):
        assert p in data["summary"]["sum7"], f"sum7 lacks {p}: {data['summary'].get('missing')}"
    assert data["summary"]["ratio_to_ceiling"]["ceiling"] == pytest.approx(1.0)
    assert data["summary"]["speedup_vs_peft"]["peft_bnb"] == pytest.approx(1.0)
    with open(files["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "CSV has no rows"
    assert set(report.META_COLUMNS + report.ROW_COLUMNS) <= set(rows[0]), "CSV lacks columns"
    assert len(rows) == len(data["rows"])
    assert {r["case"] for r in rows} >= {"main", "msweep", "rsweep", "variants", "decode"}
    assert any("timings are NOT meaningful on CPU" in line for line in smoke["_log"])
    assert smoke["_wall_s"] < 120, f"smoke run took {smoke['_wall_s']:.0f}s"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke profile is the CPU check; a GPU runs the full suite")
def test_smoke_providers_and_parity(smoke):
    status = smoke["providers"]
    for name in GPU_ONLY:
        assert status[name]["available"] is False, f"{name} claims to run without a GPU"
        assert "GPU" in status[name]["reason"] or "CUDA" in status[name]["reason"], status[name]
    runnable = [n for n, s in status.items() if s["available"]]
    for name in ("lora_fast_torch", "lora_fast_dense_torch", "peft_bnb", "dequant_cublas", "torch_ref", "ceiling"):
        assert name in runnable, f"{name} should run on CPU: {status[name]['reason']}"
    assert not smoke["errors"], "errors: " + "; ".join(f"{e['case']} {e['what']}: {e['error']}" for e in smoke["errors"])
    bad_rows = [r for r in smoke["rows"] if r["status"] not in ("ok", "unavailable")]
    assert not bad_rows, bad_rows[:3]
    checked = {e["provider"] for e in smoke["parity"]}
    assert checked == set(runnable) - {"ceiling", "bnb_base_only"}
    failed = [e for e in smoke["parity"] if not e["ok"]]
    assert not failed, [(e["provider"], e["proj"], e["bias"], e.get("error"),
                         {k: e[k] for k in ("y", "dX", "dA", "dB") if isinstance(e.get(k), dict) and not e[k]["ok"]})
                        for e in failed]
    for e in smoke["parity"]:
        for k in ("y", "dX", "dA", "dB"):
            assert e[k]["max_err"] <= e[k]["bar"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke profile is the CPU check; a GPU runs the full suite")
def test_smoke_e2e(smoke):
    e2e = smoke["e2e"]
    assert e2e is not None
    for v in ("peft_bnb", "lora_fast"):
        assert e2e[v]["status"] == "ok", e2e[v].get("error")
        assert len(e2e[v]["losses"]) == e2e["config"]["warmup"] + e2e["config"]["steps"]
    # same model, same adapter initialisation, same data: the loss curves agree to bf16 noise
    assert e2e["max_abs_loss_diff"] < 0.05
    assert smoke["summary"]["e2e"]["speedup_tokens_per_s"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real h100 path runs instead")
def test_dry_run_exercises_gpu_path(tmp_path):
    """``--dry-run``: the h100 profile's GPU code path (events, peak-memory reads, CUDA-graph
    decode) on the CPU with stand-ins, shapes mapped down; it must run without an error."""
    res = cli.run(["--profile", "h100", "--dry-run", "--quick", "--cases", "main", "decode", "--no-plots",
                   "--providers", "lora_fast_torch,peft_bnb,dequant_cublas,torch_ref,ceiling,bnb_base_only",
                   "--out", str(tmp_path)], log=lambda s: None)
    assert res["meta"]["profile"] == "h100-dryrun-quick"
    assert not res["errors"], res["errors"][:2]
    graph = [r for r in res["rows"] if r["mode"] == "decode_graph"]
    assert graph and all(r["status"] == "ok" for r in graph)
    steps = [r for r in res["rows"] if r["case"] == "main" and r["mode"] == "step"]
    assert steps and all(r["peak_extra_MB"] is not None for r in steps)
    assert {s["proj"] for s in steps} == {"q_proj,o_proj", "k_proj,v_proj", "gate_proj,up_proj", "down_proj"}
    assert set(res["summary"]["sum7"]) >= {"peft_bnb", "ceiling", "lora_fast_torch"}


def test_e2e_kernel_categories():
    """The e2e step breakdown's kernel classes: lora_fast's own kernels before the generic
    'gemm' match, bitsandbytes' dequantisation apart from the GEMMs."""
    from bench.e2e import classify_kernel

    assert classify_kernel("lora_gemm_kernel") == "adapter (lora_fast kernels)"
    assert classify_kernel("dy_pass_kernel") == "adapter (lora_fast kernels)"
    assert classify_kernel("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)") \
        == "nf4 dequant (bitsandbytes)"
    assert classify_kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert classify_kernel("void at::native::vectorized_elementwise_kernel<8, ...>") == "elementwise / reduce / copy"
    assert classify_kernel("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert classify_kernel("something_else") == "other"


def test_bf16_loss_curve_follows_fp32_not_peft_rounding():
    """bench.rounding on a small model: the emulation of PEFT's bf16 rounding (base output rounded,
    then the adapter added) reproduces PEFT's own bf16 curve, and lora_fast's patched model in
    bf16 (here its PyTorch backend, which rounds like the kernels) stays much closer to the fp32
    run of the same model than PEFT's bf16 curve does (bench/NOTES.md)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from bench import rounding
    from bench.profiles import E2EConfig

    cfg = E2EConfig("small", hidden=256, inter=896, layers=2, heads=8, kv_heads=2, vocab=1024, batch=2, seq=64)
    res = rounding.run(cfg, steps=3, log=lambda *_: None)
    curves, dist = res["losses"], res["max_abs_diff_to_fp32"]
    assert set(curves) == set(rounding.RUNS) and all(len(v) == 3 for v in curves.values())
    assert curves["single"][0] == curves["double"][0]  # B = 0: the same first forward
    for a, b in zip(curves["double"], curves["peft_bf16"]):
        assert abs(a - b) < 5e-4, (curves["double"], curves["peft_bf16"])
    assert dist["peft_bf16"] > 1e-3, dist  # the effect is visible at this size
    assert dist["lora_fast"] < 0.3 * dist["peft_bf16"], dist
    assert dist["single"] < 0.3 * dist["peft_bf16"], dist


def test_launch_count_one_layer(tmp_path):
    """bench.launch_count: the host work of one e2e step, counted (CPU, one layer).  In a
    subprocess: it imports the kernels under TRITON_INTERPRET=1, which would leave them
    interpreted for the rest of a GPU test session."""
    import json
    import subprocess
    import sys

    out = tmp_path / "lc.json"
    proc = subprocess.run([sys.executable, "-m", "bench.launch_count", "--profile", "h100", "--layers", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["variants"]
    peft, lf, fused = res["peft_bnb"], res["lora_fast"], res["lora_fast_fused"]
    assert peft["triton_launches"] == 0 and lf["triton_launches"] >= 7 * 4  # 7 projections, 4-5 launches a step
    assert fused["kernels"] < lf["kernels"] < peft["kernels"]
    assert fused["triton_launches"] > lf["triton_launches"]  # the norms, SwiGLU and loss kernels
