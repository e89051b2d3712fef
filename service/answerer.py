"""Fetch + decode: answer questions from caches fetched over gRPC from the prefix store.

A decode worker never sees a compress replica's memory: it fetches the cache bytes by id through
``PrefixStoreClient`` (verified), decodes them, and keeps a small LRU of decoded caches (bounded
in bytes) so follow-up questions on the same document skip the fetch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from service import codec
from service.decode import Sampling
from service.engine import Engine
from service.kvcache import CompressedKV
from service.store.client import PrefixStoreClient


@dataclass
class AnswerStats:
    cache_id: str
    cache_source: str  # "memory" | "store"
    time_to_first_token_s: float
    new_tokens: int
    seconds: float
    fetched_bytes: int


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
        kv = self.items.pop(key, None)
        if kv is not None:
            self.bytes -= kv.nbytes()


class Answerer:
    """Engine + store client + LRU. ``fetches`` counts caches fetched from the store."""

    def __init__(self, engine: Engine, client: PrefixStoreClient, lru_bytes: int = 256 << 20):
        self.engine = engine
        self.client = client
        self.lru = DecodedLRU(lru_bytes)
        self.fetches = 0
        self._model_lock = asyncio.Lock()

    async def cache(self, tenant: str, cache_id: str) -> tuple[CompressedKV, str, int]:
        """(decoded cache, source, fetched bytes)."""
        kv = self.lru.get((tenant, cache_id))
        if kv is not None:
            return kv, "memory", 0
        _, data = await asyncio.to_thread(self.client.fetch, cache_id, tenant)
        kv = await asyncio.to_thread(codec.decode, data)
        self.engine.check_compatible(kv)
        self.fetches += 1
        self.lru.put((tenant, cache_id), kv)
        return kv, "store", len(data)

    async def answer(self, tenant: str, cache_id: str, question: str, sampling: Sampling,
                     stop: tuple[str, ...] = ()) -> AsyncIterator[str | AnswerStats]:
        """Yield answer text pieces, then one AnswerStats."""
        start = time.perf_counter()
        kv, source, fetched = await self.cache(tenant, cache_id)
        first, tokens = None, 0
        async with self._model_lock:
            async for count, piece in _in_thread(lambda: self.engine.stream_counted(kv, question, sampling, stop)):
                tokens = count
                if first is None:
                    first = time.perf_counter() - start
                yield piece
        total = time.perf_counter() - start
        yield AnswerStats(cache_id, source, first if first is not None else total, tokens, total, fetched)


async def _in_thread(make: Callable[[], Iterator]) -> AsyncIterator:
    """Run a blocking generator in a thread and yield its items on the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            gen: Iterator = make()
            for item in gen:
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as e:  # noqa: BLE001 - re-raised on the loop
            loop.call_soon_threadsafe(queue.put_nowait, e)

    worker = loop.run_in_executor(None, run)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await worker
