"""Profiles: which shapes and sizes a run covers.  A profile names shapes, not a GPU: the suite
runs it on whatever device is present and records which one ran it.

Projections are grouped by shape (q_proj and o_proj of Llama-3-8B are both 4096->4096, so
they are measured once); ``count`` says how many of the seven projections of a decoder layer
have that shape, which is how the seven-projection sums ("sum7") are formed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .harness import TimingCfg


@dataclass(frozen=True)
class Shape:
    """A (K -> N) projection shape: ``names`` of the projections that have it, ``count`` of them
    per decoder layer."""

    key: str  # e.g. "q_proj,o_proj"
    K: int
    N: int
    count: int
    model: str

    @property
    def label(self) -> str:
        return f"{self.key} {self.K}->{self.N}"


def _model(model: str, projections: List[Tuple[str, int, int]]) -> List[Shape]:
    groups: Dict[Tuple[int, int], List[str]] = {}
    for name, k, n in projections:
        groups.setdefault((k, n), []).append(name)
    return [Shape(",".join(names), k, n, len(names), model) for (k, n), names in groups.items()]


def llama_projections(hidden: int, inter: int, kv_out: int) -> List[Tuple[str, int, int]]:
    return [
        ("q_proj", hidden, hidden), ("k_proj", hidden, kv_out), ("v_proj", hidden, kv_out), ("o_proj", hidden, hidden),
        ("gate_proj", hidden, inter), ("up_proj", hidden, inter), ("down_proj", inter, hidden),
    ]


MODELS: Dict[str, List[Shape]] = {
    "llama3_8b": _model("llama3_8b", llama_projections(4096, 14336, 1024)),
    "llama3_70b": _model("llama3_70b", llama_projections(8192, 28672, 1024)),
    "llama2_7b": _model("llama2_7b", llama_projections(4096, 11008, 4096)),
    "tiny": _model("tiny", llama_projections(128, 256, 64)),
}


@dataclass(frozen=True)
class E2EConfig:
    """One trainer step of a Llama-architecture model with an NF4 base and PEFT LoRA."""

    name: str
    hidden: int = 4096
    inter: int = 14336
    layers: int = 4
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    batch: int = 2
    seq: int = 2048
    r: int = 16
    alpha: int = 32
    lr: float = 1e-4
    grad_ckpt: bool = False
    warmup: int = 3
    steps: int = 10


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    models: Tuple[str, ...]  # the first is the primary model: its sum7 is the summary
    main_M: int = 8192
    r: int = 16
    alpha: int = 32
    parity_M: int = 256
    msweep_M: Tuple[int, ...] = (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384)
    rsweep_r: Tuple[int, ...] = (4, 8, 16, 64)
    decode_M: Tuple[int, ...] = (1, 16)
    # variants (dropout / bias / fp32 adapters) run on these projections only, to save time
    variant_keys: Tuple[str, ...] = ("q_proj,o_proj", "gate_proj,up_proj")
    variants: Tuple[Tuple[float, bool, str], ...] = (
        (0.1, False, "bf16"), (0.0, True, "bf16"), (0.1, True, "bf16"), (0.0, False, "fp32"),
    )
    msweep_models: Tuple[str, ...] = ()  # default: the primary model only
    e2e: Optional[E2EConfig] = None
    e2e_by_default: bool = True
    cases: Tuple[str, ...] = ("hw", "parity", "main", "e2e", "decode", "msweep", "variants", "rsweep")
    matmul_n: int = 8192  # hardware ceiling: n^3 bf16 GEMM
    copy_bytes: int = 2 * 2**30  # hardware ceiling: device copy of this many bytes
    timing: TimingCfg = field(default_factory=TimingCfg)
    budget_s: float = 280.0  # benchmark time after start-up; cases past it are skipped (and say so)
    decode_inner: int = 10
    decode_rep: int = 20

    def shapes(self, models: Optional[Tuple[str, ...]] = None) -> List[Shape]:
        return [s for m in (models or self.models) for s in MODELS[m]]

    @property
    def primary(self) -> str:
        return self.models[0]


LLAMA3_8B_E2E = E2EConfig("llama3_8b_4layers")
LLAMA2_7B_E2E = E2EConfig(
    "llama2_7b_32layers_gc", hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, batch=1, seq=2048,
    grad_ckpt=True, warmup=2, steps=5,
)

PROFILES: Dict[str, Profile] = {
    "h100": Profile(
        "h100",
        "Llama-3-8B projections on an H100 (80 GB), plus the Hopper ceilings; finishes in < 10 min",
        models=("llama3_8b",),
        e2e=LLAMA3_8B_E2E,
        # 280 s cut the dropout/bias/fp32 variants and the rank sweep on the H100 (run 065908Z:
        # the other cases took 214 s, the variants' first autotuning alone 75 s)
        budget_s=480.0,
    ),
    "a100": Profile(
        "a100",
        "Llama-3-8B and Llama-3-70B projections (A100 40/80 GB)",
        models=("llama3_8b", "llama3_70b"),
        variant_keys=("q_proj,o_proj", "gate_proj,up_proj"),
        e2e=LLAMA3_8B_E2E,
        budget_s=540.0,
    ),
    "rtx3060": Profile(
        "rtx3060",
        "Llama-2-7B projections at token counts that fit QLoRA in 12 GB (RTX 3060, sm_86)",
        models=("llama2_7b",),
        main_M=2048,
        msweep_M=(1, 16, 64, 256, 512, 1024, 2048, 4096),
        variant_keys=("q_proj,k_proj,v_proj,o_proj", "gate_proj,up_proj"),
        e2e=LLAMA2_7B_E2E,
        e2e_by_default=False,  # 32 layers with checkpointing: slow, runs only with --cases e2e
        copy_bytes=2**30,
        budget_s=540.0,
    ),
    "smoke": Profile(
        "smoke",
        "CPU smoke test: tiny shapes, parity of every provider; timings not meaningful",
        models=("tiny",),
        main_M=64,
        parity_M=48,
        msweep_M=(1, 64),
        rsweep_r=(4, 16),
        variant_keys=("q_proj,o_proj",),
        variants=((0.1, False, "bf16"), (0.0, True, "bf16"), (0.0, False, "fp32")),
        e2e=E2EConfig("tiny_2layers", hidden=128, inter=256, layers=2, heads=4, kv_heads=2, vocab=256, batch=2,
                      seq=32, warmup=1, steps=3),
        matmul_n=256,
        copy_bytes=2**22,
        timing=TimingCfg(warm_ms=0.0, min_warm=0, max_warm=0, rep_ms=0.0, min_rep=2, max_rep=2),
        budget_s=240.0,
        decode_inner=2,
        decode_rep=2,
    ),
}

PROFILE_NAMES = ("auto",) + tuple(PROFILES)
CASE_NAMES = ("hw", "parity", "main", "memory", "e2e", "decode", "msweep", "variants", "rsweep")


def _down(d: int) -> int:
    """A dimension mapped down for --dry-run: /32, a multiple of 64, at least 64."""
    return max(64, ((d // 32 + 63) // 64) * 64)


def _down_m(m: int) -> int:
    return m if m <= 16 else max(16, m // 64)


def dry_run(profile: Profile) -> Profile:
    """The same profile with every shape and size mapped down so the GPU code path runs on a
    CPU in seconds (``--dry-run``).  Shape keys are kept, so tables and JSON look the same."""
    models = {}
    for m in profile.models + tuple(profile.msweep_models):
        models[m] = [dataclasses.replace(s, K=_down(s.K), N=_down(s.N)) for s in MODELS[m]]
    MODELS.update({f"{m}@dry": v for m, v in models.items()})
    e2e = profile.e2e
    if e2e is not None:
        e2e = dataclasses.replace(
            e2e, hidden=_down(e2e.hidden), inter=_down(e2e.inter), layers=min(e2e.layers, 2), heads=4,
            kv_heads=max(1, 4 * e2e.kv_heads // e2e.heads), vocab=512, seq=32, warmup=1, steps=2,
        )
    return dataclasses.replace(
        profile,
        models=tuple(f"{m}@dry" for m in profile.models),
        msweep_models=tuple(f"{m}@dry" for m in profile.msweep_models),
        main_M=_down_m(profile.main_M),
        parity_M=_down_m(profile.parity_M),
        msweep_M=tuple(sorted({_down_m(m) for m in profile.msweep_M})),
        decode_M=profile.decode_M,
        e2e=e2e,
        matmul_n=256,
        copy_bytes=2**22,
        timing=TimingCfg(warm_ms=0.0, min_warm=0, max_warm=0, rep_ms=0.0, min_rep=2, max_rep=2),
        budget_s=900.0,
        decode_inner=2,
        decode_rep=2,
    )


def quick(profile: Profile) -> Profile:
    """``--quick``: fewer sweep points and shorter timing loops (for a first look)."""
    ms = profile.msweep_M
    keep = sorted({ms[0], ms[len(ms) // 2], profile.main_M if profile.main_M in ms else ms[-1], ms[-1]})
    rs = profile.rsweep_r
    return dataclasses.replace(
        profile,
        msweep_M=tuple(keep),
        rsweep_r=tuple(sorted({rs[0], rs[-1]})),
        variant_keys=profile.variant_keys[:1],
        variants=profile.variants[:2],
        timing=profile.timing.scaled(0.5),
        e2e=None if profile.e2e is None else dataclasses.replace(profile.e2e, warmup=min(profile.e2e.warmup, 2),
                                                                 steps=max(2, profile.e2e.steps // 2)),
    )
