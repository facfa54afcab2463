"""pytest-benchmark view of the per-projection cases: ``pytest bench/ --benchmark-only``.

One QLoRA layer per Llama-3-8B projection shape, M = 8192 tokens (``BENCH_M`` overrides),
r = 16, α = 32, bf16, each provider of ``python -m bench`` (same weights, same inputs).  Each
round synchronises the GPU, so pytest-benchmark's wall-clock rounds are GPU times plus launch
overhead.  Needs a CUDA GPU: without one every test is skipped with the reason.  ``pytest tests/``
does not collect this folder.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.profiles import MODELS
from bench.providers import Assets, LayerSpec, Unavailable, all_providers, check_available
from bench.suite import make_callables, make_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="benchmarks need a CUDA GPU (CPU timings mean nothing); `python -m bench --profile smoke` is the CPU check",
)

M = int(os.environ.get("BENCH_M", "8192"))
R, ALPHA = 16, 32
SHAPES = MODELS["llama3_8b"]
PROVIDERS = ["lora_fast_triton", "lora_fast_cuda", "peft_bnb", "dequant_cublas", "torch_ref", "ceiling"]


@pytest.fixture(scope="module")
def assets():
    a = Assets(torch.device("cuda"))
    yield a
    a.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("mode", ["step", "fwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s.key.split(',')[0]}-{s.K}x{s.N}" for s in SHAPES])
def test_projection(benchmark, assets, shape, provider, mode):
    p = all_providers()[provider]
    try:
        check_available(p, torch.device("cuda"))
    except Unavailable as exc:
        pytest.skip(f"{provider}: {exc}")
    spec = LayerSpec(shape, R, ALPHA)
    with p.active():
        try:
            built = p.build(spec, assets)
        except Unavailable as exc:
            pytest.skip(f"{provider}: {exc}")
        except Exception as exc:
            if type(exc).__name__ == "BackendUnavailableError":
                pytest.skip(f"{provider}: {exc}")
            raise
        X, dY = make_inputs(shape, M, torch.device("cuda"))
        fn = make_callables(built, X, dY)[mode]

        def run():
            fn()
            torch.cuda.synchronize()

        try:
            run()
        except Exception as exc:
            if type(exc).__name__ == "BackendUnavailableError":
                pytest.skip(f"{provider}: {exc}")
            raise
        benchmark.group = f"{shape.key} {shape.K}->{shape.N} M={M} {mode}"
        benchmark.extra_info.update(
            provider=provider, proj=shape.key, K=shape.K, N=shape.N, M=M, r=R, alpha=ALPHA, mode=mode,
            gpu=torch.cuda.get_device_name(),
        )
        benchmark.pedantic(run, rounds=30, warmup_rounds=5, iterations=1)
