"""Compress-or-reuse: a context becomes a stored cache exactly once across all replicas.

The cache id is derived from the content (``service.cache.ids``); if the prefix store has it, nothing is
prefilled. Otherwise ``RedisStore.get_or_create`` takes the document's single-flight lock, one
replica prefills and compresses, and every other replica asking meanwhile waits for that entry.
"""

from __future__ import annotations

import asyncio
import time

from service.cache import codec
from service.cache.ids import CacheKey
from service.engine.cancel import run_stoppable
from service.engine.engine import Engine
from service.engine.presses import canonical
from service.engine.selection import SELECTION_REVISION
from service.protocol import CompressResult
from service.store.metered import MeteredStore
from service.store.redis_store import RedisStore


class CacheCompressor:
    """Engine + prefix store. ``prefills`` counts model prefills done by this process; ``store.outcomes``
    the entries it wrote (it writes to Redis itself, so the store server never sees these puts)."""

    def __init__(self, engine: Engine, store: RedisStore):
        self.engine = engine
        self.store = MeteredStore(store)
        self.prefills = 0
        self._model_lock = asyncio.Lock()  # one model call at a time per replica

    def cache_key(self, tenant: str, press: dict, codec_name: str, task_prompts: list[str]) -> CacheKey:
        loaded = self.engine.loaded
        spec = dict(press)
        if task_prompts:  # task-aware scoring changes the cache: part of its identity
            spec["task_prompts"] = list(task_prompts)
        return CacheKey(loaded.model_id, loaded.revision, loaded.tokenizer_digest, spec, codec_name, tenant,
                        selection_revision=SELECTION_REVISION)

    async def compress(self, tenant: str, context: str | list[int], press: str | dict | None = None,
                       codec_name: str | None = None, task_prompts: list[str] | None = None,
                       ttl_s: int | None = None) -> CompressResult:
        start = time.perf_counter()
        codec_name = codec_name or self.engine.config.codec
        spec = canonical(self.engine.config.default_press if press is None else press)
        ids = await asyncio.to_thread(self.engine.context_ids, context)  # a long document: off the event loop
        key = self.cache_key(tenant, spec, codec_name, task_prompts or [])

        async def compute() -> bytes:
            # The lock stays held until the model thread has ended, also when this request is cancelled.
            async with self._model_lock:
                self.prefills += 1
                kv, _ = await run_stoppable(
                    lambda stop: self.engine.compress(ids, spec, task_prompts, codec_name, stop=stop))
                return await asyncio.to_thread(codec.encode, kv, codec_name)

        manifest, created = await self.store.get_or_create(key, ids, compute, ttl_s)
        m = manifest
        return CompressResult(m.cache_id, m.context_tokens, list(m.layer_slots), m.kept_tokens(), m.total_bytes,
                              m.uncompressed_bytes,
                              not created, time.perf_counter() - start, self.engine.model_id, spec, codec_name)
