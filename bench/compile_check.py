"""Kernel regression CI: compile every kernel for sm_80 / sm_86 / sm_90 without a GPU.

    python -m bench.compile_check                  # everything
    python -m bench.compile_check --arch 90 --kernel xa_kernel --max-configs 2 --no-cuda
    python -m bench.compile_check --json out.json

Triton: every kernel in ``kernels/`` (the table ``KERNELS`` below: one row per kernel) is
compiled with every autotune config of its list, for each variant (activation dtype, dense or
NF4 weight, ...) and each target, through ``triton.compile(ASTSource(fn, signature,
constexprs), target=GPUTarget("cuda", cap, 32))``.  A config FAILS when it does not compile,
needs more shared memory than the target's opt-in maximum per block (sm_80 166912, sm_86
101376, sm_90 232448 bytes) or spills registers (a stack frame or local memory in the cubin: the ``STACK`` and ``LOCAL``
fields of the kernel's own ``Function <name>:`` block of ``cuobjdump -res-usage``; ptxas puts
spilled registers in the stack frame).  A config that fails
on an arch is reported as ``pruned on sm_XX`` instead when the kernel module's own
``prune_configs_by`` function, called the way the autotuner calls it with that arch's shared
memory limit, drops it in every launch scenario of that variant (several M buckets / ranks).
Configs the prune function never offers to a variant (e.g. dense configs for an NF4 weight)
are not compiled for it ("n/a").

CUDA: where ``nvcc`` exists, each ``csrc/*.cu`` is compiled with ``nvcc -c`` and one
``-gencode`` per arch, ``-Xptxas -v`` parsed for registers and spill stores/loads; a compile
error or any spill fails.

Exit status: 0 when nothing failed, 1 otherwise.  Prints a table kernel x config x arch with
shared memory (KB), registers and spills.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice; the default

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opt-in maximum shared memory per block, bytes.
ARCH_SMEM = {80: 166912, 86: 101376, 90: 232448}
ARCHS = tuple(ARCH_SMEM)

# Scalar (non-pointer, non-constexpr) arguments that are floats; every other scalar is i32.
FLOAT_ARGS = {"scaling", "p", "inv_keep", "dropout_p", "offset", "nf4_offset", "eps"}

# Launch scenarios offered to the prune functions (they see M_BUCKET etc. as the autotuner does).
M_BUCKETS = (1, 16, 64, 128, 256, 1024, 1 << 16)

_DT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "u8": 1, "i32": 4, "i64": 8}


# --------------------------------------------------------------------------------------------
# the table of kernels
# --------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One way a kernel is launched: pointer dtypes (by argument name; unnamed pointers get
    ``act``) and constexpr values.  ``name`` shows up in the table."""

    name: str
    act: str = "bf16"
    ptrs: Dict[str, str] = field(default_factory=dict)
    constexprs: Dict[str, Any] = field(default_factory=dict)
    # extra named args handed to the prune function (scalars it reads), besides M_BUCKET
    prune_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class KernelRow:
    """A Triton kernel to check.  ``kernel`` names the (possibly autotuned / heuristics-wrapped)
    function in ``module``; ``configs`` the module attribute holding its autotune configs (None:
    one default config); ``prune`` the module's early_config_prune function (None: no pruning);
    ``options`` extra ``triton.compile`` options the launcher uses."""

    module: str
    kernel: str
    configs: Optional[str]
    variants: List[Variant]
    prune: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    default_config: Dict[str, Any] = field(default_factory=dict)  # when configs is None

    @property
    def label(self) -> str:
        return f"{self.module.split('.')[-1]}.{self.kernel}"


def _ranks(act: str) -> Tuple[int, int]:
    """The BLOCK_R values the low-rank launchers use: 16 and the widest tile (128 for 16-bit
    operands, ``MAX_BLOCK_R_IEEE`` = 32 for fp32 ones, which run on FMA; larger ranks are tiled)."""
    return (16, 32) if act == "fp32" else (16, 128)


def _v(name, act="bf16", ptrs=None, **constexprs):
    prune_args = constexprs.pop("_prune", {})
    return Variant(name, act, dict(ptrs or {}), constexprs, prune_args)


# NF4 pointer dtypes (nested: uint8 absmax codes)
_NF4_NESTED = {"w_ptr": "u8", "packed_ptr": "u8", "absmax_ptr": "u8", "absmax2_ptr": "fp32",
               "code2_ptr": "fp32", "code_ptr": "fp32"}
_NF4_PLAIN = {**_NF4_NESTED, "absmax_ptr": "fp32"}

_GEMM_FLAGS = dict(HAS_LORA=True, HAS_BIAS=True, HAS_DROPOUT=True, EVEN_K=False, BLOCK_R=16)

KERNELS: List[KernelRow] = [
    KernelRow(
        "kernels.lora_gemm", "lora_gemm_kernel", "CONFIGS", prune="prune_configs",
        variants=[
            _v("dense-bf16", "bf16", {"p_ptr": "fp32", "q_ptr": "fp32"}, W_NF4=False, NESTED=False, DOT_IEEE=False,
               **_GEMM_FLAGS),
            _v("dense-fp16", "fp16", {"p_ptr": "fp32"}, W_NF4=False, NESTED=False, DOT_IEEE=False, **_GEMM_FLAGS),
            _v("dense-fp32", "fp32", {}, W_NF4=False, NESTED=False, DOT_IEEE=True, **_GEMM_FLAGS),
            _v("nf4-nested-bf16", "bf16", {**_NF4_NESTED, "p_ptr": "fp32", "q_ptr": "fp32"}, W_NF4=True, NESTED=True,
               DOT_IEEE=False, **_GEMM_FLAGS),
            _v("nf4-plain-fp16", "fp16", {**_NF4_PLAIN, "p_ptr": "fp32"}, W_NF4=True, NESTED=False, DOT_IEEE=False,
               **_GEMM_FLAGS),
            _v("nf4-nested-fp32", "fp32", dict(_NF4_NESTED), W_NF4=True, NESTED=True, DOT_IEEE=True, **_GEMM_FLAGS),
        ],
    ),
    KernelRow(
        "kernels.lowrank", "xa_kernel", "XA_CONFIGS", prune="prune_xa",
        variants=[
            _v(f"{act}-r{br}", act, {"a_ptr": a_dt, "out_ptr": "fp32"}, HAS_DROPOUT=True, IEEE=act == "fp32", BLOCK_R=br)
            for act, a_dt in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")) for br in _ranks(act)
        ],
    ),
    KernelRow(
        "kernels.lowrank", "dy_pass_kernel", "DY_CONFIGS", prune="prune_dy",
        variants=[
            _v(f"{act}-r{br}", act, {"b_ptr": b_dt, "xa_ptr": "fp32", "dyb_ptr": "fp32", "db_ptr": "fp32"},
               IEEE=act == "fp32", STREAM=stream, BLOCK_R=br)
            for act, b_dt in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32"))
            for br, stream in zip(_ranks(act), (True, False))
        ],
    ),
    KernelRow(
        "kernels.lowrank", "da_kernel", "DA_CONFIGS", prune="prune_da",
        variants=[
            _v(f"{act}-r{br}", act, {"dyb_ptr": "fp32", "out_ptr": out}, HAS_DROPOUT=True, IEEE=act == "fp32",
               BLOCK_R=br)
            for act, out in (("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")) for br in _ranks(act)
        ],
    ),
    KernelRow(
        "kernels.lowrank", "merge_kernel", "MERGE_CONFIGS", prune="prune_merge", options={"enable_fp_fusion": False},
        variants=[
            # the Triton backend's merged weight: fp32 adapters rounded to bf16 in registers
            _v("nf4-nested-bf16-f32ab-r16", "bf16", {**_NF4_NESTED, "a_ptr": "fp32", "b_ptr": "fp32"}, NF4=True,
               NESTED=True, QBLOCK=64, QBLOCK2=256, HAS_MERGE=True, IEEE=False, BLOCK_R=16),
            _v("nf4-nested-bf16-bf16ab-r16", "bf16", {**_NF4_NESTED, "a_ptr": "bf16", "b_ptr": "bf16"}, NF4=True,
               NESTED=True, QBLOCK=64, QBLOCK2=256, HAS_MERGE=True, IEEE=False, BLOCK_R=16),
            _v("dense-bf16-f32ab-r16", "bf16", {"w_ptr": "bf16", "absmax_ptr": "bf16", "absmax2_ptr": "bf16",
                                               "code2_ptr": "bf16", "code_ptr": "bf16", "a_ptr": "fp32",
                                               "b_ptr": "fp32"}, NF4=False, NESTED=False, QBLOCK=1, QBLOCK2=1,
               HAS_MERGE=True, IEEE=False, BLOCK_R=16),
            _v("nf4-nested-bf16-r64", "bf16", {**_NF4_NESTED, "a_ptr": "fp32", "b_ptr": "fp32"}, NF4=True, NESTED=True,
               QBLOCK=64, QBLOCK2=256, HAS_MERGE=True, IEEE=True, BLOCK_R=64),
            _v("nf4-plain-fp16-r16", "fp16", {**_NF4_PLAIN}, NF4=True, NESTED=False, QBLOCK=64, QBLOCK2=256,
               HAS_MERGE=True, IEEE=False, BLOCK_R=16),
            _v("dense-fp32-r64", "fp32", {"absmax_ptr": "fp32", "absmax2_ptr": "fp32", "code2_ptr": "fp32",
                                          "code_ptr": "fp32"}, NF4=False, NESTED=False, QBLOCK=64, QBLOCK2=256,
               HAS_MERGE=True, IEEE=True, BLOCK_R=64),
        ],
    ),
    KernelRow(
        "kernels.lowrank", "nf4_dequant_kernel", "DEQUANT_CONFIGS", options={"enable_fp_fusion": False},
        variants=[
            _v("nested-bf16", "bf16", dict(_NF4_NESTED), NESTED=True, QBLOCK=64, QBLOCK2=256, FLAT64=False),
            _v("plain-fp32-flat64", "fp32", dict(_NF4_PLAIN), NESTED=False, QBLOCK=64, QBLOCK2=256, FLAT64=True),
        ],
    ),
    KernelRow(
        "kernels.nf4", "nf4_rows_kernel", "ROWS_CONFIGS", prune="prune_rows", options={"enable_fp_fusion": False},
        variants=[
            # the Triton backend's merged weight: fp32 adapters rounded to bf16 in registers
            _v("nested-bf16-merge-f32ab-r16", "bf16", {**_NF4_NESTED, "a_ptr": "fp32", "b_ptr": "fp32"}, QBLOCK=64,
               QBLOCK2=256, NESTED=True, HAS_MERGE=True, BLOCK_R=16, IEEE=False),
            _v("nested-bf16-merge-r16", "bf16", {**_NF4_NESTED, "a_ptr": "bf16", "b_ptr": "bf16"}, QBLOCK=64,
               QBLOCK2=256, NESTED=True, HAS_MERGE=True, BLOCK_R=16, IEEE=False),
            _v("plain-fp16-dequant", "fp16", dict(_NF4_PLAIN), QBLOCK=64, QBLOCK2=256, NESTED=False,
               HAS_MERGE=False, BLOCK_R=16, IEEE=False),
            # the largest blocksize (256): every BLOCK_K must hold whole quantisation blocks
            _v("nested-bf16-merge-q256", "bf16", {**_NF4_NESTED, "a_ptr": "bf16", "b_ptr": "bf16"}, QBLOCK=256,
               QBLOCK2=256, NESTED=True, HAS_MERGE=True, BLOCK_R=16, IEEE=False),
            _v("nested-fp32-merge-r16", "fp32", dict(_NF4_NESTED), QBLOCK=128, QBLOCK2=256, NESTED=True,
               HAS_MERGE=True, BLOCK_R=16, IEEE=True),
        ],
    ),
    # fused RMSNorm / gated SiLU (lora_fast/norm_mlp.py): every (BLOCK_N, num_warps) the launcher picks
    KernelRow(
        "kernels.rmsnorm", "rmsnorm_fwd_kernel", "NORM_FWD_CONFIGS",
        variants=[
            _v("bf16", "bf16", {"rstd_ptr": "fp32"}, EMULATE_RNE=False),
            _v("bf16-w-fp32", "bf16", {"w_ptr": "fp32", "y_ptr": "fp32", "rstd_ptr": "fp32"}, EMULATE_RNE=False),
            _v("fp32", "fp32", {}, EMULATE_RNE=False),
        ],
    ),
    KernelRow(
        "kernels.rmsnorm", "rmsnorm_bwd_kernel", "NORM_BWD_CONFIGS", prune="prune_norm_bwd",
        variants=[
            _v("bf16", "bf16", {"rstd_ptr": "fp32", "dw_ptr": "bf16"}, HAS_DW=False, EMULATE_RNE=False),
            _v("bf16-dw", "bf16", {"rstd_ptr": "fp32", "dw_ptr": "fp32"}, HAS_DW=True, EMULATE_RNE=False),
            _v("bf16-w-fp32-dw", "bf16", {"dy_ptr": "fp32", "w_ptr": "fp32", "rstd_ptr": "fp32", "dw_ptr": "fp32"},
               HAS_DW=True, EMULATE_RNE=False),
            _v("fp32-dw", "fp32", {}, HAS_DW=True, EMULATE_RNE=False),
        ],
    ),
    KernelRow(
        "kernels.swiglu", "silu_mul_fwd_kernel", "SWIGLU_CONFIGS",
        variants=[_v(act, act, EMULATE_RNE=False) for act in ("bf16", "fp16", "fp32")],
    ),
    KernelRow(
        "kernels.swiglu", "silu_mul_bwd_kernel", "SWIGLU_CONFIGS",
        variants=[_v(act, act, EMULATE_RNE=False) for act in ("bf16", "fp16", "fp32")],
    ),
    KernelRow(
        "kernels.rope", "rope_kernel", "ROPE_CONFIGS", options={"enable_fp_fusion": False},
        variants=[_v(f"{act}-{'bwd' if bwd else 'fwd'}", act, BACKWARD=bwd, EMULATE_RNE=False)
                  for act in ("bf16", "fp16", "fp32") for bwd in (False, True)],
    ),
    KernelRow(
        "kernels.cross_entropy", "ce_fwd_kernel", "CE_CONFIGS",
        variants=[_v(act, act, {"target_ptr": "i64", "loss_ptr": "fp32", "lse_ptr": "fp32"})
                  for act in ("bf16", "fp16", "fp32")],
    ),
    KernelRow(
        "kernels.cross_entropy", "ce_bwd_kernel", "CE_CONFIGS",
        variants=[_v(act, act, {"target_ptr": "i64", "lse_ptr": "fp32", "g_ptr": "fp32"}, EMULATE_RNE=False)
                  for act in ("bf16", "fp16", "fp32")],
    ),
    KernelRow(
        "kernels.lowrank", "dropout_mask_kernel", None, default_config={"BLOCK": "MASK_BLOCK"},
        variants=[_v("fp32", "fp32", {"out_ptr": "fp32"})],
    ),
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _import(module: str):
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    return importlib.import_module(module)


def _kernel_types():
    import triton

    types_ = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        types_.append(InterpretedFunction)
    except Exception:  # pragma: no cover
        pass
    return tuple(types_)


def _jit_fn(obj):
    """The underlying triton JITFunction of an Autotuner / Heuristics / JITFunction (an
    InterpretedFunction under TRITON_INTERPRET=1: enough for the table, not for compiling)."""
    kinds = _kernel_types()
    seen = 0
    while not isinstance(obj, kinds):
        obj = getattr(obj, "fn", None)
        seen += 1
        if obj is None or seen > 10:
            raise TypeError("not a triton kernel")
    return obj


def _py_fn(fn):
    """The Python function behind a JITFunction / InterpretedFunction."""
    return fn.fn


def _params(fn) -> List[Tuple[str, bool]]:
    """(name, is_constexpr) for each parameter of the kernel."""
    if hasattr(fn, "params"):
        return [(p.name, bool(p.is_constexpr)) for p in fn.params]
    import triton.language as tl

    sig = inspect.signature(_py_fn(fn))
    return [(name, p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr"))
            for name, p in sig.parameters.items()]


class _FakeDevice:
    def __init__(self, index: int):
        self.type = "cuda"
        self.index = index

    def __repr__(self):
        return f"cuda:{self.index}"


class _FakeTensor:
    """What a prune function may look at: dtype, element_size(), device."""

    def __init__(self, dt: str, device: _FakeDevice):
        import torch

        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "u8": torch.uint8,
                      "i32": torch.int32, "i64": torch.int64}[dt]
        self._bytes = _DT_BYTES[dt]
        self.device = device

    def element_size(self):
        return self._bytes

    def data_ptr(self):
        return 0


_FAKE_INDEX = 7


class _FakeUtils:
    def __init__(self, arch: int, smem: int):
        self._props = {"max_shared_mem": smem, "max_num_regs": 65536, "multiprocessor_count": 132,
                       "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def get_device_properties(self, *args, **kwargs):
        return dict(self._props)


class _FakeDriver:
    """Stands in for triton's active driver while a prune function runs."""

    def __init__(self, arch: int, smem: int):
        self.utils = _FakeUtils(arch, smem)
        self._arch = arch

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self._arch, 32)

    def get_current_device(self):
        return _FAKE_INDEX

    def get_device_capability(self, *args, **kwargs):
        return (self._arch // 10, self._arch % 10)

    def is_active(self):
        return True


_CACHE_HINTS = ("SMEM", "DEVICE", "LIMIT", "PROPS", "INFO", "CAPAB")


@contextlib.contextmanager
def _arch_view(module, arch: int, smem: int):
    """Make ``module``'s device queries see an ``sm_<arch>`` GPU with ``smem`` bytes of opt-in
    shared memory per block: triton's active driver and torch.cuda's property queries are
    replaced, and the module's per-device caches (module-level dicts named like ``_SMEM_LIMIT``
    or ``_DEVICE_INFO``) are emptied for the duration and restored afterwards."""
    import torch

    props = types.SimpleNamespace(
        name=f"fake sm_{arch}", major=arch // 10, minor=arch % 10, multi_processor_count=132,
        shared_memory_per_block_optin=smem, max_shared_memory_per_block_optin=smem,
        shared_memory_per_multiprocessor=smem + 1024, L2_cache_size=50 << 20, total_memory=80 << 30,
        regs_per_multiprocessor=65536, warp_size=32, max_threads_per_multi_processor=2048,
    )
    saved = {}
    caches = {}
    for name, val in list(vars(module).items()):
        if isinstance(val, dict) and name.startswith("_") and any(h in name.upper() for h in _CACHE_HINTS):
            caches[name] = dict(val)
            val.clear()
    for name, val in (("get_device_properties", lambda *a, **k: props),
                      ("get_device_capability", lambda *a, **k: (arch // 10, arch % 10))):
        saved[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, val)
    drv, saved_driver = None, None
    try:
        from triton.runtime import driver as drv

        saved_driver = drv._active
        drv._active = _FakeDriver(arch, smem)
    except Exception:
        drv = None
    try:
        yield
    finally:
        for name, val in saved.items():
            setattr(torch.cuda, name, val)
        if drv is not None:
            drv._active = saved_driver
        for name, content in caches.items():
            d = getattr(module, name)
            d.clear()
            d.update(content)


def _ptr_dtype(variant: Variant, name: str) -> str:
    return variant.ptrs.get(name, variant.act)


def _cfg_key(cfg) -> str:
    kw = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{kw},w{cfg.num_warps},s{cfg.num_stages}"


def _configs(row: KernelRow, module) -> list:
    import triton

    if row.configs is None:
        kw = {k: (getattr(module, v) if isinstance(v, str) else v) for k, v in row.default_config.items()}
        return [triton.Config(kw, num_warps=4, num_stages=3)]
    return list(getattr(module, row.configs))


def _prune_named_args(row: KernelRow, fn, variant: Variant, m_bucket: int) -> Tuple[dict, dict]:
    dev = _FakeDevice(_FAKE_INDEX)
    named, kwargs = {}, {}
    for name, is_c in _params(fn):
        if is_c:
            if name in variant.constexprs:
                kwargs[name] = variant.constexprs[name]
            continue
        if name.endswith("_ptr"):
            named[name] = _FakeTensor(_ptr_dtype(variant, name), dev)
        elif name in FLOAT_ARGS:
            named[name] = 0.5
        elif name == "M_BUCKET":
            named[name] = m_bucket
        else:
            named[name] = 4096
    named.update(variant.prune_args)
    return named, kwargs


def kept_by_prune(row: KernelRow, module, fn, variant: Variant, configs: list, smem: Optional[int],
                  arch: int = 90) -> Optional[set]:
    """Config keys the module's prune function keeps in at least one launch scenario with the
    given shared-memory limit (None: the kernel has no prune function)."""
    if row.prune is None:
        return None
    prune = getattr(module, row.prune)
    keep = set()
    # the whole pruned list, as autotuning sees it (LORA_FAST_AUTOTUNE=0 would keep only the first)
    old = os.environ.get("LORA_FAST_AUTOTUNE")
    os.environ["LORA_FAST_AUTOTUNE"] = "1"
    try:
        keep = _kept(row, prune, fn, variant, configs, module, arch, smem)
    finally:
        if old is None:
            os.environ.pop("LORA_FAST_AUTOTUNE", None)
        else:
            os.environ["LORA_FAST_AUTOTUNE"] = old
    return keep


def _kept(row, prune, fn, variant, configs, module, arch, smem) -> set:
    keep = set()
    with _arch_view(module, arch, smem if smem is not None else (1 << 40)):
        for mb in M_BUCKETS:
            named, kwargs = _prune_named_args(row, fn, variant, mb)
            try:
                kept = prune(list(configs), named, **kwargs)
            except TypeError:
                kept = prune(list(configs), {**named, **kwargs})
            keep.update(_cfg_key(c) for c in kept)
    return keep


# --------------------------------------------------------------------------------------------
# compiling one Triton config
# --------------------------------------------------------------------------------------------

def _tool(name: str) -> Optional[str]:
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except Exception:
        pass
    return shutil.which(name)


_RES_FUNC = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str, kernel: Optional[str] = None) -> Optional[Tuple[int, int, int]]:
    """(registers, stack bytes, local bytes) of ``kernel``'s ``Function <name>:`` block in
    ``cuobjdump -res-usage`` output (the first block when ``kernel`` is None or not found).
    Register spills land in the stack frame (``STACK``); ``LOCAL`` counts other local memory."""
    blocks = [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(5))) for m in _RES_FUNC.finditer(text)]
    if not blocks:
        return None
    for name, reg, stack, local in blocks:
        if kernel is not None and name == kernel:
            return reg, stack, local
    _, reg, stack, local = blocks[0]
    return reg, stack, local


def _res_usage(cubin: bytes, kernel: Optional[str] = None) -> Tuple[Optional[int], Optional[int]]:
    """(registers, stack + local bytes) of the cubin's kernel, via cuobjdump -res-usage."""
    tool = _tool("cuobjdump")
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(path)
    got = parse_res_usage(out, kernel)
    if got is None:
        return None, None
    reg, stack, local = got
    return reg, stack + local


def compile_one(module_name: str, kernel: str, variant: Variant, cfg_kwargs: dict, num_warps: int,
                num_stages: int, arch: int, options: dict) -> dict:
    """Compile one (kernel, variant, config, arch); returns shared/regs/spills or error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _import(module_name)
    fn = _jit_fn(getattr(module, kernel))
    sig, consts, attrs = {}, {}, {}
    constexpr_values = {**variant.constexprs, **cfg_kwargs}
    missing = []
    for i, (name, is_c) in enumerate(_params(fn)):
        if is_c:
            sig[name] = "constexpr"
            if name not in constexpr_values:
                missing.append(name)
            else:
                consts[(i,)] = constexpr_values[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + _ptr_dtype(variant, name)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    if missing:
        return dict(ok=False, error=f"constexpr(s) without a value in the table: {', '.join(missing)}")
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        opts = {"num_warps": num_warps, "num_stages": num_stages, **options}
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return dict(ok=False, error=" | ".join(msg[-3:])[:400], seconds=time.time() - t0)
    shared = int(getattr(ck.metadata, "shared", 0) or 0)
    name = getattr(ck.metadata, "name", None) or kernel
    regs, local = _res_usage(ck.asm["cubin"], name) if "cubin" in ck.asm else (None, None)
    return dict(ok=True, shared=shared, regs=regs, spill_bytes=local, seconds=time.time() - t0)


def _compile_job(args):
    return compile_one(*args)


# --------------------------------------------------------------------------------------------
# CUDA sources
# --------------------------------------------------------------------------------------------

_PTXAS_FN = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30).stdout
        dem = out.splitlines()
        if len(dem) == len(names):
            return dict(zip(names, dem))
    except Exception:
        pass
    return {n: n for n in names}


def parse_ptxas(text: str) -> List[dict]:
    """Per kernel and arch: registers, spill store/load bytes, static smem, from -Xptxas -v."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _PTXAS_FN.search(line)
        if m:
            cur = dict(function=m.group(1), arch=m.group(2), regs=None, spill_stores=0, spill_loads=0, smem=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["spill_stores"], cur["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = _PTXAS_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            if s:
                cur["smem"] = int(s.group(1))
    names = _demangle([r["function"] for r in rows])
    for r in rows:
        r["kernel"] = names.get(r["function"], r["function"])
    return rows


def compile_cuda(archs: Sequence[int], sources: Optional[Sequence[str]] = None, nvcc: Optional[str] = None) -> dict:
    """nvcc -c each csrc/*.cu for ``archs``; returns {"skipped": reason} or per-file results."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        for c in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            if c and os.path.exists(os.path.join(c, "bin", "nvcc")):
                nvcc = os.path.join(c, "bin", "nvcc")
                break
    if nvcc is None:
        return {"skipped": "nvcc not found"}
    csrc = os.path.join(REPO, "csrc")
    sources = sources or sorted(os.path.join(csrc, f) for f in os.listdir(csrc) if f.endswith(".cu"))
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    files = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-c", "-O3", "-std=c++17", "-lineinfo", "--use_fast_math", "-Xptxas", "-v", *gencode,
                   "-I", csrc, src, "-o", os.path.join(tmp, os.path.basename(src) + ".o")]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            out = proc.stdout + proc.stderr
            kernels = parse_ptxas(out)
            errors = [l for l in out.splitlines() if " error" in l.lower() or l.lower().startswith("error")]
            spills = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
            files.append(dict(source=os.path.relpath(src, REPO), ok=proc.returncode == 0 and not spills,
                              returncode=proc.returncode, seconds=time.time() - t0, kernels=kernels,
                              errors=errors[:20] if proc.returncode else [], spills=len(spills)))
    return {"nvcc": nvcc, "files": files}


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------

def run_triton_checks(rows: Sequence[KernelRow], archs: Sequence[int], max_configs: Optional[int] = None,
                      variants_per_kernel: Optional[int] = None, jobs: int = 1, log=print,
                      variant_filter: Optional[Sequence[str]] = None,
                      config_filter: Optional[Sequence[str]] = None) -> List[dict]:
    """Returns one result dict per (kernel, variant, config, arch)."""
    plan = []  # (row, variant, cfg, arch, status-or-None)
    results = []
    for row in rows:
        try:
            module = _import(row.module)
            fn = _jit_fn(getattr(module, row.kernel))
            configs = _configs(row, module)
        except Exception as exc:
            results.append(dict(kernel=row.label, variant="-", config="-", arch="-", status="FAIL",
                                error=f"cannot load kernel: {type(exc).__name__}: {exc}"))
            continue
        variants = [v for v in row.variants if not variant_filter or any(f in v.name for f in variant_filter)]
        variants = variants[:variants_per_kernel] if variants_per_kernel else variants
        for variant in variants:
            try:
                applicable = kept_by_prune(row, module, fn, variant, configs, None)
            except Exception as exc:
                results.append(dict(kernel=row.label, variant=variant.name, config="-", arch="-", status="FAIL",
                                    error=f"prune function failed: {type(exc).__name__}: {exc}"))
                continue
            configs_v = [c for c in configs if not config_filter or any(f in _cfg_key(c) for f in config_filter)]
            cfgs = [c for c in configs_v if applicable is None or _cfg_key(c) in applicable]
            skipped = [c for c in configs_v if c not in cfgs]
            for c in skipped:
                for arch in archs:
                    results.append(dict(kernel=row.label, variant=variant.name, config=_cfg_key(c), arch=f"sm_{arch}",
                                        status="n/a", note="never offered to this variant by the prune function"))
            if max_configs:
                cfgs = cfgs[:max_configs]
            for arch in archs:
                kept = kept_by_prune(row, module, fn, variant, configs, ARCH_SMEM[arch], arch)
                for c in cfgs:
                    plan.append((row, variant, c, arch, kept))
    log(f"compile_check: {len(plan)} Triton compilations ({jobs} job{'s' if jobs > 1 else ''})")
    jobs_args = [(row.module, row.kernel, variant, dict(c.kwargs), c.num_warps, c.num_stages, arch, row.options)
                 for (row, variant, c, arch, _) in plan]
    t0 = time.time()
    if jobs > 1 and len(plan) > 1:
        with cf.ProcessPoolExecutor(max_workers=jobs) as ex:
            outs = list(ex.map(_compile_job, jobs_args))
    else:
        outs = [_compile_job(a) for a in jobs_args]
    for (row, variant, c, arch, kept), out in zip(plan, outs):
        limit = ARCH_SMEM[arch]
        res = dict(kernel=row.label, variant=variant.name, config=_cfg_key(c), arch=f"sm_{arch}", **out)
        problems = []
        if not out.get("ok"):
            problems.append(f"compile error: {out.get('error')}")
        else:
            if out["shared"] > limit:
                problems.append(f"shared memory {out['shared']} B > {limit} B")
            if out.get("spill_bytes"):
                problems.append(f"register spills ({out['spill_bytes']} B of stack/local memory)")
        pruned = kept is not None and _cfg_key(c) not in kept
        if not problems:
            res["status"] = "ok" if not pruned else "ok (pruned)"
        elif pruned:
            res["status"] = f"pruned on sm_{arch}"
            res["note"] = "; ".join(problems)
        else:
            res["status"] = "FAIL"
            res["error"] = "; ".join(problems)
        results.append(res)
    log(f"compile_check: Triton done in {time.time() - t0:.0f} s")
    order = {row.label: i for i, row in enumerate(rows)}
    results.sort(key=lambda r: (order.get(r["kernel"], -1), r["variant"], r["config"], r["arch"]))
    return results


def format_table(results: List[dict]) -> str:
    lines = []
    hdr = f"{'kernel':<34} {'variant':<20} {'config':<44} {'arch':<6} {'smem KB':>8} {'regs':>5} {'spill':>6}  status"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for r in results:
        smem = f"{r['shared'] / 1024:.1f}" if r.get("shared") is not None else "-"
        regs = str(r.get("regs")) if r.get("regs") is not None else "-"
        spill = str(r.get("spill_bytes")) if r.get("spill_bytes") is not None else "-"
        status = r["status"]
        extra = r.get("error") or r.get("note") or ""
        if status in ("n/a",):
            extra = ""
        lines.append(f"{r['kernel']:<34} {r['variant']:<20} {r['config']:<44} {r['arch']:<6} {smem:>8} {regs:>5} "
                     f"{spill:>6}  {status}{('  ' + extra) if extra and status != 'ok' else ''}")
    return "\n".join(lines)


def format_cuda(cuda: dict) -> str:
    if "skipped" in cuda:
        return f"CUDA sources: skipped ({cuda['skipped']})"
    lines = [f"CUDA sources (nvcc {cuda['nvcc']}):",
             f"{'source':<26} {'arch':<6} {'regs':>5} {'spill st/ld':>12} {'smem':>6}  kernel"]
    for f in cuda["files"]:
        if f["returncode"] != 0:
            lines.append(f"{f['source']:<26} COMPILE ERROR: " + " | ".join(f["errors"][:5]))
        for k in f["kernels"]:
            lines.append(f"{f['source']:<26} {k['arch']:<6} {k['regs'] if k['regs'] is not None else '-':>5} "
                         f"{str(k['spill_stores']) + '/' + str(k['spill_loads']):>12} {k['smem']:>6}  "
                         f"{k['kernel'][:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Compile every kernel for sm_80/86/90 and check smem/spills.")
    ap.add_argument("--arch", type=int, action="append", choices=list(ARCHS), help="only these archs (repeatable)")
    ap.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    ap.add_argument("--max-configs", type=int, default=None, help="first N applicable configs per variant")
    ap.add_argument("--variant", action="append", help="only variants whose name contains this (repeatable)")
    ap.add_argument("--config", action="append", help="only configs whose key contains this (repeatable)")
    ap.add_argument("--variants", type=int, default=None, help="first N variants per kernel")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces @triton.jit: re-run without it (compiling needs the real JIT).
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "bench.compile_check", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(cmd, env=env, cwd=REPO)

    archs = tuple(args.arch) if args.arch else ARCHS
    rows = [r for r in KERNELS if not args.kernel or any(k in r.label for k in args.kernel)]
    report: dict = {"archs": [f"sm_{a}" for a in archs], "smem_limits": {f"sm_{a}": ARCH_SMEM[a] for a in archs}}
    failed = 0
    if not args.no_triton:
        try:
            import triton

            report["triton"] = triton.__version__
        except Exception as exc:
            print(f"compile_check: triton not importable: {exc}", file=sys.stderr)
            return 1
        res = run_triton_checks(rows, archs, args.max_configs, args.variants, args.jobs,
                                log=(lambda *a: None) if args.quiet else print,
                                variant_filter=args.variant, config_filter=args.config)
        report["triton_results"] = res
        bad = [r for r in res if r["status"] == "FAIL"]
        failed += len(bad)
        if args.quiet:
            if bad:
                print(format_table(bad))
        else:
            print(format_table(res))
        counts = {}
        for r in res:
            key = r["status"].split(" on ")[0] if r["status"].startswith("pruned") else r["status"]
            counts[key] = counts.get(key, 0) + 1
        print(f"Triton {triton.__version__}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if not args.no_cuda:
        cuda = compile_cuda(archs)
        report["cuda"] = cuda
        print(format_cuda(cuda) if not args.quiet else
              ("CUDA: " + ("skipped: " + cuda["skipped"] if "skipped" in cuda else
                           ", ".join(f"{f['source']} {'ok' if f['ok'] else 'FAIL'}" for f in cuda["files"]))))
        if "files" in cuda:
            failed += sum(1 for f in cuda["files"] if not f["ok"])
    # what was actually compiled: a filter that matches nothing (a typo in --kernel, say) or
    # --no-triton without nvcc must not read as a passing check
    # (a config the prune drops was compiled and checked too; "n/a" rows were never offered)
    checked = sum(1 for r in report.get("triton_results", ()) if r["status"] != "n/a")
    checked += len((report.get("cuda") or {}).get("files", ()))
    report["failed"] = failed
    report["checked"] = checked
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
    if checked == 0:
        print("compile_check: FAILED: nothing was compiled (no kernel, variant or config matched the filters"
              + (", and nvcc was not found" if "skipped" in (report.get("cuda") or {}) else "") + ")")
        return 1
    print(f"compile_check: {'OK' if failed == 0 else f'{failed} FAILED'}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
