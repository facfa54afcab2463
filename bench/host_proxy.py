"""Host time of one NF4 LoRA training step on the Triton path, with every kernel launch stubbed:
``python -m bench.host_proxy [--json F]``.

A CPU proxy for the host work that bounds the narrow projections' step on an H100
(bench/NOTES.md, "Host work per step"): an fp16 64×64 ``NF4LoRALinear`` (r=16), forward +
backward, launches replaced by no-ops under ``TRITON_INTERPRET=1``, so the time is Python and
torch-op dispatch only.  Reports the minimum over ``--reps`` runs of ``--steps`` steps (the
minimum: this machine is shared and noisy).  Compare two commits by running it on both, in
alternation, in one sitting.  Not a GPU timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def measure(steps: int = 300, reps: int = 15) -> float:
    os.environ["LORA_FAST_BACKEND"] = "triton"
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from lora_fast import NF4LoRALinear, _lowrank, _nf4_rows

    _lowrank.launch = _nf4_rows.launch = lambda *a, **k: None
    dt = torch.float16
    x = torch.randn(32, 64, dtype=dt, requires_grad=True)
    dy = torch.randn(32, 64, dtype=dt)
    layer = NF4LoRALinear.from_linear(torch.nn.Linear(64, 64, bias=False, dtype=dt), r=16, lora_alpha=32)
    layer.train()

    def step():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(dy)

    for _ in range(100):
        step()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t) / steps * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    us = measure(args.steps, args.reps)
    import lora_fast

    print(f"host time per NF4 step (launches stubbed, CPU proxy): {us:.1f} us  [{lora_fast.__file__}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"us_per_step_min": us, "steps": args.steps, "reps": args.reps, "lora_fast": lora_fast.__file__,
                       "device": "cpu (host proxy, launches stubbed)"}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
