"""The NF4 weight operand handed to kernels: plain tensors in the bitsandbytes layout."""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class NF4Operand:
    """An NF4-quantised weight of logical shape ``shape = (N, K)`` in bitsandbytes layout.

    packed:   uint8 (ceil(N*K/2),): element f = n*K + k in byte f//2, high nibble when f is even.
    absmax:   fp32 (nblocks,) or, when nested (double quantisation), uint8 codes into ``code2``.
    absmax2:  fp32 (ceil(nblocks/nested_blocksize),) second-level scales, nested only.
    code2:    fp32 (256,) dynamic map of the nested absmax, nested only.
    offset:   mean added back to the decoded nested absmax.
    code:     fp32 (16,) NF4 code values, on the weight's device.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    code2: Optional[torch.Tensor]
    offset: float
    blocksize: int
    nested_blocksize: int
    shape: Tuple[int, int]
    code: torch.Tensor

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device


@functools.lru_cache(maxsize=None)
def kernel_module(name: str):
    """``lora_fast.kernels.<name>`` (the installed ``kernels/`` folder), or ``kernels.<name>`` from a
    source checkout; imported on first use so ``TRITON_INTERPRET`` may be set before triton loads."""
    try:
        return importlib.import_module(f"lora_fast.kernels.{name}")
    except ImportError:
        return importlib.import_module(f"kernels.{name}")
