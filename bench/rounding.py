"""Which bf16 loss curve follows the fp32 one: PEFT's, or lora_fast's numerics?  (CPU, ~2 min)

    python -m bench.rounding [--hidden 512] [--layers 2] [--vocab 4096] [--seq 128] [--steps 6]

A small NF4 Llama with PEFT LoRA (r=16, B = 0 at the start, AdamW lr 1e-4: the e2e case of the
bench, scaled down) is trained from the same weights and adapters in five ways:

* ``peft_fp32``: PEFT with fp32 activations (the reference; the NF4 base is the same);
* ``peft_bf16``: PEFT with bf16 activations, as users run it;
* ``double``: PEFT's bf16 rounding emulated: ``Y = bf16(bf16(X·Wᵀ) + bf16(s·XA·Bᵀ))``;
* ``single``: lora_fast's split regime: ``Y = bf16(X·Wᵀ + bf16(s·XA·Bᵀ))`` (fp32 sum, one rounding),
  the same for ``dX``;
* ``merged``: lora_fast's NF4 merged regime: ``W_eff = bf16(code·absmax + s·B·A)`` from fp32;
* ``lora_fast``: the model patched by ``lora_fast.patch`` on the backend ``auto`` picks (on the
  CPU the PyTorch backend, which rounds like the split regime; on a GPU the kernels).

The three emulations run in PyTorch (bf16 ``tl.dot`` does not run in Triton's interpreter, so on
the CPU the kernels' own bf16 numerics can only be emulated); ``python -m bench.e2e_numerics``
runs the real kernels at full size on a GPU.  Early in training
``s·XA·Bᵀ`` is far below one ulp of the bf16 base output, so rounding the base output first (PEFT)
drops most of the adapter's effect; ``single`` and ``merged`` keep it.  Results: bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import warnings
from typing import Dict, List

import torch

from .e2e import _reset_adapters, _trainable, build_model
from .e2e_numerics import _train
from .profiles import E2EConfig

MODES = ("double", "single", "merged")
RUNS = ("peft_fp32", "peft_bf16") + MODES + ("lora_fast",)
BF16 = torch.bfloat16


class _Emulated(torch.autograd.Function):
    """One LoRA layer, NF4 base (``w32``: fp32 code·absmax, ``w16``: bf16(w32) as bnb dequantises),
    with the forward/backward rounding of ``mode``."""

    @staticmethod
    def forward(ctx, x, A, B, w32, w16, s, mode):
        xf = x.float()
        xa = xf @ A.to(BF16).float().t()  # the XA pass: bf16 operands, fp32 accumulation
        if mode == "merged":
            y = (xf @ _w_eff(w32, A, B, s).float().t()).to(BF16)
        else:
            adapter = (s * (xa.to(BF16).float() @ B.to(BF16).float().t())).to(BF16).float()
            base = xf @ w16.float().t()
            if mode == "double":
                base = base.to(BF16).float()
            y = (base + adapter).to(BF16)
        ctx.save_for_backward(x, A, B, w32, w16, xa)
        ctx.s, ctx.mode = s, mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, w32, w16, xa = ctx.saved_tensors
        s, mode = ctx.s, ctx.mode
        dyf = dy.float()
        dyb = dyf @ B.to(BF16).float()
        if mode == "merged":
            dx = (dyf @ _w_eff(w32, A, B, s).float()).to(BF16)
        else:
            adapter = (s * (dyb.to(BF16).float() @ A.to(BF16).float())).to(BF16).float()
            base = dyf @ w16.float()
            if mode == "double":
                base = base.to(BF16).float()
            dx = (base + adapter).to(BF16)
        dA = s * (dyb.to(BF16).float().t() @ x.float())
        dB = s * (dyf.t() @ xa.to(BF16).float())
        return dx, dA.to(A.dtype), dB.to(B.dtype), None, None, None, None


def _w_eff(w32, A, B, s):
    return (w32 + s * (B.to(BF16).float() @ A.to(BF16).float())).to(BF16)


def emulate(model: torch.nn.Module, mode: str) -> int:
    """Route every PEFT LoRA Linear4bit layer of ``model`` through :class:`_Emulated`."""
    from lora_fast import reference
    from lora_fast.patch import _nf4_operand

    n = 0
    for mod in model.modules():
        if not (hasattr(mod, "base_layer") and hasattr(mod, "lora_A") and "default" in mod.lora_A):
            continue
        op = _nf4_operand(mod, mod.base_layer)
        w32 = reference.nf4_dequantize(op, torch.float32)
        w16 = w32.to(BF16)

        def forward(x, *args, _m=mod, _w32=w32, _w16=w16, **kwargs):
            lead = x.shape[:-1]
            y = _Emulated.apply(x.reshape(-1, x.shape[-1]), _m.lora_A["default"].weight,
                                _m.lora_B["default"].weight, _w32, _w16, _m.scaling["default"], mode)
            return y.reshape(*lead, y.shape[-1])

        mod.forward = forward
        n += 1
    return n


def run(cfg: E2EConfig, steps: int, log=print, device: str = "cpu") -> Dict[str, object]:
    dev = torch.device(device)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(dev)
    curves: Dict[str, List[float]] = {}
    init = None
    for name in RUNS:
        model = build_model(cfg, dev, dtype=torch.float32 if name == "peft_fp32" else BF16)
        if init is None:
            init = {n: p.detach().clone() for n, p in _trainable(model).items()}
        _reset_adapters(model, init)
        if name in MODES and emulate(model, name) == 0:
            raise RuntimeError("no PEFT LoRA layer found to emulate")
        if name == "lora_fast":
            import lora_fast

            if not lora_fast.patch(model).converted:
                raise RuntimeError("lora_fast.patch converted no layer")
        curves[name], _ = _train(model, ids, steps, cfg.lr)
        log(f"{name:10s} " + " ".join(f"{v:.4f}" for v in curves[name]))
        del model
    ref = curves["peft_fp32"]
    dist = {k: max(abs(a - b) for a, b in zip(v, ref)) for k, v in curves.items()}
    log("max |loss - peft_fp32| over the steps: " + ", ".join(f"{k} {v:.4f}" for k, v in dist.items()))
    return {"config": dataclasses.asdict(cfg), "steps": steps, "losses": curves, "max_abs_diff_to_fp32": dist}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to run the lora_fast row on the kernels")
    ap.add_argument("--json", default=None, help="write the curves here")
    args = ap.parse_args(argv)
    cfg = E2EConfig("rounding", hidden=args.hidden, inter=int(args.hidden * 3.5), layers=args.layers,
                    heads=8, kv_heads=2, vocab=args.vocab, batch=2, seq=args.seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(cfg, args.steps, device=args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
