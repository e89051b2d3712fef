"""Fetch + decode: answer questions from caches fetched over gRPC from the prefix store.

A decode worker never sees a compress replica's memory: it fetches the cache bytes by id through
``PrefixStoreClient`` (verified), decodes them, and keeps a small LRU of decoded caches (bounded
in bytes) so follow-up questions on the same document skip the fetch.

An in-memory copy is used only while its store entry is live: a hit older than ``revalidate_s``
(0.25 s) asks the store (``Stat``, which also refreshes the entry's TTL as any hit does), so a
Delete or an expiry takes effect on every replica within that bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from service import codec
from service.cancel import Cancelled, wait_until_done
from service.decode import Sampling
from service.engine import Engine
from service.kvcache import CompressedKV
from service.store.client import PrefixStoreClient
from service.store.errors import NotFound


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
        """Forget ``key`` (absent is fine)."""
        kv = self.items.pop(key, None)
        if kv is not None:
            self.bytes -= kv.nbytes()


class Answerer:
    """Engine + store client + LRU. ``fetches`` counts caches fetched from the store."""

    def __init__(self, engine: Engine, client: PrefixStoreClient, lru_bytes: int = 256 << 20,
                 revalidate_s: float = 0.25):
        self.engine = engine
        self.client = client
        self.lru = DecodedLRU(lru_bytes)
        self.revalidate_s = revalidate_s
        self.fetches = 0
        self._checked: dict[tuple[str, str], tuple[float, bytes]] = {}  # key -> (monotonic time, sha256)
        self._model_lock = asyncio.Lock()

    async def cache(self, tenant: str, cache_id: str) -> tuple[CompressedKV, str, int]:
        """(decoded cache, source, fetched bytes). Raises NotFound for a deleted or expired entry."""
        key = (tenant, cache_id)
        kv = self.lru.get(key)
        if kv is not None and await self._still_live(key):
            return kv, "memory", 0
        manifest, data = await asyncio.to_thread(self.client.fetch, cache_id, tenant)
        kv = await asyncio.to_thread(codec.decode, data)
        self.engine.check_compatible(kv)
        self.fetches += 1
        self.lru.put(key, kv)
        self._checked[key] = (time.monotonic(), manifest.sha256)
        return kv, "store", len(data)

    async def _still_live(self, key: tuple[str, str]) -> bool:
        checked_at, sha256 = self._checked.get(key, (0.0, b""))
        if time.monotonic() - checked_at <= self.revalidate_s:
            return True
        try:
            manifest = await asyncio.to_thread(self.client.stat, key[1], key[0], True)
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
                     stop: tuple[str, ...] = ()) -> AsyncIterator[str | AnswerStats]:
        """Yield answer text pieces, then one AnswerStats."""
        start = time.perf_counter()
        kv, source, fetched = await self.cache(tenant, cache_id)
        first, tokens = None, 0
        async with self._model_lock:
            async for count, piece in _in_thread(
                    lambda flag: self.engine.stream_counted(kv, question, sampling, stop, flag)):
                tokens = count
                if first is None:
                    first = time.perf_counter() - start
                yield piece
        total = time.perf_counter() - start
        yield AnswerStats(cache_id, source, first if first is not None else total, tokens, total, fetched)


async def _in_thread(make: Callable[[threading.Event], Iterator]) -> AsyncIterator:
    """Run a blocking generator ``make(stop)`` in a thread and yield its items on the event loop.

    When the consumer stops early (cancelled, disconnected), ``stop`` is set and this waits until
    the thread has really ended, so the model lock around it is not released under running work.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in make(stop):
                if stop.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except Cancelled:
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
        await wait_until_done(worker)
