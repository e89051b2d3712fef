"""Prefill + scoring + eviction: run the context through the model inside a press, collect the cache."""

from __future__ import annotations

import contextlib
import threading

import torch
from kvpress import BasePress
from transformers import DynamicCache, PreTrainedModel

from service.cache.kvcache import CacheMeta, CompressedKV
from service.engine.cancel import stop_between_layers
from service.engine.presses.kvcompose import PaddingIndices
from service.engine.presses.registry import presses_in
from service.engine.selection import select


def prefill(model: PreTrainedModel, context_ids: list[int], press: BasePress | None, meta: CacheMeta,
            stop: threading.Event | None = None) -> CompressedKV:
    """Prefill ``context_ids`` (compressing in the press's hooks) and return the compressed cache.

    stop: when set, the work ends before the next decoder layer with ``Cancelled``.

    Head-wise evictions become the returned cache's ``evicted`` masks (``collect``), and the
    evicted slots are dropped (``compact``), so head-wise eviction saves real memory.
    """
    ids = torch.tensor([context_ids], device=model.device)
    cache = DynamicCache()
    attn = [layer.self_attn for layer in model.model.layers]
    for module in attn:
        module.masked_key_indices = None
    try:
        with torch.inference_mode(), stop_between_layers(model, stop), \
                (press(model) if press is not None else contextlib.nullcontext()):
            model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return collect(model, cache, meta, press)
    finally:  # also after a failure or a cancellation midway: the model keeps no per-request state
        for module in attn:
            module.masked_key_indices = None


def collect(model: PreTrainedModel, cache: DynamicCache, meta: CacheMeta,
            press: BasePress | None = None) -> CompressedKV:
    """The compressed cache, with the head-wise evictions of ``press`` (and of presses nested in it).

    Our presses return their head masks as a value (``head_masks``). kvpress's own head-wise presses
    (AdaKV, CriticalAdaKV) can only leave them as ``masked_key_indices`` on the attention modules,
    which its attention patch reads: those are taken from there and cleared, so the model keeps no
    per-document state. KVCompose's marks there (``PaddingIndices``, for kvpress's decode loops) are
    cleared but not taken: its ``head_masks`` hold them, and a mark may be another run's.
    """
    attn = [layer.self_attn for layer in model.model.layers]
    marks = [getattr(m, "masked_key_indices", None) for m in attn]
    evicted = [None if isinstance(mark, PaddingIndices) else _evicted_mask(mark, layer)
               for mark, layer in zip(marks, cache.layers)]
    for module in attn:
        module.masked_key_indices = None
    for part in presses_in(press):
        for i, mask in getattr(part, "head_masks", {}).items():
            evicted[i] = mask if evicted[i] is None else evicted[i] | mask
    return compact(CompressedKV.from_cache(cache, evicted, meta))


def _evicted_mask(indices: tuple[torch.Tensor, ...] | None, layer) -> torch.Tensor | None:
    """kvpress's (batch, head, position) index triple -> (kv_heads, len) bool mask."""
    if indices is None:
        return None
    _, heads, length, _ = layer.keys.shape
    mask = torch.zeros(heads, length, dtype=torch.bool, device=layer.keys.device)
    _, head, position = indices
    mask[head, position] = True
    return mask


def compact(kv: CompressedKV) -> CompressedKV:
    """Drop head-wise evicted slots: each head's kept slots packed densely, in position order.

    kvpress's head-wise presses (AdaKV, CriticalAdaKV, ...) only mask evicted slots, which saves no
    memory. Attention does not depend on the order of keys (positions are inside the rotated keys),
    so each layer can shrink to its busiest head's count; shorter heads' spare slots stay evicted.
    """
    keys, values, evicted = [], [], []
    for k, v, e in zip(kv.keys, kv.values, kv.evicted):
        if e is None:
            keys.append(k), values.append(v), evicted.append(None)
            continue
        kept = ~e.to(k.device)
        positions, padding = select(kept.float(), kept.sum(dim=1).clamp(min=1))
        index = positions.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        keys.append(k.gather(1, index)), values.append(v.gather(1, index))
        still = kept.gather(1, positions) == 0  # a head that kept nothing keeps one evicted slot
        mask = still if padding is None else (padding | still)
        evicted.append(mask if bool(mask.any()) else None)
    return CompressedKV(keys=keys, values=values, evicted=evicted, meta=kv.meta)
