"""Precision layouts the store's codecs do not ship, measured on the accuracy suite without a new format.

``kvcompose bench accuracy --codecs`` takes these names beside the codecs (rows ``<press>@<variant>``):
the cache is read back as the variant would store it, and its bytes are estimated from the codecs'
real encoded bytes:

- ``k4v2-res``: k4v2 with a float16 residual, as KIVI keeps one (Liu et al. 2024, arXiv 2402.02750):
  each layer's first ``SINKS`` slots (attention sinks) and last ``RECENT`` slots (the latest tokens
  kept) exact. Bytes: k4v2's, plus those slots in float16 (their quantised copy is not subtracted).
- ``k4v2-top``: precision per layer from KVCompose's own allocation: the ``TOP_SHARE`` of layers the
  global allocator gave the most slots (the informative ones, by its scores) in int8, the others k4v2.
  Bytes: each codec's encoded cache, shared out among the layers by their slots.
"""

from __future__ import annotations

import torch

from service.cache import codec
from service.cache.kvcache import CompressedKV
from service.config import CODECS

SINKS = 4
RECENT = 32
TOP_SHARE = 0.25
VARIANTS = ("k4v2-res", "k4v2-top")


def read_back(kv: CompressedKV, name: str) -> CompressedKV:
    """The cache as a decode worker would get it from the codec or variant ``name``."""
    if name in CODECS:
        return _through(kv, name)
    coded = _through(kv, "k4v2")
    if name == "k4v2-res":
        exact = kv.to(dtype=torch.float16)
        keys = [_residual(e, c) for e, c in zip(exact.keys, coded.keys)]
        values = [_residual(e, c) for e, c in zip(exact.values, coded.values)]
        return CompressedKV(keys=keys, values=values, evicted=coded.evicted, meta=coded.meta)
    if name == "k4v2-top":
        wide, top = _through(kv, "int8"), set(_top_layers(kv))
        pick = [wide if i in top else coded for i in range(kv.num_layers)]
        return CompressedKV(keys=[p.keys[i] for i, p in enumerate(pick)],
                            values=[p.values[i] for i, p in enumerate(pick)], evicted=coded.evicted, meta=coded.meta)
    raise ValueError(f"unknown codec variant {name!r}; known: {', '.join(VARIANTS)}")


def stored_bytes(kv: CompressedKV, name: str) -> int:
    """Bytes the codec ``name`` stores, or the variant ``name`` would (estimated: the module's docstring)."""
    if name in CODECS:
        return len(codec.encode(kv, name))
    k4v2 = len(codec.encode(kv, "k4v2"))
    if name == "k4v2-res":
        kept = sum(min(SINKS + RECENT, k.shape[1]) * k.shape[0] * k.shape[2] for k in kv.keys)
        return k4v2 + 2 * kept * 2  # keys and values, 2 bytes each
    if name == "k4v2-top":
        slots = kv.kept_tokens_per_layer()
        share = sum(slots[i] for i in _top_layers(kv)) / sum(slots)
        return round(share * len(codec.encode(kv, "int8")) + (1 - share) * k4v2)
    raise ValueError(f"unknown codec variant {name!r}; known: {', '.join(VARIANTS)}")


def _through(kv: CompressedKV, name: str) -> CompressedKV:
    """Stored with the codec ``name`` and read back."""
    return codec.decode(codec.encode(kv.to(dtype=codec.memory_dtype(name)), name))


def _residual(exact: torch.Tensor, coded: torch.Tensor) -> torch.Tensor:
    """(kv_heads, slots, d): the coded slots, with the first SINKS and last RECENT exact."""
    out = coded.clone()
    out[:, :SINKS] = exact[:, :SINKS]
    out[:, -RECENT:] = exact[:, -RECENT:]
    return out


def _top_layers(kv: CompressedKV) -> list[int]:
    slots = kv.kept_tokens_per_layer()
    n = max(1, round(TOP_SHARE * len(slots)))
    return sorted(range(len(slots)), key=lambda i: -slots[i])[:n]
