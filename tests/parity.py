"""One tolerance rule for every parity test.

A result passes when ``err(result) <= 2 * err(same-dtype torch) + atol[dtype]`` (+ ``2e-5·max|ref|``
for fp32, see ``RTOL_ACC``), both errors
measured elementwise against an fp64 reference, so the bar moves with the dtype's own rounding.
Failures report the worst element, its index and any NaN/inf mismatch.
"""
from __future__ import annotations

from typing import Optional

import torch

ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# fp32 only: a share of the largest reference magnitude on top of the bar.  Two fp32 results
# with different accumulation orders (a K=4096 sequential Triton loop against cuBLAS) differ by
# ~eps32 * sqrt(K) * |partial sums|, which at Llama sizes exceeds 2x cuBLAS's own error.
RTOL_ACC = {torch.float32: 2e-5}
RTOL_FALLBACK = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def report(actual: torch.Tensor, ref: torch.Tensor) -> str:
    a = actual.detach().to(torch.float64).cpu()
    r = ref.detach().to(torch.float64).cpu()
    bad_a = ~torch.isfinite(a)
    bad_r = ~torch.isfinite(r)
    if (bad_a != bad_r).any():
        idx = torch.nonzero(bad_a != bad_r)[0].tolist()
        return f"NaN/inf mismatch at {idx}: got {a[tuple(idx)].item()}, want {r[tuple(idx)].item()}"
    diff = (a - r).abs().nan_to_num(0.0)
    flat = int(diff.argmax())
    idx = list(torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else []
    idx = [int(i) for i in idx]
    return (f"max abs err {diff.max().item():.3e} at {idx}: got {a.reshape(-1)[flat].item():.6g}, "
            f"want {r.reshape(-1)[flat].item():.6g} (shape {tuple(a.shape)})")


def assert_parity(actual: torch.Tensor, ref64: torch.Tensor, torch_same_dtype: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None, what: str = "") -> None:
    """``actual`` vs the fp64 ``ref64``; ``torch_same_dtype`` is plain PyTorch's answer in the
    working dtype (its error sets the bar).  Without it, an rtol per dtype is used."""
    dtype = dtype or actual.dtype
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    r = ref64.detach().to(torch.float64).cpu()
    assert torch.isfinite(a).all() == torch.isfinite(r).all(), f"{what}: {report(a, r)}"
    err = (a - r).abs()
    if torch_same_dtype is not None:
        t = torch_same_dtype.detach().to(torch.float64).cpu()
        bar = 2 * (t - r).abs().max().item() + ATOL[dtype] + RTOL_ACC.get(dtype, 0.0) * r.abs().max().item()
    else:
        bar = RTOL_FALLBACK[dtype] * r.abs().max().item() + ATOL[dtype]
    assert err.max().item() <= bar, f"{what}: error above {bar:.3e}; {report(a, r)}"
