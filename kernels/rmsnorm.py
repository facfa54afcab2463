"""Triton kernels for the RMSNorm of Llama-family decoders (``LlamaRMSNorm`` and its copies).

    forward   y = w · round_in(x · rstd),  rstd = rsqrt(mean(x²) + eps)     ``rmsnorm_fwd_kernel``
    backward  g = dy · w,  dx = rstd · (g − x̂ · mean(g · x̂)),  x̂ = x · rstd  ``rmsnorm_bwd_kernel``
              dw = Σ_rows dy · round_in(x̂)   (partials per program, summed by the launcher)

The rounding points are Hugging Face's: x̂ is computed in fp32 and rounded to the input dtype
(``hidden_states.to(input_dtype)``), then multiplied by the weight in fp32 and rounded to the
output dtype (the promotion of weight and input dtypes).  The backward works in fp32 and
rounds dx once.  One program per row (``ROWS`` rows with the dW reduction); rows wider than
``BLOCK_N`` are streamed in chunks (``SINGLE = False``).  Launchers: ``lora_fast/norm_mlp.py``.
"""
import triton
import triton.language as tl

from .common import round_to

# The only configs the launchers use (no autotuning: one row per program, its width decides),
# listed as configs so that ``bench.compile_check`` compiles each for sm_80/86/90.  A row stays
# in registers up to 16384 columns forward; backward holds x, dy, w (and the dW partial) per
# element, and ptxas spilled above 8192 columns (4096 with dW) at 16 warps (compile check), so
# wider rows are streamed in chunks (``SINGLE = False``: two passes over the row, the second
# from L1/L2).
_SINGLE_WARPS = {128: 1, 256: 1, 512: 2, 1024: 4, 2048: 4, 4096: 8, 8192: 16, 16384: 16}
MAX_SINGLE_FWD, MAX_SINGLE_BWD, MAX_SINGLE_BWD_DW = 16384, 8192, 4096
CHUNK_FWD, CHUNK_BWD = (8192, 16), (4096, 8)


def _cfg(block, single, warps):
    return triton.Config({"BLOCK_N": block, "SINGLE": single}, num_warps=warps, num_stages=1)


NORM_FWD_CONFIGS = [_cfg(b, True, w) for b, w in _SINGLE_WARPS.items()] + [_cfg(*CHUNK_FWD[:1], False, CHUNK_FWD[1])]
NORM_BWD_CONFIGS = ([_cfg(b, True, w) for b, w in _SINGLE_WARPS.items() if b <= MAX_SINGLE_BWD]
                    + [_cfg(CHUNK_BWD[0], False, CHUNK_BWD[1])])


def norm_config(n: int, backward: bool = False, has_dw: bool = False):
    """The config (``BLOCK_N``, ``SINGLE``, num_warps) for rows of ``n`` columns."""
    limit = (MAX_SINGLE_BWD_DW if has_dw else MAX_SINGLE_BWD) if backward else MAX_SINGLE_FWD
    if n <= limit:
        block = max(128, triton.next_power_of_2(n))
        return _cfg(block, True, _SINGLE_WARPS[block])
    block, warps = CHUNK_BWD if backward else CHUNK_FWD
    return _cfg(block, False, warps)


def prune_norm_bwd(configs, named_args, **kwargs):
    """The backward configs a launch with these flags can use (compile check: the dW variants
    never take single rows wider than ``MAX_SINGLE_BWD_DW``)."""
    has_dw = kwargs.get("HAS_DW", named_args.get("HAS_DW", False))
    return [c for c in configs if not (has_dw and c.kwargs["SINGLE"] and c.kwargs["BLOCK_N"] > MAX_SINGLE_BWD_DW)]


@triton.jit
def _row_sumsq(x_row, N, BLOCK_N: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        xv = tl.load(x_row + c, mask=c < N, other=0.0).to(tl.float32)
        acc += xv * xv
    return tl.sum(acc, axis=0)


@triton.jit
def rmsnorm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    N, stride_x, stride_y, eps,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    y_row = y_ptr + row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = cols < N
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        xhat = round_to(x * rstd, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, round_to(w * xhat, y_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
    else:
        rstd = tl.math.rsqrt(_row_sumsq(x_row, N, BLOCK_N) / N + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = c < N
            x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
            xhat = round_to(x * rstd, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, round_to(w * xhat, y_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bwd_chunk(x_ptr, dy_ptr, w_ptr, row, stride_x, stride_dy, c, m):
    """x, dy and w of one column chunk of a row, in fp32 (both passes of the chunked backward)."""
    x = tl.load(x_ptr + row * stride_x + c, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    return x, dy, w


@triton.jit
def rmsnorm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    M, N, stride_dy, stride_x, stride_dx, ROWS,
    BLOCK_N: tl.constexpr, SINGLE: tl.constexpr, HAS_DW: tl.constexpr, EMULATE_RNE: tl.constexpr,
):
    """Rows ``[pid·ROWS, pid·ROWS + ROWS)``; with ``HAS_DW`` this program's fp32 partial of dW
    goes to row ``pid`` of ``dw_ptr`` (P, N)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    row0 = pid.to(tl.int64) * ROWS
    if SINGLE:
        mask = cols < N
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, ROWS):
            row = row0 + i
            if row < M:
                rstd = tl.load(rstd_ptr + row)
                x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                g = dy * w
                c = tl.sum(g * xhat, axis=0) / N
                dx = rstd * (g - xhat * c)
                tl.store(dx_ptr + row * stride_dx + cols, round_to(dx, dx_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
                if HAS_DW:
                    dw_acc += dy * round_to(xhat, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
        if HAS_DW:
            tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
    else:
        for i in range(0, ROWS):
            row = row0 + i
            if row < M:
                rstd = tl.load(rstd_ptr + row)
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    m = c < N
                    x, dy, w = _bwd_chunk(x_ptr, dy_ptr, w_ptr, row, stride_x, stride_dy, c, m)
                    acc += dy * w * x
                mean_gx = tl.sum(acc, axis=0) * rstd / N
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    m = c < N
                    x, dy, w = _bwd_chunk(x_ptr, dy_ptr, w_ptr, row, stride_x, stride_dy, c, m)
                    xhat = x * rstd
                    dx = rstd * (dy * w - xhat * mean_gx)
                    tl.store(dx_ptr + row * stride_dx + c, round_to(dx, dx_ptr.dtype.element_ty, EMULATE_RNE), mask=m)
                    if HAS_DW:
                        # this program owns row pid of the partials: read-modify-write is race-free
                        part = dw_ptr + pid.to(tl.int64) * N + c
                        prev = tl.load(part, mask=m, other=0.0)
                        tl.store(part, prev + dy * round_to(xhat, x_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32), mask=m)
