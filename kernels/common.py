"""Device helpers shared by the lora_fast Triton kernels.

NF4 layout (bitsandbytes): a weight of logical shape (N, K) is flattened row-major; element
``f = n*K + k`` lives in byte ``f // 2`` of the packed uint8 buffer, in the HIGH nibble when
``f`` is even and the LOW nibble when it is odd.  Its scale is ``absmax[f // blocksize]``.
With double quantisation (``NESTED``) the absmax is itself a uint8 code:
``absmax_fp32[b] = code2[absmax_q[b]] * absmax2[b // nested_blocksize] + offset``.
The dequantised value is ``nf4_code[nibble] * absmax_fp32`` computed in fp32.

Dropout: element ``(m, k)`` of an (M, K) activation is kept when
``tl.rand(seed, m*K + k) >= p``; kept values are scaled by ``1/(1-p)``.  Every kernel that
needs the mask regenerates it with this one function, so forward and backward agree and no
mask is stored.
"""
import os

import triton
import triton.language as tl


def autotune_enabled() -> bool:
    """``LORA_FAST_AUTOTUNE=0`` makes every kernel run the first config its prune keeps instead of
    benchmarking all of them (read at each new autotune key, not at import).  The GPU test run
    uses it: parity does not depend on the config, and benchmarking every config of every kernel
    for every test shape costs minutes of compilation.  Default: autotune."""
    return os.environ.get("LORA_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "off", "false", "no")


def configs_in(configs, members, keep=True):
    """The entries of ``configs`` that are (``keep``) or are not (``keep=False``) one of the
    config objects in ``members`` (identity: equal configs may stand in two lists)."""
    return [c for c in configs if any(c is m for m in members) == keep]


def elsize(t, default=2):
    """Element size in bytes of a launch argument seen by a prune function (``default`` when it
    is not a tensor, e.g. the compile check's stand-ins without one)."""
    try:
        return t.element_size()
    except AttributeError:
        return default


def tune_pick(configs):
    """What an ``early_config_prune`` returns: all ``configs``, or only the first when
    autotuning is off (see :func:`autotune_enabled`)."""
    configs = list(configs)
    return configs if autotune_enabled() or len(configs) <= 1 else configs[:1]


@triton.jit
def nf4_dequant_flat(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, offset,
    flat, mask, blocksize, nested_blocksize,
    NESTED: tl.constexpr,
):
    """Dequantise the NF4 elements at flat indices ``flat`` (any shape) to fp32."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    nib = tl.where((flat & 1) == 0, byte >> 4, byte & 15)
    val = tl.load(code_ptr + nib, mask=mask, other=0.0)
    blk = flat // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
            absmax2_ptr + blk // nested_blocksize, mask=mask, other=0.0
        ) + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return val * scale


@triton.jit
def dropout_keep_scale(seed, flat, p, inv_keep):
    """``1/(1-p)`` where element ``flat`` is kept, 0 where dropped (fp32)."""
    r = tl.rand(seed, flat)
    return tl.where(r >= p, inv_keep, 0.0)


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (round to nearest even).  ``EMULATE_RNE`` (the launchers
    set it under ``TRITON_INTERPRET=1``): the interpreter truncates fp32 -> bf16 casts (measured,
    triton 3.9: 487 of 1000 random values off by one ulp), so bf16 is rounded with integer ops
    first and the cast is then exact; on a GPU the cast itself rounds to nearest even."""
    if EMULATE_RNE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        r = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        return r.to(dtype)
    return x.to(dtype)
