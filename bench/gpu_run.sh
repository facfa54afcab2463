#!/usr/bin/env bash
# One GPU session of lora_fast on the lent machine: install, parity tests, CUDA self-check,
# benchmark.  Usage: bash bench/gpu_run.sh [tests] [breakdown] [numerics] [cuda] [cudavar] [e2e32] [bench ARGS...]
# bitsandbytes travels unpacked in .whl/site (the machine cannot reach a registry).
set -uo pipefail
OUT=${OUT:-/tmp/lora_fast_gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD/.whl/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export LORA_FAST_SKIP_CUDA_BUILD=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
python3 - <<'PY'
import torch, triton
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability(), "torch", torch.__version__, "triton", triton.__version__)
try:
    import bitsandbytes, peft, transformers
    print("bnb", bitsandbytes.__version__, "peft", peft.__version__, "transformers", transformers.__version__)
except Exception as e:
    print("import problem:", e)
PY
while [ $# -gt 0 ]; do
  case "$1" in
    tests) shift; timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest tests -v -p no:cacheprovider -o faulthandler_timeout=150 ${TESTS_N:+-n "$TESTS_N"} ${TESTS_K:+-k "$TESTS_K"} -rf >"$OUT/pytest.log" 2>&1
      grep -E "FAILED|ERROR|passed|failed|Timeout" "$OUT/pytest.log" | tail -40 ;;
    breakdown) shift; timeout "${BREAKDOWN_TIMEOUT:-200}" python3 -m bench.breakdown --json "$OUT/breakdown.json" ${BREAKDOWN_ARGS:-} 2>&1 | tee "$OUT/breakdown.log" | tail -90 ;;
    cudavar) shift  # the CUDA self-check of an alternative csrc/nf4_lora_gemv.cu kept in .variant/ (untracked)
      cp csrc/nf4_lora_gemv.cu /tmp/gemv_orig.cu && cp .variant/nf4_lora_gemv.cu csrc/nf4_lora_gemv.cu
      LORA_FAST_CUDA_BUILD_DIR=/tmp/lf_build_variant timeout "${CUDA_TIMEOUT:-180}" python3 bench/cuda_selfcheck.py --quick --json "$OUT/cuda_selfcheck_variant.json" 2>&1 | tee "$OUT/cuda_variant.log" | tail -30
      cp /tmp/gemv_orig.cu csrc/nf4_lora_gemv.cu ;;
    numerics) shift; timeout "${NUMERICS_TIMEOUT:-240}" python3 -m bench.e2e_numerics --json "$OUT/e2e_numerics.json" ${NUMERICS_ARGS:-} 2>&1 | tee "$OUT/e2e_numerics.log" | tail -30 ;;
    cuda) shift; timeout "${CUDA_TIMEOUT:-180}" python3 bench/cuda_selfcheck.py 2>&1 | tee "$OUT/cuda_selfcheck.log" | tail -30 ;;
    e2e32) shift  # issue 6's second setting: 32 Llama-2-7B layers, gradient checkpointing, batch 1x2048
      timeout "${E2E32_TIMEOUT:-400}" python3 -m bench --profile rtx3060 --cases e2e --out "$OUT/bench_e2e32" 2>&1 | tee "$OUT/e2e32.log" | tail -20 ;;
    bench) shift; timeout "${BENCH_TIMEOUT:-570}" python3 -m bench --out "$OUT/bench" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60; break ;;
    *) echo "unknown stage $1"; exit 2 ;;
  esac
done
