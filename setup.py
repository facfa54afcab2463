"""Build script for lora_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the
``lora_fast.kernels`` sub-package, and the CUDA sources in ``csrc/`` as ``lora_fast/csrc``
(see ``package_dir``), so that every install can compile the CUDA extension on first use on a
GPU machine (``lora_fast.cuda_ext``).

The extension is also built at install time when torch is importable in the build environment,
is a CUDA build, and nvcc is found — which under pip needs ``--no-build-isolation`` (pip's
isolated build environment has no torch):

    pip install --no-build-isolation -e .            # or: pip install --no-build-isolation .

``LORA_FAST_CUDA_ARCHS`` picks the architectures (default ``80;86;90``; parsed by
``lora_fast/_archs.py``, e.g. ``80;86;90``, ``8.0 9.0``, ``sm_90a``); ``LORA_FAST_SKIP_CUDA_BUILD=1``
(or ``true``/``yes``/``on``) skips the install-time build.  The pure-Python install works
without the extension.
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
ext_modules = []
cmdclass = {}


def _load_archs():
    spec = importlib.util.spec_from_file_location("_lora_fast_archs", os.path.join(HERE, "lora_fast", "_archs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _note(msg: str) -> None:
    print(f"lora_fast setup: {msg}", file=sys.stderr)


def _cuda_extension():
    if os.environ.get("LORA_FAST_SKIP_CUDA_BUILD", "").strip().lower() in ("1", "true", "yes", "on"):
        _note("LORA_FAST_SKIP_CUDA_BUILD is set: the CUDA extension is not built now (it compiles on first use)")
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:
        _note(f"torch is not importable in the build environment ({type(exc).__name__}): the CUDA extension "
              "compiles on first use on a GPU machine (pip install --no-build-isolation to build it now)")
        return None
    if torch.version.cuda is None:
        _note("torch is a CPU-only build: no CUDA extension")
        return None
    if CUDA_HOME is None:
        _note("nvcc not found (CUDA_HOME unset): the CUDA extension compiles on first use, if nvcc is there then")
        return None
    archs_mod = _load_archs()
    archs = archs_mod.from_env(os.environ)  # (blank: the default; a bad entry raises ValueError naming it)
    csrc = os.path.join(HERE, "csrc")
    if not os.path.isdir(csrc):
        _note(f"{csrc} is missing: no CUDA extension")
        return None
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))
    if not sources:
        return None
    ext = CUDAExtension(
        name="lora_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"],
                            "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + archs_mod.gencode_flags(archs)},
    )
    cmdclass["build_ext"] = BuildExtension
    return ext


_ext = _cuda_extension()
if _ext is not None:
    ext_modules.append(_ext)

setup(
    name="lora_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for LoRA and QLoRA fine-tuning",
    python_requires=">=3.10",
    packages=["lora_fast", "lora_fast.kernels", "lora_fast.csrc"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels", "lora_fast.csrc": "csrc"},
    package_data={"lora_fast.csrc": ["*.cu", "*.cpp", "*.h"]},
    install_requires=["torch>=2.4", "triton>=3.0", "bitsandbytes>=0.45", "safetensors", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft", "transformers", "accelerate", "trl"],
        "bench": ["peft", "transformers", "accelerate", "matplotlib", "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
