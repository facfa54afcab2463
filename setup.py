"""Build script for lora_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the
``lora_fast.kernels`` sub-package (see ``package_dir``).  The CUDA extension in ``csrc/``
is built only when a CUDA toolchain and a CUDA build of torch are present and
``LORA_FAST_SKIP_CUDA_BUILD`` is not set; otherwise it is compiled on first use on a GPU
machine (``lora_fast.cuda_ext``) and the pure-Python install works without it.
"""
import os

from setuptools import setup

ext_modules = []
cmdclass = {}


def _cuda_extension():
    if os.environ.get("LORA_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:
        return None
    if CUDA_HOME is None or torch.version.cuda is None:
        return None
    archs = os.environ.get("LORA_FAST_CUDA_ARCHS", "80;86;90").replace(",", ";").split(";")
    gencode = []
    for a in filter(None, archs):
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith((".cu", ".cpp"))
    )
    if not sources:
        return None
    ext = CUDAExtension(
        name="lora_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + gencode},
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
    packages=["lora_fast", "lora_fast.kernels"],
    package_dir={"lora_fast": "lora_fast", "lora_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0", "bitsandbytes>=0.45", "safetensors", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "peft", "transformers", "accelerate", "trl"],
        "bench": ["peft", "transformers", "accelerate", "matplotlib", "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
