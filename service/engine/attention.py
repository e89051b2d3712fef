"""Attention with a correct causal mask for every layer, whatever its cache length.

transformers builds one mask for all layers from layer 0's cache length
(huggingface/transformers#35168). After KVCompose's global allocation or PyramidKV,
layers hold different numbers of tokens, so that shared mask is wrong (or crashes).
This attention function ignores the shared mask and builds, per layer, the mask its
own key length calls for:

- the new queries are the last ``q_len`` keys, so query ``i`` sees keys ``j <= k_len - q_len + i``
  (bottom-right aligned causal mask);
- head-wise presses evict per KV head: ``evicted[layer]`` of shape ``(kv_heads, cached_len)``, or
  ``(batch, kv_heads, cached_len)`` for a batch of caches (True = evicted), hides those positions
  from that head's queries.

The per-layer evicted masks travel as a forward keyword (``kvc_evicted``), never as state on
the model, so one model serves many caches concurrently. Only a caller that passes none (kvpress's
pipeline, ``generate`` under a press) gets kvpress's convention instead: head-wise presses leave
``masked_key_indices`` on the attention modules, hidden from decode steps until the next prefill
(``kvpress_evicted``), as kvpress's attention patch does for the functions it wraps (not this one).

A caller that needs the softmax normaliser of every query (KVCompose's scoring) passes a dict as
``kvc_lse``; on CPU it is filled from the fused kernel at no extra cost, per layer, with (heads,
q_len) log-sum-exp values.
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers import AttentionInterface

ATTENTION_NAME = "kvcompose_sdpa"
log = logging.getLogger(__name__)


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool mask (q_len, k_len), True = may attend; the queries are the last q_len keys."""
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows + (k_len - q_len)


def key_mask(
    q_len: int, k_len: int, evicted: torch.Tensor | None, num_groups: int, device: torch.device
) -> torch.Tensor | None:
    """Bool attention mask (1|batch, heads, q_len, k_len) for one layer, or None when plain causal will do.

    evicted: (kv_heads, cached_len) or (batch, kv_heads, cached_len) bool, cached_len <= k_len;
    positions after it are new tokens.
    """
    if evicted is None:
        if q_len == 1 or q_len == k_len:
            return None
        return causal_mask(q_len, k_len, device)[None, None]
    evicted = evicted.to(device)
    if evicted.ndim == 2:
        evicted = evicted.unsqueeze(0)
    keep = torch.ones(*evicted.shape[:2], k_len, dtype=torch.bool, device=device)
    keep[:, :, : evicted.shape[2]] = ~evicted
    keep = keep.repeat_interleave(num_groups, dim=1)  # kv heads -> query heads
    mask = keep[:, :, None, :].expand(-1, -1, q_len, -1)
    if q_len > 1:
        mask = mask & causal_mask(q_len, k_len, device)
    return mask


def per_layer_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kvc_evicted: list[torch.Tensor | None] | None = None,
    kvc_lse: dict[int, torch.Tensor] | None = None,
    kvc_static: bool = False,
    kvc_kernel: bool = False,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention; query (b, heads, q, d), key/value (b, kv_heads, k, d).

    Ragged batches (continuous batching, ``service.engine.batching``): key and value are lists with one
    (1, kv_heads, k_r, d) tensor per row and ``kvc_evicted[layer]`` a list of per-row masks; each
    row attends to its own cache exactly as it would alone (the same call on the same tensors), or,
    with ``kvc_kernel`` (where Triton runs), all rows in one batched kernel (``ragged_attention``): no
    (q, k) mask materialised, no K/V repeated per query head.
    """
    evicted = kvc_evicted[module.layer_idx] if kvc_evicted is not None else None
    if kvc_evicted is None and not isinstance(key, list):
        evicted = kvpress_evicted(module, query.shape[2], key)
    if kvc_static:  # a static decode step (``service.engine.step_graph``)
        if not isinstance(key, list):  # the batched kernel: ``key`` is the layer's ``ragged_attention.RaggedRows``
            from service.engine.ragged_attention import attend

            return attend(query, key, scaling, softcap).transpose(1, 2).contiguous(), None
        # row by row over whole buffers, slots hidden by ``evicted``
        rows = [decode_attention(query[r : r + 1], k, v, evicted[r], scaling, softcap)
                for r, (k, v) in enumerate(zip(key, value))]
        return torch.cat(rows).transpose(1, 2).contiguous(), None
    if isinstance(key, list):
        if kvc_kernel:
            from service.engine.ragged_attention import attend_views

            return attend_views(query, key, value, evicted, scaling, softcap).transpose(1, 2).contiguous(), None
        rows = [_sdpa(query[r : r + 1], k, v, evicted[r] if evicted is not None else None, dropout, scaling, softcap)
                for r, (k, v) in enumerate(zip(key, value))]
        return torch.cat(rows).transpose(1, 2).contiguous(), None
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if softcap:  # Gemma 2: no fused kernel caps logits
        out, lse = capped_attention(query, key, value, key_mask(q_len, k_len, evicted, groups, query.device),
                                    scaling, softcap)
        if kvc_lse is not None:
            kvc_lse[module.layer_idx] = lse[0]
        return out.transpose(1, 2).contiguous(), None
    if kvc_lse is not None and evicted is None and k_len >= q_len and query.shape[0] == 1:
        if query.device.type == "cpu":
            if groups > 1:  # the fused kernel that returns the lse has no GQA flag
                key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
            out, lse = attention_with_lse(query, key, value, scaling)
            kvc_lse[module.layer_idx] = lse[0]
            return out.transpose(1, 2).contiguous(), None
        if triton_runs_on(query.device):
            out, lse = split_attention_with_lse(query, key, value, scaling)
            kvc_lse[module.layer_idx] = lse
            return out.transpose(1, 2).contiguous(), None
    return _sdpa(query, key, value, evicted, dropout, scaling).transpose(1, 2).contiguous(), None


def kvpress_evicted(module: torch.nn.Module, q_len: int, key: torch.Tensor) -> torch.Tensor | None:
    """(batch, kv_heads, k_len) bool mask of the keys kvpress's ``masked_key_indices`` hide, or None.

    As kvpress's attention patch: a prefill (as many queries as keys) drops the module's indices, so
    a later cache never inherits an earlier one's; other calls hide the indexed keys.
    """
    indices = getattr(module, "masked_key_indices", None)
    if indices is None:
        return None
    if q_len == key.shape[2]:
        module.masked_key_indices = None
        return None
    batch, head, position = indices
    mask = torch.zeros(key.shape[:3], dtype=torch.bool, device=key.device)
    mask[batch, head, position] = True
    return mask


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, evicted: torch.Tensor | None,
          dropout: float, scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """(b, heads, q, d) attention output under the per-layer causal mask and head-wise evictions."""
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    mask = key_mask(q_len, k_len, evicted, groups, query.device)
    if softcap:
        return capped_attention(query, key, value, mask, scaling, softcap)[0]
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=mask is None and q_len == k_len and q_len > 1,
        enable_gqa=groups > 1,  # no repeated copy of the cache: ~10x faster decode steps on CPU
    )


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor,
                     scaling: float | None, softcap: float | None = None) -> torch.Tensor:
    """One row's new queries (1, heads, q, d) over a whole fixed cache buffer (1, kv_heads, C, d), with
    ``hidden`` (1, kv_heads, C) True where a slot is not attended (not yet written, or evicted).

    Fixed shapes and no host sync, so a CUDA graph can hold it (``service.engine.step_graph``). A GQA group's
    query heads share one key matrix, so the cache is read once, never repeated per query head. As
    transformers' eager attention: logits in the model's dtype, softmax in float32.
    """
    _, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    q = query[0].reshape(kv_heads, heads // kv_heads * q_len, dim)
    scale = scaling if scaling is not None else dim**-0.5
    logits = cap_logits(torch.bmm(q, key[0].transpose(1, 2)) * scale, softcap)
    logits = logits.masked_fill(hidden[0][:, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.bmm(weights, value[0]).view(1, heads, q_len, dim)


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping, softcap * tanh(logits / softcap); unchanged without a cap."""
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def capped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with soft-capped logits, (b, heads, q, d) output and (b, heads, q) log-sum-exp.

    mask: bool, True = may attend, or None for bottom-right causal. Materialises (q, k) logits.
    """
    q_len, k_len = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = cap_logits(torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale, softcap)
    allowed = mask if mask is not None else causal_mask(q_len, k_len, query.device)
    logits = logits.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = (logits - lse.unsqueeze(-1)).exp()
    return torch.matmul(weights, value.float()).to(query.dtype), lse


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU fused attention of the last q_len keys' queries, with its log-sum-exp (b, heads, q).

    The fused kernel's causal flag is top-left aligned, so the cached keys (all visible) and the
    new keys (causal, square) are attended separately and merged by their log-sum-exps: exact,
    and no (q, k) mask is materialised.
    """
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    split = key.shape[2] - query.shape[2]
    if split == 0:
        out, lse = flash(query, key, value, 0.0, True, scale=scale)[:2]
        return out.to(query.dtype), lse
    out_a, lse_a = flash(query, key[:, :, :split], value[:, :, :split], 0.0, False, scale=scale)[:2]
    out_b, lse_b = flash(query, key[:, :, split:], value[:, :, split:], 0.0, True, scale=scale)[:2]
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * (lse_a - lse).exp().unsqueeze(-1) + out_b * (lse_b - lse).exp().unsqueeze(-1)
    return out.to(query.dtype), lse


def split_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU attention of the last q_len keys' queries (batch 1), with each query's log-sum-exp (heads, q).

    The replay of KVCompose's scoring: q_len new queries after k_len - q_len cached keys. One SDPA
    call would need a bottom-right causal mask, (q_len, k_len) materialised, and no fused kernel takes
    it with GQA. Instead, the cached keys (all visible) and the new keys (causal, square) are each
    attended by the flash kernel, and merged by their log-sum-exps, which the fused scorer's Triton
    kernel computes (``fused_scoring.log_sum_exp``; GQA without copies); the scorer then reuses them.
    """
    from service.engine.presses.fused_scoring import log_sum_exp

    split = key.shape[2] - query.shape[2]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    gqa = query.shape[1] != key.shape[1]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out_b = sdpa(query, key[:, :, split:], value[:, :, split:], is_causal=True, scale=scale, enable_gqa=gqa)
    lse_b = log_sum_exp(query[0], key[0, :, split:], scale, causal=True)
    if split == 0:
        return out_b, lse_b
    out_a = sdpa(query, key[:, :, :split], value[:, :, :split], scale=scale, enable_gqa=gqa)
    lse_a = log_sum_exp(query[0], key[0, :, :split], scale, causal=False)
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * (lse_a - lse).exp()[None, :, :, None].to(out_a.dtype) + \
        out_b * (lse_b - lse).exp()[None, :, :, None].to(out_b.dtype)
    return out, lse


@functools.cache
def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels (``fused_scoring``, ``ragged_attention``) run natively here: on CUDA,
    once per process and device, a small kernel is compiled, run and checked (``triton_ops.probe``).
    If that fails, one log line says why and the torch paths (reference scorer, row-by-row decode
    attention) serve instead: slower, never wrong."""
    if device.type != "cuda":
        return False
    try:
        from service.engine import triton_ops

        triton_ops.probe(device)
    except Exception as e:  # noqa: BLE001 - any failure (no Triton, JIT, driver, ptxas) means the torch paths
        log.warning("Triton kernels do not run on %s (%s: %s); using the torch scorer and per-row decode attention",
                    device, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


def use_per_layer_attention(model: torch.nn.Module) -> None:
    """Register the attention function (idempotent) and switch ``model`` to it."""
    import kvpress  # noqa: F401  kvpress wraps every registered attention function on import: register after it

    AttentionInterface.register(ATTENTION_NAME, per_layer_sdpa)
    model.set_attn_implementation(ATTENTION_NAME)
