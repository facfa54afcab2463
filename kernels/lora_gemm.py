"""Triton GEMM with a LoRA epilogue (dense or NF4 frozen weight).

Computes, with fp32 accumulation::

    C[M, N] = A[M, K] @ Wop[K, N]  +  scaling * (P[M, R] @ Q[R, N]) * Dmask[M, N]  +  bias[N]

Here ``N`` is the output width (``Nout``) and ``K`` the reduction length (``Kred``).  The
same kernel serves the forward of a frozen-base LoRA layer (``A = X``, ``Wop = W0^T``,
``P = X@A_lora``, ``Q = B_lora^T``) and its backward dX (``A = dY``, ``Wop = W0``,
``P = dY@B_lora``, ``Q = A_lora``, dropout mask regenerated over the output coordinates).

Weight operand ``Wop[k, n]`` is addressed as ``w_ptr + k*stride_wk + n*stride_wn``:

* dense (``W_NF4=False``): ``w_ptr`` is the stored weight (any float dtype, any strides);
  the tile is cast to the activation dtype before ``tl.dot``.
* NF4 (``W_NF4=True``): ``w_ptr`` is the packed uint8 buffer (bitsandbytes layout) and
  ``k*stride_wk + n*stride_wn`` is the FLAT index ``row*Kw + col`` of the logical stored
  weight (Nw, Kw) -- i.e. ``(stride_wk, stride_wn) = (1, Kw)`` for the forward
  (``Wop = W^T``) and ``(Kw, 1)`` for the backward (``Wop = W``).  The tile is dequantised
  to fp32 inside the main loop with ``common.nf4_dequant_flat`` then cast to the
  activation dtype.

Dropout (``HAS_DROPOUT``) multiplies ONLY the LoRA term by
``common.dropout_keep_scale(seed, m*N + n, dropout_p, inv_keep)`` (int32 flat index over
the (M, N) output).  The LoRA term is computed first (R loop, chunks of ``BLOCK_R``), scaled
and masked in fp32, and the main K loop then accumulates into the same register
accumulator, so a single (BLOCK_M, BLOCK_N) fp32 accumulator is live.

Full signature of :func:`lora_gemm_kernel` (all pointer arguments must be valid tensors;
unused ones may alias any tensor)::

    lora_gemm_kernel(
        a_ptr,                      # (M, K) activations, fp16/bf16/fp32; defines dot dtype
        w_ptr,                      # dense weight or NF4 packed uint8 (see above)
        absmax_ptr,                 # NF4: fp32 absmax, or uint8 codes when NESTED
        absmax2_ptr, code2_ptr,     # NF4 NESTED: fp32 second-level absmax and 256-entry code
        code_ptr,                   # NF4: 16 fp32 code values
        p_ptr, q_ptr,               # LoRA factors (M, R) and (R, N), any float dtype
        bias_ptr,                   # (N,) any float dtype, element n at n*stride_bias
        c_ptr,                      # (M, N) output; values cast to its dtype
        M, N, K, R,                 # R ignored unless HAS_LORA
        stride_am, stride_ak, stride_wk, stride_wn,
        stride_pm, stride_pr, stride_qr, stride_qn,
        stride_bias, stride_cm, stride_cn,
        nf4_offset,                 # fp32 offset added to the nested absmax
        blocksize, nested_blocksize,
        scaling, dropout_p, inv_keep,   # fp32
        seed,                       # int, philox seed of tl.rand
        M_BUCKET,                   # next power of two >= M: autotune key only (unused)
        W_NF4, NESTED, HAS_LORA, HAS_BIAS, HAS_DROPOUT, DOT_IEEE,   # tl.constexpr flags
        EVEN_K, BLOCK_R,            # tl.constexpr, set by HEURISTICS below
        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,   # tl.constexpr, from CONFIGS / autotune
    )
    grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),)

``DOT_IEEE`` selects ``input_precision="ieee"`` for fp32 activations (exact fp32 FMA
products instead of TF32); ``input_precision`` exists in tl.dot since triton 3.0.

Exposed objects:

* ``HEURISTICS``: ``{"BLOCK_R": 16, "EVEN_K": K % BLOCK_K == 0}`` as functions of the args.
* ``lora_gemm_kernel``: the raw ``@triton.jit`` function (what a compile checker compiles;
  it must supply EVEN_K / BLOCK_R itself, see ``HEURISTICS``).
* ``lora_gemm_kernel_heur``: ``triton.heuristics(HEURISTICS)(lora_gemm_kernel)``; launch it
  with explicit BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M (+ num_warps/num_stages) -- used under
  ``TRITON_INTERPRET=1`` with ``INTERPRETER_META``.
* ``lora_gemm_kernel_tuned``: ``triton.autotune(CONFIGS, key=AUTOTUNE_KEY,
  prune_configs_by={"early_config_prune": prune_configs})`` over ``lora_gemm_kernel_heur``.
* ``CONFIGS`` (= ``DENSE_CONFIGS + NF4_CONFIGS``; the prune step offers each weight kind
  only its own list), ``AUTOTUNE_KEY``, ``INTERPRETER_META``, ``estimate_smem(...)``,
  ``prune_configs``, ``smem_limit(device)``.  The autotuner also keys on every tensor argument's dtype.

NF4 note: the fp32 gathers inside ``nf4_dequant_flat`` (16-entry code, absmax / code2 /
absmax2) are software-pipelined by Triton through shared memory like the A tile, which is
why the NF4 configs use fewer stages (see ``estimate_smem``).

Index arithmetic: row offsets of A/P/C use int64 (M*N may exceed 2**31, e.g. an lm_head);
column offsets, weight offsets / NF4 flat indices and the dropout flat index are int32
(the launcher checks the weight and Q spans stay below 2**31; the dropout index is int32
by definition so that every kernel draws the same philox stream).
"""
import triton
import triton.language as tl

from .common import configs_in, dropout_keep_scale, nf4_dequant_flat, tune_pick


@triton.jit(do_not_specialize=["seed", "M_BUCKET"])
def lora_gemm_kernel(
    a_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr,
    p_ptr, q_ptr, bias_ptr, c_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wk, stride_wn,
    stride_pm, stride_pr, stride_qr, stride_qn,
    stride_bias, stride_cm, stride_cn,
    nf4_offset, blocksize, nested_blocksize,
    scaling, dropout_p, inv_keep,
    seed,
    M_BUCKET,
    W_NF4: tl.constexpr, NESTED: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # ---- grouped (swizzled) program order for L2 reuse of the weight tiles ----
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_group = pid % num_pid_in_group
    pid_m = first_pid_m + (pid_in_group % group_size_m)
    pid_n = pid_in_group // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrapped indices: every load in M / N is in bounds, only the store is masked
    rm = (offs_m % M).to(tl.int64)
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)

    act_dtype = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # ---- LoRA term first: acc = scaling * (P @ Q) [* keep/(1-p)] ----
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        p_ptrs = p_ptr + rm[:, None] * stride_pm + offs_r[None, :] * stride_pr
        q_ptrs = q_ptr + offs_r[:, None] * stride_qr + rn[None, :] * stride_qn
        for rr in range(0, tl.cdiv(R, BLOCK_R)):
            r_ok = offs_r < R - rr * BLOCK_R
            pt = tl.load(p_ptrs, mask=r_ok[None, :], other=0.0).to(act_dtype)
            qt = tl.load(q_ptrs, mask=r_ok[:, None], other=0.0).to(act_dtype)
            if DOT_IEEE:
                acc = tl.dot(pt, qt, acc, input_precision="ieee")
            else:
                acc = tl.dot(pt, qt, acc)
            p_ptrs += BLOCK_R * stride_pr
            q_ptrs += BLOCK_R * stride_qr
        acc = acc * scaling
        if HAS_DROPOUT:
            flat_mn = offs_m[:, None] * N + offs_n[None, :]
            acc = acc * dropout_keep_scale(seed, flat_mn, dropout_p, inv_keep)

    # ---- main loop: acc += A @ Wop ----
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    if not W_NF4:
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k_rem = K - kk * BLOCK_K
        if EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_rem, other=0.0)
        if W_NF4:
            kidx = kk * BLOCK_K + offs_k
            flat = kidx[:, None] * stride_wk + rn[None, :] * stride_wn
            if EVEN_K:
                wmask = tl.full((BLOCK_K, BLOCK_N), 1, tl.int1)
            else:
                wmask = (offs_k[:, None] < k_rem) & (rn[None, :] >= 0)
            b = nf4_dequant_flat(
                w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, nf4_offset,
                flat, wmask, blocksize, nested_blocksize, NESTED,
            ).to(act_dtype)
        else:
            if EVEN_K:
                b = tl.load(w_ptrs).to(act_dtype)
            else:
                b = tl.load(w_ptrs, mask=offs_k[:, None] < k_rem, other=0.0).to(act_dtype)
            w_ptrs += BLOCK_K * stride_wk
        if DOT_IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias).to(tl.float32)[None, :]

    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# --------------------------------------------------------------------------------------
# heuristics / autotune configuration
# --------------------------------------------------------------------------------------

def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _block_r(args):
    """R chunk of the epilogue loop: 16 for every R (1..256+).

    Measured with triton 3.9 ``triton.compile`` for sm_80/sm_90: a 16-wide chunk keeps the
    LoRA loop's shared memory within the main loop's allocation, while 32/64-wide chunks
    add up to ~48 KB on top of it (the two loops' buffers are not shared).  The LoRA
    product is only R/K of the work, so the narrower MMA costs nothing measurable.
    """
    return 16


def _even_k(args):
    return int(args["K"]) % int(args["BLOCK_K"]) == 0


HEURISTICS = {"BLOCK_R": _block_r, "EVEN_K": _even_k}


def _cfg(bm, bn, bk, stages, warps, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
        num_warps=warps, num_stages=stages,
    )


# Every list below compiles without register spills (no stack frame) for sm_80, sm_86 and sm_90
# with the LoRA epilogue, bias and dropout on (``python -m bench.compile_check``) under both
# triton 3.9 (CPU/CI) and triton 3.6 (the GPU image; ``.ci/run`` checks both).
# The epilogue's second accumulator and the regenerated dropout mask cost registers, so tiles
# stay at <= 32 fp32 accumulators per thread: 128x128 with 8 or 16 warps spills 56-940 bytes,
# 64x256 with 8 warps (clean under 3.9) spills 40-944 bytes under 3.6, 128x256 kilobytes.  The prune step drops whatever does not fit the
# current device's shared memory (RTX 3060 / sm_86: 99 KB, A100: 163 KB, H100: 227 KB) and
# offers the dense list for dense weights, the NF4 list for NF4 weights and the FP32 list for
# fp32 activations (FMA dots: small tiles and BLOCK_K=16).
DENSE_CONFIGS = [
    _cfg(64, 128, 64, 3, 8),
    _cfg(128, 64, 64, 3, 8),
    _cfg(64, 128, 32, 3, 8),
    _cfg(128, 64, 32, 3, 8),
    _cfg(64, 64, 64, 3, 4),
    _cfg(32, 128, 64, 4, 8),    # small M (decode / tiny batches)
    _cfg(32, 64, 64, 4, 4),     # small M
]

# NF4: the code / absmax gathers of ``nf4_dequant_flat`` are fp32 loads that Triton's
# software pipeliner stages through shared memory like the A tile (12 B per weight element
# per stage when nested, 8 B when not), so these use fewer stages.
NF4_CONFIGS = [
    _cfg(64, 128, 32, 4, 8),
    _cfg(128, 64, 32, 4, 8),
    _cfg(64, 128, 32, 2, 8),
    _cfg(128, 64, 32, 2, 8),
    _cfg(64, 64, 32, 3, 4),
    _cfg(32, 128, 32, 2, 8),    # small M
    _cfg(32, 64, 32, 3, 4),     # small M
]

# fp32 activations (``DOT_IEEE``), dense or NF4.
FP32_CONFIGS = [
    _cfg(64, 64, 16, 3, 8),
    _cfg(64, 32, 16, 3, 4),
    _cfg(32, 64, 16, 3, 8),
]

# Every autotune config (dense, NF4, fp32; no config appears in two lists, so a config's key
# names one list); what a compile checker iterates over.
CONFIGS = DENSE_CONFIGS + NF4_CONFIGS + FP32_CONFIGS

AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "R", "W_NF4", "NESTED", "HAS_LORA", "HAS_BIAS", "HAS_DROPOUT"]

# Single fixed config used under TRITON_INTERPRET=1 (autotuning in the interpreter is far
# too slow).  Small blocks so that the tests' small shapes exercise tails and grouping.
INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def estimate_smem(block_m, block_n, block_k, num_stages, act_bytes, w_nf4, nested=True, cc_major=None):
    """Estimate (bytes) of the shared memory one program allocates.

    Calibrated on triton 3.9 ``triton.compile`` output for sm_80/86/90, and an upper bound of
    it and of triton 3.6's for every config in ``CONFIGS`` (fp16/bf16/fp32, dense/NF4; exact for
    most, up to ~25% over for the NF4 gathers' buffers):

    * wgmma (sm_90+, 16-bit activations, BLOCK_M >= 64) keeps ``num_stages`` buffers of the
      A tile (and of the dense W tile); mma.sync (sm_80/86, fp32-ieee, BLOCK_M < 64) keeps
      ``num_stages - 1`` (cp.async prefetch).  ``cc_major=None`` (unknown device) assumes
      ``num_stages`` buffers everywhere: a safe upper bound.
    * dense: buffers * (A tile + W tile).
    * NF4: A buffers * A tile + (num_stages - 1) * ``BLOCK_K*BLOCK_N*g`` bytes of staged
      gathers with ``g = 12`` (nested: fp32 code, code2 and absmax2) or ``8`` (plain: fp32
      code and absmax), plus one dequantised W tile staged for the MMA operand.

    The LoRA loop (BLOCK_R = 16) and the output layout conversion fit inside this.  If the
    estimate is ever short (another triton version), the autotuner skips a config that
    raises OutOfResources.
    """
    a_tile = block_m * block_k * act_bytes
    w_tile = block_k * block_n * act_bytes
    if cc_major is None:
        bufs = gather_bufs = num_stages
    else:
        wgmma = cc_major >= 9 and act_bytes == 2 and block_m >= 64
        gather_bufs = max(1, num_stages - 1)
        bufs = num_stages if wgmma else gather_bufs
    if w_nf4:
        g = 12 if nested else 8
        return bufs * a_tile + gather_bufs * block_k * block_n * g + w_tile
    return bufs * (a_tile + w_tile)


_DEVICE_INFO = {}


def _device_info(device):
    """(opt-in shared memory per block, compute-capability major) of ``device``; queried
    lazily at the first launch, cached.  Unknown -> (99 KB, None)."""
    idx = device.index if getattr(device, "index", None) is not None else 0
    info = _DEVICE_INFO.get(idx)
    if info is None:
        lim, major = 0, None
        try:
            from triton.runtime import driver

            lim = int(driver.active.utils.get_device_properties(idx)["max_shared_mem"])
        except Exception:
            try:
                import torch

                lim = int(torch.cuda.get_device_properties(idx).shared_memory_per_block_optin)
            except Exception:
                lim = 0
        try:
            import torch

            major = int(torch.cuda.get_device_capability(idx)[0])
        except Exception:
            major = None
        if lim <= 0:
            lim = 99 * 1024  # smallest of the supported targets (sm_86)
        info = (lim, major)
        _DEVICE_INFO[idx] = info
    return info


def smem_limit(device):
    return _device_info(device)[0]


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune``: keep the dense, NF4 or fp32 list, drop configs that exceed the
    device's shared memory or are a poor fit for the (bucketed) M.  Never returns []."""
    args = {**named_args, **kwargs}
    a = args["a_ptr"]
    act_bytes = a.element_size()
    w_nf4 = bool(args.get("W_NF4", False))
    nested = bool(args.get("NESTED", True))
    limit, major = _device_info(a.device)
    m_bucket = int(args.get("M_BUCKET", 1 << 30))

    own = FP32_CONFIGS if act_bytes == 4 else (NF4_CONFIGS if w_nf4 else DENSE_CONFIGS)
    family = configs_in(configs, own)
    family = family or list(configs)

    def smem(c):
        kw = c.kwargs
        return estimate_smem(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, act_bytes, w_nf4,
                             nested, major)

    fitting = [c for c in family if smem(c) <= limit]
    if not fitting:
        return [min(family, key=smem)]
    if m_bucket <= 64:
        keep = [c for c in fitting if c.kwargs["BLOCK_M"] <= 64]
    elif m_bucket >= 512:
        keep = [c for c in fitting if c.kwargs["BLOCK_M"] >= 64]
    else:
        keep = fitting
    return tune_pick(keep or fitting)


lora_gemm_kernel_heur = triton.heuristics(HEURISTICS)(lora_gemm_kernel)

lora_gemm_kernel_tuned = triton.autotune(
    configs=CONFIGS,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
)(lora_gemm_kernel_heur)
