"""KVCompose's task attention on a GPU: two fused Triton kernels, no (queries x keys) block in memory.

Per query head h and context key j the score is max_i or sum_i of exp(l_ij - lse_i) over the task
queries i, where l_ij = scale * q_i . k_j (soft-capped for Gemma 2) and lse_i is the log-sum-exp of
query i's logits over the keys it sees. As in flash attention (Dao et al., 2022; Triton's
fused-attention tutorial), each program keeps one block in registers and walks the other axis:

- ``_lse_kernel``: a block of queries walks the key blocks with a running max and sum (online
  softmax), giving lse_i. Causal: query i sees keys j <= offset + i, and key blocks past the block's
  last query are skipped.
- ``_score_kernel``: a block of context keys walks the query blocks, keeping each key's running max
  of log-weights (or sum of weights). The reduction is turned around, so every program owns its
  outputs (no atomics), and each key block is read once.

GQA: query head h reads KV head h // groups, so the cache is never repeated. Products accumulate in
float32 (bfloat16 inputs multiply exactly in float32; float32 inputs use IEEE, not TF32), so the
result equals the reference scorer (``service.engine.presses.scoring``) up to summation order.

This module imports Triton; ``scoring`` imports it only where it is used (``available``), so CPU
machines without Triton use the reference scorer. Tests run the kernels on the CPU with Triton's
interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from service.engine.triton_ops import dot, dot_options, pow2

BLOCK_Q = 32
BLOCK_K = 64


def log_sum_exp(query: torch.Tensor, keys: torch.Tensor, scale: float, causal: bool,
                softcap: float | None = None) -> torch.Tensor:
    """(heads, T) float32 log-sum-exp of each query's logits over the keys it sees (causal: the T
    queries are the last T keys). query: (heads, T, d); keys: (kv_heads, K, d)."""
    heads, t_len, dim = query.shape
    kv_heads, k_len, _ = keys.shape
    query, keys = _rows(query), _rows(keys)
    lse = torch.empty(heads, t_len, device=query.device, dtype=torch.float32)
    _lse_kernel[(triton.cdiv(t_len, BLOCK_Q), heads)](
        query, keys, lse, t_len, k_len, k_len - t_len, heads // kv_heads, scale, softcap or 1.0,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), CAUSAL=causal, BLOCK_Q=BLOCK_Q,
        BLOCK_K=BLOCK_K, **_constants(query, softcap))
    return lse


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any head and row strides, but contiguous vectors."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _constants(query: torch.Tensor, softcap: float | None) -> dict:
    dim = query.shape[-1]
    return {"HEAD_DIM": dim, "D": max(16, pow2(dim)), "SOFTCAP": bool(softcap), **dot_options(query.dtype)}


def task_attention(query: torch.Tensor, keys: torch.Tensor, n_context: int, scale: float, how: str, *,
                   lse: torch.Tensor | None = None, causal: bool = True, lse_keys: int | None = None,
                   softcap: float | None = None) -> torch.Tensor:
    """One pass of task queries folded over the first ``n_context`` keys: (heads, n_context) float32.

    query: (heads, T, d), post-RoPE; keys: (kv_heads, K, d). lse: (heads, T) float32, or None to
    compute it here over the first ``lse_keys`` keys (default all K), causally (query i sees keys
    j <= lse_keys - T + i) or not. how="max" gives max_i (l_ij - lse_i) (log-space, as
    ``TaskAttention`` keeps it); "mean" gives sum_i exp(l_ij - lse_i).
    """
    heads, t_len, dim = query.shape
    kv_heads, k_len, _ = keys.shape
    if heads % kv_heads or keys.shape[2] != dim or not 0 < n_context <= k_len:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} do not fit n_context={n_context}")
    query, keys = _rows(query), _rows(keys)
    if lse is None:
        lse = log_sum_exp(query, keys[:, : k_len if lse_keys is None else lse_keys], scale, causal, softcap)
    lse = lse.float().contiguous()
    out = torch.empty(heads, n_context, device=query.device, dtype=torch.float32)
    grid = (triton.cdiv(n_context, BLOCK_K), heads)
    _score_kernel[grid](query, keys, lse, out, t_len, n_context, heads // kv_heads, scale, softcap or 1.0,
                        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
                        MEAN=how == "mean", BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, **_constants(query, softcap))
    return out


@triton.jit
def _logits(q, k, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    x = dot(q, tl.trans(k), PRECISION, WIDEN) * scale
    if SOFTCAP:  # softcap * tanh(x / softcap), with tanh(y) = 2 sigmoid(2y) - 1
        x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
    return x


@triton.jit
def _load_block(ptr, base, rows, n_rows, stride, dims, HEAD_DIM: tl.constexpr):
    return tl.load(ptr + base + rows[:, None] * stride + dims[None, :],
                   mask=(rows[:, None] < n_rows) & (dims[None, :] < HEAD_DIM), other=0.0)


# Lengths are not specialised (Triton would compile a variant per length % 16 and == 1): one variant
# serves every document (``service.bench.compile_check.variants`` counts them).
@triton.jit(do_not_specialize=["t_len", "n_keys", "offset"])
def _lse_kernel(q_ptr, k_ptr, lse_ptr, t_len, n_keys, offset, groups, scale, softcap,
               sq_h, sq_t, sk_h, sk_n, HEAD_DIM: tl.constexpr, D: tl.constexpr, SOFTCAP: tl.constexpr,
               PRECISION: tl.constexpr, WIDEN: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr,
               BLOCK_K: tl.constexpr):
    block, head = tl.program_id(0), tl.program_id(1)
    rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, D)
    q = _load_block(q_ptr, head * sq_h, rows, t_len, sq_t, dims, HEAD_DIM)
    kv_base = (head // groups) * sk_h
    m = tl.full([BLOCK_Q], -1e30, tl.float32)  # finite: a fully masked block must not give inf - inf
    s = tl.zeros([BLOCK_Q], tl.float32)
    end = n_keys
    if CAUSAL:  # no query of this block sees past offset + its last row
        end = tl.minimum(n_keys, offset + (block + 1) * BLOCK_Q)
    for start in range(0, end, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        k = _load_block(k_ptr, kv_base, cols, n_keys, sk_n, dims, HEAD_DIM)
        x = _logits(q, k, scale, softcap, SOFTCAP, PRECISION, WIDEN)
        visible = cols[None, :] < n_keys
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        x = tl.where(visible, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + head * t_len + rows, m + tl.log(s), mask=rows < t_len)


@triton.jit(do_not_specialize=["t_len", "n_context"])
def _score_kernel(q_ptr, k_ptr, lse_ptr, out_ptr, t_len, n_context, groups, scale, softcap,
                 sq_h, sq_t, sk_h, sk_n, HEAD_DIM: tl.constexpr, D: tl.constexpr, SOFTCAP: tl.constexpr,
                 PRECISION: tl.constexpr, WIDEN: tl.constexpr, MEAN: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    block, head = tl.program_id(0), tl.program_id(1)
    cols = block * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, D)
    k = _load_block(k_ptr, (head // groups) * sk_h, cols, n_context, sk_n, dims, HEAD_DIM)
    if MEAN:
        acc = tl.zeros([BLOCK_K], tl.float32)
    else:
        acc = tl.full([BLOCK_K], float("-inf"), tl.float32)
    for start in range(0, t_len, BLOCK_Q):
        rows = start + tl.arange(0, BLOCK_Q)
        q = _load_block(q_ptr, head * sq_h, rows, t_len, sq_t, dims, HEAD_DIM)
        lse = tl.load(lse_ptr + head * t_len + rows, mask=rows < t_len, other=float("inf"))
        logw = _logits(q, k, scale, softcap, SOFTCAP, PRECISION, WIDEN) - lse[:, None]  # padding rows: -inf
        if MEAN:
            acc += tl.sum(tl.exp(logw), 0)
        else:
            acc = tl.maximum(acc, tl.max(logw, 0))
    tl.store(out_ptr + head * n_context + cols, acc, mask=cols < n_context)

