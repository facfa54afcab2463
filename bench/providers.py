"""Providers: named setups that build a LoRA layer for a (K -> N) projection and say whether they
can run here.  Every provider of one case gets the same weights: the dense bf16 ``W`` for the
dense providers and one bitsandbytes ``Linear4bit`` quantised from it for the NF4 providers
(PEFT wraps it, lora_fast takes it over with ``NF4LoRALinear.from_bnb``, dequant_cublas reads its
packed bytes), and the same adapter ``A``, ``B``.

    lora_fast_<backend>        NF4LoRALinear.from_bnb, LORA_FAST_BACKEND=<backend> (triton, cuda; torch on CPU)
    lora_fast_dense_<backend>  LoRALinear.from_linear on the dense bf16 base (main and parity cases)
    peft_bnb                   PEFT LoRA on bnb Linear4bit (nf4, double quant, bf16 compute): the anchor
    dequant_cublas             NF4 dequantised into a reused buffer, cuBLAS x@Wᵀ, addmm_ of the adapter,
                               hand-written backward (Unsloth's LoRA approach)
    torch_ref                  plain PyTorch LoRA on the dense bf16 base
    ceiling                    the two bf16 GEMMs a frozen-base step cannot avoid: x@W0ᵀ and dY@W0
    bnb_base_only              the bnb Linear4bit alone, no adapter (decode reference)
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .env import temp_env
from .profiles import Shape

Tensor = torch.Tensor

ALL_CASES = frozenset({"parity", "main", "msweep", "rsweep", "variants", "decode"})


class Unavailable(RuntimeError):
    """The provider cannot run here (missing package, backend or device); the reason is shown."""


@dataclass(frozen=True)
class LayerSpec:
    shape: Shape
    r: int
    alpha: float
    dropout: float = 0.0
    bias: bool = False
    adapter_dtype: str = "bf16"  # "bf16" or "fp32"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def a_dtype(self) -> torch.dtype:
        return torch.float32 if self.adapter_dtype == "fp32" else torch.bfloat16


def _seed_of(*parts) -> int:
    h = 1469598103934665603
    for p in parts:
        for ch in str(p):
            h = ((h ^ ord(ch)) * 1099511628211) % 2**61
    return h % 2**31


class Assets:
    """Weights shared by every provider of a case, built lazily and cached per shape (and rank)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._dense: Dict[Tuple[int, int], Tensor] = {}
        self._bias: Dict[int, Tensor] = {}
        self._lin4: Dict[Tuple[int, int, bool], nn.Module] = {}
        self._deq: Dict[Tuple[int, int, bool], Tensor] = {}
        self._adapter: Dict[Tuple[int, int, int, str], Tuple[Tensor, Tensor]] = {}

    def _gen(self, *parts) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(_seed_of(*parts))
        return g

    def dense(self, K: int, N: int) -> Tensor:
        """W0 (N, K) bf16, entries ~ N(0, 1/K) so outputs are O(1)."""
        key = (K, N)
        if key not in self._dense:
            w = torch.randn(N, K, generator=self._gen("W", K, N)) / math.sqrt(K)
            self._dense[key] = w.to(self.device, torch.bfloat16)
        return self._dense[key]

    def bias(self, N: int) -> Tensor:
        if N not in self._bias:
            self._bias[N] = (torch.randn(N, generator=self._gen("bias", N)) * 0.1).to(self.device, torch.bfloat16)
        return self._bias[N]

    def linear4bit(self, K: int, N: int, bias: bool) -> nn.Module:
        """bnb Linear4bit (nf4, blocksize 64, double quant, bf16 compute) quantised from W0 on
        the device, as shared/measure/anchors.py builds it."""
        key = (K, N, bias)
        if key not in self._lin4:
            import bitsandbytes as bnb

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lin = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4")
                lin.weight = bnb.nn.Params4bit(
                    self.dense(K, N).cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
                )
                if bias:
                    lin.bias = nn.Parameter(self.bias(N).cpu(), requires_grad=False)
                if self.device.type == "cpu":
                    # bnb repacks the weight for its AVX512 CPU kernel on the first no-grad forward
                    # in eval mode, which would change the bytes the other providers share.
                    lin.support_avx512bf16_for_cpu = False
                lin = lin.to(self.device)
            self._lin4[key] = lin
        return self._lin4[key]

    def nf4_dense(self, K: int, N: int) -> Tensor:
        """The NF4 weight dequantised by bitsandbytes (bf16): the base the NF4 providers compute with."""
        key = (K, N, False)
        if key not in self._deq:
            import bitsandbytes.functional as BF

            lin = self.linear4bit(K, N, False)
            self._deq[key] = BF.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(torch.bfloat16)
        return self._deq[key]

    def adapter(self, K: int, N: int, r: int, dtype: str) -> Tuple[Tensor, Tensor]:
        """A (r, K) ~ N(0, 1/K), B (N, r) ~ N(0, 1e-4): B non-zero so the adapter path is timed
        on real data, not zeros."""
        key = (K, N, r, dtype)
        if key not in self._adapter:
            g = self._gen("AB", K, N, r)
            a = torch.randn(r, K, generator=g) / math.sqrt(K)
            b = torch.randn(N, r, generator=g) * 0.01
            dt = torch.float32 if dtype == "fp32" else torch.bfloat16
            self._adapter[key] = (a.to(self.device, dt), b.to(self.device, dt))
        return self._adapter[key]

    def clear(self) -> None:
        self._dense.clear()
        self._bias.clear()
        self._lin4.clear()
        self._deq.clear()
        self._adapter.clear()


@dataclass
class Built:
    """A provider's layer.  ``forward(x)`` is the differentiable training forward on (M, K) input;
    ``trainables`` are the adapter tensors whose gradients a step computes (besides dX).
    ``custom(X, dY)`` replaces the generic fwd/bwd/step callables (the ceiling)."""

    forward: Callable[[Tensor], Tensor]
    trainables: List[Tensor]
    base: str  # "nf4" or "dense": which base weight the parity reference uses
    infer: Optional[Callable[[Tensor], Tensor]] = None
    custom: Optional[Callable[[Tensor, Tensor], Dict[str, Callable[[], object]]]] = None
    module: Optional[nn.Module] = None
    note: str = ""


@dataclass
class Provider:
    name: str
    description: str
    build: Callable[[LayerSpec, Assets], Built]
    cases: frozenset = ALL_CASES
    env: Dict[str, str] = field(default_factory=dict)
    needs: Tuple[str, ...] = ()  # "bnb", "peft", "lora_fast"
    lora_fast_backend: Optional[str] = None
    cuda_only: bool = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Set this provider's environment (LORA_FAST_BACKEND) while its layers are built and run."""
        with temp_env(self.env):
            yield


# ------------------------------------------------------------------------------ lora_fast
def _lora_fast():
    try:
        import lora_fast
    except Exception as exc:
        raise Unavailable(f"lora_fast is not importable ({type(exc).__name__}: {exc})") from exc
    return lora_fast


def _copy_adapter(layer: nn.Module, A: Tensor, B: Tensor) -> None:
    with torch.no_grad():
        layer.lora_A.data = A.detach().clone().to(layer.lora_A.device)
        layer.lora_B.data = B.detach().clone().to(layer.lora_B.device)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)


def _build_lora_fast_nf4(spec: LayerSpec, assets: Assets) -> Built:
    lf = _lora_fast()
    K, N = spec.shape.K, spec.shape.N
    lin4 = assets.linear4bit(K, N, spec.bias)
    layer = lf.NF4LoRALinear.from_bnb(lin4, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                      adapter_dtype=spec.a_dtype)
    _copy_adapter(layer, *assets.adapter(K, N, spec.r, spec.adapter_dtype))
    layer.train()
    return Built(layer, [layer.lora_A, layer.lora_B], "nf4", module=layer)


def _build_lora_fast_dense(spec: LayerSpec, assets: Assets) -> Built:
    lf = _lora_fast()
    K, N = spec.shape.K, spec.shape.N
    lin = nn.Linear(K, N, bias=spec.bias, device="meta")
    lin.weight = nn.Parameter(assets.dense(K, N), requires_grad=False)
    if spec.bias:
        lin.bias = nn.Parameter(assets.bias(N), requires_grad=False)
    layer = lf.LoRALinear.from_linear(lin, r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                      adapter_dtype=spec.a_dtype)
    note = ""
    if not spec.bias and getattr(layer, "bias", None) is not None:
        # lora_fast 0.1.0: from_linear of a bias-free nn.Linear adds a zero bias on the CPU
        # (LoRALinear(bias=True, device=None)); drop it so the layer matches its base.
        layer.register_parameter("bias", None)
        note = "workaround: from_linear added a CPU zero bias to a bias-free Linear; removed"
    _copy_adapter(layer, *assets.adapter(K, N, spec.r, spec.adapter_dtype))
    layer.train()
    return Built(layer, [layer.lora_A, layer.lora_B], "dense", module=layer, note=note)


# ------------------------------------------------------------------------------ PEFT + bnb
def _build_peft_bnb(spec: LayerSpec, assets: Assets) -> Built:
    import peft

    K, N = spec.shape.K, spec.shape.N
    lin4 = assets.linear4bit(K, N, spec.bias)
    holder = nn.Module()
    holder.proj = lin4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            holder, peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                                    target_modules=["proj"]),
        )
    lin = pm.base_model.model.proj
    A, B = assets.adapter(K, N, spec.r, spec.adapter_dtype)
    la, lb = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    la.data = A.detach().clone()
    lb.data = B.detach().clone()
    la.requires_grad_(True)
    lb.requires_grad_(True)
    pm.train()
    return Built(lin, [la, lb], "nf4", module=pm, note=type(lin).__module__ + "." + type(lin).__name__)


def _build_bnb_base_only(spec: LayerSpec, assets: Assets) -> Built:
    lin4 = assets.linear4bit(spec.shape.K, spec.shape.N, spec.bias)
    return Built(lin4, [], "nf4", module=lin4)


# ------------------------------------------------------------------------------ dequant + cuBLAS
class _DequantBuffer:
    """NF4 base of a bnb Linear4bit, dequantised on demand into one reused bf16 buffer."""

    def __init__(self, lin4: nn.Module) -> None:
        self.packed = lin4.weight.data
        self.state = lin4.weight.quant_state
        n, k = self.state.shape
        self.buf = torch.empty(n, k, device=self.packed.device, dtype=torch.bfloat16)
        self._out_ok = True

    def __call__(self) -> Tensor:
        import bitsandbytes.functional as BF

        if self._out_ok:
            try:
                BF.dequantize_4bit(self.packed, self.state, out=self.buf)
                return self.buf
            except NotImplementedError:  # bnb's CPU backend has no out= variant
                self._out_ok = False
        self.buf.copy_(BF.dequantize_4bit(self.packed, self.state))
        return self.buf


class _DequantLoRA(torch.autograd.Function):
    """y = x·deq(W0)ᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ with the backward written out:
    dX = dY·deq(W0) + s·((dY·B)·A)⊙m,  dA = s·(dY·B)ᵀ·drop(x),  dB = s·dYᵀ·(drop(x)·Aᵀ)."""

    @staticmethod
    def forward(ctx, x, A, B, deq, bias, s, p):
        dt = x.dtype
        W = deq()
        out = x @ W.t()
        if bias is not None:
            out += bias.to(dt)
        mask = None
        xd = x
        if p > 0:
            mask = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
            xd = x * mask
        xa = xd @ A.to(dt).t()
        out.addmm_(xa, B.to(dt).t(), alpha=s)
        ctx.save_for_backward(xd, xa, A, B, mask)
        ctx.deq, ctx.s = deq, s
        return out

    @staticmethod
    def backward(ctx, dy):
        xd, xa, A, B, mask = ctx.saved_tensors
        s, dt = ctx.s, dy.dtype
        dyb = dy @ B.to(dt)
        dA = (dyb.t() @ xd).mul_(s).to(A.dtype) if ctx.needs_input_grad[1] else None
        dB = (dy.t() @ xa).mul_(s).to(B.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ ctx.deq()
            if mask is None:
                dx.addmm_(dyb, A.to(dt), alpha=s)
            else:
                dx.add_((dyb @ A.to(dt)).mul_(mask), alpha=s)
        return dx, dA, dB, None, None, None, None


def _build_dequant_cublas(spec: LayerSpec, assets: Assets) -> Built:
    K, N = spec.shape.K, spec.shape.N
    lin4 = assets.linear4bit(K, N, spec.bias)
    deq = _DequantBuffer(lin4)
    A0, B0 = assets.adapter(K, N, spec.r, spec.adapter_dtype)
    A = A0.detach().clone().requires_grad_(True)
    B = B0.detach().clone().requires_grad_(True)
    bias = assets.bias(N) if spec.bias else None
    s, p = spec.scaling, spec.dropout

    def forward(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = _DequantLoRA.apply(x.reshape(-1, K), A, B, deq, bias, s, p)
        return y.reshape(*lead, N)

    def infer(x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = _DequantLoRA.apply(x.reshape(-1, K), A, B, deq, bias, s, 0.0)
        return y.reshape(*lead, N)

    return Built(forward, [A, B], "nf4", infer=infer)


# ------------------------------------------------------------------------------ dense references
def _build_torch_ref(spec: LayerSpec, assets: Assets) -> Built:
    K, N = spec.shape.K, spec.shape.N
    W = assets.dense(K, N)
    bias = assets.bias(N) if spec.bias else None
    A0, B0 = assets.adapter(K, N, spec.r, spec.adapter_dtype)
    A = A0.detach().clone().requires_grad_(True)
    B = B0.detach().clone().requires_grad_(True)
    s, p = spec.scaling, spec.dropout

    def forward(x: Tensor) -> Tensor:
        xd = F.dropout(x, p, training=True) if p > 0 else x
        return F.linear(x, W, bias) + (xd @ A.to(x.dtype).t()) @ B.to(x.dtype).t() * s

    def infer(x: Tensor) -> Tensor:
        return F.linear(x, W, bias) + (x @ A.to(x.dtype).t()) @ B.to(x.dtype).t() * s

    return Built(forward, [A, B], "dense", infer=infer)


def _build_ceiling(spec: LayerSpec, assets: Assets) -> Built:
    W = assets.dense(spec.shape.K, spec.shape.N)

    def custom(X: Tensor, dY: Tensor) -> Dict[str, Callable[[], object]]:
        Xd = X.detach()

        def fwd():
            return Xd @ W.t()

        def bwd():
            return dY @ W

        def step():
            return Xd @ W.t(), dY @ W

        return {"fwd": fwd, "bwd": bwd, "step": step}

    return Built(lambda x: x.detach() @ W.t(), [], "dense", infer=lambda x: x @ W.t(), custom=custom)


# ------------------------------------------------------------------------------ registry
_TRAINING = frozenset({"main", "msweep", "rsweep", "variants", "decode", "parity"})


def all_providers() -> Dict[str, Provider]:
    out: Dict[str, Provider] = {}
    for backend in ("triton", "cuda", "torch"):
        out[f"lora_fast_{backend}"] = Provider(
            f"lora_fast_{backend}",
            f"lora_fast NF4LoRALinear.from_bnb (same bnb weights as peft_bnb), LORA_FAST_BACKEND={backend}",
            _build_lora_fast_nf4, env={"LORA_FAST_BACKEND": backend}, needs=("lora_fast", "bnb"),
            lora_fast_backend=backend,
            # the CUDA backend runs its own kernels for decode-sized M and hands the rest to
            # Triton: the rank sweep and the variants would time the Triton path twice
            cases=frozenset({"parity", "main", "msweep", "decode"}) if backend == "cuda" else ALL_CASES,
        )
    out["lora_fast_triton_cublaslr"] = Provider(
        "lora_fast_triton_cublaslr",
        "lora_fast_triton with the skinny adapter GEMMs on cuBLAS (LORA_FAST_LOWRANK=cublas)",
        _build_lora_fast_nf4, env={"LORA_FAST_BACKEND": "triton", "LORA_FAST_LOWRANK": "cublas"},
        needs=("lora_fast", "bnb"), lora_fast_backend="triton",
        cases=frozenset({"parity", "main", "msweep"}),
    )
    out["lora_fast_triton_split"] = Provider(
        "lora_fast_triton_split",
        "lora_fast_triton on the NF4 base in the split regime (LORA_FAST_TRITON_PATH=split: dequantised W0 GEMM "
        "accumulating onto the rank-r adapter term, Y and dX rounded once), against the merged default for NF4 "
        "(W_eff = deq(W0) + s·B·A, one pass less over Y and dX; bench/NOTES.md)",
        _build_lora_fast_nf4, env={"LORA_FAST_BACKEND": "triton", "LORA_FAST_TRITON_PATH": "split"},
        needs=("lora_fast", "bnb"), lora_fast_backend="triton",
        cases=frozenset({"parity", "main"}),
    )
    for backend in ("triton", "cuda", "torch"):
        out[f"lora_fast_dense_{backend}"] = Provider(
            f"lora_fast_dense_{backend}",
            f"lora_fast LoRALinear.from_linear on the dense bf16 base, LORA_FAST_BACKEND={backend}",
            _build_lora_fast_dense, cases=frozenset({"main", "parity"}), env={"LORA_FAST_BACKEND": backend},
            needs=("lora_fast",), lora_fast_backend=backend,
        )
    out["peft_bnb"] = Provider(
        "peft_bnb", "PEFT LoRA on bitsandbytes Linear4bit (nf4, double quant, bf16 compute): what ANCHORS measured",
        _build_peft_bnb, needs=("peft", "bnb"),
    )
    out["dequant_cublas"] = Provider(
        "dequant_cublas",
        "bnb dequantise into a reused buffer + cuBLAS x@Wᵀ + addmm_ adapter, hand-written backward (Unsloth-style)",
        _build_dequant_cublas, needs=("bnb",),
    )
    out["torch_ref"] = Provider("torch_ref", "plain PyTorch LoRA on the dense bf16 base", _build_torch_ref)
    out["ceiling"] = Provider(
        "ceiling", "the two unavoidable bf16 cuBLAS GEMMs x@W0ᵀ and dY@W0 (no adapter)", _build_ceiling,
        cases=frozenset({"main", "msweep", "decode"}),
    )
    out["bnb_base_only"] = Provider(
        "bnb_base_only", "the bnb Linear4bit alone, no adapter (decode reference)", _build_bnb_base_only,
        cases=frozenset({"decode"}), needs=("bnb",),
    )
    return out


def default_names(on_cuda: bool) -> List[str]:
    """Providers a run lists by default.  On a GPU the Triton and CUDA backends; on the CPU the
    torch backend (the reference), with Triton and CUDA still listed so their absence is shown."""
    lf = ["lora_fast_triton", "lora_fast_cuda"] + (
        ["lora_fast_triton_cublaslr", "lora_fast_triton_split"] if on_cuda else ["lora_fast_torch"])
    dense = ["lora_fast_dense_triton", "lora_fast_dense_cuda"] + ([] if on_cuda else ["lora_fast_dense_torch"])
    return lf + ["peft_bnb", "dequant_cublas", "torch_ref", "ceiling"] + dense + ["bnb_base_only"]


def check_available(p: Provider, device: torch.device, allow_interpret: bool = False) -> None:
    """Raise :class:`Unavailable` with the reason when ``p`` cannot run on ``device``."""
    for need in p.needs:
        if need == "bnb":
            try:
                import bitsandbytes  # noqa: F401
            except Exception as exc:
                raise Unavailable(f"bitsandbytes is not installed ({type(exc).__name__}: {exc})") from exc
        elif need == "peft":
            try:
                import peft  # noqa: F401
            except Exception as exc:
                raise Unavailable(f"peft is not installed ({type(exc).__name__}: {exc})") from exc
        elif need == "lora_fast":
            _lora_fast()
    if p.lora_fast_backend == "triton" and device.type != "cuda" and not allow_interpret:
        raise Unavailable("Triton needs a CUDA GPU (its CPU interpreter is for tests/, not benchmarks: it "
                          "computes the suite's bf16 tl.dot wrongly)")
    if p.lora_fast_backend == "cuda" and device.type != "cuda":
        raise Unavailable("the CUDA backend needs a CUDA GPU")


def probe(p: Provider, assets_device: torch.device) -> None:
    """Build and run a tiny layer (forward and backward) with ``p``: turns a missing backend
    into :class:`Unavailable` before any case is timed.  Other errors propagate."""
    shape = Shape("probe", 128, 128, 1, "probe")
    spec = LayerSpec(shape, r=8, alpha=16)
    assets = Assets(assets_device)
    with p.active():
        try:
            built = p.build(spec, assets)
            x = torch.randn(16, 128, device=assets_device, dtype=torch.bfloat16, requires_grad=True)
            dy = torch.randn(16, 128, device=assets_device, dtype=torch.bfloat16)
            if built.custom is not None:
                for fn in built.custom(x, dy).values():
                    fn()
            elif built.trainables:
                y = built.forward(x)
                torch.autograd.grad(y, [x] + built.trainables, dy)
            else:
                with torch.no_grad():
                    built.forward(x)
        except Unavailable:
            raise
        except Exception as exc:
            if type(exc).__name__ == "BackendUnavailableError":
                raise Unavailable(str(exc)) from exc
            raise
