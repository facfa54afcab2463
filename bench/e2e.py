"""End-to-end trainer step (``--cases e2e``), after shared/measure/e2e_peft.py.

A Llama-architecture model from a ``transformers.LlamaConfig`` with random weights, SDPA
attention, an NF4 base (bitsandbytes ``Linear4bit``, quantised on the device) on all seven
projections of every layer, PEFT LoRA on all of them, AdamW, bf16.  Measured twice on the same
model from the same adapter initialisation:

  peft_bnb   PEFT + bitsandbytes, as an ordinary trainer runs it;
  lora_fast  the same model after ``lora_fast.patch(model)`` -- or, where that does not exist,
             after :func:`swap_in_lora_fast` (each PEFT LoRA layer replaced by
             ``NF4LoRALinear.from_bnb`` of its base with the LoRA weights copied in).

Reported per variant: tokens/s, ms/step, peak memory, and the loss of each step (same data, so
the two loss curves should agree to bf16 noise).
"""
from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .env import Dev, temp_env
from .profiles import E2EConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def swap_in_lora_fast(model: nn.Module) -> int:
    """Replace every PEFT LoRA layer over a bitsandbytes ``Linear4bit`` in ``model`` with a
    ``lora_fast.NF4LoRALinear`` sharing the same NF4 bytes (``from_bnb``), carrying over r, alpha,
    dropout, rsLoRA and the ``default`` adapter's weights.  Returns how many were swapped."""
    import bitsandbytes as bnb
    import lora_fast

    swapped = 0
    for name, mod in list(model.named_modules()):
        base = getattr(mod, "base_layer", None)
        lora_a = getattr(mod, "lora_A", None)
        if base is None or not isinstance(lora_a, nn.ModuleDict) or "default" not in lora_a:
            continue
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        drop = mod.lora_dropout["default"]
        p = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
        rslora = bool(getattr(mod, "use_rslora", {}).get("default", False))
        A = mod.lora_A["default"].weight
        B = mod.lora_B["default"].weight
        new = lora_fast.NF4LoRALinear.from_bnb(
            base, r=int(mod.r["default"]), lora_alpha=mod.lora_alpha["default"], lora_dropout=p,
            use_rslora=rslora, adapter_dtype=A.dtype,
        )
        if abs(new.scaling - float(mod.scaling["default"])) > 1e-6 * max(1.0, abs(new.scaling)):
            raise RuntimeError(f"{name}: lora_fast scaling {new.scaling} != PEFT scaling {mod.scaling['default']}")
        with torch.no_grad():
            new.lora_A.data = A.detach().clone()
            new.lora_B.data = B.detach().clone()
        new.lora_A.requires_grad_(A.requires_grad)
        new.lora_B.requires_grad_(B.requires_grad)
        new.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped += 1
    return swapped


def _quantize_linears(module: nn.Module, device: torch.device, gen: torch.Generator, std: float,
                      dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace the nn.Linear children of ``module`` by bnb Linear4bit (nf4, blocksize 64, double
    quant, ``dtype`` compute) quantised on ``device`` from random N(0, std²) weights rounded to
    bf16 (the same NF4 bytes whatever ``dtype``)."""
    import bitsandbytes as bnb

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            w = (torch.randn(child.out_features, child.in_features, generator=gen, device=gen.device) * std)
            w = w.to(device, torch.bfloat16)
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
            if device.type == "cpu":
                q.support_avx512bf16_for_cpu = False
            q = q.to(device)
            setattr(module, name, q)
            del child, w
        else:
            _quantize_linears(child, device, gen, std, dtype)


def build_model(cfg: E2EConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The NF4 Llama model with PEFT LoRA, built one decoder layer at a time so the bf16 model
    never has to fit on the device at once (a 7B model on a 12 GB card).  ``dtype=torch.float32``
    builds the same weights (rounded to bf16, then upcast) as an fp32 reference."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    lcfg = LlamaConfig(
        hidden_size=cfg.hidden, intermediate_size=cfg.inter, num_hidden_layers=0, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab, max_position_embeddings=max(4096, cfg.seq),
    )
    lcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(lcfg).to(torch.bfloat16).to(dtype)
        for i in range(cfg.layers):
            layer = LlamaDecoderLayer(lcfg, i).to(torch.bfloat16).to(dtype)
            _quantize_linears(layer, device, gen, lcfg.initializer_range, dtype)
            model.model.layers.append(layer)
    lcfg.num_hidden_layers = cfg.layers
    if cfg.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", target_modules=TARGETS)
        )
    model.train()
    return model


# Kernel categories of the step breakdown (checked in this order: lora_fast's own kernels have
# "gemm" in their names, bitsandbytes' dequantisation is not a GEMM).
STEP_CATEGORIES = (
    ("adapter (lora_fast kernels)", ("xa_kernel", "dy_pass_kernel", "da_kernel", "nf4_rows_kernel", "merge_kernel",
                                     "lora_gemm_kernel", "nf4_dequant_kernel", "nf4_lora_gemv", "lora_fast")),
    ("nf4 dequant (bitsandbytes)", ("kdequantize", "dequantize_blockwise", "kgemm_4bit", "gemv_4bit")),
    ("lora_fast norm / SwiGLU / RoPE / loss", ("rmsnorm_fwd", "rmsnorm_bwd", "silu_mul_fwd", "silu_mul_bwd",
                                               "rope_kernel", "ce_fwd_kernel", "ce_bwd_kernel")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "splitk")),
    ("elementwise / reduce / copy", ("elementwise", "reduce", "copy", "memcpy", "memset", "fill", "cat",
                                     "index", "softmax", "norm", "multi_tensor", "adam", "scatter", "gather")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for cat, keys in STEP_CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return "other"


def profile_step(step: Callable[[], object], dev: Dev) -> Optional[Dict[str, object]]:
    """One training step under torch.profiler: GPU time per kernel category (ms), kernel launches,
    and the step's wall time; ``idle`` is wall minus the kernels' summed time.  None off CUDA."""
    if dev.torch_device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    dev.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        a, b = dev.event(), dev.event()
        a.record()
        step()
        b.record()
        dev.sync()
    cats: Dict[str, float] = {}
    launches = 0
    for ev in prof.events():
        if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        launches += 1
        cat = classify_kernel(ev.name)
        cats[cat] = cats.get(cat, 0.0) + ev.time_range.elapsed_us() / 1e3
    wall = a.elapsed_time(b)
    busy = sum(cats.values())
    return {"wall_ms": wall, "busy_ms": busy, "idle_ms": max(0.0, wall - busy), "kernels": launches,
            "ms_by_category": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _reset_adapters(model: nn.Module, init: Dict[str, torch.Tensor]) -> None:
    """Copy the initial adapter values back into the model's trainable parameters (same names)."""
    with torch.no_grad():
        for n, p in _trainable(model).items():
            if n in init:
                p.copy_(init[n])


def _train(model: nn.Module, cfg: E2EConfig, dev: Dev, ids: torch.Tensor) -> Dict[str, object]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    losses: List[torch.Tensor] = []
    for _ in range(cfg.warmup):
        losses.append(step())
    dev.sync()
    dev.free_cache()
    dev.reset_peak()
    events = [dev.event() for _ in range(cfg.steps + 1)]
    t0 = time.perf_counter()
    events[0].record()
    for i in range(cfg.steps):
        losses.append(step())
        events[i + 1].record()
    dev.sync()
    dt = (time.perf_counter() - t0) / cfg.steps
    per_step = sorted(events[i].elapsed_time(events[i + 1]) for i in range(cfg.steps))
    tokens = cfg.batch * cfg.seq
    res = {
        "status": "ok",
        "ms_per_step": dt * 1e3,
        "step_ms_median": per_step[len(per_step) // 2],
        "tokens_per_s": tokens / dt,
        "peak_GB": dev.max_allocated() / 2**30 if dev.memory_supported() else None,
        "losses": [float(v) for v in torch.stack(losses).float().cpu().tolist()],
        "trainable_params": sum(p.numel() for p in params),
    }
    try:  # one more step under the profiler (after the timed ones; its loss is not recorded)
        res["breakdown"] = profile_step(step, dev)
    except Exception as exc:  # the breakdown is a diagnostic: never fail the e2e case for it
        res["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
    del opt
    return res


def run_e2e(cfg: E2EConfig, dev: Dev, log: Callable[[str], None]) -> Dict[str, object]:
    """Both variants on one model; fail-soft per variant.  Returns the e2e block of the results."""
    result: Dict[str, object] = {"config": dataclasses.asdict(cfg), "peft_bnb": None, "lora_fast": None}
    device = dev.torch_device
    try:
        t = time.perf_counter()
        model = build_model(cfg, device)
        result["build_s"] = round(time.perf_counter() - t, 2)
        log(f"e2e      built {cfg.name}: {cfg.layers} layers, hidden {cfg.hidden}, inter {cfg.inter}, "
            f"batch {cfg.batch}x{cfg.seq} ({result['build_s']} s)")
    except Exception as exc:
        result["error"] = f"build: {type(exc).__name__}: {exc}"
        result["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
        log(f"e2e      ERROR building the model: {result['error']}")
        return result
    g = torch.Generator(device="cpu")
    g.manual_seed(1234)
    ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
    init = {n: p.detach().clone() for n, p in _trainable(model).items()}

    # (a) PEFT + bitsandbytes
    try:
        result["peft_bnb"] = _train(model, cfg, dev, ids)
        r = result["peft_bnb"]
        log(f"e2e      peft_bnb : {r['tokens_per_s']:10.0f} tok/s  {r['ms_per_step']:8.1f} ms/step  "
            f"peak {r['peak_GB'] if r['peak_GB'] is None else round(r['peak_GB'], 2)} GB  loss {r['losses'][-1]:.4f}")
    except Exception as exc:
        result["peft_bnb"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                              "traceback": "".join(traceback.format_exception(exc))[-4000:]}
        log(f"e2e      peft_bnb : ERROR {result['peft_bnb']['error']}")
    dev.free_cache()

    # (b) the same model, same adapter initialisation, through lora_fast
    entry: Dict[str, object] = {"status": "error"}
    try:
        _reset_adapters(model, init)
        import lora_fast

        before = dict(lora_fast.dispatch_stats())
        patch = getattr(lora_fast, "patch", None)
        method = "lora_fast.patch"
        patched: nn.Module = model
        if callable(patch):
            try:
                ret = patch(model)
                if isinstance(ret, nn.Module):
                    patched = ret
                converted = getattr(ret, "converted", None)
                skipped = getattr(ret, "skipped", None)
                if converted is not None:
                    entry["converted"] = len(converted)
                if skipped:
                    entry["patch_skipped"] = {k: str(v)[:200] for k, v in list(dict(skipped).items())[:20]}
                if converted is None and not isinstance(ret, nn.Module):
                    entry["patch_returned"] = repr(ret)[:200]
            except Exception as exc:
                entry["patch_error"] = f"{type(exc).__name__}: {exc}"
                method = "swap_in_lora_fast (lora_fast.patch raised)"
        else:
            method = "swap_in_lora_fast (lora_fast.patch does not exist)"
        if method != "lora_fast.patch":
            entry["swapped"] = swap_in_lora_fast(patched)
        # patch() may swap modules or only their classes: count modules whose class is lora_fast's
        n_lf = sum(1 for m in patched.modules() if type(m).__module__.startswith("lora_fast"))
        entry["method"] = method
        entry["lora_fast_layers"] = n_lf
        if n_lf == 0:
            raise RuntimeError(f"{method} left no lora_fast layer in the model")
        entry.update(_train(patched, cfg, dev, ids))
        after = dict(lora_fast.dispatch_stats())
        entry["dispatch"] = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
        fast = sum(v for k, v in entry["dispatch"].items() if not k.startswith("peft:"))
        if fast == 0:
            entry["warning"] = "lora_fast.dispatch_stats() counted no lora_fast call during training"
        log(f"e2e      lora_fast: {entry['tokens_per_s']:10.0f} tok/s  {entry['ms_per_step']:8.1f} ms/step  "
            f"peak {entry['peak_GB'] if entry['peak_GB'] is None else round(entry['peak_GB'], 2)} GB  "
            f"loss {entry['losses'][-1]:.4f}  ({method}, {n_lf} layers)")
    except Exception as exc:
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}",
                     traceback="".join(traceback.format_exception(exc))[-4000:])
        log(f"e2e      lora_fast: ERROR {entry['error']}")
    result["lora_fast"] = entry

    # (c) the patched model once more on lora_fast's PyTorch reference backend: the same rounding
    # scheme as the kernels (base and adapter summed in fp32, rounded once) written in plain
    # PyTorch, so (b) against (c) checks the kernels, and (a) against (b)/(c) shows PEFT's own
    # bf16 rounding (it rounds X·Wᵀ before adding the adapter; bench/NOTES.md, bench.rounding)
    if entry.get("status") == "ok":
        try:
            _reset_adapters(patched, init)
            with temp_env({"LORA_FAST_BACKEND": "torch"}):
                ref_entry = _train(patched, cfg, dev, ids)
            result["lora_fast_torch_backend"] = ref_entry
            log(f"e2e      lora_fast (torch backend): {ref_entry['tokens_per_s']:10.0f} tok/s  "
                f"loss {ref_entry['losses'][-1]:.4f}")
        except Exception as exc:
            result["lora_fast_torch_backend"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    # (d) the same patched model with the sibling projections grouped (patch(group_siblings=True):
    # q/k/v and gate/up read X once per step for their adapters), on the default backend
    if entry.get("status") == "ok" and method == "lora_fast.patch":
        try:
            _reset_adapters(patched, init)
            lora_fast.unpatch(patched)
            groups = lora_fast.patch(patched, group_siblings=True).groups
            before = dict(lora_fast.dispatch_stats())
            g_entry = _train(patched, cfg, dev, ids)
            after = dict(lora_fast.dispatch_stats())
            g_entry["groups"] = len(groups)
            g_entry["dispatch"] = {k: v - before.get(k, 0) for k, v in after.items()
                                   if v - before.get(k, 0) > 0 and ("grouped" in k)}
            result["lora_fast_grouped"] = g_entry
            log(f"e2e      lora_fast (group_siblings): {g_entry['tokens_per_s']:10.0f} tok/s  "
                f"{g_entry['ms_per_step']:8.1f} ms/step  loss {g_entry['losses'][-1]:.4f}")
        except Exception as exc:
            result["lora_fast_grouped"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    # (e) patch(fuse_ops=True): the Llama RMSNorm, gated-SiLU MLP and loss on fused kernels too
    # (lora_fast/norm_mlp.py; opt-in until this row shows the gain predicted in bench/NOTES.md)
    if entry.get("status") == "ok" and method == "lora_fast.patch":
        try:
            _reset_adapters(patched, init)
            lora_fast.unpatch(patched)
            rep = lora_fast.patch(patched, fuse_ops=True)
            before = dict(lora_fast.dispatch_stats())
            f_entry = _train(patched, cfg, dev, ids)
            after = dict(lora_fast.dispatch_stats())
            f_entry["fused_modules"] = len(rep.fused)
            f_entry["dispatch"] = {k: v - before.get(k, 0) for k, v in after.items()
                                   if v - before.get(k, 0) > 0 and any(o in k for o in ("rms_norm", "silu_mul", "rope", "cross_entropy"))}
            result["lora_fast_fused"] = f_entry
            log(f"e2e      lora_fast (fuse_ops): {f_entry['tokens_per_s']:10.0f} tok/s  "
                f"{f_entry['ms_per_step']:8.1f} ms/step  peak "
                f"{f_entry['peak_GB'] if f_entry['peak_GB'] is None else round(f_entry['peak_GB'], 2)} GB  "
                f"loss {f_entry['losses'][-1]:.4f}  ({len(rep.fused)} modules fused)")
        except Exception as exc:
            result["lora_fast_fused"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                         "traceback": "".join(traceback.format_exception(exc))[-4000:]}
            log(f"e2e      lora_fast (fuse_ops): ERROR {result['lora_fast_fused']['error']}")
        finally:
            lora_fast.unpatch(patched)  # fuse_ops' rotary function is process-wide: restore it
    a, b = result["peft_bnb"], result["lora_fast"]
    if isinstance(a, dict) and isinstance(b, dict) and a.get("status") == "ok" and b.get("status") == "ok":
        result["speedup_tokens_per_s"] = b["tokens_per_s"] / a["tokens_per_s"]
        la, lb = a["losses"], b["losses"]
        result["max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(la, lb))
        c = result.get("lora_fast_torch_backend")
        if isinstance(c, dict) and c.get("status") == "ok":
            result["max_abs_loss_diff_torch_backend"] = max(abs(x - y) for x, y in zip(la, c["losses"]))
            result["max_abs_loss_diff_triton_vs_torch_backend"] = max(abs(x - y) for x, y in zip(lb, c["losses"]))
    del model
    dev.free_cache()
    return result
