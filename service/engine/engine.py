"""The in-process engine: one loaded model; compress contexts and answer questions from compressed caches.

This is the object the CLI, the store and the Ray Serve deployments call. It is not thread-safe:
one engine runs one model call at a time (callers serialise, e.g. one request per replica).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from service.cache.codec import memory_dtype
from service.cache.kvcache import CacheMeta, CompressedKV
from service.config import CODECS, BatchLimits, EngineConfig
from service.engine.batching import DecodeLoop, Request
from service.engine.decode import Sampling, question_logits
from service.engine.models import PENALTIES, LoadedModel, load_model, position_limit, sampling_defaults
from service.engine.prefill import prefill
from service.engine.presses import build, canonical
from service.engine.prompt import PromptFormat
from service.protocol import KeptFraction


@dataclass(frozen=True)
class CompressStats(KeptFraction):
    original_tokens: int
    kept_tokens_per_layer: list[float]
    compressed_bytes: int
    uncompressed_bytes: int
    seconds: float

    def to_json(self) -> dict:
        return {
            "original_tokens": self.original_tokens,
            "kept_tokens": round(sum(self.kept_tokens_per_layer) / len(self.kept_tokens_per_layer), 2),
            "kept_tokens_per_layer": [round(x, 2) for x in self.kept_tokens_per_layer],
            "kept_fraction": round(self.kept_fraction, 4),
            "compressed_bytes": self.compressed_bytes,
            "uncompressed_bytes": self.uncompressed_bytes,
            "seconds": round(self.seconds, 3),
        }


class Engine:
    def __init__(self, config: EngineConfig | None = None, loaded: LoadedModel | None = None):
        self.config = config or EngineConfig()
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        self.loaded = loaded or load_model(self.config)
        self.prompt = PromptFormat(self.loaded.tokenizer)
        # the model's own window bounds every context, whatever the config says
        self.window, self._window_kind = position_limit(self.loaded.model.config)
        self.max_context_tokens = min(self.config.max_context_tokens, self.window)
        # read once: the tokenizer is not safe to touch from several threads while another encodes
        self._stop_token_ids = self._model_stop_token_ids()
        self.sampling_defaults = sampling_defaults(self.loaded)  # what an unset penalty means
        self._loops = threading.local()  # each calling thread drives its own loop (see ``decode_loop``)

    def decode_loop(self) -> DecodeLoop:
        """The decode loop this thread answers through (the CLI, benchmarks, tests): the service's
        own loop code, driven in the caller's thread, one per thread; no memory budget but the host's."""
        loop = getattr(self._loops, "loop", None)
        if loop is None:
            loop = self._loops.loop = self.new_decode_loop(BatchLimits(memory_bytes=1 << 50))
        return loop

    def new_decode_loop(self, limits: BatchLimits | None = None, static_steps: bool | None = None) -> DecodeLoop:
        """A decode loop over this engine's model, its questions prepared by ``prepare``."""
        return DecodeLoop(self.loaded.model, self.loaded.tokenizer, self.prepare, limits, static_steps)

    @property
    def device(self) -> torch.device:
        """Where the model runs; caches it answers from are moved here."""
        return self.loaded.model.device

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    def context_ids(self, context: str | list[int]) -> list[int]:
        """Token ids of a context given as text (chat-templated) or as ids (used as given)."""
        if isinstance(context, str) and not context.strip():
            raise ValueError("document is empty (or only whitespace)")
        ids = self.prompt.context_ids(context) if isinstance(context, str) else [int(i) for i in context]
        if not ids:
            raise ValueError("context is empty")
        if len(ids) > self.max_context_tokens:
            raise ValueError(f"context has {len(ids)} tokens; the limit is {self.max_context_tokens} "
                             f"(max_context_tokens, at most the model's {self.window} {self._window_kind})")
        vocab = self.loaded.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"context token ids must be in [0, {vocab})")
        return ids

    def compress(
        self,
        context: str | list[int],
        press: str | dict | None = None,
        task_prompts: list[str] | None = None,
        codec: str | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[CompressedKV, CompressStats]:
        """Prefill and compress one context. ``press`` None = the configured default; ``{}`` = no compression.

        task_prompts: expected questions; KVCompose scores the context by their attention (task-aware).
        codec: the storage codec the cache is meant for (default: the configured one); the returned
            cache is in that codec's in-memory dtype, and ``codec.encode(kv, codec)`` gives its bytes.
        stop: set it to end the work early (``service.protocol.Cancelled``).
        """
        codec = codec or self.config.codec
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
        start = time.perf_counter()
        ids = self.context_ids(context)
        spec = canonical(self.config.default_press if press is None else press)
        # Task prompts go into the press as it is built, not set on it afterwards.
        built = build(spec, [self.prompt.question_ids(q) for q in task_prompts] if task_prompts else None)
        meta = CacheMeta(self.loaded.model_id, self.loaded.revision, len(ids), spec)
        dtype = memory_dtype(codec)
        kv = prefill(self.loaded.model, ids, built, meta, stop).to(dtype=dtype)
        stats = CompressStats(
            original_tokens=len(ids),
            kept_tokens_per_layer=kv.kept_tokens_per_layer(),
            compressed_bytes=kv.nbytes(),
            uncompressed_bytes=kv.uncompressed_nbytes(dtype),
            seconds=time.perf_counter() - start,
        )
        return kv, stats

    def info(self) -> dict:
        """What ListModels reports about the served model."""
        loaded = self.loaded
        return {"id": loaded.model_id, "revision": loaded.revision, "layers": loaded.model.config.num_hidden_layers,
                "max_context_tokens": self.max_context_tokens, "default_press": self.config.default_press,
                "default_codec": self.config.codec, "sampling_defaults": self.sampling_defaults}

    def check_compatible(self, kv: CompressedKV) -> None:
        if (kv.meta.model_id, kv.meta.model_revision) != (self.loaded.model_id, self.loaded.revision):
            raise ValueError(
                f"cache was made by {kv.meta.model_id}@{kv.meta.model_revision}; "
                f"this engine runs {self.loaded.model_id}@{self.loaded.revision}"
            )
        cfg = self.loaded.model.config
        if kv.num_layers != cfg.num_hidden_layers:
            raise ValueError(f"cache has {kv.num_layers} layers; the model has {cfg.num_hidden_layers}")

    def stop_token_ids(self) -> tuple[int, ...]:
        return self._stop_token_ids

    def _model_stop_token_ids(self) -> tuple[int, ...]:
        eos = self.loaded.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        extra = [self.loaded.tokenizer.eos_token_id]
        return tuple(sorted({int(t) for t in eos + extra if t is not None}))

    def stream(self, kv: CompressedKV, question: str, sampling: Sampling | None = None) -> Iterator[str]:
        """Yield answer text pieces as tokens are produced; stop strings end the answer (``Sampling.stop``)."""
        for _, piece in self.stream_counted(kv, question, sampling):
            yield piece

    def prepare(self, kv: CompressedKV, question: str, sampling: Sampling | None = None,
                ) -> tuple[list[int], Sampling]:
        """(question ids, sampling with every default filled in: the model's stop tokens, its stop
        strings where the request names none, its penalties, and an answer that ends at the window).
        Raises ValueError when the cache is not this model's or the question does not fit."""
        self.check_compatible(kv)
        sampling = sampling or Sampling()
        if not sampling.stop_token_ids:
            sampling = dataclasses.replace(sampling, stop_token_ids=self.stop_token_ids())
        unset = {name: self.sampling_defaults[name] for name in PENALTIES
                 if getattr(sampling, name) is None and name in self.sampling_defaults}
        if not sampling.stop and self.sampling_defaults.get("stop"):  # the model's own: kept in the answer
            unset |= {"stop": tuple(self.sampling_defaults["stop"]), "include_stop_str_in_output": True}
        if unset:
            sampling = dataclasses.replace(sampling, **unset)
        question_ids = self.prompt.question_ids(question)
        room = self.window - kv.meta.original_length - len(question_ids)
        if room < 1:
            raise ValueError(f"question has {len(question_ids)} tokens; after the {kv.meta.original_length}-token "
                             f"context only {max(room + len(question_ids) - 1, 0)} of the model's {self.window} "
                             f"{self._window_kind} are left")
        if sampling.max_new_tokens > room:  # the answer ends at the model's window
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        return question_ids, sampling

    def stream_counted(self, kv: CompressedKV, question: str, sampling: Sampling | None = None,
                       ) -> Iterator[tuple[int, str]]:
        """As ``stream``, with the number of tokens generated so far beside each piece (through the
        service's decode loop, ``batching.DecodeLoop``, driven in this thread)."""
        question_ids, sampling = self.prepare(kv, question, sampling)
        yield from self.decode_loop().stream_here(Request(kv, question_ids, sampling))

    def answer(self, kv: CompressedKV, question: str, sampling: Sampling | None = None) -> str:
        return "".join(self.stream(kv, question, sampling))

    def question_logits(self, kv: CompressedKV, question_ids: list[int]) -> torch.Tensor:
        return question_logits(self.loaded.model, kv, question_ids)
