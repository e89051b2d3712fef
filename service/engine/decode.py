"""Decode: answer questions from a compressed cache, never mutating it.

Question tokens take positions from the original context length on (as kvpress's pipeline), each
layer attends under its own causal mask (``service.engine.attention``), and head-wise evictions are
passed to the attention function per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from service.cache.kvcache import CompressedKV
from service.protocol import MIN_TEMPERATURE, Sampling  # noqa: F401 - the decode settings live in protocol


def question_logits(model: PreTrainedModel, kv: CompressedKV, question_ids: list[int]) -> torch.Tensor:
    """Logits (len(question_ids), vocab) at every question position; the cache is left untouched."""
    cache = padded_cache([kv], model, room=len(question_ids))
    with torch.inference_mode():
        out = model(**step_inputs(model, kv, question_ids, kv.meta.original_length), past_key_values=cache)
    return out.logits[0].float()


def generate(model: PreTrainedModel, kv: CompressedKV, question_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Yield generated token ids one at a time; stops at a stop token (not yielded) or the limit."""
    cache = padded_cache([kv], model, room=len(question_ids) + sampling.max_new_tokens)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    position = kv.meta.original_length
    ids = question_ids
    with torch.inference_mode():
        for _ in range(sampling.max_new_tokens):
            out = model(**step_inputs(model, kv, ids, position), past_key_values=cache, logits_to_keep=1)
            position += len(ids)
            token = pick_token(out.logits[0, -1].float(), sampling, generator)
            if token in sampling.stop_token_ids:
                return
            yield token
            ids = [token]


def generate_batch(
    model: PreTrainedModel,
    kvs: list[CompressedKV],
    question_ids: list[int],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    finished: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Greedy answers to one question from several caches of the same context, decoded together.

    A CPU decode step is bound by reading the weights, so one step for all caches costs little
    more than one. Each layer is padded to its longest cache; padding is marked evicted, so every
    row attends exactly to its own cache (same tokens as ``generate``, up to float rounding of
    batched matmuls). A row ends at a stop token, after ``max_new_tokens``, or once
    ``finished(row, tokens)`` says so; ended rows leave the batch.
    """
    lengths = {kv.meta.original_length for kv in kvs}
    if len(lengths) != 1:
        raise ValueError("generate_batch needs caches of one context (same original length)")
    device = model.device
    cache = padded_cache(kvs, model, room=len(question_ids) + max_new_tokens)
    evicted = _padded_evicted(kvs, device)
    answers: list[list[int]] = [[] for _ in kvs]
    rows = list(range(len(kvs)))
    position = lengths.pop()
    ids = torch.tensor([question_ids] * len(kvs), device=device)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            positions = torch.arange(position, position + ids.shape[1], device=device).expand(len(rows), -1)
            out = model(input_ids=ids, position_ids=positions, past_key_values=cache, kvc_evicted=evicted,
                        logits_to_keep=1)
            position += ids.shape[1]
            tokens = out.logits[:, -1].argmax(dim=-1).tolist()
            keep = []
            for i, (row, token) in enumerate(zip(rows, tokens)):
                if token in stop_token_ids:
                    continue
                answers[row].append(token)
                if finished is None or not finished(row, answers[row]):
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                for layer in cache.layers:
                    layer.batch_select_indices(index)
                evicted = [e[index] for e in evicted]
                rows = [rows[i] for i in keep]
            ids = torch.tensor([[tokens[i]] for i in keep], device=device)
    return answers


class ReservedLayer(DynamicLayer):
    """A cache layer with room reserved for the tokens to come, appended in place.

    DynamicLayer concatenates on every step, copying the whole cache each time: with a long
    context and a batch of caches that copy costs more than the step's matmuls. ``keys`` and
    ``values`` are views of the filled part of the buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        b, h, n, d = keys.shape
        self._k = keys.new_empty(b, h, n + room, d)
        self._v = values.new_empty(b, h, n + room, d)
        self._k[:, :, :n], self._v[:, :, :n] = keys, values
        # The room is zeroed: static steps attend over the whole buffer with unwritten slots masked,
        # and a masked slot's weight (0) times uninitialised memory (maybe inf or nan) would be nan.
        self._k[:, :, n:], self._v[:, :, n:] = 0, 0
        self._n = n
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def update(self, key_states, value_states, cache_kwargs=None):
        end = self._n + key_states.shape[2]
        if end > self._k.shape[2]:
            raise RuntimeError(f"cache room exhausted: {end} > {self._k.shape[2]} slots")
        self._k[:, :, self._n : end], self._v[:, :, self._n : end] = key_states, value_states
        self._n = end
        self._views()
        return self.keys, self.values

    def truncate(self, n: int) -> None:
        """Forget the last ``n`` appended slots (a padded batch's padding)."""
        self._n -= n
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()


class RaggedLayer(DynamicLayer):
    """One layer of a ragged batch: each row keeps its own ``ReservedLayer`` (its own length, no
    padding, no copy when rows join or leave); ``update`` returns per-row lists, which the
    attention function (``service.engine.attention``) attends row by row."""

    def __init__(self, rows: list[ReservedLayer]):
        super().__init__()
        self.rows = rows
        self.is_initialized = True
        self.dtype, self.device = rows[0].dtype, rows[0].device

    def update(self, key_states, value_states, cache_kwargs=None):
        out = [row.update(key_states[r : r + 1], value_states[r : r + 1]) for r, row in enumerate(self.rows)]
        return [k for k, _ in out], [v for _, v in out]

    def get_seq_length(self) -> int:
        return max(row.get_seq_length() for row in self.rows)


def ragged_cache(rows: list[Cache]) -> Cache:
    """A batch over the rows' own caches (each a ``reserved_cache`` of batch 1)."""
    layers = len(rows[0].layers)
    return Cache(layers=[RaggedLayer([row.layers[i] for row in rows]) for i in range(layers)])


def reserved_cache(keys: list[torch.Tensor], values: list[torch.Tensor], room: int) -> Cache:
    """A fresh cache over per-layer (B, kv_heads, len, d) copies, with ``room`` slots to grow."""
    return Cache(layers=[ReservedLayer(k, v, room) for k, v in zip(keys, values)])


def padded_cache(kvs: list[CompressedKV], model: PreTrainedModel, room: int) -> Cache:
    """One batch row per cache; each layer zero-padded to its longest cache (see ``_padded_evicted``)."""
    keys, values = [], []
    for layer in range(kvs[0].num_layers):
        width = max(kv.keys[layer].shape[1] for kv in kvs)
        heads, _, dim = kvs[0].keys[layer].shape
        k = torch.zeros(len(kvs), heads, width, dim, device=model.device, dtype=model.dtype)
        v = torch.zeros_like(k)
        for b, kv in enumerate(kvs):
            k[b, :, : kv.keys[layer].shape[1]] = kv.keys[layer]
            v[b, :, : kv.values[layer].shape[1]] = kv.values[layer]
        keys.append(k)
        values.append(v)
    return reserved_cache(keys, values, room)


def _padded_evicted(kvs: list[CompressedKV], device: torch.device) -> list[torch.Tensor]:
    """Per layer (B, kv_heads, width): each cache's own evictions, and its padding, marked evicted."""
    out = []
    for layer in range(kvs[0].num_layers):
        width = max(kv.keys[layer].shape[1] for kv in kvs)
        e = torch.ones(len(kvs), kvs[0].keys[layer].shape[0], width, device=device, dtype=torch.bool)
        for b, kv in enumerate(kvs):
            n = kv.keys[layer].shape[1]
            e[b, :, :n] = False if kv.evicted[layer] is None else kv.evicted[layer]
        out.append(e)
    return out


def step_inputs(model: PreTrainedModel, kv: CompressedKV, ids: list[int], start: int) -> dict:
    device = model.device
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.arange(start, start + len(ids), device=device).unsqueeze(0),
        "kvc_evicted": kv.evicted_for(device),
    }


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
