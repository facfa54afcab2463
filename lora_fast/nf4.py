"""NF4 (4-bit NormalFloat) weights in bitsandbytes' exact layout, quantised bit-exactly.

Layout (identical to ``bitsandbytes.functional.quantize_4bit(W, quant_type="nf4")``):

* The weight of logical shape ``S`` (``N = prod(S)`` elements, row-major) is cut into
  ``nblocks = ceil(N / blocksize)`` *flat* blocks; the last one may be partial (blocks run
  across rows: they are not aligned to rows unless ``K % blocksize == 0``).
* ``absmax[b]`` (fp32, ``(nblocks,)``) is the largest ``|w|`` of block ``b``.
* Element ``f`` gets the 4-bit index ``q[f]`` of the NF4 code nearest to
  ``w[f] / absmax[f // blocksize]``; ``packed[i] = (q[2i] << 4) | q[2i + 1]`` (``(ceil(N/2),)``
  uint8, first element in the HIGH nibble).  For odd ``N`` the final low nibble is padding.
* Dequantisation is ``NF4_CODE[q[f]] * absmax[f // blocksize]`` in fp32, rounded once to the
  output dtype.
* Double quantisation ("nested", bnb's ``compress_statistics=True``): ``offset = mean(absmax)``,
  then ``absmax - offset`` is quantised with bnb's 8-bit blockwise scheme in blocks of
  ``nested_blocksize = 256``: ``absmax2`` (fp32, ``(ceil(nblocks/256),)``) holds each block's
  max ``|absmax - offset|`` and ``absmax`` becomes uint8 indices into the 256-entry dynamic map
  ``code2``.  Decoded: ``code2[absmax[b]] * absmax2[b // 256]``, then ``+ offset`` (two fp32
  roundings, no FMA).

Exact rounding rules.  bitsandbytes 0.50.2 runs *different* algorithms on CPU (its pure-torch
"default" backend for the 4-bit part, libbitsandbytes_cpu for the nested statistics) and on
CUDA (kernels built with ``--use_fast_math``), which disagree in corner cases, so
:func:`quantize` reproduces the one bnb runs on the tensor's device.  Both compute the absmax in
fp32, take one reciprocal per block and multiply (bnb-CPU's partial last block excepted), and
pick the NF4 index as the number of thresholds strictly below the scaled value (ties go to the
lower code).
The differences:

* reciprocal -- CPU: IEEE ``1 / max(absmax, 1e-38)``; CUDA: the hardware approximation
  ``rcp.approx.ftz.f32`` (differs from IEEE by 1 ulp for ~10% of inputs), with subnormal
  inputs/absmax flushed to zero.
* partial last block -- CPU *divides* by ``max(absmax, 1e-38)`` instead of multiplying by the
  reciprocal, and stores that clamped absmax; CUDA treats it like any other block.
* thresholds -- CPU: fp32 midpoints ``(c[i] + c[i+1]) / 2``.  CUDA: the decimal literals of its
  ``dQuantizeNF4`` decision tree rounded to fp32; four midpoints (i = 0, 8, 12, 14) are exact
  ties between two fp32 values and the literals round to the other neighbour (1 ulp apart).
* all-zero block -- CPU: indices 7 (code 0.0); CUDA: 0 * inf = NaN fails every comparison, so
  indices 0 (code -1.0, times absmax 0).  The padding nibble of an odd N is a scaled 0: 7,
  or 0 on CUDA when its block is all zero.
* nested statistics (8-bit dynamic map, blocks of 256) -- CPU: a 65536-entry lookup table,
  ``LUT[trunc(fma((y + 1) * 0.5, 65535, 0.5))]`` with ``y = clamp(c * (1/absmax2), -1, 1)`` and
  ``LUT[i] = #{midpoints < (2 i) / 65535 - 1}``, an approximation of "nearest code"; CUDA: a
  binary search returning the nearest code by fp32 midpoints, exact ties going to the EVEN
  index.  An all-zero 256-block gives index 0 on both.
* dequantisation -- CUDA flushes subnormal products to zero.

The CUDA rules need Triton for the hardware reciprocal (inline PTX); without it the IEEE
reciprocal is used with a warning (then rare elements may differ from bnb).
"""
from __future__ import annotations

import operator
import warnings
from fractions import Fraction
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

Tensor = torch.Tensor

__all__ = ["NF4_CODE", "NF4Tensor", "quantize", "dynamic_map", "SUPPORTED_BLOCKSIZES"]

# The 16 NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero.  These are the fp32 values bitsandbytes hard-codes for "nf4".
NF4_CODE: Tensor = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

# Thresholds of bnb's CUDA ``dQuantizeNF4`` decision tree as written in its source (float
# literals).  They are the exact midpoints of the codes printed as doubles; four of them are
# (almost) exact ties between two fp32 values, and the compiler's correctly rounded
# decimal -> fp32 conversion picks the other neighbour than fp32 arithmetic on the codes does.
_CUDA_NF4_THRESHOLDS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)

# Block sizes bitsandbytes 0.50.2's quantize_4bit accepts (on every backend).
SUPPORTED_BLOCKSIZES: Tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NESTED_BLOCKSIZE = 256  # bnb always double-quantises absmax in blocks of 256
_LUT_SIZE = 65536  # size of bnb's CPU lookup table for 8-bit blockwise quantisation
_FLT_MIN = 1.1754943508222875e-38  # smallest normal fp32; CUDA's FTZ treats anything below as 0
_CHUNK = 1 << 22  # elements quantised per step: bounds the temporaries for multi-GB weights
_BACKENDS = ("auto", "cpu", "cuda")

_cache: Dict[Tuple[str, str], Tensor] = {}


def _cached(name: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
    """Small per-device constant tables (codes, thresholds, LUT), built once."""
    key = (name, str(device))
    t = _cache.get(key)
    if t is None:
        t = build().to(device)
        _cache[key] = t
    return t


def _midpoints(code: Tensor) -> Tensor:
    """fp32 ``(code[i] + code[i+1]) * 0.5`` -- how both bnb libraries compute midpoints at run
    time (``/ 2`` and ``* 0.5`` are the same exact halving)."""
    return (code[:-1] + code[1:]) * 0.5


def _f32_nearest(decimal: str) -> float:
    """Correctly rounded decimal -> fp32 (what a C compiler does with ``1.23f``).  Going through a
    Python float would round twice, which matters for literals next to an fp32 tie."""
    exact = Fraction(decimal)
    base = torch.tensor(float(exact), dtype=torch.float32)
    cands = [base, torch.nextafter(base, base.new_tensor(2.0)), torch.nextafter(base, base.new_tensor(-2.0))]
    return min(cands, key=lambda c: abs(Fraction(c.item()) - exact)).item()


def _nf4_thresholds(device: torch.device, cuda: bool) -> Tensor:
    """(15,) fp32 decision thresholds: index = number of thresholds strictly below x."""
    if cuda:
        return _cached("nf4_thr_cuda", device,
                       lambda: torch.tensor([_f32_nearest(s) for s in _CUDA_NF4_THRESHOLDS], dtype=torch.float32))
    return _cached("nf4_thr_cpu", device, lambda: _midpoints(NF4_CODE))


def _build_dynamic_map() -> Tensor:
    # bnb's create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each decade
    # e = 0..6, 2**e linearly spaced "fraction" values (midpoints of an fp32 linspace over
    # [0.1, 1]) scaled by 10**(e-6), with both signs, plus 0 and 1 -> 256 values, sorted.  The
    # scaling is an fp32 tensor-times-Python-scalar product, exactly as bnb computes it.
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for e in range(7):
        bounds = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = means * (10.0 ** (e - 6))
        parts += [scaled, -scaled]
    values = torch.cat(parts).sort().values
    assert values.numel() == 256
    return values


def dynamic_map(device: Union[str, torch.device, None] = None) -> Tensor:
    """A fresh (256,) fp32 copy of bnb's signed dynamic 8-bit map (``code2`` of nested absmax)."""
    return _cached("dyn", torch.device(device or "cpu"), _build_dynamic_map).clone()


def _dyn_midpoints(device: torch.device) -> Tensor:
    """(255,) fp32 midpoints of the dynamic map."""
    return _cached("dyn_mid", device, lambda: _midpoints(_build_dynamic_map()))


def _dyn_lut(device: torch.device) -> Tensor:
    """bnb's CPU lookup table (int64 (65536,)): entry ``i`` counts the dynamic-map midpoints
    below the fp32 grid value ``(2i) / 65535 - 1``."""

    def build() -> Tensor:
        grid = torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0 / float(_LUT_SIZE - 1) - 1.0
        return torch.bucketize(grid, _midpoints(_build_dynamic_map()), right=False)

    return _cached("dyn_lut", device, build)


# --------------------------------------------------------------------------------------------
# the CUDA reciprocal
# --------------------------------------------------------------------------------------------

_rcp_kernel = None
_rcp_warned = False


def _rcp_approx_ftz(x: Tensor) -> Tensor:
    """Elementwise ``rcp.approx.ftz.f32`` -- the reciprocal bnb's fast-math CUDA kernels use for
    ``1.0f / absmax`` -- of a CUDA fp32 tensor.  It is a hardware approximation (not the IEEE
    result for ~10% of inputs), so it is run through Triton's inline PTX rather than emulated."""
    global _rcp_kernel, _rcp_warned
    try:
        if _rcp_kernel is None:
            import triton
            import triton.language as tl

            @triton.jit
            def _kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
                offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                v = tl.load(x_ptr + offs, mask=mask, other=1.0)
                r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                              is_pure=True, pack=1)
                tl.store(out_ptr + offs, r, mask=mask)

            _rcp_kernel = _kernel
        x = x.contiguous()
        out = torch.empty_like(x)
        n = x.numel()
        _rcp_kernel[((n + 1023) // 1024,)](x, out, n, BLOCK=1024)
        return out
    except Exception as exc:  # no Triton / not NVIDIA: IEEE fallback, rarely different by 1 ulp
        if not _rcp_warned:
            warnings.warn(f"lora_fast.nf4: hardware rcp.approx unavailable ({type(exc).__name__}: {exc}); using "
                          f"the IEEE reciprocal, which may differ from bitsandbytes' CUDA kernel in rare elements",
                          RuntimeWarning, stacklevel=3)
            _rcp_warned = True
        return torch.reciprocal(x)


def unpack_bnb_cpu_layout(packed: Tensor, qs):
    """``(packed, QuantState)`` of a bitsandbytes 4-bit weight that bitsandbytes repacked for
    its AVX512 CPU kernel, back in the standard layout, as new objects (the inputs are not
    modified).  bitsandbytes' own inverse (``_convert_weight_packed_for_cpu_inverse``) restores
    the bytes, and re-quantises the scales when they were double-quantised; otherwise it leaves
    them transposed, ``(K / blocksize, N)`` in bf16, which this puts back in block order.  The
    scales stay the bf16-rounded values that bitsandbytes' CPU kernel computes with (the repacking
    rounded them; the originals are gone)."""
    import copy

    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    work = copy.copy(qs)  # the inverse reassigns the state's fields: keep the caller's state intact
    out, work = _convert_weight_packed_for_cpu_inverse(packed, work)
    if not work.nested:
        n, k = (int(d) for d in work.shape)
        absmax = work.absmax
        if absmax.dim() != 2 or tuple(absmax.shape) != (k // work.blocksize, n):
            raise ValueError(f"bitsandbytes' CPU-packed scales have shape {tuple(absmax.shape)}, expected "
                             f"({k // work.blocksize}, {n}) for a ({n}, {k}) weight with blocksize {work.blocksize}")
        work.absmax = absmax.t().reshape(-1).to(torch.float32).contiguous()
    return out, work


def restore_bnb_layout(p) -> None:
    """A bitsandbytes ``Params4bit`` that bitsandbytes repacked for its AVX512 CPU kernel (at the
    first CPU inference forward) back in the standard layout, in place, as bitsandbytes itself
    does before saving or moving it; any other weight is left alone."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        p.data, p.quant_state = unpack_bnb_cpu_layout(p.data, qs)


# --------------------------------------------------------------------------------------------
# quantisation
# --------------------------------------------------------------------------------------------


def _check_blocksize(blocksize) -> int:
    """``blocksize`` as a Python int (numpy integers accepted, as bitsandbytes does)."""
    bad = ValueError(f"unsupported blocksize {blocksize!r}; bitsandbytes accepts {SUPPORTED_BLOCKSIZES}")
    if isinstance(blocksize, bool):
        raise bad
    try:
        blocksize = operator.index(blocksize)
    except TypeError:
        raise bad from None
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise bad
    return blocksize


def _check_input(W: Tensor, blocksize: int) -> None:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(W).__name__}")
    if not W.dtype.is_floating_point:
        raise ValueError(f"NF4 quantisation needs a floating-point weight, got non-floating dtype {W.dtype}")
    if W.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"NF4 quantisation supports float32/float16/bfloat16 weights (as bitsandbytes), "
                         f"got unsupported dtype {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"cannot quantise an empty tensor (shape {tuple(W.shape)})")
    if W.device.type == "meta":
        raise ValueError(f"cannot quantise a weight on the meta device (shape {tuple(W.shape)}): NF4 quantisation "
                         "needs its values; materialise it first (e.g. module.to_empty(...) and load the weights)")


def _resolve_backend(backend: str, device: torch.device) -> bool:
    """True when bnb's CUDA rounding rules apply."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return device.type == "cuda"
    return backend == "cuda"


def _ftz(t: Tensor) -> Tensor:
    """Flush fp32 subnormals to +0 (for non-negative maxima, as CUDA's fmaxf.ftz does)."""
    return torch.where(t < _FLT_MIN, torch.zeros_like(t), t)


def _blocks(x: Tensor, blocksize: int) -> Tensor:
    """View the flat ``x`` (n,) as (ceil(n/blocksize), blocksize), zero padding the last row."""
    pad = (-x.numel()) % blocksize
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(-1, blocksize)


def _ftz_product(t: Tensor) -> Tensor:
    """bnb's CUDA dequantisation multiplies with FTZ: subnormal fp32 products become (signed)
    zero.  Only reachable with absmax < ~1.2e-38; the CPU library keeps them."""
    if not t.is_cuda:
        return t
    return torch.where(t.abs() < _FLT_MIN, t * 0.0, t)


def _reciprocal(absmax: Tensor, cuda: bool) -> Tensor:
    return _rcp_approx_ftz(absmax) if (cuda and absmax.is_cuda) else torch.reciprocal(absmax)


def _nf4_codes(xb: Tensor, absmax: Tensor, cuda: bool, divide: bool = False) -> Tensor:
    """NF4 indices (int64, same shape) of the rows of ``xb`` (b, L) fp32 with scales ``absmax``
    (b,), as bnb computes them.  ``divide``: bnb-CPU's rule for the partial last block."""
    thr = _nf4_thresholds(xb.device, cuda)
    if cuda:
        # One approximate reciprocal per block, multiply, compare against the literal thresholds
        # with '>' (== bucketize, ties down).  FTZ: subnormal inputs are 0 (-> index 7), and an
        # absmax of 0 gives 0 * inf = NaN, for which every comparison fails -> index 0.
        scaled = xb * _reciprocal(absmax, cuda).unsqueeze(1)
        scaled.masked_fill_(xb.abs() < _FLT_MIN, 0.0)
        q = torch.bucketize(scaled, thr)
        return q.masked_fill_((absmax == 0).unsqueeze(1), 0)
    # bnb's pure-torch backend: the same expressions, so the same fp32 roundings.  Scales are
    # clamped to >= 1e-38 (so a zero block scales to 0 -> index 7) and values to [-1, 1].
    if divide:
        scaled = xb / absmax.unsqueeze(1)
    else:
        scaled = xb * (1.0 / absmax).unsqueeze(1)
    return torch.bucketize(torch.clamp(scaled, -1, 1), thr)


def _quantize_4bit(W: Tensor, blocksize: int, cuda: bool) -> Tuple[Tensor, Tensor]:
    """Flat NF4 quantisation of ``W`` (any shape).  Returns (packed uint8 (ceil(N/2),),
    absmax fp32 (ceil(N/blocksize),)).  Works in chunks of whole blocks to bound memory."""
    flat = W.detach().reshape(-1)
    n = flat.numel()
    full = n // blocksize
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=W.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=W.device)
    step = max(1, _CHUNK // blocksize)
    for b0 in range(0, full, step):
        b1 = min(full, b0 + step)
        xb = flat[b0 * blocksize:b1 * blocksize].to(torch.float32).view(b1 - b0, blocksize)  # exact upcast
        am = xb.abs().amax(dim=1)
        if cuda:
            am = _ftz(am)
        absmax[b0:b1] = am
        if not cuda:
            am = am.clamp(min=1e-38)
        q = _nf4_codes(xb, am, cuda).view(-1).to(torch.uint8)
        packed[b0 * blocksize // 2:b1 * blocksize // 2] = (q[0::2] << 4) | q[1::2]
    if full < nblocks:  # partial last block (blocksize is even, so it starts on a byte boundary)
        xt = flat[full * blocksize:].to(torch.float32).view(1, -1)
        am = xt.abs().amax(dim=1)
        am = _ftz(am) if cuda else am.clamp(min=1e-38)  # bnb-CPU stores the clamped value here
        absmax[full:] = am
        q = _nf4_codes(xt, am, cuda, divide=not cuda).view(-1)
        if n % 2:  # padding nibble: a scaled 0, i.e. index 7 (0 in a zero block on CUDA)
            q = torch.cat([q, q.new_full((1,), 0 if (cuda and bool(am[0] == 0)) else 7)])
        q = q.to(torch.uint8)
        packed[full * blocksize // 2:] = (q[0::2] << 4) | q[1::2]
    if not bool(torch.isfinite(absmax).all()):  # a NaN/inf anywhere makes its block's max non-finite
        raise ValueError("cannot quantise a weight with non-finite values (NaN or inf)")
    return packed, absmax


def _quantize_blockwise_8bit(c: Tensor, blocksize: int, cuda: bool) -> Tuple[Tensor, Tensor]:
    """bnb's ``quantize_blockwise`` with the dynamic map, of the flat fp32 ``c`` (n,) (in
    practice the nested absmax, a few thousand values).  Returns (codes uint8 (n,), absmax fp32
    (ceil(n/blocksize),))."""
    n = c.numel()
    cb = _blocks(c, blocksize)  # the zero padding leaves every block's max |c| unchanged
    absmax = cb.abs().amax(dim=1)
    if cuda:
        absmax = _ftz(absmax)
        cb = cb.masked_fill(cb.abs() < _FLT_MIN, 0.0)
    # Both libraries take one reciprocal per block and multiply.  A zero block gives
    # 0 * inf = NaN, which both map to index 0 (CUDA: every comparison false; CPU: the zero
    # block is special-cased).
    y = cb * _reciprocal(absmax, cuda).unsqueeze(1)
    y = y.masked_fill((absmax == 0).unsqueeze(1), 0.0)
    if cuda:
        # dQuantize: a 7-step binary search over the 256 sorted codes, then the nearer of the
        # bracketing pair by the fp32 midpoint.  bucketize counts midpoints < y; when y sits
        # exactly on a midpoint the search returns whichever of the pair has the even index
        # (the final, never-compared pivot of the search is always even).
        mids = _dyn_midpoints(c.device)
        q = torch.bucketize(y, mids)
        on_mid = (mids[q.clamp(max=mids.numel() - 1)] == y) & (q % 2 == 1)
        q = q + on_mid.to(q.dtype)
    else:
        # CPU library: clamp, map [-1, 1] onto the 65536-entry grid with
        # trunc(fma((y + 1) * 0.5, 65535, 0.5)), look the grid point up.  (y + 1) * 0.5 is a
        # multiple of 2^-25 below 1, so t * 65535 + 0.5 is exact in float64 and a single
        # rounding to fp32 reproduces the FMA.
        # A subnormal block absmax has an infinite reciprocal: its values go to +-1 and its zero
        # entries (the block padding included) to NaN, which bnb's CPU library maps to index 0
        # (checked byte-equal: weights of magnitude 1e-45 .. 3e-38) and must not index the LUT.
        t = (torch.clamp(y.nan_to_num(-1.0), -1.0, 1.0) + 1.0) * 0.5
        idx = (t.double() * float(_LUT_SIZE - 1) + 0.5).to(torch.float32).to(torch.int64)
        q = _dyn_lut(c.device)[idx]
    q = q.masked_fill((absmax == 0).unsqueeze(1), 0)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


@torch.no_grad()
def quantize(W: Tensor, blocksize: int = 64, double_quant: bool = True, *, backend: str = "auto") -> "NF4Tensor":
    """Quantise ``W`` (any shape, fp32/fp16/bf16, CPU or CUDA) to NF4, bit-exact with
    ``bitsandbytes.functional.quantize_4bit(W, blocksize=blocksize, quant_type="nf4",
    compress_statistics=double_quant)`` run on the same device: same packed bytes, absmax,
    absmax2, code2 and offset.

    ``backend``: ``"auto"`` (bnb's CUDA rules for CUDA tensors, its CPU rules otherwise) or
    ``"cpu"``/``"cuda"`` to reproduce what bnb would produce on that device (``"cuda"`` needs a
    CUDA tensor for the hardware reciprocal to be exact).
    Raises ValueError for non-float or unsupported dtypes, unsupported blocksizes, empty or
    non-finite weights.
    """
    blocksize = _check_blocksize(blocksize)
    _check_input(W, blocksize)
    cuda = _resolve_backend(backend, W.device)
    packed, absmax = _quantize_4bit(W, blocksize, cuda)
    if not double_quant:
        return NF4Tensor(packed, absmax, W.shape, W.dtype, blocksize)
    # The mean is the same torch reduction on the same tensor as in bnb, hence the same fp32
    # value; its summation order is device-specific, so bnb-CPU statistics are made on the CPU.
    stats = absmax if (cuda or absmax.device.type == "cpu") else absmax.cpu()
    offset = stats.mean()
    qabsmax, absmax2 = _quantize_blockwise_8bit(stats - offset, _NESTED_BLOCKSIZE, cuda)
    qabsmax, absmax2 = qabsmax.to(W.device), absmax2.to(W.device)
    return NF4Tensor(packed, qabsmax, W.shape, W.dtype, blocksize, absmax2, dynamic_map(W.device),
                     float(offset), _NESTED_BLOCKSIZE)


# --------------------------------------------------------------------------------------------
# the container
# --------------------------------------------------------------------------------------------


class NF4Tensor:
    """An NF4-quantised weight in bitsandbytes' layout (a plain container, not a Tensor subclass).

    packed:   uint8 (ceil(N/2),) with N = prod(shape); byte i = q[2i] << 4 | q[2i+1].
    absmax:   fp32 (nblocks,) per-block max |w|, or uint8 (nblocks,) codes into ``code2`` when
              nested; nblocks = ceil(N / blocksize).
    absmax2:  fp32 (ceil(nblocks / nested_blocksize),) or None.
    code2:    fp32 (256,) dynamic map or None.
    offset:   float added back to the decoded nested absmax (0.0 when not nested).
    shape, dtype: logical shape and original dtype of the weight.

    Tensors passed in are kept as they are (flattened views, never copies), so an NF4Tensor made
    from module buffers or from a bnb ``Params4bit`` shares their storage.
    """

    def __init__(
        self,
        packed: Tensor,
        absmax: Tensor,
        shape: Sequence[int],
        dtype: torch.dtype,
        blocksize: int = 64,
        absmax2: Optional[Tensor] = None,
        code2: Optional[Tensor] = None,
        offset: float = 0.0,
        nested_blocksize: int = _NESTED_BLOCKSIZE,
    ) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.nested_blocksize = int(nested_blocksize)
        self.offset = float(offset)
        n = self.shape.numel()
        if self.blocksize <= 0 or self.nested_blocksize <= 0:
            raise ValueError(f"blocksize and nested_blocksize must be positive, got "
                             f"{self.blocksize} and {self.nested_blocksize}")
        if packed.dtype != torch.uint8:
            raise ValueError(f"packed must be uint8, got {packed.dtype}")
        self.packed = packed.view(-1)  # view: fails loudly instead of copying a strided tensor
        if self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed has {self.packed.numel()} bytes, expected {(n + 1) // 2} for shape "
                             f"{tuple(self.shape)}")
        self.absmax = absmax.view(-1)
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax has {self.absmax.numel()} entries, expected {nblocks} "
                             f"(ceil({n} / blocksize {self.blocksize}))")
        if (absmax2 is None) != (code2 is None):
            raise ValueError("absmax2 and code2 must be given together (double quantisation)")
        self.absmax2 = None if absmax2 is None else absmax2.view(-1)
        self.code2 = None if code2 is None else code2.view(-1)
        if self.absmax2 is not None:
            assert self.code2 is not None
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"nested absmax must be uint8 codes, got {self.absmax.dtype}")
            nb2 = -(-nblocks // self.nested_blocksize)
            if self.absmax2.numel() != nb2:
                raise ValueError(f"absmax2 has {self.absmax2.numel()} entries, expected {nb2}")
            if self.code2.numel() != 256:
                raise ValueError(f"code2 must have 256 entries, got {self.code2.numel()}")
        elif not self.absmax.dtype.is_floating_point:
            raise ValueError(f"absmax must be floating point when not nested, got {self.absmax.dtype}")
        devices = {t.device for t in (self.packed, self.absmax, self.absmax2, self.code2) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"NF4Tensor parts are on different devices: {sorted(map(str, devices))}")

    # ---- small accessors -------------------------------------------------------------------
    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def code(self) -> Tensor:
        """(16,) fp32 NF4 code values on this tensor's device."""
        return _cached("nf4", self.device, lambda: NF4_CODE)

    def operand(self) -> "NF4Operand":
        """This tensor as the operand the kernels take (the same tensors, no copy)."""
        from ._operand import NF4Operand

        if len(self.shape) != 2:
            raise ValueError(f"an NF4 base weight must be 2-D (out_features, in_features), got shape "
                             f"{tuple(self.shape)}")
        return NF4Operand(self.packed, self.absmax, self.absmax2, self.code2, float(self.offset), self.blocksize,
                          self.nested_blocksize, (int(self.shape[0]), int(self.shape[1])), self.code)

    def numel(self) -> int:
        return self.shape.numel()

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"nested={self.nested}, device={self.device})")

    # ---- decoding ----------------------------------------------------------------------------
    def absmax_fp32(self) -> Tensor:
        """(nblocks,) fp32 per-block scales as bnb decodes them: for nested statistics
        ``code2[absmax] * absmax2[b // nested_blocksize]`` then ``+ offset`` (two fp32 roundings)."""
        if not self.nested:
            return self.absmax.to(torch.float32)
        assert self.absmax2 is not None and self.code2 is not None
        nb = self.absmax.numel()
        vals = _blocks(self.code2.to(torch.float32)[self.absmax.long()], self.nested_blocksize)
        scaled = _ftz_product((vals * self.absmax2.to(torch.float32).unsqueeze(1)).view(-1)[:nb])
        return scaled + self.offset  # a separate op: bnb adds the offset after dequantising

    @torch.no_grad()
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Dense tensor of ``self.shape`` in ``dtype`` (default: the original dtype), equal to
        ``bitsandbytes.functional.dequantize_4bit``: fp32 ``code[q] * absmax``, rounded once."""
        n = self.numel()
        q = torch.stack((self.packed >> 4, self.packed & 15), dim=1).view(-1)[:n]
        vals = _blocks(self.code[q.long()], self.blocksize)
        out = _ftz_product((vals * self.absmax_fp32().unsqueeze(1)).view(-1)[:n])
        return out.to(dtype or self.dtype).view(self.shape)

    # ---- movement / interop ------------------------------------------------------------------
    def to(self, device: Union[str, torch.device]) -> "NF4Tensor":
        """A copy on ``device`` (or ``self`` if already there)."""
        device = torch.device(device)

        def mv(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device)

        return NF4Tensor(mv(self.packed), mv(self.absmax), self.shape, self.dtype, self.blocksize,
                         mv(self.absmax2), mv(self.code2), self.offset, self.nested_blocksize)

    def state_tensors(self) -> Dict[str, Tensor]:
        """The tensors to store as module buffers: packed, absmax (+ absmax2, code2 if nested)."""
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.nested:
            assert self.absmax2 is not None and self.code2 is not None
            out["absmax2"] = self.absmax2
            out["code2"] = self.code2
        return out

    @classmethod
    def from_bnb(cls, p) -> "NF4Tensor":
        """Wrap a quantised ``bnb.nn.Params4bit`` (e.g. ``Linear4bit.weight``) or a
        ``(packed, QuantState)`` pair without copying or re-quantising: the result shares the
        packed bytes, absmax, absmax2 and code2 tensors."""
        if isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise ValueError("from_bnb expects a Params4bit or a (packed, QuantState) pair")
            packed, qs = p
        else:
            qs = getattr(p, "quant_state", None)
            if not isinstance(p, torch.Tensor) or not hasattr(p, "bnb_quantized"):
                raise ValueError(f"from_bnb expects a bitsandbytes Params4bit or a (packed, QuantState) pair, "
                                 f"got {type(p).__name__}")
            if not p.bnb_quantized or qs is None:
                raise ValueError("the Params4bit is not quantised yet (bitsandbytes quantises on .to(device) / "
                                 ".cuda(); call that first)")
            packed = p.data
        if qs is None or not hasattr(qs, "quant_type"):
            raise ValueError("from_bnb: missing bitsandbytes QuantState (the weight is not quantised yet)")
        if qs.quant_type != "nf4":
            raise ValueError(f"from_bnb supports quant_type='nf4' only, got {qs.quant_type!r} "
                             f"(fp4 uses a different code book)")
        if getattr(qs, "packing_format_for_cpu", False):
            # bitsandbytes repacked it for its AVX512 CPU kernel (first CPU inference forward):
            # back to the standard layout, as bitsandbytes itself does before saving or moving it
            # (a Params4bit in place; a (packed, QuantState) pair is left as it is)
            if isinstance(p, (tuple, list)):
                packed, qs = unpack_bnb_cpu_layout(packed, qs)
            else:
                restore_bnb_layout(p)
                packed, qs = p.data, p.quant_state
        if qs.shape is None or qs.dtype is None or qs.blocksize is None:
            raise ValueError("from_bnb: QuantState lacks shape/dtype/blocksize")
        if qs.code is not None and (qs.code.numel() != 16 or not torch.equal(
                qs.code.detach().to("cpu", torch.float32), NF4_CODE)):
            raise ValueError("from_bnb: the QuantState's code is not the standard NF4 code book")
        if packed.dtype != torch.uint8:  # quant_storage other than uint8 holds the same bytes
            packed = packed.reshape(-1).view(torch.uint8)
        n = torch.Size(qs.shape).numel()
        packed = packed.reshape(-1)[: (n + 1) // 2]
        if qs.nested:
            s2 = qs.state2
            offset = float(qs.offset) if isinstance(qs.offset, (int, float)) else float(qs.offset.item())
            return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, s2.absmax, s2.code, offset,
                       s2.blocksize)
        return cls(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize)

    def to_bnb(self):
        """A ``bitsandbytes.nn.Params4bit`` (data ``(ceil(N/2), 1)`` uint8) with the QuantState bnb
        would have made; shares this tensor's storage."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
            offset = torch.tensor(self.offset, dtype=torch.float32, device=self.device)
        qs = QuantState(absmax=self.absmax, shape=self.shape, code=self.code.clone(), blocksize=self.blocksize,
                        quant_type="nf4", dtype=self.dtype, offset=offset, state2=state2)
        return bnb.nn.Params4bit(self.packed.view(-1, 1), requires_grad=False, quant_state=qs,
                                 blocksize=self.blocksize, compress_statistics=self.nested, quant_type="nf4",
                                 quant_storage=torch.uint8, bnb_quantized=True)
