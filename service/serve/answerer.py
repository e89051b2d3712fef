"""Fetch + decode: answer questions from caches fetched over gRPC from the prefix store.

A decode worker never sees a compress replica's memory: it fetches the cache bytes by id through a
``PrefixStore`` (``AsyncPrefixStoreClient`` in the service; verified), decodes them, and keeps a
small LRU of decoded caches (bounded in bytes) so follow-up questions on the same document skip the fetch.

An in-memory copy is used only while its store entry is live: a hit older than ``revalidate_s``
(0.25 s) asks the store (``Stat``, which also refreshes the entry's TTL as any hit does), so a
Delete or an expiry takes effect on every replica within that bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from service.cache import codec
from service.cache.kvcache import CompressedKV
from service.config import BatchLimits
from service.engine.decode import Sampling
from service.engine.engine import Engine
from service.malloc import keep_freed_memory
from service.protocol import AnswerStats, kept_fraction
from service.store.errors import NotFound
from service.store.interface import PrefixStore


class DecodedLRU:
    """(tenant, cache id) -> decoded cache, evicting least recently used beyond ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[str, str], CompressedKV] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[str, str]) -> CompressedKV | None:
        kv = self.items.get(key)
        if kv is not None:
            self.items.move_to_end(key)
        return kv

    def put(self, key: tuple[str, str], kv: CompressedKV) -> None:
        if kv.nbytes() > self.max_bytes or key in self.items:
            return
        self.items[key] = kv
        self.bytes += kv.nbytes()
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes()

    def drop(self, key: tuple[str, str]) -> None:
        """Forget ``key`` (absent is fine)."""
        kv = self.items.pop(key, None)
        if kv is not None:
            self.bytes -= kv.nbytes()


class Answerer:
    """Engine + prefix store + LRU. ``fetches`` counts caches fetched from the store."""

    def __init__(self, engine: Engine, store: PrefixStore, lru_bytes: int = 256 << 20,
                 revalidate_s: float = 0.25, batch: BatchLimits | None = None):
        self.engine = engine
        self.store = store
        self.lru = DecodedLRU(lru_bytes)
        self.revalidate_s = revalidate_s
        self.fetches = 0
        self._checked: dict[tuple[str, str], tuple[float, bytes]] = {}  # key -> (monotonic time, sha256)
        self.decoder = engine.new_decode_loop(batch)
        self._fetching: dict[tuple[str, str], asyncio.Future] = {}  # one fetch per cache at a time
        keep_freed_memory()  # a decode process: fetches reuse freed pages (service/malloc.py)

    async def cache(self, tenant: str, cache_id: str) -> tuple[CompressedKV, str, int]:
        """(decoded cache, source, fetched bytes). Raises NotFound for a deleted or expired entry."""
        key = (tenant, cache_id)
        kv = self.lru.get(key)
        if kv is not None and await self._still_live(key):
            return kv, "memory", 0
        while key in self._fetching:  # another request is fetching this cache: share its result
            pending = self._fetching[key]
            try:
                return await asyncio.shield(pending), "memory", 0
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request was cancelled
                # the fetching request was cancelled: fetch it here
        future = self._fetching[key] = asyncio.get_running_loop().create_future()
        try:
            kv, size = await self._fetch(tenant, cache_id)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # marked retrieved: only waiters see it
            raise
        else:
            future.set_result(kv)
        finally:
            del self._fetching[key]
        return kv, "store", size

    async def _fetch(self, tenant: str, cache_id: str) -> tuple[CompressedKV, int]:
        key = (tenant, cache_id)
        checked_at = time.monotonic()  # the entry was live when the fetch began: the staleness clock starts here
        manifest, chunks = await self.store.fetch(cache_id, tenant=tenant)
        # onto the model's device once (as stored: int8 moves half the bytes), not on every answer;
        # the chunks were verified as they were read: the codec does not hash them again
        kv = await asyncio.to_thread(codec.decode, chunks, self.engine.device, verified=True)
        self.engine.check_compatible(kv)
        self.fetches += 1
        self.lru.put(key, kv)
        self._checked[key] = (checked_at, manifest.sha256)
        for gone in [k for k in self._checked if k not in self.lru.items]:  # evicted meanwhile
            del self._checked[gone]
        return kv, manifest.total_bytes

    async def _still_live(self, key: tuple[str, str]) -> bool:
        checked_at, sha256 = self._checked.get(key, (0.0, b""))
        if time.monotonic() - checked_at <= self.revalidate_s:
            return True
        try:
            manifest = await self.store.stat(key[1], tenant=key[0], touch=True)
        except NotFound:
            self.lru.drop(key)
            self._checked.pop(key, None)
            raise
        if manifest.sha256 != sha256:  # deleted and stored again meanwhile: fetch the new bytes
            self.lru.drop(key)
            return False
        self._checked[key] = (time.monotonic(), sha256)
        return True

    async def answer(self, tenant: str, cache_id: str, question: str, sampling: Sampling,
                     ) -> AsyncIterator[str | AnswerStats]:
        """Yield answer text pieces, then one AnswerStats. The answer is decoded in the replica's
        batch (``service.engine.batching``); a full decoder refuses at once (``Overloaded``)."""
        start = time.perf_counter()
        self.decoder.check_capacity()  # before fetching anything
        kv, source, fetched = await self.cache(tenant, cache_id)
        timings = {"cache_s": time.perf_counter() - start}
        first, tokens = None, 0
        async for count, piece in self.decoder.stream(kv, question, sampling, timings):
            tokens = count
            if first is None:
                first = time.perf_counter() - start
            yield piece
        total = time.perf_counter() - start
        context = kv.meta.original_length
        yield AnswerStats(cache_id, source, first if first is not None else total, tokens, total, fetched,
                          context, kept_fraction(kv.kept_tokens_per_layer(), context), timings)
