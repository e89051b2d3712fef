"""Needle-in-a-haystack documents built offline (no dataset downloads), sized in the model's own tokens."""

from __future__ import annotations

import random

from transformers import PreTrainedTokenizerBase

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def needle_document(
    tokenizer: PreTrainedTokenizerBase, tokens: int, depth: float = 0.5, seed: int = 0
) -> tuple[str, str, str]:
    """(document, question, needle): about ``tokens`` tokens of filler with one fact at ``depth``."""
    rng = random.Random(seed)
    number = str(rng.randint(1_000_000, 9_999_999))
    needle = f" The special magic number is {number}. Remember it. "
    per_filler = len(tokenizer.encode(FILLER, add_special_tokens=False))
    n = max(1, (tokens - len(tokenizer.encode(needle, add_special_tokens=False))) // per_filler)
    at = int(n * depth)
    doc = FILLER * at + needle + FILLER * (n - at)
    question = "What is the special magic number mentioned in the text? Answer with the number only."
    return doc, question, number
