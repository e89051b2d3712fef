"""The service's typed requests, results and errors, importing no model stack (no torch,
transformers or kvpress), so the Ingress and the API layer load in a moment.

The modules that do the work (``decode``, ``answerer``, ``compressor``, ``batching``, ``cancel``,
``presses``) use these same types; the API layer (``service/serve/messages.py``) converts them to and from
the protos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_TEMPERATURE = 1e-3
DEFAULT_MAX_NEW_TOKENS = 128
MAX_REPETITION_PENALTY = 10.0  # beyond it every seen token is all but banned: a typo, not a setting


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, named as vLLM's ``SamplingParams``. temperature 0 = greedy; top_p in (0, 1];
    seed makes sampling repeatable. Answers end at the model's end token, a stop string, or
    ``max_new_tokens`` (128 by default: room for an answer to a question, not an essay).
    ``stop``: strings that end the answer, not included unless ``include_stop_str_in_output``;
    empty = the model's own (the embedded model's first-sentence end, kept: ``Engine.prepare``).

    The penalties count the answer's own tokens only, not the document's or the question's: a
    document answer quotes its document, and penalising that would push it off the right words.
    ``repetition_penalty`` (> 0, 1 = off) divides a seen token's positive logit and multiplies its
    negative one (CTRL, Keskar et al. 2019, as transformers and vLLM apply it);
    ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], 0 = off; OpenAI's definitions)
    subtract per occurrence and once. None = the model's default (``Engine.sampling_defaults``)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / t would overflow: sampling is undefined
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1 = off), "
                             f"got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:  # also refuses NaN
                raise ValueError(f"{name} must be in [-2, 2] (0 = off), got {value}")

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits (None and the neutral values do not)."""
        return (self.repetition_penalty or 1.0) != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)


def kept_fraction(kept_tokens_per_layer: list[float], original_tokens: int) -> float:
    """The one definition used by the CLI, the API and the store: tokens each KV head still attends
    to (stored slots minus head-wise evictions, averaged over heads), over every layer's context."""
    return sum(kept_tokens_per_layer) / (len(kept_tokens_per_layer) * original_tokens)


class KeptFraction:
    """``kept_fraction`` of a result with ``kept_tokens_per_layer`` and ``original_tokens``
    (``CompressResult``, the engine's ``CompressStats``)."""

    kept_tokens_per_layer: list[float]
    original_tokens: int

    @property
    def kept_fraction(self) -> float:
        return kept_fraction(self.kept_tokens_per_layer, self.original_tokens)


@dataclass
class CompressResult(KeptFraction):
    """A stored (or found) cache: what Compress returns."""

    cache_id: str
    original_tokens: int
    layer_slots: list[int]  # stored width of each layer (a head-wise press pads to its busiest head)
    kept_tokens_per_layer: list[float]  # what attention sees: slots minus evictions, averaged over heads
    stored_bytes: int
    uncompressed_bytes: int
    reused: bool
    seconds: float
    model: str
    press: dict
    codec: str


@dataclass
class AnswerStats:
    """How one answer was served: what Generate's last message carries."""

    cache_id: str
    cache_source: str  # "memory" | "store"
    time_to_first_token_s: float
    new_tokens: int
    seconds: float
    fetched_bytes: int
    context_tokens: int = 0  # the document's tokens before compression
    kept_fraction: float = 1.0  # of them, what each KV head still attends to (``kept_fraction``)
    timings: dict[str, float] = field(default_factory=dict)  # GenerateStats.timings, as far as known


@dataclass(frozen=True)
class Piece:
    """Answer text as a Decoder sent it (``sent_unix``: its wall clock then), on its way to a client."""

    text: str
    sent_unix: float


class PressSpecError(ValueError):
    """A press spec that cannot be built; the message names the offending field."""


class Cancelled(Exception):
    """Model work stopped because its request was cancelled."""


class Overloaded(Exception):
    """The decoder is at its admission limit; the client should retry (RESOURCE_EXHAUSTED)."""
