"""Drop-in ``nn.Linear`` replacements: :class:`LoRALinear` (dense frozen base) and
:class:`NF4LoRALinear` (NF4 frozen base, bitsandbytes layout).

Both compute ``y = x·W0ᵀ (+ bias) + s·(drop(x)·Aᵀ)·Bᵀ`` through :func:`lora_fast.ops.lora_linear`
with ``s = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``).  Only ``lora_A`` (r, in)
and ``lora_B`` (out, r) are trainable; A starts Kaiming-uniform and B at zero, so a fresh
layer equals its base.  Adapter weights are fp32 by default, as PEFT keeps them.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import nf4 as nf4_mod
from ._operand import NF4Operand
from .ops import lora_linear

Tensor = torch.Tensor


class _LoRABase(nn.Module):
    """Adapter bookkeeping shared by the dense and NF4 layers."""

    def _init_adapter(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_rslora: bool,
        device,
        adapter_dtype: torch.dtype,
    ) -> None:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={r!r}")
        r = int(r)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not math.isfinite(float(lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if r > min(in_features, out_features):
            warnings.warn(
                f"LoRA rank r={r} exceeds min(in_features, out_features)={min(in_features, out_features)}: "
                "the update cannot have that rank (allowed, as in PEFT)",
                UserWarning,
                stacklevel=3,
            )
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.merged = False
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adapter_dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adapter_dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a=√5, as nn.Linear and PEFT), B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def _freeze_base(self) -> None:
        for name, p in self.named_parameters():
            if not name.startswith("lora_"):
                p.requires_grad_(False)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense update ``s·B·A`` (out, in)."""
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def _dropout_p(self) -> float:
        return self.lora_dropout if self.training else 0.0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}"
            + (", use_rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )

    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W0 + s·B·A`` (and the bias), in ``dtype``
        (default: the base weight's dtype, bf16 for an NF4 base stored from bf16)."""
        w = self.dense_weight(torch.float32)
        if not self.merged:
            w = w + self.delta_weight(torch.float32)
        dt = dtype or self._base_dtype()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dt)
        with torch.no_grad():
            lin.weight.copy_(w.to(dt))
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dt))
        return lin


class LoRALinear(_LoRABase):
    """LoRA on a dense frozen base.  ``weight`` (out, in) and ``bias`` are frozen parameters."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = True,
        device=None,
        dtype: Optional[torch.dtype] = None,
        adapter_dtype: torch.dtype = torch.float32,
        _weight: Optional[Tensor] = None,
        _bias: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        if _weight is None:
            _weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
            nn.init.kaiming_uniform_(_weight, a=math.sqrt(5))
        self.weight = nn.Parameter(_weight, requires_grad=False)
        if _bias is not None:
            self.bias = nn.Parameter(_bias, requires_grad=False)
        elif bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=_weight.device, dtype=_weight.dtype), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        self._init_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                           self.weight.device, adapter_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``; its weight and bias tensors are shared, not copied."""
        _check_dense_linear(linear)
        return cls(
            linear.in_features, linear.out_features, r, lora_alpha, lora_dropout, use_rslora,
            bias=linear.bias is not None, adapter_dtype=adapter_dtype,
            _weight=linear.weight.data, _bias=None if linear.bias is None else linear.bias.data,
        )

    def _base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return self.weight.to(dtype or self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x = _autocast_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return lora_linear(x, self.weight, bias, self.lora_A, self.lora_B, self.scaling, self._dropout_p())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s·B·A`` into the base weight (forward then runs the base alone)."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged", UserWarning, stacklevel=2)
            return
        self.weight.add_(self.delta_weight(torch.float32).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update merged by :meth:`merge`."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged", UserWarning, stacklevel=2)
            return
        self.weight.sub_(self.delta_weight(torch.float32).to(self.weight.dtype))
        self.merged = False


class NF4LoRALinear(_LoRABase):
    """LoRA on an NF4 frozen base stored in bitsandbytes' layout (QLoRA).

    The packed weight and its statistics are buffers (``nf4_packed``, ``nf4_absmax``,
    ``nf4_offset`` and, with double quantisation, ``nf4_absmax2``/``nf4_code2``), so
    ``.to(device)`` and ``state_dict`` carry them.  Dtype casts of the module (``.half()``,
    ``.to(torch.bfloat16)``) leave the fp32 statistics fp32, as bitsandbytes' ``Linear4bit``
    does: rounding them would change the weight.  ``weight`` returns an
    :class:`lora_fast.nf4.NF4Tensor` view of them.
    """

    # fp32 quantisation statistics (nf4_absmax only without double quantisation: else uint8 codes)
    _FP32_STATS = ("nf4_absmax", "nf4_absmax2", "nf4_code2", "nf4_offset")

    def __init__(
        self,
        qweight: "nf4_mod.NF4Tensor",
        bias: Optional[Tensor] = None,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"NF4 base must be 2-D (out, in), got shape {tuple(qweight.shape)}")
        self._set_qweight(qweight)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)
        out_features, in_features = qweight.shape
        self._init_adapter(in_features, out_features, r, lora_alpha, lora_dropout, use_rslora,
                           qweight.device, adapter_dtype)
        self._premerge: Optional["nf4_mod.NF4Tensor"] = None

    def _set_qweight(self, q: "nf4_mod.NF4Tensor") -> None:
        self.register_buffer("nf4_packed", q.packed)
        self.register_buffer("nf4_absmax", q.absmax)
        self.register_buffer("nf4_absmax2", q.absmax2)
        self.register_buffer("nf4_code2", q.code2)
        # saved with the state dict; read on every call as a Python float (no device sync), re-read
        # from the buffer only when the buffer changed (see _offset_value)
        self.register_buffer("nf4_offset", torch.tensor(float(q.offset), dtype=torch.float32, device=q.packed.device))
        self._offset = float(q.offset)
        self._offset_key = _buffer_key(self.nf4_offset)
        self.blocksize = int(q.blocksize)
        self.nested_blocksize = int(q.nested_blocksize)
        self.weight_shape = torch.Size(q.shape)
        self.weight_dtype = q.dtype
        self._code_cache: Optional[Tensor] = None

    def _offset_value(self) -> float:
        """The double-quantisation offset as a float.  The ``nf4_offset`` buffer is the truth
        (state dicts, accelerate's ``set_module_tensor_to_device``, in-place ``copy_``); the float
        is re-read (one device sync) only when the buffer object or its version changed."""
        buf = self.nf4_offset
        if torch.compiler.is_compiling() or buf.device.type == "meta":
            return self._offset
        key = _buffer_key(buf)
        if key != self._offset_key:
            self._offset, self._offset_key = float(buf), key
        return self._offset

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "nf4_offset"
        if key not in state_dict and prefix + "nf4_packed" in state_dict:
            # a state dict from before the offset was a buffer: 0 without double quantisation; with
            # it the offset is lost (it is not recoverable from the codes): say so
            if prefix + "nf4_absmax2" not in state_dict:
                state_dict[key] = torch.zeros((), dtype=torch.float32)
            else:
                error_msgs.append(
                    f"{key} is missing: this NF4 state dict was saved before lora_fast kept the double-quantisation "
                    "offset in it, and the offset cannot be recovered from the codes; quantise the layer again "
                    "from its dense weight (NF4LoRALinear.from_linear) or from the bitsandbytes checkpoint (from_bnb)"
                )
        absmax = state_dict.get(prefix + "nf4_absmax")
        if isinstance(absmax, Tensor):
            # double quantisation must agree: otherwise (strict=False) the uint8 codes of one
            # layout would be copied as values into the fp32 scales of the other
            theirs = prefix + "nf4_absmax2" in state_dict or absmax.dtype == torch.uint8
            ours = self.nf4_absmax2 is not None
            if theirs != ours:
                error_msgs.append(
                    f"{prefix}nf4_absmax: the state dict's NF4 weight is {'' if theirs else 'not '}double-quantised "
                    f"(absmax dtype {absmax.dtype}) but this layer's is {'' if ours else 'not '}(absmax dtype "
                    f"{self.nf4_absmax.dtype}); build the layer with double_quant={theirs} to load it"
                )
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # refresh the float now: the buffer was copied into in place, which an inference tensor's
        # (absent) version counter cannot show, and a compiled forward reads only the float
        val = state_dict.get(key)
        buf = self._buffers.get("nf4_offset")
        if (isinstance(val, Tensor) and val.numel() == 1 and val.device.type != "meta" and buf is not None
                and buf.device.type != "meta"):
            self._offset, self._offset_key = float(val), _buffer_key(buf)

    def _apply(self, fn, recurse=True):
        keep = {n: b for n in self._FP32_STATS if (b := self._buffers.get(n)) is not None and b.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        for n, old in keep.items():
            new = self._buffers.get(n)
            if new is not None and new.dtype != torch.float32:
                self._buffers[n] = old.to(device=new.device)
        return out

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> "NF4LoRALinear":
        """Quantise an ``nn.Linear``'s weight to NF4 (bit-exact with bitsandbytes) and wrap it."""
        _check_dense_linear(linear)
        q = nf4_mod.quantize(linear.weight.data, blocksize=blocksize, double_quant=double_quant)
        bias = None if linear.bias is None else linear.bias.data
        return cls(q, bias, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    @classmethod
    def from_bnb(
        cls,
        linear4bit: nn.Module,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> "NF4LoRALinear":
        """Take over a ``bitsandbytes.nn.Linear4bit`` (as HF ``load_in_4bit`` makes them) without
        re-quantising: its packed bytes and statistics are shared."""
        weight = getattr(linear4bit, "weight", None)
        if weight is None:
            raise TypeError(f"from_bnb expects a bitsandbytes Linear4bit, got {type(linear4bit).__name__}")
        q = nf4_mod.NF4Tensor.from_bnb(weight)
        bias = getattr(linear4bit, "bias", None)
        return cls(q, None if bias is None else bias.data, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype)

    @property
    def weight(self) -> "nf4_mod.NF4Tensor":
        return nf4_mod.NF4Tensor(
            self.nf4_packed, self.nf4_absmax, self.weight_shape, self.weight_dtype, self.blocksize,
            self.nf4_absmax2, self.nf4_code2, self._offset_value(), self.nested_blocksize,
        )

    def to_bnb(self) -> nn.Module:
        """A ``bitsandbytes.nn.Linear4bit`` sharing this layer's NF4 base (the adapter is dropped)."""
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(
            self.in_features, self.out_features, bias=self.bias is not None, compute_dtype=self.weight_dtype,
            quant_type="nf4", device="meta",
        )
        lin.weight = self.weight.to_bnb()
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=False)
        return lin

    def operand(self) -> NF4Operand:
        code = self._code_cache
        if code is None or code.device != self.nf4_packed.device:
            code = nf4_mod.NF4_CODE.to(self.nf4_packed.device)
            self._code_cache = code
        return NF4Operand(
            self.nf4_packed, self.nf4_absmax, self.nf4_absmax2, self.nf4_code2, self._offset_value(),
            self.blocksize, self.nested_blocksize, (self.out_features, self.in_features), code,
        )

    def _base_dtype(self) -> torch.dtype:
        return self.weight_dtype

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return self.weight.dequantize(dtype or self.weight_dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = _autocast_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.merged:
            return F.linear(x, self.dense_weight(x.dtype), bias)
        return lora_linear(x, self.operand(), bias, self.lora_A, self.lora_B, self.scaling, self._dropout_p())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s·B·A`` into the base and re-quantise it to NF4 (lossy, as in PEFT); the
        original NF4 tensors are kept so :meth:`unmerge` restores them exactly."""
        if self.merged:
            warnings.warn("NF4LoRALinear.merge(): already merged", UserWarning, stacklevel=2)
            return
        original = self.weight
        w = original.dequantize(torch.float32) + self.delta_weight(torch.float32)
        merged = nf4_mod.quantize(w.to(self.weight_dtype), blocksize=self.blocksize, double_quant=original.nested)
        self._premerge = original
        self._set_qweight(merged)
        self.merged = True
        warnings.warn("NF4LoRALinear.merge(): the merged weight is re-quantised to NF4, which rounds it",
                      UserWarning, stacklevel=2)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._premerge is None:
            warnings.warn("NF4LoRALinear.unmerge(): not merged", UserWarning, stacklevel=2)
            return
        original = self._premerge
        if original.device != self.nf4_packed.device:  # the module moved since merge()
            original = original.to(self.nf4_packed.device)
        self._set_qweight(original)
        self._premerge = None
        self.merged = False


def _check_dense_linear(linear) -> None:
    """``from_linear`` takes a dense ``nn.Linear``; a bitsandbytes 4-bit/8-bit layer (an
    ``nn.Linear`` subclass holding packed integer weights) is pointed to ``from_bnb``."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
    w = linear.weight
    if type(w).__name__ in ("Params4bit", "Int8Params") or not w.dtype.is_floating_point:
        raise TypeError(
            f"from_linear expects a dense floating-point nn.Linear, got a {type(linear).__name__} whose weight is "
            f"{type(w).__name__} of dtype {w.dtype}; for a bitsandbytes 4-bit layer use NF4LoRALinear.from_bnb"
        )


def _buffer_key(buf: Tensor) -> tuple:
    """What identifies a buffer's value without reading it: the object, its storage (``.data = t``
    swaps it under the same object) and its version counter (in-place writes).  Inference tensors
    have no version counter: an in-place write to one inside ``inference_mode`` is seen only when
    it comes through ``load_state_dict`` (which refreshes the float itself)."""
    try:
        return (id(buf), buf.data_ptr(), buf._version)
    except RuntimeError:
        return (id(buf), buf.data_ptr(), None)


def _autocast_input(x: Tensor) -> Tensor:
    """Under autocast, run in the autocast dtype as ``nn.Linear`` would."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if x.dtype != dt:
            x = x.to(dt)
    return x


def count_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts; NF4 bases (lora_fast's, or bitsandbytes' ``Params4bit``)
    count their logical (out×in) elements."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None) if type(p).__name__ == "Params4bit" else None
        total += torch.Size(shape).numel() if shape is not None else p.numel()
    for mod in model.modules():
        if isinstance(mod, NF4LoRALinear):
            total += mod.weight_shape.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` like PEFT."""
    trainable, total = count_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
