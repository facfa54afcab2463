"""GPU self-check of the CUDA backend (``lora_fast.cuda_ext``): build, parity, timings.

Run on a CUDA machine from the repository root::

    python -m bench.cuda_selfcheck                 # build + parity + quantize + timings
    python -m bench.cuda_selfcheck --quick         # fewer parity cases
    python -m bench.cuda_selfcheck --skip-bench    # parity only
    python -m bench.cuda_selfcheck --bnb-path build/nf4_bnb_probe   # where bitsandbytes lives

Steps:
1. JIT-builds the extension (or imports ``lora_fast._C``) and reports the build time.
2. GEMV parity against an fp64 reference of the exactly dequantised weight (the way
   bitsandbytes dequantises: ``code * absmax`` in fp32, one rounding to the activation dtype):
   fp16/bf16, M in {1, 3, 16, 64}, odd N, K both a multiple of 32 (tensor-core path) and not
   (scalar path), r in {1, 16, 64}, nested and plain absmax, blocksize 64/128, fp32 and
   activation-dtype adapters, with and without bias; each case also through the scalar kernel.
3. NF4 quantisation: byte equality (packed and absmax) with bitsandbytes' CUDA
   ``quantize_4bit`` when bitsandbytes is importable, and with ``lora_fast.nf4.quantize``.
4. Timings under CUDA-graph replay (median over >= 200 replays of a graph holding several
   calls on rotating weight copies, so the weight stream never hits L2) for
   4096->14336, 14336->4096, 4096->4096, 4096->1024 at M = 1 and 16, next to the bytes floor
   (packed bytes + absmax bytes over the measured device-to-device copy bandwidth) and
   ``bitsandbytes.matmul_4bit`` at M = 1.
Prints tables and writes JSON to ``$OUT/cuda_selfcheck.json`` (or ``/tmp`` without ``$OUT``).
Exit status 1 when a parity check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional, Tuple

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# Tolerances on max|y - y_ref| / max|y_ref| (tensor-core path multiplies the code by the scale
# in the activation dtype: one extra rounding per weight; the scalar path dequantises exactly).
RTOL_MMA = {torch.bfloat16: 1.6e-2, torch.float16: 3e-3}
RTOL_SCALAR = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}
RTOL_XA = 1e-3


# ---------------------------------------------------------------------------------------------
# operands and reference (torch only; no bitsandbytes needed)
# ---------------------------------------------------------------------------------------------

def make_nf4_operand(W: torch.Tensor, blocksize: int = 64, nested: bool = False, nested_blocksize: int = 256):
    """An NF4Operand of ``W`` (N, K) in bitsandbytes' layout, quantised with plain torch ops
    (nearest code by midpoints).  Bit-exactness with bitsandbytes is irrelevant here: the
    reference dequantises the very same operand."""
    from lora_fast._operand import NF4Operand

    n, k = W.shape
    dev = W.device
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
    flat = W.reshape(-1).float()
    numel = flat.numel()
    nb = (numel + blocksize - 1) // blocksize
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - numel)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=1e-30).unsqueeze(1)).reshape(-1)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)[: numel + (numel % 2)]
    if q.numel() % 2:
        q = torch.cat([q, q.new_full((1,), 7)])
    packed = (q[0::2] << 4) | q[1::2]
    if not nested:
        return NF4Operand(packed.contiguous(), absmax.contiguous(), None, None, 0.0, blocksize, nested_blocksize,
                          (n, k), code)
    offset = float(absmax.mean())
    c = absmax - offset
    nb2 = (nb + nested_blocksize - 1) // nested_blocksize
    cb = torch.nn.functional.pad(c, (0, nb2 * nested_blocksize - nb)).view(nb2, nested_blocksize)
    absmax2 = cb.abs().amax(dim=1).clamp(min=1e-30)
    code2 = torch.linspace(-1.0, 1.0, 256, device=dev, dtype=torch.float32)
    y = (cb / absmax2.unsqueeze(1)).reshape(-1)[:nb]
    qa = torch.bucketize(y, (code2[:-1] + code2[1:]) / 2).clamp(0, 255).to(torch.uint8)
    return NF4Operand(packed.contiguous(), qa.contiguous(), absmax2.contiguous(), code2, offset, blocksize,
                      nested_blocksize, (n, k), code)


def reference_forward(x, op, bias, A, B, scaling):
    """fp64 (y, xa) of the LoRA forward with the weight dequantised exactly like bitsandbytes
    and the adapter rounded to the activation dtype."""
    from lora_fast import reference as ref

    dt = x.dtype
    w = ref.nf4_dequantize(op, dt).double()
    x64 = x.double()
    a64 = A.to(dt).double()
    b64 = B.to(dt).double()
    xa = x64 @ a64.t()
    y = x64 @ w.t() + scaling * (xa @ b64.t())
    if bias is not None:
        y = y + bias.to(dt).double()
    return y, xa


def make_case(M, N, K, r, dtype, blocksize, nested, adapter_dtype, with_bias, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.02).to(device)
    op = make_nf4_operand(W, blocksize, nested)
    x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    A = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device=device, dtype=adapter_dtype)
    B = (torch.randn(N, r, generator=g) * 0.05).to(device=device, dtype=adapter_dtype)
    bias = (torch.randn(N, generator=g) * 0.1).to(device=device, dtype=dtype) if with_bias else None
    return x, op, bias, A, B


def check_parity(M, N, K, r, dtype, blocksize, nested, adapter_dtype=None, with_bias=True, scaling=0.5,
                 force_scalar=False, device="cuda", seed=0) -> Dict:
    """Runs one GEMV case through lora_fast.cuda_ext.forward; returns a dict with errors and ok."""
    from lora_fast import cuda_ext

    adapter_dtype = adapter_dtype or dtype
    x, op, bias, A, B = make_case(M, N, K, r, dtype, blocksize, nested, adapter_dtype, with_bias, device, seed)
    y, xa = cuda_ext.forward(x, op, bias, A, B, scaling, 0.0, 0, force_scalar=force_scalar)
    torch.cuda.synchronize()
    y_ref, xa_ref = reference_forward(x, op, bias, A, B, scaling)
    scale_y = float(y_ref.abs().max().clamp(min=1e-6))
    scale_xa = float(xa_ref.abs().max().clamp(min=1e-6))
    err_y = float((y.double() - y_ref).abs().max()) / scale_y
    err_xa = float((xa.double() - xa_ref).abs().max()) / scale_xa
    mma_ok = K % 32 == 0 and not force_scalar
    tol = (RTOL_MMA if mma_ok else RTOL_SCALAR)[dtype]
    finite = bool(torch.isfinite(y).all()) and bool(torch.isfinite(xa).all())
    ok = finite and err_y <= tol and err_xa <= RTOL_XA and y.shape == (M, N) and xa.shape == (M, r) \
        and y.dtype == dtype and xa.dtype == torch.float32
    return dict(M=M, N=N, K=K, r=r, dtype=str(dtype).replace("torch.", ""), blocksize=blocksize, nested=nested,
                adapter_dtype=str(adapter_dtype).replace("torch.", ""), bias=with_bias,
                path="scalar" if (force_scalar or K % 32) else "mma", err_y=err_y, err_xa=err_xa, tol=tol, ok=ok)


def parity_cases(quick: bool = False) -> List[Tuple]:
    """(M, N, K, r, dtype, blocksize, nested, adapter_dtype, bias) combinations."""
    out = []
    dtypes = (torch.bfloat16, torch.float16)
    ms = (1, 3, 16, 64)
    shapes = ((333, 4096), (129, 800), (77, 200)) if not quick else ((333, 4096), (77, 200))
    rs = (1, 16, 64)
    i = 0
    for dt in dtypes:
        for m in ms:
            for (n, k) in shapes:
                for r in rs:
                    nested = bool(i % 2)
                    bs = 64 if (i // 2) % 2 == 0 else 128
                    adt = torch.float32 if (i % 3 == 0) else dt
                    bias = (i % 4) != 1
                    i += 1
                    if quick and r == 16 and m in (3, 64):
                        continue
                    out.append((m, n, k, r, dt, bs, nested, adt, bias))
    # every (nested, blocksize) pair at the headline shape
    for nested in (False, True):
        for bs in (32, 64, 128, 256, 4096):
            out.append((1, 4096 + 16, 4096, 16, torch.bfloat16, bs, nested, torch.float32, True))
    return out


# ---------------------------------------------------------------------------------------------
# quantisation parity
# ---------------------------------------------------------------------------------------------

def _import_bnb(bnb_path: Optional[str]):
    try:
        import bitsandbytes as bnb  # noqa: F401
        return bnb, ""
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}"
    for p in filter(None, [bnb_path, os.environ.get("LORA_FAST_BNB_PATH"), "build/nf4_bnb_probe"]):
        if os.path.isdir(os.path.join(p, "bitsandbytes")):
            sys.path.insert(0, os.path.abspath(p))
            try:
                import bitsandbytes as bnb  # noqa: F401,F811
                return bnb, ""
            except Exception as exc:
                first = f"{type(exc).__name__}: {exc}"
                sys.path.pop(0)
    return None, first


def quantize_inputs(device="cuda") -> List[Tuple[str, torch.Tensor]]:
    g = torch.Generator(device="cpu").manual_seed(1)
    cases = []
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        cases.append((f"randn(256,1024) {dt}", torch.randn(256, 1024, generator=g).to(device=device, dtype=dt)))
        cases.append((f"randn(33,31) odd {dt}", torch.randn(33, 31, generator=g).to(device=device, dtype=dt)))
        w = torch.randn(64, 200, generator=g) * 0.02
        w[3] = 0.0                           # all-zero blocks
        w[5, :64] = torch.tensor(NF4_CODE * 4)  # values exactly on codes (scale 1)
        cases.append((f"zeros+codes(64,200) {dt}", w.to(device=device, dtype=dt)))
    w = torch.randn(3, 4097, generator=g)
    w[1, :100] = 1e-40                       # fp32 subnormals (FTZ)
    cases.append(("subnormals fp32", w.to(device)))
    cases.append(("big 4096x4096 bf16", (torch.randn(4096, 4096, generator=g) * 0.02).to(device, torch.bfloat16)))
    return cases


def check_quantize(bnb, blocksizes=(32, 64, 128, 256, 512, 1024, 2048, 4096), device="cuda") -> List[Dict]:
    from lora_fast import cuda_ext

    try:
        from lora_fast import nf4 as nf4mod
    except Exception:
        nf4mod = None
    rows = []
    for name, W in quantize_inputs(device):
        for bs in blocksizes:
            packed, absmax = cuda_ext.quantize_nf4_cuda(W, bs)
            row = dict(case=name, blocksize=bs)
            if bnb is not None:
                try:
                    import bitsandbytes.functional as F

                    qb, st = F.quantize_4bit(W, blocksize=bs, quant_type="nf4", compress_statistics=False)
                    pb = qb.reshape(-1).view(torch.uint8)
                    same_p = pb.numel() == packed.numel() and bool(torch.equal(pb, packed))
                    same_a = bool(torch.equal(st.absmax.float().reshape(-1), absmax))
                    nbad = int((pb != packed).sum()) if pb.numel() == packed.numel() else -1
                    row.update(bnb_packed_equal=same_p, bnb_absmax_equal=same_a, bnb_bytes_differing=nbad)
                except Exception as exc:
                    row.update(bnb_error=f"{type(exc).__name__}: {exc}")
            if nf4mod is not None:
                try:
                    t = nf4mod.quantize(W, blocksize=bs, double_quant=False)
                    row.update(nf4py_packed_equal=bool(torch.equal(t.packed.reshape(-1), packed)),
                               nf4py_absmax_equal=bool(torch.equal(t.absmax.float().reshape(-1), absmax)))
                except Exception as exc:
                    row.update(nf4py_error=f"{type(exc).__name__}: {exc}")
            checks = [v for k, v in row.items() if k.endswith("_equal")]
            row["ok"] = all(checks) if checks else None
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(ts)


def time_graph(calls, replays: int = 200) -> Tuple[float, str]:
    """Median µs per call of ``calls`` (a list of zero-arg callables) captured in one CUDA graph,
    over ``replays`` replays.  Falls back to eager timing (noted) if capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        run = graph.replay
        for _ in range(5):
            run()
    except Exception as exc:
        mode = f"eager (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
        torch.cuda.synchronize()

        def run():
            for fn in calls:
                fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / len(calls))
    return statistics.median(ts), mode


def bench_shapes(replays: int, bnb, rank: int = 16, blocksize: int = 64, nested: bool = True,
                 dtype=torch.bfloat16, shapes=((4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024)),
                 ms=(1, 16), bw: Optional[float] = None) -> List[Dict]:
    from lora_fast import cuda_ext

    bw = bw or copy_bandwidth()
    rows = []
    l2_bytes = 50 << 20
    try:
        l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size or l2_bytes
    except Exception:
        pass
    for (k, n) in shapes:
        wbytes = n * k // 2 + (n * k // blocksize) * (1 if nested else 4)
        copies = max(2, min(64, math.ceil(3 * l2_bytes / wbytes)))
        inner = max(copies, 16)
        g = torch.Generator(device="cpu").manual_seed(0)
        W = (torch.randn(n, k, generator=g) * 0.02).to("cuda", torch.bfloat16)
        op0 = make_nf4_operand(W, blocksize, nested)
        ops = [op0] + [
            type(op0)(op0.packed.clone(), op0.absmax.clone(), op0.absmax2, op0.code2, op0.offset, op0.blocksize,
                      op0.nested_blocksize, op0.shape, op0.code) for _ in range(copies - 1)
        ]
        A = (torch.randn(rank, k, generator=g) / math.sqrt(k)).to("cuda", dtype)
        B = (torch.randn(n, rank, generator=g) * 0.05).to("cuda", dtype)
        floor_us = wbytes / bw * 1e6
        for m in ms:
            x = torch.randn(m, k, generator=g).to("cuda", dtype)
            row = dict(K=k, N=n, M=m, r=rank, blocksize=blocksize, nested=nested, dtype=str(dtype).replace("torch.", ""),
                       weight_bytes=wbytes, floor_us=floor_us, copies=copies, inner=inner)
            for label, pdl in (("lora_fast_us", -1), ("lora_fast_nopdl_us", 0)):
                try:
                    calls = [
                        (lambda o=ops[i % copies]: cuda_ext.forward(x, o, None, A, B, 2.0, 0.0, 0, use_pdl=pdl))
                        for i in range(inner)
                    ]
                    us, mode = time_graph(calls, replays)
                    row[label] = us
                    row[label.replace("_us", "_mode")] = mode
                except Exception as exc:
                    row[label.replace("_us", "_error")] = f"{type(exc).__name__}: {exc}"
            if "lora_fast_us" in row:
                row["fraction_of_floor"] = floor_us / row["lora_fast_us"]
            if bnb is not None and m == 1:
                try:
                    import bitsandbytes.functional as F

                    qs_list = []
                    for _ in range(copies):
                        qw, qs = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
                        qs_list.append((qw, qs))
                    calls = [
                        (lambda qq=qs_list[i % copies]: bnb.matmul_4bit(x, qq[0].t(), quant_state=qq[1]))
                        for i in range(inner)
                    ]
                    us, mode = time_graph(calls, replays)
                    row["bnb_matmul_4bit_us"] = us
                    row["bnb_mode"] = mode
                    del qs_list
                except Exception as exc:
                    row["bnb_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
        del ops, op0, W
        torch.cuda.empty_cache()
    return rows


def profile_kernels(shapes=((4096, 14336), (14336, 4096)), ms=(1, 16), calls: int = 20) -> List[Dict]:
    """Average device time per kernel (eager launches, torch.profiler/CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    from lora_fast import cuda_ext

    rows = []
    for (k, n) in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        W = (torch.randn(n, k, generator=g) * 0.02).to("cuda", torch.bfloat16)
        op = make_nf4_operand(W, 64, True)
        A = (torch.randn(16, k, generator=g) / math.sqrt(k)).to("cuda", torch.bfloat16)
        B = (torch.randn(n, 16, generator=g) * 0.05).to("cuda", torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
            for _ in range(3):
                cuda_ext.forward(x, op, None, A, B, 2.0, 0.0, 0)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    cuda_ext.forward(x, op, None, A, B, 2.0, 0.0, 0)
                torch.cuda.synchronize()
            for ev in prof.key_averages():
                dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if ev.count and dev_us:
                    name = ev.key.split("(")[0][-60:]
                    rows.append(dict(K=k, N=n, M=m, kernel=name, avg_us=dev_us / ev.count, count=ev.count))
                    print(f"profile {k}->{n} M={m}: {name:<60} {dev_us / ev.count:8.2f} us x{ev.count}")
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer parity cases")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-quantize", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times (torch.profiler, eager)")
    ap.add_argument("--bnb-path", default=None, help="folder holding a bitsandbytes package to import")
    ap.add_argument("--json", default=None, help="output JSON path (default $OUT or /tmp)")
    args = ap.parse_args(argv)

    out_dir = os.environ.get("OUT") or "/tmp"
    json_path = args.json or os.path.join(out_dir, "cuda_selfcheck.json")
    report: Dict = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    if not torch.cuda.is_available():
        print("cuda_selfcheck: no CUDA device; nothing to check", file=sys.stderr)
        report["error"] = "no CUDA device"
        _write(json_path, report)
        return 2
    props = torch.cuda.get_device_properties(0)
    report["device"] = props.name
    report["capability"] = f"{props.major}.{props.minor}"
    report["sm_count"] = props.multi_processor_count
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {report['triton']}")

    bnb, bnb_err = _import_bnb(args.bnb_path)
    report["bitsandbytes"] = getattr(bnb, "__version__", None) if bnb is not None else f"unavailable: {bnb_err}"
    print(f"bitsandbytes: {report['bitsandbytes']}")

    from lora_fast import cuda_ext

    t0 = time.time()
    ok, why = cuda_ext.status()
    report["build_s"] = time.time() - t0
    report["status"] = [ok, why]
    print(f"cuda_ext.status() = ({ok}, {why!r}) after {report['build_s']:.1f} s")
    if not ok:
        _write(json_path, report)
        return 1

    failed = 0
    if not args.skip_parity:
        rows = []
        cases = parity_cases(args.quick)
        t0 = time.time()
        for (m, n, k, r, dt, bs, nested, adt, bias) in cases:
            for fs in (False, True):
                if fs and k % 32:
                    continue  # already the scalar path
                try:
                    row = check_parity(m, n, k, r, dt, bs, nested, adt, bias, force_scalar=fs)
                except Exception as exc:
                    row = dict(M=m, N=n, K=k, r=r, dtype=str(dt), blocksize=bs, nested=nested, force_scalar=fs,
                               ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-800:])
                rows.append(row)
                if not row["ok"]:
                    failed += 1
                    print("PARITY FAIL:", row)
        report["parity"] = rows
        worst = {}
        for row in rows:
            if "err_y" in row:
                key = (row["dtype"], row["path"])
                worst[key] = max(worst.get(key, 0.0), row["err_y"])
        print(f"parity: {len(rows) - failed}/{len(rows)} cases pass ({time.time() - t0:.1f} s); worst rel err: "
              + ", ".join(f"{d}/{p}={v:.2e}" for (d, p), v in sorted(worst.items())))

    if not args.skip_quantize:
        qrows = check_quantize(bnb)
        report["quantize"] = qrows
        qbad = [r for r in qrows if r["ok"] is False]
        failed += len(qbad)
        for r in qbad:
            print("QUANTIZE MISMATCH:", r)
        have_bnb = any("bnb_packed_equal" in r for r in qrows)
        print(f"quantize: {len(qrows) - len(qbad)}/{len(qrows)} cases byte-equal"
              f" (vs bitsandbytes CUDA: {'yes' if have_bnb else 'not compared: ' + str(report['bitsandbytes'])};"
              f" vs lora_fast.nf4: {'yes' if any('nf4py_packed_equal' in r for r in qrows) else 'no'})")

    if args.profile:
        report["profile"] = profile_kernels()

    if not args.skip_bench:
        bw = copy_bandwidth()
        report["copy_bandwidth_GBps"] = bw / 1e9
        print(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)")
        brows = bench_shapes(args.replays, bnb, bw=bw)
        report["timings"] = brows
        hdr = (f"{'K->N':>12} {'M':>3} {'floor us':>9} {'lora_fast':>10} {'no PDL':>8} {'%floor':>7} "
               f"{'bnb M=1':>8}")
        print(hdr)
        print("-" * len(hdr))
        for r in brows:
            print(f"{str(r['K']) + '->' + str(r['N']):>12} {r['M']:>3} {_fmt(r['floor_us']):>9} "
                  f"{_fmt(r.get('lora_fast_us')):>10} {_fmt(r.get('lora_fast_nopdl_us')):>8} "
                  f"{_fmt(100 * r['fraction_of_floor'] if 'fraction_of_floor' in r else None, '.0f'):>7} "
                  f"{_fmt(r.get('bnb_matmul_4bit_us')):>8}")
            for key in ("lora_fast_error", "lora_fast_nopdl_error", "bnb_error"):
                if key in r:
                    print(f"    {key}: {r[key]}")
            if r.get("lora_fast_mode", "graph") != "graph":
                print(f"    mode: {r['lora_fast_mode']}")
    report["failed"] = failed
    _write(json_path, report)
    print(f"wrote {json_path}; {'ALL OK' if failed == 0 else f'{failed} FAILURES'}")
    return 0 if failed == 0 else 1


def _write(path: str, report: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
