"""lora_fast: fused Triton/CUDA kernels for LoRA and QLoRA fine-tuning.

Public API::

    lora_fast.LoRALinear.from_linear(linear, r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=False)
    lora_fast.NF4LoRALinear.from_linear(linear, r=8, ..., blocksize=64, double_quant=True)
    lora_fast.NF4LoRALinear.from_bnb(linear4bit, r=8, lora_alpha=16, ...)
    lora_fast.nf4.quantize(W, blocksize=64, double_quant=True)
    lora_fast.save_adapter(model, path) / lora_fast.load_adapter(model, path)
    lora_fast.patch(peft_model, fuse_ops=False) / lora_fast.unpatch(peft_model)
    lora_fast.fuse_ops(model) / lora_fast.unfuse_ops(model)      # fused RMSNorm + SwiGLU
    lora_fast.dispatch_stats()
"""
from . import nf4
from ._backend import BackendUnavailableError, dispatch_stats
from .modules import LoRALinear, NF4LoRALinear, count_parameters, print_trainable_parameters
from .ops import lora_linear, lora_linear_grouped
from .adapter_io import AdapterLoadError, load_adapter, save_adapter
from .patch import PatchReport, apply_lora, loraplus_param_groups, patch, unpatch
from .norm_mlp import cross_entropy, fuse_ops, rms_norm, rope, silu_mul, unfuse_ops

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "BackendUnavailableError",
    "LoRALinear",
    "NF4LoRALinear",
    "PatchReport",
    "apply_lora",
    "count_parameters",
    "cross_entropy",
    "dispatch_stats",
    "fuse_ops",
    "load_adapter",
    "lora_linear",
    "lora_linear_grouped",
    "loraplus_param_groups",
    "nf4",
    "patch",
    "print_trainable_parameters",
    "rms_norm",
    "rope",
    "save_adapter",
    "silu_mul",
    "unfuse_ops",
    "unpatch",
]
