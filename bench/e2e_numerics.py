"""Diagnostic: why the end-to-end loss curve of lora_fast differs from PEFT's on a GPU.

    python -m bench.e2e_numerics [--steps 6] [--layers 2]

Builds the e2e model of the ``h100`` profile (NF4 Llama-3-8B-shaped layers, PEFT LoRA r=16 on all
seven projections), trains it a few AdamW steps with PEFT, then patches it with lora_fast and
trains the same steps from the same initial adapters under several settings (Triton default,
the opt-in merged regime, LORA_FAST_LOWRANK=cublas, LORA_FAST_TRITON_PATH=dequant,
LORA_FAST_BACKEND=torch).  Prints each
setting's losses and how far its first-step adapter gradients are from PEFT's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Dict, List

import torch

from .e2e import _trainable, build_model
from .env import temp_env
from .profiles import PROFILES

SETTINGS = {
    "triton": {},
    "triton_split_path": {"LORA_FAST_TRITON_PATH": "split"},
    "triton_merged_path": {"LORA_FAST_TRITON_PATH": "merged"},
    "triton_cublas_lowrank": {"LORA_FAST_LOWRANK": "cublas"},
    "triton_dequant_path": {"LORA_FAST_TRITON_PATH": "dequant"},
    "torch_backend": {"LORA_FAST_BACKEND": "torch"},
}


def _train(model, ids, steps: int, lr: float):
    params = list(_trainable(model).values())
    opt = torch.optim.AdamW(params, lr=lr)
    losses: List[float] = []
    grads0 = None
    for i in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if i == 0:
            grads0 = {n: p.grad.detach().float().clone() for n, p in _trainable(model).items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))
    return losses, grads0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import lora_fast

    cfg = dataclasses.replace(PROFILES["h100"].e2e, layers=args.layers)
    dev = torch.device("cuda")
    model = build_model(cfg, dev)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(dev)
    init = {n: p.detach().clone() for n, p in _trainable(model).items()}
    res: Dict[str, object] = {"config": dataclasses.asdict(cfg)}
    # the fp32 reference: same weights and adapters, activations in fp32
    ref_model = build_model(cfg, dev, dtype=torch.float32)
    _reset_adapters(ref_model, init)
    fp32_losses, _ = _train(ref_model, ids, args.steps, cfg.lr)
    del ref_model
    torch.cuda.empty_cache()
    res["peft_fp32"] = {"losses": fp32_losses}
    peft_losses, peft_g = _train(model, ids, args.steps, cfg.lr)

    def dist(losses):
        return (max(abs(a - b) for a, b in zip(losses, fp32_losses)),
                max(abs(a - b) for a, b in zip(losses, peft_losses)))

    res["peft_bnb"] = {"losses": peft_losses, "max_abs_diff_to_fp32": dist(peft_losses)[0]}
    lora_fast.patch(model)
    lines = [f"{'':24s} losses per step{'':{max(0, 8 * args.steps - 15)}s} max |diff| to fp32 / to peft_bnb",
             f"{'peft_fp32 (reference)':24s} " + " ".join(f"{v:.4f}" for v in fp32_losses),
             f"{'peft_bnb':24s} " + " ".join(f"{v:.4f}" for v in peft_losses) + f"   {dist(peft_losses)[0]:.4f} / -"]
    for name, env in SETTINGS.items():
        _reset_adapters(model, init)
        with temp_env(env):
            losses, g0 = _train(model, ids, args.steps, cfg.lr)
        rel = {}
        for n, ref in peft_g.items():
            got = g0.get(n)
            if got is None:
                continue
            rel[n] = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        worst = max(rel.items(), key=lambda kv: kv[1]) if rel else ("", 0.0)
        ratio = {n: (g0[n].norm() / peft_g[n].norm().clamp_min(1e-30)).item() for n in rel}
        d32, dpeft = dist(losses)
        res[name] = {"losses": losses, "max_abs_diff_to_fp32": d32, "max_abs_diff_to_peft_bnb": dpeft,
                     "grad0_rel_diff_worst": worst, "grad0_norm_ratio": ratio}
        lines.append(f"{name:24s} " + " ".join(f"{v:.4f}" for v in losses) + f"   {d32:.4f} / {dpeft:.4f}")
        lines.append(f"{'':24s} step-0 grads vs PEFT: worst rel diff {worst[1]:.2e} ({worst[0].split('model.')[-1]})")
        rs = sorted(ratio.values())
        lines.append(f"{'':24s} grad-norm ratio to PEFT min {rs[0]:.4f} median {rs[len(rs) // 2]:.4f} max {rs[-1]:.4f}")
    path = args.json or os.path.join(os.environ.get("OUT", "/tmp"), "e2e_numerics.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
