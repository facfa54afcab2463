"""Host work of one end-to-end training step, counted: ``python -m bench.launch_count``.

The 32-layer checkpointed Llama-2-7B step of issue 6 is host-bound on an H100 (ANCHORS: PEFT
issues 12.6k kernel launches per step with the GPU busy 57% of the time), so what a variant
*issues* per step is a quantity of its own.  This counts it on any machine, the CPU included:
the e2e model (``bench/e2e.py``: NF4 bitsandbytes base, PEFT LoRA r=16 on all seven
projections, AdamW) built with the profile's layer count, attention layout and checkpointing
but small widths, and one training step of each variant run under a ``TorchDispatchMode``:

  ops       every ATen op dispatched (each costs host time: ~15 µs on the H100 host measured);
  kernels   those that launch device work (views, ``empty`` and metadata ops excluded),
            plus the Triton launches (stubbed: nothing is computed, the numbers are ignored).

Widths change the split choices of lora_fast's reductions (a few ops per layer), not the
structure, so the counts are the step's at full size to within that.  On a GPU run the e2e case's
profiler ``kernels`` column is the measured counterpart.  Counts, not timings: they say where
host time goes, not how much.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import os
import sys
import warnings
from typing import Dict

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch no device work (views, allocations, metadata)
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "detach", "alias", "as_strided",
    "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "unbind", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_local_scalar_dense", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_reshape_alias", "view_as", "narrow",
    "diagonal", "unfold", "set_", "resize_", "_has_compatible_shallow_copy_type", "is_nonzero", "dim", "size",
    "stride", "numel", "promote_types", "result_type",
}


class OpCount(TorchDispatchMode):
    """Counts every ATen op dispatched inside it by name (``self.ops``); also what
    tests/test_host_ops.py budgets one layer's step with."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _stub_launches(launches: collections.Counter):
    """Replace every Triton launch of lora_fast by a counter (under the interpreter nothing is
    computed; the step's numbers are garbage and unused); restored on exit."""
    import lora_fast.ops as ops
    from lora_fast import _lowrank, _nf4_rows, norm_mlp
    from lora_fast._operand import kernel_module

    def fake(kernel, grid, *args, **kwargs):
        launches[getattr(getattr(kernel, "fn", kernel), "__name__", "?")] += 1

    class FakeGemm:
        def __getitem__(self, grid):
            return lambda *a, **k: launches.__setitem__("lora_gemm", launches["lora_gemm"] + 1)

    gemm = kernel_module("lora_gemm")
    patches = [
        (_lowrank, "launch", fake), (_nf4_rows, "launch", fake), (norm_mlp, "launch", fake),
        (gemm, "lora_gemm_kernel_heur", FakeGemm()),
        (_lowrank, "_device_info", lambda device: (132, 50 << 20)),  # an H100's SMs and L2: its split choices
        (_lowrank, "_interp_or", lambda value, config, key: value),
        (ops, "kernel_issue", lambda x, A, B, base=None, bias=None: None),  # counting only: let the GPU path run on the CPU
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def count_step(model, ids) -> Dict[str, object]:
    import torch

    # foreach, as AdamW picks on CUDA tensors (on the CPU it would loop per parameter: ~10 ops each)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm: lazy state (optimizer moments, caches) is not part of a steady step
    mode = OpCount()
    with mode:
        step()
    ops = mode.ops
    launching = {k: v for k, v in ops.items() if k not in NO_LAUNCH}
    return {"ops": sum(ops.values()), "launching_ops": sum(launching.values()),
            "top": dict(collections.Counter(launching).most_common(12))}


def run(profile: str, layers: int = 0) -> Dict[str, object]:
    import torch

    from bench.env import temp_env

    # the Triton backend on CPU tensors (its launches are stubbed: nothing is interpreted)
    with temp_env({"TRITON_INTERPRET": "1"}):
        return _run(profile, layers, torch)


def _run(profile: str, layers: int, torch) -> Dict[str, object]:
    from bench.e2e import build_model
    from bench.profiles import PROFILES

    import lora_fast

    e2e = PROFILES[profile].e2e
    cfg = dataclasses.replace(e2e, hidden=64 * max(1, e2e.heads // 8), inter=192 * max(1, e2e.heads // 8),
                              heads=e2e.heads // 8 or 1, kv_heads=max(1, e2e.kv_heads // 8), vocab=256, batch=1,
                              seq=16, layers=layers or e2e.layers)
    launches: collections.Counter = collections.Counter()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = build_model(cfg, torch.device("cpu"), dtype=torch.float16)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
    from bench.env import git_commit

    out: Dict[str, object] = {"profile": profile, "config": dataclasses.asdict(cfg), "commit": git_commit(),
                              "torch": torch.__version__, "device": "cpu (counts only)", "variants": {}}
    variants = (("peft_bnb", None), ("lora_fast", {}), ("lora_fast_grouped", {"group_siblings": True}),
                ("lora_fast_fused", {"fuse_ops": True}))
    for name, kw in variants:
        model = copy.deepcopy(base)
        env = {"LORA_FAST_BACKEND": "torch" if kw is None else "triton"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with warnings.catch_warnings(), _stub_launches(launches):
                warnings.simplefilter("ignore")
                if kw is not None:
                    lora_fast.patch(model, **kw)
                launches.clear()
                res = count_step(model, ids)
                if kw is not None:
                    lora_fast.unpatch(model)  # fuse_ops' rotary function is process-wide
        finally:
            for k, v in old.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        res["triton_launches"] = sum(launches.values()) // 2  # counted over the warm-up and the counted step
        res["kernels"] = res["launching_ops"] + res["triton_launches"]
        out["variants"][name] = res
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="rtx3060", help="e2e config of this bench profile (rtx3060: 32 layers, "
                                                         "checkpointing; h100: 4 layers)")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = run(args.profile, args.layers)
    cfg = res["config"]
    print(f"one training step, {cfg['name']} structure ({cfg['layers']} layers, checkpointing {cfg['grad_ckpt']}), "
          "counted on the host:")
    print(f"{'variant':20s} {'aten ops':>9s} {'launching':>10s} {'triton':>7s} {'kernels':>8s}")
    for name, r in res["variants"].items():
        print(f"{name:20s} {r['ops']:9d} {r['launching_ops']:10d} {r['triton_launches']:7d} {r['kernels']:8d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
