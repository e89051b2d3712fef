"""One batched decode attention over ragged compressed caches: three Triton launches per layer.

After KVCompose each answer's cache has its own length in every layer, and head-wise presses hide
positions per KV head. Paged engines assume one length per sequence (vLLM #10491, SGLang #12607), so
attention would run row by row: B x layers small kernels a step. Here each row keeps its own buffer
(``decode.ReservedLayer``, (1, kv_heads, capacity, d), contiguous) and a per-layer table on the device
holds each row's key, value and hidden-slot addresses and its capacity (``table``). Per layer:

- ``append``: every row's new key and value written at its write slot, which is un-hidden;
- ``attend``: split-K decoding (flash-decoding, Dao et al. 2023): program (row, KV head, split) walks its
  share of the row's filled length with an online softmax; a GQA group's query heads are one block,
  so each key block is read once;
- ``_merge_kernel``: each query head's splits merged by their log-sum-exps.

Lengths and addresses are read from device memory, never passed as arguments: one compiled variant
serves every batch and length, and a CUDA graph captured over a table replays for any rows of the same
batch size once the table is rewritten (``service.engine.step_graph``). Logits accumulate in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from service.engine.triton_ops import dot, dot_options, pow2

BLOCK_N = 64
TABLE_COLUMNS = 4  # key address, value address, hidden-slot address, capacity


@dataclass(frozen=True)
class RaggedRows:
    """One layer of a batch for the kernels: what ``StaticLayer.update`` hands the attention function.

    table: (B, 4) int64 on the device; length: (B,) int64, each row's write slot (its filled length
    before this step's token); n_splits: how many programs share one row's keys."""

    table: torch.Tensor
    length: torch.Tensor
    kv_heads: int
    n_splits: int


def table(keys: list[torch.Tensor], values: list[torch.Tensor], hidden: list[torch.Tensor]) -> torch.Tensor:
    """(B, 4) int64 host table of rows' buffers: keys/values (1, kv_heads, capacity, d), hidden
    (1, kv_heads, capacity) bool. The buffers must stay alive as long as the table is used."""
    for k, v, h in zip(keys, values, hidden):
        if not (k.is_contiguous() and v.is_contiguous() and h.is_contiguous()) or k.shape != v.shape \
                or h.shape != k.shape[:3] or h.dtype != torch.bool:
            raise ValueError(f"row buffers must be contiguous (1, kv_heads, capacity, d) keys and values "
                             f"with a (1, kv_heads, capacity) bool mask: got {tuple(k.shape)}, {tuple(h.shape)}")
    return torch.tensor([[k.data_ptr(), v.data_ptr(), h.data_ptr(), k.shape[2]]
                         for k, v, h in zip(keys, values, hidden)], dtype=torch.int64, device="cpu")


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
    """(B, heads, 1, d) attention of each row's new query over its buffer's filled slots (its write
    slot included), hidden slots left out. query: (B, heads, 1, d)."""
    batch, heads, q_len, dim = query.shape
    kv_heads = rows.kv_heads
    if q_len != 1 or heads % kv_heads:
        raise ValueError(f"one query per row and whole GQA groups expected, got query {tuple(query.shape)}")
    groups = heads // kv_heads
    query = query.contiguous()
    scale = scale if scale is not None else dim**-0.5
    part = torch.empty(batch, kv_heads, rows.n_splits, groups, dim, device=query.device, dtype=torch.float32)
    stat = torch.empty(batch, kv_heads, rows.n_splits, groups, 2, device=query.device, dtype=torch.float32)
    _attend_kernel[(batch, kv_heads, rows.n_splits)](
        query, rows.table, rows.length, part, stat, groups, scale, softcap or 1.0, rows.n_splits,
        query.stride(0), query.stride(1), HEAD_DIM=dim, D=pow2(dim), G=max(16, pow2(groups)), BLOCK_N=BLOCK_N,
        SOFTCAP=bool(softcap), **dot_options(query.dtype))
    out = torch.empty_like(query)
    _merge_kernel[(batch, heads)](part, stat, out, groups, rows.n_splits, out.stride(0), out.stride(1),
                                  HEAD_DIM=dim, D=pow2(dim), S=pow2(rows.n_splits))
    return out


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


@triton.jit
def _attend_kernel(q_ptr, table_ptr, length_ptr, part_ptr, stat_ptr, groups, scale, softcap, n_splits,
                   sq_b, sq_h, HEAD_DIM: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                   SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(length_ptr + row) + 1  # this step's token is written at the old length
    capacity = tl.load(table_ptr + row * 4 + 3)
    k_buf = tl.load(table_ptr + row * 4).to(q_ptr.dtype, bitcast=True) + kv_head * capacity * HEAD_DIM
    v_buf = tl.load(table_ptr + row * 4 + 1).to(q_ptr.dtype, bitcast=True) + kv_head * capacity * HEAD_DIM
    hidden = tl.load(table_ptr + row * 4 + 2).to(tl.pointer_type(tl.int8), bitcast=True) + kv_head * capacity
    chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, G)
    dims = tl.arange(0, D)
    in_dims = dims < HEAD_DIM
    q = tl.load(q_ptr + row * sq_b + (kv_head * groups + g)[:, None] * sq_h + dims[None, :],
                mask=(g < groups)[:, None] & in_dims[None, :], other=0.0)
    m = tl.full([G], -1e30, tl.float32)  # finite: a fully hidden block must not give inf - inf
    s = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    for first in range(start, end, BLOCK_N):
        cols = first + tl.arange(0, BLOCK_N)
        inside = cols < end
        at = cols[:, None] * HEAD_DIM + dims[None, :]
        both = inside[:, None] & in_dims[None, :]
        k = tl.load(k_buf + at, mask=both, other=0.0)
        x = dot(q, tl.trans(k), PRECISION, WIDEN) * scale
        if SOFTCAP:  # Gemma 2: softcap * tanh(x / softcap), with tanh(y) = 2 sigmoid(2y) - 1
            x = softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)
        seen = inside & (tl.load(hidden + cols, mask=inside, other=1) == 0)
        x = tl.where(seen[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 1))
        p = tl.exp(x - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_buf + at, mask=both, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, WIDEN)
        s = s * alpha + tl.sum(p, 1)
        m = m_new
    base = ((row * tl.num_programs(1) + kv_head) * n_splits + split) * groups + g
    tl.store(part_ptr + base[:, None] * HEAD_DIM + dims[None, :], acc, mask=(g < groups)[:, None] & in_dims[None, :])
    tl.store(stat_ptr + base * 2, m, mask=g < groups)
    tl.store(stat_ptr + base * 2 + 1, s, mask=g < groups)


@triton.jit
def _merge_kernel(part_ptr, stat_ptr, out_ptr, groups, n_splits, so_b, so_h,
                  HEAD_DIM: tl.constexpr, D: tl.constexpr, S: tl.constexpr):
    row, head = tl.program_id(0), tl.program_id(1)
    kv_heads = tl.num_programs(1) // groups
    splits = tl.arange(0, S)
    used = splits < n_splits
    base = ((row * kv_heads + head // groups) * n_splits + splits) * groups + head % groups
    m = tl.load(stat_ptr + base * 2, mask=used, other=-1e30)
    s = tl.load(stat_ptr + base * 2 + 1, mask=used, other=0.0)
    weight = tl.exp(m - tl.max(m, 0))
    dims = tl.arange(0, D)
    part = tl.load(part_ptr + base[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None] & (dims < HEAD_DIM)[None, :],
                   other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(s * weight, 0)
    tl.store(out_ptr + row * so_b + head * so_h + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
