"""Batched attention over ragged compressed caches: three Triton launches per layer, any batch.

After KVCompose each answer's cache has its own length in every layer, and head-wise presses hide
positions per KV head. Paged engines assume one length per sequence (vLLM #10491, SGLang #12607), so
attention would run row by row: B x layers small kernels a step. Here each row keeps its own buffer
(``decode.ReservedLayer``, (1, kv_heads, capacity, d)) and a per-layer table on the device holds each
row's key, value and hidden-slot addresses and its capacity (``table``). Per layer:

- ``append``: a decode step's new key and value of every row written at its write slot, un-hidden;
- ``attend``: split-K attention (flash-decoding, Dao et al. 2023) of each row's ``q_len`` new queries
  over its filled slots, bottom-right causal (query i sees the slots before this step's tokens and
  the first i + 1 of them): program (row, KV head x query tile, split) walks its share of the row with
  an online softmax. A tile is a GQA group's query heads times queries, so each key block is read once
  for the whole group; decode steps (``q_len`` 1) are one tile, a question's prefill several;
- ``_merge_kernel``: each query's splits merged by their log-sum-exps.

Lengths and addresses are read from device memory, never passed as arguments: one compiled variant
serves every batch and length, and a CUDA graph captured over a table replays for any rows of the same
batch size once the table is rewritten (``service.engine.step_graph``). A row without head-wise
evictions may have no hidden-slot mask (address 0). Logits accumulate in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from service.engine.triton_ops import dot, dot_options, pow2

BLOCK_N = 64
MAX_BLOCK_M = 64  # query rows (group heads x queries) of one program
TABLE_COLUMNS = 4  # key address, value address, hidden-slot address (0: none), capacity


@dataclass(frozen=True)
class RaggedRows:
    """One layer of a batch for the kernels: what ``StaticLayer.update`` hands the attention function.

    table: (B, 4) int64 on the device; length: (B,) int64, each row's filled length before this step's
    tokens (its write slot); n_splits: how many programs share one row's keys."""

    table: torch.Tensor
    length: torch.Tensor
    kv_heads: int
    n_splits: int


def table(keys: list[torch.Tensor], values: list[torch.Tensor], hidden: list[torch.Tensor | None]) -> torch.Tensor:
    """(B, 4) int64 host table of rows' buffers: keys/values (1, kv_heads, capacity, d), contiguous,
    or a view of their first slots (a ``ReservedLayer``'s filled part); hidden (1, kv_heads, capacity)
    bool, or None for a row without evictions. The buffers must stay alive while the table is used."""
    rows = []
    for k, v, h in zip(keys, values, hidden):
        _, heads, _, dim = k.shape
        capacity = k.stride(1) // dim
        # each head's slot 0 where the kernels index it, slots and channels dense
        dense = k.storage_offset() == v.storage_offset() == 0 and k.stride()[1:] == (capacity * dim, dim, 1)
        if not dense or v.stride() != k.stride() or v.shape != k.shape or \
                (h is not None and (h.shape != (1, heads, capacity) or not h.is_contiguous() or h.dtype != torch.bool)):
            raise ValueError(f"row buffers must be contiguous (1, kv_heads, capacity, d) keys and values with a "
                             f"(1, kv_heads, capacity) bool mask: got {tuple(k.shape)} strides {k.stride()}, "
                             f"{None if h is None else (tuple(h.shape), h.dtype)}")
        rows.append([k.data_ptr(), v.data_ptr(), 0 if h is None else h.data_ptr(), capacity])
    return torch.tensor(rows, dtype=torch.int64, device="cpu")


def splits_for(device: torch.device, batch: int, kv_heads: int) -> int:
    """Programs per row: enough (row, head, split) programs to fill the GPU twice over; a fixed
    function of the batch size, so a captured graph holds for any lengths."""
    if device.type != "cuda":
        return 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(64, -(-2 * sms // (batch * kv_heads))))


def append(rows: RaggedRows, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write key/value (B, kv_heads, 1, d) at each row's write slot and un-hide it."""
    batch, kv_heads, _, dim = key.shape
    key, value = key.contiguous(), value.contiguous()
    _append_kernel[(batch, kv_heads)](key, value, rows.table, rows.length, key.stride(0), key.stride(1),
                                      HEAD_DIM=dim, D=pow2(dim))


def attend(query: torch.Tensor, rows: RaggedRows, scale: float | None, softcap: float | None = None) -> torch.Tensor:
    """(B, heads, q_len, d) attention of each row's q_len new queries (query (B, heads, q_len, d), the
    last q_len of its filled slots once written) over its buffer, bottom-right causal, hidden slots
    left out."""
    batch, heads, q_len, dim = query.shape
    kv_heads = rows.kv_heads
    if heads % kv_heads:
        raise ValueError(f"query heads must be whole GQA groups of {kv_heads} KV heads, got {heads}")
    groups = heads // kv_heads
    query = query.contiguous()
    scale = scale if scale is not None else dim**-0.5
    m_rows = groups * q_len
    block_m = min(MAX_BLOCK_M, max(16, pow2(m_rows)))
    tiles = triton.cdiv(m_rows, block_m)
    part = torch.empty(batch, kv_heads, rows.n_splits, m_rows, dim, device=query.device, dtype=torch.float32)
    stat = torch.empty(batch, kv_heads, rows.n_splits, m_rows, 2, device=query.device, dtype=torch.float32)
    _attend_kernel[(batch, kv_heads * tiles, rows.n_splits)](
        query, rows.table, rows.length, part, stat, groups, q_len, scale, softcap or 1.0, rows.n_splits,
        query.stride(0), query.stride(1), query.stride(2), HEAD_DIM=dim, D=pow2(dim), BLOCK_M=block_m,
        BLOCK_N=BLOCK_N, SOFTCAP=bool(softcap), num_warps=8 if dim > 64 else 4, **dot_options(query.dtype))
    out = torch.empty_like(query)
    _merge_kernel[(batch, heads, q_len)](part, stat, out, groups, rows.n_splits, out.stride(0), out.stride(1),
                                         out.stride(2), HEAD_DIM=dim, D=pow2(dim), S=pow2(rows.n_splits))
    return out


def attend_views(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                 evicted: list[torch.Tensor | None] | None, scale: float | None,
                 softcap: float | None = None) -> torch.Tensor:
    """``attend`` over rows given as their filled views (a ragged question prefill, ``decode.RaggedLayer``):
    keys/values (1, kv_heads, n_r + q_len, d), each the head of a ``ReservedLayer`` buffer; evicted:
    per row (kv_heads, cached) bool, True = evicted, or None."""
    batch, _, q_len, _ = query.shape
    kv_heads, device = keys[0].shape[1], query.device
    hidden = []
    for r, k in enumerate(keys):
        e = evicted[r] if evicted is not None else None
        if e is not None:
            h = torch.zeros(1, kv_heads, k.stride(1) // k.shape[3], dtype=torch.bool, device=device)
            h[0, :, : e.shape[1]] = e.to(device)
            e = h
        hidden.append(e)
    before = torch.tensor([k.shape[2] - q_len for k in keys], dtype=torch.int64, device="cpu")
    rows = RaggedRows(table(keys, values, hidden).to(device), before.to(device), kv_heads,
                      splits_for(device, batch, kv_heads))
    return attend(query, rows, scale, softcap)


@triton.jit
def _append_kernel(k_new, v_new, table_ptr, length_ptr, sn_b, sn_h, HEAD_DIM: tl.constexpr, D: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    at = tl.load(length_ptr + row)
    capacity = tl.load(table_ptr + row * 4 + 3)
    dims = tl.arange(0, D)
    inside = dims < HEAD_DIM
    src = row * sn_b + head * sn_h + dims
    dst = (head * capacity + at) * HEAD_DIM + dims
    k_buf = tl.load(table_ptr + row * 4).to(k_new.dtype, bitcast=True)
    v_buf = tl.load(table_ptr + row * 4 + 1).to(v_new.dtype, bitcast=True)
    tl.store(k_buf + dst, tl.load(k_new + src, mask=inside), mask=inside)
    tl.store(v_buf + dst, tl.load(v_new + src, mask=inside), mask=inside)
    hidden = tl.load(table_ptr + row * 4 + 2).to(tl.pointer_type(tl.int8), bitcast=True)
    tl.store(hidden + head * capacity + at, tl.zeros([], tl.int8))


# q_len and n_splits are not specialised: one variant for decode steps and every question length
@triton.jit(do_not_specialize=["q_len", "n_splits"])
def _attend_kernel(q_ptr, table_ptr, length_ptr, part_ptr, stat_ptr, groups, q_len, scale, softcap, n_splits,
                   sq_b, sq_h, sq_t, HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    row, split = tl.program_id(0), tl.program_id(2)
    tiles = tl.cdiv(groups * q_len, BLOCK_M)
    kv_head, tile = tl.program_id(1) // tiles, tl.program_id(1) % tiles
    before = tl.load(length_ptr + row)  # filled slots before this step's q_len tokens
    length = before + q_len
    capacity = tl.load(table_ptr + row * 4 + 3)
    k_buf = tl.load(table_ptr + row * 4).to(q_ptr.dtype, bitcast=True) + kv_head * capacity * HEAD_DIM
    v_buf = tl.load(table_ptr + row * 4 + 1).to(q_ptr.dtype, bitcast=True) + kv_head * capacity * HEAD_DIM
    hidden_at = tl.load(table_ptr + row * 4 + 2)
    hidden = hidden_at.to(tl.pointer_type(tl.int8), bitcast=True) + kv_head * capacity

    m_idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query-major: (query i, group head g)
    m_ok = m_idx < groups * q_len
    query, head = m_idx // groups, kv_head * groups + m_idx % groups
    dims = tl.arange(0, D)
    in_dims = dims < HEAD_DIM
    q = tl.load(q_ptr + row * sq_b + head[:, None] * sq_h + query[:, None] * sq_t + dims[None, :],
                mask=m_ok[:, None] & in_dims[None, :], other=0.0)
    sees = before + query  # the last slot each query may attend
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(tl.minimum(start + chunk, length), before + tl.max(tl.where(m_ok, query, 0)) + 1)
    masked_end = tl.where(hidden_at != 0, end, 0)  # no mask: nothing to load
    m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully hidden block must not give inf - inf
    s = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for first in range(start, end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        inside = cols < end
        at = cols[:, None] * HEAD_DIM + dims[None, :]
        both = inside[:, None] & in_dims[None, :]
        k = tl.load(k_buf + at, mask=both, other=0.0)
        x = dot(q, tl.trans(k), PRECISION, WIDEN) * scale
        if SOFTCAP:  # Gemma 2: softcap * tanh(x / softcap), with tanh(y) = 2 sigmoid(2y) - 1
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        shown = inside & (tl.load(hidden + cols, mask=cols < masked_end, other=0) == 0)
        x = tl.where(shown[None, :] & (cols[None, :] <= sees[:, None]), x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp(x - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_buf + at, mask=both, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, WIDEN)
        s = s * alpha + tl.sum(p, 1)
        m = m_new
    base = ((row * tl.num_programs(1) // tiles + kv_head) * n_splits + split) * groups * q_len + m_idx
    tl.store(part_ptr + base[:, None] * HEAD_DIM + dims[None, :], acc, mask=m_ok[:, None] & in_dims[None, :])
    tl.store(stat_ptr + base * 2, m, mask=m_ok)
    tl.store(stat_ptr + base * 2 + 1, s, mask=m_ok)


@triton.jit(do_not_specialize=["n_splits"])
def _merge_kernel(part_ptr, stat_ptr, out_ptr, groups, n_splits, so_b, so_h, so_t,
                  HEAD_DIM: tl.constexpr, D: tl.constexpr, S: tl.constexpr):
    row, head, query = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_heads, q_len = tl.num_programs(1) // groups, tl.num_programs(2)
    splits = tl.arange(0, S)
    used = splits < n_splits
    base = ((row * kv_heads + head // groups) * n_splits + splits) * groups * q_len + query * groups + head % groups
    m = tl.load(stat_ptr + base * 2, mask=used, other=-1e30)
    s = tl.load(stat_ptr + base * 2 + 1, mask=used, other=0.0)
    weight = tl.exp(m - tl.max(m, 0))
    dims = tl.arange(0, D)
    part = tl.load(part_ptr + base[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None] & (dims < HEAD_DIM)[None, :],
                   other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(s * weight, 0)
    tl.store(out_ptr + row * so_b + head * so_h + query * so_t + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)
