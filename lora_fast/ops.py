"""The LoRA linear op: ``torch.library`` custom ops, their fake kernels and autograd.

    lora_fast::lora_fwd(x (M,K), base..., bias?, A (r,K), B (N,r), seed) -> (y (M,N), xa (M,r) fp32)
    lora_fast::lora_bwd(dy (M,N), x, xa, base..., A, B, seed, needs) -> (dx, dA, dB, dbias)

The base is either a dense (N, K) weight or NF4 (bitsandbytes layout; the packed bytes are
passed as ``weight`` plus absmax/absmax2/code2/code and the ints of ``nf4_meta``).  Both ops
dispatch at run time to the backend chosen by :mod:`lora_fast._backend`; registering them as
custom ops with fake kernels lets ``torch.compile(fullgraph=True)`` trace through a layer.

Adapter weights keep their own dtype (PEFT keeps them fp32 under QLoRA); the kernels compute
the adapter path in the activation dtype with fp32 accumulation and return dA/dB in the
adapter dtype.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple, Union

import torch

from . import _backend
from . import reference as ref
from ._operand import NF4Operand

Tensor = torch.Tensor
Base = Union[Tensor, NF4Operand]

_EMPTY = torch.empty(0)


def _trainable_base(x: Tensor, w: Tensor, bias, A: Tensor, B: Tensor, scaling: float, dropout_p: float) -> Tensor:
    """The base weight requires grad (a frozen-base op would silently drop dW0): plain PyTorch
    autograd, warned once and counted."""
    return _plain_autograd(x, w, bias, A, B, scaling, dropout_p,
                           "the base weight requires grad (lora_fast's kernels never compute dW0)",
                           " Freeze it (weight.requires_grad_(False)) for the fast path")


def _plain_autograd(x: Tensor, w: Tensor, bias, A: Tensor, B: Tensor, scaling: float, dropout_p: float, why: str,
                    hint: str = "") -> Tensor:
    """The layer as plain PyTorch autograd (what PEFT runs), warned once and counted."""
    if not torch.compiler.is_compiling():
        _backend.warn_once(f"plain:{why}", f"lora_fast: {why}; running plain PyTorch autograd.{hint}")
        _backend.record("torch", f"fallback({why})")
    dt = x.dtype
    xd = torch.nn.functional.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    y = torch.nn.functional.linear(x, w.to(dt), None if bias is None else bias.to(dt))
    return y + scaling * torch.nn.functional.linear(torch.nn.functional.linear(xd, A.to(dt)), B.to(dt))


def _as_base(base) -> Base:
    """A dense weight or NF4Operand as it is; the public :class:`lora_fast.nf4.NF4Tensor` (what
    ``nf4.quantize`` returns) viewed as the operand the kernels take."""
    if isinstance(base, (Tensor, NF4Operand)):
        return base
    from . import nf4 as nf4_mod

    if isinstance(base, nf4_mod.NF4Tensor):
        return base.operand()
    raise TypeError(f"base must be a weight tensor, an NF4Tensor or an NF4Operand, got {type(base).__name__}")


def _operand(weight: Tensor, absmax, absmax2, code2, code, nf4_meta: List[int], offset: float) -> Base:
    if not nf4_meta:
        return weight
    n, k, blocksize, nested_blocksize = nf4_meta
    return NF4Operand(weight, absmax, absmax2, code2, float(offset), blocksize, nested_blocksize, (n, k), code)


def _out_features(weight: Tensor, nf4_meta: List[int]) -> int:
    return nf4_meta[0] if nf4_meta else weight.shape[0]


def _dense(base: Base, dtype: torch.dtype) -> Tensor:
    return ref.nf4_dequantize(base, dtype) if isinstance(base, NF4Operand) else base


def _auto_gemv(x: Tensor, base: Base, bias, A: Tensor, B: Tensor, dropout_p: float) -> bool:
    """Under ``auto``, decode-sized NF4 calls go to the CUDA GEMV: on an H100 it ran q_proj at
    M=1 in 9.8 µs against 922 µs for the Triton path and 20.9 µs for PEFT+bitsandbytes
    (CUDA-graph replay, bench/NOTES.md).  Only when the extension builds on this machine."""
    if not isinstance(base, NF4Operand) or x.shape[0] > 64 or dropout_p > 0 or not x.is_cuda:
        return False
    if _backend.requested_backend() != "auto":
        return False
    from . import cuda_ext

    if cuda_ext.gemv_unsupported_reason(x, base, bias, A, B, dropout_p):
        return False
    ok, why = _backend.cuda_status(x.device)
    if not ok:
        _backend.warn_once(f"gemv:{why}", f"lora_fast: CUDA decode kernel unavailable ({why}); using Triton")
        _backend.record("triton", f"fallback(cuda gemv unavailable: {why})")
    return ok


def kernel_issue(x: Tensor, A: Tensor, B: Tensor, base: Optional[Base] = None,
                 bias: Optional[Tensor] = None) -> Optional[str]:
    """Why the Triton/CUDA kernels cannot compute this call correctly (None: they can)."""
    if (A.dtype in _KERNEL_FLOAT and B.dtype in _KERNEL_FLOAT and x.dtype in _KERNEL_FLOAT
            and (x.dtype is not torch.bfloat16 or x.device.type != "cpu")
            and (base is None or type(base) is NF4Operand or base.dtype in _KERNEL_FLOAT)
            and (bias is None or bias.dtype in _KERNEL_FLOAT)):
        return None  # the usual case, decided in a few set/identity tests
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return ("bf16 activations in the Triton CPU interpreter, whose tl.dot computes bf16 wrongly "
                "(use float16/float32 there, or LORA_FAST_BACKEND=torch)")
    if x.dtype not in _FLOAT_DTYPES:
        return f"the input is {x.dtype}; the kernels compute in float16, bfloat16 or float32"
    for name, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in _FLOAT_DTYPES:
            return f"{name} is {t.dtype}; the kernels take float16, bfloat16 or float32 adapter weights"
    if base is not None and type(base) is not NF4Operand and base.dtype not in _FLOAT_DTYPES:
        return f"the base weight is {base.dtype}; the kernels take a float16, bfloat16 or float32 (or NF4) base"
    if bias is not None and bias.dtype not in _FLOAT_DTYPES:
        return f"the bias is {bias.dtype}; the kernels take a float16, bfloat16 or float32 bias"
    return None


def _usable(backend: str, x: Tensor, A: Tensor, B: Tensor, base: Optional[Base] = None,
            bias: Optional[Tensor] = None) -> str:
    """``backend``, or 'torch' where the kernels cannot take this call under ``auto`` (warned
    once and counted); a backend named in ``LORA_FAST_BACKEND`` that cannot take it raises."""
    if backend == "torch":
        return backend
    why = kernel_issue(x, A, B, base, bias)
    if why is None:
        return backend
    name = _backend.requested_backend()
    if name != "auto":
        raise _backend.BackendUnavailableError(f"LORA_FAST_BACKEND={name} cannot run this call: {why}")
    _backend.warn_once(f"kernel-issue:{why}", f"lora_fast: falling back to the PyTorch reference backend: {why}")
    _backend.record("torch", f"fallback({why})")
    return "torch"


def _autocast_off(device: torch.device):
    """The ops compute in the dtypes they are given (the modules cast the input to the autocast
    dtype first, as nn.Linear does); an enclosing autocast must not re-cast their matmuls (a
    bnb base with compute_dtype=float32 under bf16 autocast mixed dtypes in one addmm_)."""
    t = device.type
    if t in ("cpu", "cuda") and torch.is_autocast_enabled(t):
        return torch.autocast(t, enabled=False)
    return contextlib.nullcontext()


_NULL = contextlib.nullcontext()


def _guards(device: torch.device):
    """:func:`_autocast_off` and :func:`_backend.device_guard` for ``device``; one shared no-op
    context in the usual case (no autocast, the current device)."""
    t = device.type
    if t == "cuda":
        if torch.is_autocast_enabled("cuda") or (device.index is not None
                                                 and device.index != torch.cuda.current_device()):
            return _Both(device)
    elif t == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.autocast("cpu", enabled=False)
    return _NULL


class _Both(contextlib.ExitStack):
    def __init__(self, device):
        super().__init__()
        self.enter_context(_autocast_off(device))
        self.enter_context(_backend.device_guard(device))


def _forward_impl(x, base: Base, bias, A, B, scaling: float, dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    with _guards(x.device):
        return _forward_run(x, base, bias, A, B, scaling, dropout_p, seed)


def _backward_impl(dy, x, xa, base: Base, A, B, scaling: float, dropout_p: float, seed: int, flags: List[bool]):
    with _guards(dy.device):
        return _backward_run(dy, x, xa, base, A, B, scaling, dropout_p, seed, flags)


def _forward_run(x, base: Base, bias, A, B, scaling: float, dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    backend = _usable(_backend.select(x.device), x, A, B, base, bias)
    if backend == "triton" and _auto_gemv(x, base, bias, A, B, dropout_p):
        backend = "cuda"
    if backend == "triton":
        from . import triton_backend

        return triton_backend.forward(x, base, bias, A, B, scaling, dropout_p, seed)
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.forward(x, base, bias, A, B, scaling, dropout_p, seed)
    _backend.record("torch", "reference")
    mask = ref.dropout_scale_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
    return ref.forward(x, _dense(base, x.dtype), bias, A, B, scaling, mask)


def _backward_run(dy, x, xa, base: Base, A, B, scaling: float, dropout_p: float, seed: int, flags: List[bool]):
    backend = _usable(_backend.select(dy.device), x, A, B, base)
    if backend == "triton":
        from . import triton_backend

        return triton_backend.backward(dy, x, xa, base, A, B, scaling, dropout_p, seed, flags)
    if backend == "cuda":
        from . import cuda_ext

        return cuda_ext.backward(dy, x, xa, base, A, B, scaling, dropout_p, seed, flags)
    _backend.record("torch", "reference")
    mask = ref.dropout_scale_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device) if dropout_p > 0 else None
    return ref.backward(dy, x, xa, _dense(base, dy.dtype), A, B, scaling, mask, flags)


def _reference_fn(base: Base, scaling: float, dropout_p: float, seed: int, backend: str):
    """The layer as differentiable PyTorch, for a double backward, with the dropout mask the
    forward's ``backend`` drew (the kernels' Philox ``tl.rand`` stream, or the torch backend's)."""

    def fn(x, A, B, bias):
        mask = None
        if dropout_p > 0:
            if backend == "torch":
                mask = ref.dropout_scale_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
            else:
                from . import _lowrank

                mask = _lowrank.dropout_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)
        return ref.lora_linear_ref(x, _dense(base, x.dtype), bias, A, B, scaling, mask)

    return fn


class _EagerLoRA(torch.autograd.Function):
    """The eager path: the same implementations as the custom ops without their dispatch
    machinery, which costs ~250 µs of CPU per call (measured on this repo's CPU machine) --
    more than a whole k_proj step on an H100.  ``torch.compile`` takes the custom ops."""

    @staticmethod
    def forward(ctx, x, A, B, bias, base, scaling, dropout_p, seed):
        y, xa = _forward_impl(x, base, bias, A, B, scaling, dropout_p, seed)
        ctx.save_for_backward(x, xa, A, B)
        ctx.base, ctx.scaling, ctx.dropout_p, ctx.seed = base, scaling, dropout_p, seed
        ctx.has_bias = bias is not None
        ctx.bias = bias
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, A, B = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the kernels' backward is not differentiable
            backend = _usable(_backend.select(x.device), x, A, B, ctx.base)
            return _backend.graph_backward(_reference_fn(ctx.base, ctx.scaling, ctx.dropout_p, ctx.seed, backend),
                                           (x, A, B, ctx.bias), (dy,), "lora_linear") + (None,) * 4
        need = ctx.needs_input_grad
        flags = [need[0], need[1], need[2], ctx.has_bias and need[3]]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, da, db, dbias = _backward_impl(dy, x, xa, ctx.base, A, B, ctx.scaling, ctx.dropout_p, ctx.seed, flags)
        return dx, da, db, dbias, None, None, None, None


@torch.library.custom_op("lora_fast::lora_fwd", mutates_args=())
def lora_fwd(
    x: Tensor,
    weight: Tensor,
    absmax: Optional[Tensor],
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    code: Optional[Tensor],
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    seed: Tensor,
    scaling: float,
    dropout_p: float,
    nf4_meta: List[int],
    offset: float,
) -> Tuple[Tensor, Tensor]:
    if not math.isfinite(scaling):  # (checked here for compiled graphs, where lora_linear's check is skipped)
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    base = _operand(weight, absmax, absmax2, code2, code, nf4_meta, offset)
    return _forward_impl(x, base, bias, A, B, scaling, dropout_p, int(seed.item()) if dropout_p > 0 else 0)


@lora_fwd.register_fake
def _(x, weight, absmax, absmax2, code2, code, bias, A, B, seed, scaling, dropout_p, nf4_meta, offset):
    n = _out_features(weight, nf4_meta)
    return x.new_empty(x.shape[0], n), x.new_empty(x.shape[0], A.shape[0], dtype=torch.float32)


@torch.library.custom_op("lora_fast::lora_bwd", mutates_args=())
def lora_bwd(
    dy: Tensor,
    x: Tensor,
    xa: Tensor,
    weight: Tensor,
    absmax: Optional[Tensor],
    absmax2: Optional[Tensor],
    code2: Optional[Tensor],
    code: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    seed: Tensor,
    scaling: float,
    dropout_p: float,
    nf4_meta: List[int],
    offset: float,
    needs: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    base = _operand(weight, absmax, absmax2, code2, code, nf4_meta, offset)
    s = int(seed.item()) if dropout_p > 0 else 0
    out = _backward_impl(dy, x, xa, base, A, B, scaling, dropout_p, s, [bool(v) for v in needs])
    # an output not needed is an empty tensor in that gradient's dtype (as the fake kernel says)
    dtypes = (x.dtype, A.dtype, B.dtype, dy.dtype)
    return tuple(t if t is not None else dy.new_empty(0, dtype=dt) for t, dt in zip(out, dtypes))


@lora_bwd.register_fake
def _(dy, x, xa, weight, absmax, absmax2, code2, code, A, B, seed, scaling, dropout_p, nf4_meta, offset, needs):
    n = _out_features(weight, nf4_meta)
    shapes = [tuple(x.shape), tuple(A.shape), tuple(B.shape), (n,)]
    dtypes = [x.dtype, A.dtype, B.dtype, dy.dtype]
    return tuple(
        dy.new_empty(shape if need else (0,), dtype=dt) for shape, dt, need in zip(shapes, dtypes, needs)
    )


_FWD_INPUTS = ("x", "weight", "absmax", "absmax2", "code2", "code", "bias", "A", "B", "seed")


def _setup_context(ctx, inputs, output):
    x, weight, absmax, absmax2, code2, code, bias, A, B, seed, scaling, dropout_p, nf4_meta, offset = inputs
    _, xa = output
    ctx.save_for_backward(x, xa, weight, absmax, absmax2, code2, code, A, B, seed)
    ctx.scaling, ctx.dropout_p, ctx.nf4_meta, ctx.offset = scaling, dropout_p, list(nf4_meta), offset
    ctx.has_bias = bias is not None


def _backward(ctx, dy, dxa):
    x, xa, weight, absmax, absmax2, code2, code, A, B, seed = ctx.saved_tensors
    needs = [
        int(ctx.needs_input_grad[0]),
        int(ctx.needs_input_grad[7]),
        int(ctx.needs_input_grad[8]),
        int(ctx.has_bias and ctx.needs_input_grad[6]),
    ]
    dx, da, db, dbias = lora_bwd(
        dy.contiguous() if dy.stride(-1) != 1 else dy,
        x, xa, weight, absmax, absmax2, code2, code, A, B, seed,
        ctx.scaling, ctx.dropout_p, ctx.nf4_meta, ctx.offset, needs,
    )
    grads = dict(
        x=dx if needs[0] else None,
        A=da if needs[1] else None,
        B=db if needs[2] else None,
        bias=dbias if needs[3] else None,
    )
    return tuple(grads.get(name) for name in _FWD_INPUTS) + (None, None, None, None)


lora_fwd.register_autograd(_backward, setup_context=_setup_context)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_FLOAT = frozenset(_FLOAT_DTYPES)
_ANY_FLOAT = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def lora_linear(
    x: Tensor,
    base: Base,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """LoRA linear ``y = x·W0ᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ`` through the selected backend.

    x: (..., K) fp16/bf16/fp32.  base: dense (N, K) tensor or :class:`NF4Operand` of shape (N, K).
    bias: (N,) or None.  lora_A: (r, K).  lora_B: (N, r).  Returns (..., N) in x's dtype.
    Dropout (``dropout_p > 0``) uses a fresh seed drawn from torch's CPU generator; the mask
    is regenerated from it in backward, never stored.
    """
    # (checks ordered cheap-first: this runs on every call of every layer, and on an H100 host the
    # narrow projections' step is bound by host time, bench/NOTES.md)
    if type(base) is not NF4Operand:
        base = _as_base(base)
    if type(base) is NF4Operand:
        n, k = base.shape
    else:
        if base.dim() != 2:
            raise ValueError(f"the base weight must be 2-D (out_features, in_features), got shape {tuple(base.shape)}")
        if base.dtype not in _ANY_FLOAT:
            raise TypeError(f"the dense base weight has dtype {base.dtype}; a floating-point weight is needed")
        n, k = base.shape
    xs = x.shape
    if not xs:
        raise ValueError("input must have at least one dimension (..., in_features), got a 0-d tensor")
    if xs[-1] != k:
        raise ValueError(f"input has {xs[-1]} features in its last dim, but the layer expects in_features={k}")
    if x.dtype not in _FLOAT_DTYPES and x.dtype is not torch.float64:
        raise TypeError(f"input dtype {x.dtype} is not supported (use float16, bfloat16, float32 or float64)")
    wdev = base.device
    if x.device != wdev:
        raise ValueError(f"input is on {x.device} but the layer's weights are on {wdev}")
    a_shape, b_shape = lora_A.shape, lora_B.shape
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != k or b_shape[0] != n or a_shape[0] != b_shape[1]:
        raise ValueError(
            f"adapter shapes lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not fit a ({n}, {k}) base"
        )
    if lora_A.dtype not in _ANY_FLOAT or lora_B.dtype not in _ANY_FLOAT:
        bad, t = ("lora_A", lora_A) if lora_A.dtype not in _ANY_FLOAT else ("lora_B", lora_B)
        raise TypeError(f"{bad} has dtype {t.dtype}; adapter weights must be floating point")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n},) for out_features={n}")
    if dropout_p and not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if type(base) is not NF4Operand and base.requires_grad and torch.is_grad_enabled():
        return _trainable_base(x, base, bias, lora_A, lora_B, float(scaling), float(dropout_p))
    if x.dtype is torch.float64:  # no kernel computes in fp64 (as PEFT does on a float64 model)
        return _plain_autograd(x, _dense(base, x.dtype), bias, lora_A, lora_B, float(scaling), float(dropout_p),
                               "float64 activations (the kernels compute in float16, bfloat16 or float32)")
    # (not while compiling: under torch.compile(dynamic=True) the scaling is a symbolic float,
    # which math.isfinite cannot take without a graph break; the custom op checks it at run time)
    if not torch.compiler.is_compiling() and not math.isfinite(float(scaling)):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    lead = xs[:-1]
    if torch._C._are_functorch_transforms_active():
        # torch.func (grad, vmap, jacrev, functional_call): the reference expressions, which the
        # transforms can differentiate and batch (the kernels' autograd Functions define no rules)
        _backend.record("torch", "reference(torch.func transform)")
        mask = None
        if dropout_p > 0:
            seed_int = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
            mask = ref.dropout_scale_mask(seed_int, math.prod(lead), k, float(dropout_p), x.device).view(*lead, k)
        return ref.lora_linear_ref(x, _dense(base, x.dtype), bias, lora_A, lora_B, float(scaling), mask)
    x2 = x.reshape(-1, k) if k else x.reshape(math.prod(lead), 0)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not torch.compiler.is_compiling():
        seed_int = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p > 0 else 0
        y = _EagerLoRA.apply(x2, lora_A, lora_B, bias, base, float(scaling), float(dropout_p), seed_int)
        return y.reshape(*lead, n)
    if dropout_p > 0:
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    else:
        seed = torch.zeros((), dtype=torch.int64)
    if isinstance(base, NF4Operand):
        weight, absmax, absmax2, code2, code = base.packed, base.absmax, base.absmax2, base.code2, base.code
        meta = [n, k, base.blocksize, base.nested_blocksize]
        offset = base.offset
    else:
        weight, absmax, absmax2, code2, code, meta, offset = base, None, None, None, None, [], 0.0
    y, _ = lora_fwd(
        x2, weight, absmax, absmax2, code2, code, bias, lora_A, lora_B, seed,
        float(scaling), float(dropout_p), meta, float(offset),
    )
    return y.reshape(*lead, n)


def _group_operands(layers) -> List[Tuple[Base, Optional[Tensor], Tensor, Tensor, float]]:
    out = []
    for layer in layers:
        base = layer.operand() if hasattr(layer, "operand") else layer.weight
        out.append((base, layer.bias, layer.lora_A, layer.lora_B, float(layer.scaling)))
    return out


class _GroupedLoRA(torch.autograd.Function):
    """Layers that read the same X (q/k/v, gate/up) on the Triton split/merged regimes: one pass
    over X gives every layer's XA (their A matrices stacked) and one pass gives every dA; each
    layer still runs its own base GEMM, and dX is accumulated in place across layers (onto one
    rank-sum GEMM of the split layers' adapter terms)."""

    @staticmethod
    def forward(ctx, x, group, paths, *params):
        with _guards(x.device):
            return _GroupedLoRA._forward(ctx, x, group, paths)

    @staticmethod
    def _forward(ctx, x, group, paths):
        from . import triton_backend as tb

        # the XA kernel casts A to x's dtype in registers: the stacked factors need no host cast
        a_cat = torch.cat([A for _, _, A, _, _ in group], dim=0)
        xa_all = tb._xa(x, a_cat, 0.0, 0)
        ys, off = [], 0
        for (base, bias, A, B, s), path in zip(group, paths):
            r = A.shape[0]
            if path == "split":
                y = tb.adapter_out(xa_all[:, off:off + r], B.t(), s, bias, x.dtype)
                ys.append(y.addmm_(x, tb._dequantized(base, x.dtype, cast=True).t()))
            else:
                w_eff = tb._effective_weight(base, A, B, s, x.dtype)
                ys.append(torch.nn.functional.linear(x, w_eff, None if bias is None else bias.to(x.dtype)))
            off += r
        _backend.record("triton", f"fwd_grouped{len(group)}_{'+'.join(sorted(set(paths)))}")
        ctx.save_for_backward(x, xa_all)
        ctx.group, ctx.paths = group, paths
        ctx.set_materialize_grads(False)  # an output outside the loss arrives as None, not zeros
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        if torch.is_grad_enabled():
            raise RuntimeError("lora_fast.lora_linear_grouped: double backward (create_graph=True) is not supported; "
                               "call the layers one by one (or patch without group_siblings)")
        x, xa_all = ctx.saved_tensors  # unpacked once (checkpointing allows no second unpack)
        with _guards(x.device):
            return _GroupedLoRA._backward(ctx, x, xa_all, *dys)

    @staticmethod
    def _backward(ctx, x, xa_all, *dys):
        from . import triton_backend as tb

        group, paths = ctx.group, ctx.paths
        _backend.record("triton", f"bwd_grouped{len(group)}_{'+'.join(sorted(set(paths)))}")
        dybs, dBs, dbiases, dys_used = [], [], [], []
        used = [dy is not None for dy in dys]  # an output outside the loss: its layer's grads are None
        # one scaling for the whole group (the usual case: same r and alpha) is applied by the dA
        # and dX passes; different ones are folded into each layer's dY·B first
        scales = {s for _, _, _, _, s in group}
        common = scales.pop() if len(scales) == 1 else None
        pass_scale = 1.0 if common is None else common  # what the dA and dX passes multiply by
        off = 0
        for (base, bias, A, B, s), dy in zip(group, dys):
            r = A.shape[0]
            if dy is None:
                dy = x.new_zeros(x.shape[0], B.shape[0])
            elif dy.stride(-1) != 1:
                dy = dy.contiguous()
            dyb, db = tb._dy(dy, B, xa_all[:, off:off + r], s, 0.0)
            dybs.append(dyb if common is not None else dyb * s)
            dBs.append(db)
            dys_used.append(dy)
            dbiases.append(dy.sum(0) if bias is not None and bias.requires_grad else None)
            off += r
        dx = None
        if ctx.needs_input_grad[0]:
            split = [i for i, p in enumerate(paths) if p == "split"]
            if split:  # the split layers' adapter terms s·(dY·B)·A, as one GEMM over their ranks
                dx = tb.adapter_out(torch.cat([dybs[i] for i in split], dim=1),
                                    torch.cat([group[i][2] for i in split], dim=0),
                                    pass_scale, None, x.dtype)
            for (base, bias, A, B, s), dy, path, u in zip(group, dys_used, paths, used):
                if not u:
                    continue
                if path == "split":
                    w = tb._dequantized(base, dy.dtype, cast=True)
                else:
                    w = tb._effective_weight(base, A, B, s, dy.dtype)
                dx = dy @ w if dx is None else dx.addmm_(dy, w)
        da_all = tb._da(torch.cat(dybs, dim=1), x, pass_scale, 0.0, 0, torch.float32)
        grads, off = [], 0
        for (base, bias, A, B, s), db, dbias, u in zip(group, dBs, dbiases, used):
            grads += [da_all[off:off + A.shape[0]].to(A.dtype), db, dbias] if u else [None, None, None]
            off += A.shape[0]
        return (dx, None, None, *grads)


def lora_linear_grouped(x: Tensor, layers) -> List[Tensor]:
    """Run several LoRA layers that share their input (q/k/v, gate/up) in one call.

    x: (..., K).  layers: ``LoRALinear``/``NF4LoRALinear`` modules with the same in_features K.
    Returns one (..., N_i) output per layer, equal to ``[layer(x) for layer in layers]``.
    On the Triton backend without dropout, X is read once for all the layers' XA (and once in
    backward for all their dA) instead of once per layer -- the narrow k/v projections otherwise
    pay a whole pass over X each.  Elsewhere (other backends, dropout, merged layers,
    ``torch.compile``) it calls the layers one by one, which ``dispatch_stats`` records.
    """
    layers = list(layers)
    if not layers:
        raise ValueError("lora_linear_grouped needs at least one layer")
    for i, layer in enumerate(layers):
        if not all(hasattr(layer, a) for a in ("lora_A", "lora_B", "scaling", "merged", "in_features")):
            raise TypeError(f"lora_linear_grouped: layer {i} is a {type(layer).__name__}, not a lora_fast "
                            "LoRALinear/NF4LoRALinear")
    k = layers[0].in_features
    for layer in layers:
        if layer.in_features != k:
            raise ValueError(f"grouped layers must share in_features: {layer.in_features} != {k}")
    if not isinstance(x, Tensor):
        raise TypeError(f"lora_linear_grouped: the input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("input must have at least one dimension (..., in_features), got a 0-d tensor")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features in its last dim, but the layers expect in_features={k}")
    for i, layer in enumerate(layers):
        wdev = layer.lora_A.device
        if x.device != wdev:
            raise ValueError(f"input is on {x.device} but the weights of layer {i} are on {wdev}")
    why = None
    if any(layer.merged for layer in layers):
        why = "merged layer"
    elif any(layer.training and layer.lora_dropout > 0 for layer in layers):
        why = "dropout"
    if why is None:
        from .modules import _autocast_input

        x = _autocast_input(x)
        ys = grouped_call(x, _group_operands(layers))
        if ys is not None:
            return ys
    else:
        _backend.record("grouped", f"per_layer({why})")
    return [layer(x) for layer in layers]


def grouped_call(x: Tensor, group: List[Tuple[Base, Optional[Tensor], Tensor, Tensor, float]]) -> Optional[List[Tensor]]:
    """The grouped Triton call on operands: ``x`` (..., K) in the compute dtype, ``group`` a list
    of ``(base, bias, A, B, scaling)`` without dropout.  Returns the outputs, or None (the reason
    recorded in ``dispatch_stats`` as ``grouped:per_layer(...)``) where it does not apply:
    ``torch.compile``, a backend other than Triton, a regime other than split/merged."""
    why = None
    k = x.shape[-1]
    if torch.compiler.is_compiling():
        why = "torch.compile"
    elif _backend.select(x.device) != "triton":
        why = "backend is not triton"
    elif any(type(base) is not NF4Operand and base.requires_grad and torch.is_grad_enabled()
             for base, _, _, _, _ in group):
        why = "trainable base weight"
    elif (issue := next((i for base, bias, A, B, _ in group if (i := kernel_issue(x, A, B, base, bias))),
                        None)) is not None:
        why = issue
    else:
        from . import triton_backend as tb

        m = x.numel() // k if k else 0
        paths = tuple(tb.plan(m, 0.0, x.device, base) for base, _, _, _, _ in group)
        other = sorted(set(paths) - {"split", "merged"})
        if other:
            why = f"triton path is {other[0]}"
    if why is not None:
        _backend.record("grouped", f"per_layer({why})")
        return None
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    params = []
    for _, bias, A, B, _ in group:
        params += [A, B, bias]  # (a None bias is a non-tensor input: its gradient is None)
    ys = _GroupedLoRA.apply(x2, group, paths, *params)
    return [y.reshape(*lead, y.shape[-1]) for y in ys]
