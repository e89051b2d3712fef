"""The compressed KV cache of one context: what prefill produces, the codec stores and decode reads.

Layers may hold different numbers of tokens (KVCompose's global allocation, PyramidKV), and
head-wise presses evict per KV head, recorded as a boolean ``evicted`` mask per layer.
Batch size is always 1: one cache is one document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from service.cache.format import CacheMeta


def kept_tokens(slots: int, evicted: torch.Tensor | None) -> float:
    """A layer's kept tokens: its slots, minus each head's evicted ones, averaged over KV heads."""
    return float(slots) if evicted is None else float((~evicted.bool()).sum(dim=1).float().mean())


@dataclass
class CompressedKV:
    """Per-layer tensors of one compressed context.

    keys[i], values[i]: (kv_heads, len_i, head_dim), post-RoPE keys as the model cached them.
    evicted[i]: (kv_heads, len_i) bool, True where that head evicted the slot; None if no head-wise eviction.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    evicted: list[torch.Tensor | None]
    meta: CacheMeta

    def __post_init__(self) -> None:
        if not (len(self.keys) == len(self.values) == len(self.evicted)):
            raise ValueError("keys, values and evicted must have one entry per layer")
        for i, (k, v, e) in enumerate(zip(self.keys, self.values, self.evicted)):
            if k.ndim != 3 or k.shape != v.shape:
                raise ValueError(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} must match (h, len, d)")
            if e is not None and tuple(e.shape) != tuple(k.shape[:2]):
                raise ValueError(f"layer {i}: evicted mask {tuple(e.shape)} must be (kv_heads, len)")

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def layer_lengths(self) -> list[int]:
        return [k.shape[1] for k in self.keys]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def kept_tokens_per_layer(self) -> list[float]:
        """Tokens a head actually attends to, averaged over KV heads (slots minus evicted)."""
        return [kept_tokens(k.shape[1], e) for k, e in zip(self.keys, self.evicted)]

    def nbytes(self) -> int:
        """Bytes of the key and value tensors (masks excluded)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    def uncompressed_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the same context would take uncompressed, in ``dtype`` (default: this cache's)."""
        item = (dtype or self.dtype).itemsize
        per_token = sum(k.shape[0] * k.shape[2] * 2 for k in self.keys)
        return per_token * self.meta.original_length * item

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> CompressedKV:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        return CompressedKV(
            keys=[move(k) for k in self.keys],
            values=[move(v) for v in self.values],
            evicted=[None if e is None else e.to(device=device) for e in self.evicted],
            meta=self.meta,
        )

    def evicted_for(self, device: torch.device | str) -> list[torch.Tensor | None] | None:
        """Per-layer masks for the attention function, or None when no layer has head-wise eviction."""
        if all(e is None for e in self.evicted):
            return None
        return [None if e is None else e.to(device) for e in self.evicted]

    @classmethod
    def from_cache(
        cls, cache: DynamicCache, evicted: list[torch.Tensor | None], meta: CacheMeta
    ) -> CompressedKV:
        keys = [layer.keys[0] for layer in cache.layers]
        values = [layer.values[0] for layer in cache.layers]
        return cls(keys=keys, values=values, evicted=evicted, meta=meta)

