"""Triton kernels for the causal-LM cross entropy over the vocabulary (Hugging Face's
``ForCausalLMLoss`` without its fp32 copy of the logits).

    forward   m = max_v x_v, log_s = log Σ_v exp(x_v − m)  (online over vocabulary chunks, fp32;
              stored per row as (m, log_s): their sum would round log_s away for large |m|)
              loss_row = (m − x_target) + log_s  (0 where target == ignore_index,
                                          NaN where the target is outside [0, V))      ``ce_fwd_kernel``
    backward  dx_v = g · (exp((x_v − m) − log_s) − [v == target])  (0 on ignored rows), rounded once to
              the logits' dtype; ``g`` = d(loss)/d(Σ loss_row), read from device memory ``ce_bwd_kernel``

The logits are read in their own dtype (bf16 upcasts exactly) and the math is fp32, as Hugging
Face's ``logits.float()`` then ``cross_entropy``; it never writes an fp32 (M, V) tensor.
Launchers: ``lora_fast/norm_mlp.py``.
"""
import triton
import triton.language as tl

from .common import round_to

# one row per program, the vocabulary in chunks (Llama-3's 128256 columns: 32 chunks); fixed,
# listed for bench.compile_check
CE_BLOCK = 4096
CE_WARPS = 8
CE_CONFIGS = [triton.Config({"BLOCK_V": CE_BLOCK}, num_warps=CE_WARPS, num_stages=1)]


@triton.jit
def ce_fwd_kernel(x_ptr, target_ptr, loss_ptr, lse_ptr, V, stride_x, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_vec, x)
        # lanes that have seen only -inf (masked vocabulary, the tail) subtract 0, not -inf:
        # exp(-inf - -inf) would be NaN; they keep s = 0
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_vec = s_vec * tl.exp(m_vec - m_sub) + tl.exp(x - m_sub)
        m_vec = m_new
    m = tl.max(m_vec, axis=0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(s_vec * tl.exp(m_vec - m_sub), axis=0)
    # m and log(s) stay apart (as log_softmax's x - m - log s): m + log(s) would round log(s)
    # away when |m| is large (1e6 and up), shifting the loss and every gradient entry
    log_s = tl.log(s)
    t = tl.load(target_ptr + row)
    valid = t != ignore_index
    inside = (t >= 0) & (t < V)
    xt = tl.load(x_row + t, mask=valid & inside, other=0.0).to(tl.float32)
    loss = tl.where(valid, tl.where(inside, (m_sub - xt) + log_s, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + 2 * row, m_sub)
    tl.store(lse_ptr + 2 * row + 1, log_s)


@triton.jit
def ce_bwd_kernel(x_ptr, target_ptr, lse_ptr, g_ptr, dx_ptr, V, stride_x, stride_dx, ignore_index,
                  BLOCK_V: tl.constexpr, EMULATE_RNE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(target_ptr + row)
    g = tl.where(t != ignore_index, tl.load(g_ptr), 0.0)
    m = tl.load(lse_ptr + 2 * row)
    log_s = tl.load(lse_ptr + 2 * row + 1)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
        d = tl.exp((x - m) - log_s) - tl.where(c == t, 1.0, 0.0)
        tl.store(dx_row + c, round_to(d * g, dx_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
