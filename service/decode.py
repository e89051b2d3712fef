"""Decode: answer questions from a compressed cache, never mutating it.

Question tokens take positions from the original context length on (as kvpress's pipeline), each
layer attends under its own causal mask (``service.attention``), and head-wise evictions are
passed to the attention function per call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from service.kvcache import CompressedKV


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 = greedy; top_p in (0, 1]; seed makes sampling repeatable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


def question_logits(model: PreTrainedModel, kv: CompressedKV, question_ids: list[int]) -> torch.Tensor:
    """Logits (len(question_ids), vocab) at every question position; the cache is left untouched."""
    cache = kv.to_dynamic_cache(model.dtype, model.device)
    with torch.inference_mode():
        out = model(**_inputs(model, kv, question_ids, kv.meta.original_length), past_key_values=cache)
    return out.logits[0].float()


def generate(model: PreTrainedModel, kv: CompressedKV, question_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Yield generated token ids one at a time; stops at a stop token (not yielded) or the limit."""
    cache = kv.to_dynamic_cache(model.dtype, model.device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    position = kv.meta.original_length
    ids = question_ids
    with torch.inference_mode():
        for _ in range(sampling.max_new_tokens):
            out = model(**_inputs(model, kv, ids, position), past_key_values=cache, logits_to_keep=1)
            position += len(ids)
            token = _pick(out.logits[0, -1].float(), sampling, generator)
            if token in sampling.stop_token_ids:
                return
            yield token
            ids = [token]


def _inputs(model: PreTrainedModel, kv: CompressedKV, ids: list[int], start: int) -> dict:
    device = model.device
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.arange(start, start + len(ids), device=device).unsqueeze(0),
        "kvc_evicted": kv.evicted_for(device),
    }


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # keep the smallest nucleus
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
