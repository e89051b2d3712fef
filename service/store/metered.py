"""Counting around a store: ``MeteredStore`` wraps any backend, which then counts nothing itself.

Outcomes (``outcomes``, exported as ``kvcompose_store_entries{outcome}``): ``put`` (a new entry),
``hit`` (a verified read), ``grant`` (a direct reader was given the chunk names; whether its bytes
verify, the store does not see), ``miss`` with ``missing_chunk_deleted`` (chunks were evicted under
an entry), ``corrupt_deleted`` (bytes failed their checksum). An entry that simply is not there is no
outcome of an entry; the server's request counts show it as NOT_FOUND. Whoever writes entries counts
them: the store server around its ``RedisStore``, and the Compressor around its own, which writes to
Redis without the server (``get_or_create``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager

from service.cache.ids import CacheKey
from service.store.errors import ChunksLost, DataLoss
from service.store.interface import PrefixStore
from service.store.manifest import Manifest

OUTCOMES = ("put", "hit", "grant", "miss", "missing_chunk_deleted", "corrupt_deleted")


class MeteredStore:
    """A ``PrefixStore`` that counts what happens to entries; ``stream``, ``grant`` and
    ``get_or_create`` pass through to backends that have them (``RedisStore``)."""

    def __init__(self, inner: PrefixStore):
        self.inner = inner
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))

    async def put(self, key: CacheKey, context_ids: Sequence[int], data: bytes, ttl_s: int | None = None,
                  **options) -> tuple[Manifest, bool]:
        """``options``: the backend's own (``RedisStore``'s ``expected_sha256``)."""
        m, existed = await self.inner.put(key, context_ids, data, ttl_s, **options)
        if not existed:
            self.outcomes["put"] += 1
        return m, existed

    async def get_or_create(self, key: CacheKey, context_ids: Sequence[int], compute: Callable[[], Awaitable[bytes]],
                            ttl_s: int | None = None) -> tuple[Manifest, bool]:
        """The backend's single flight (``RedisStore.get_or_create``); a created entry is a put."""
        m, created = await self.inner.get_or_create(key, context_ids, compute, ttl_s)
        if created:
            self.outcomes["put"] += 1
        return m, created

    async def fetch(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[bytes]]:
        with self._reading():
            result = await self.inner.fetch(cache_id, tenant=tenant)
        self.outcomes["hit"] += 1
        return result

    async def stream(self, cache_id: str, *, tenant: str) -> tuple[Manifest, AsyncIterator[bytes]]:
        with self._reading():
            m, chunks = await self.inner.stream(cache_id, tenant=tenant)

        async def counted() -> AsyncIterator[bytes]:
            with self._reading():
                async for chunk in chunks:
                    yield chunk
            self.outcomes["hit"] += 1  # only once every chunk verified

        return m, counted()

    async def grant(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[str]]:
        result = await self.inner.grant(cache_id, tenant=tenant)
        self.outcomes["grant"] += 1
        return result

    async def stat(self, cache_id: str, *, tenant: str, touch: bool = False) -> Manifest:
        return await self.inner.stat(cache_id, tenant=tenant, touch=touch)

    async def lookup(self, key: CacheKey, token_ids: Sequence[int],
                     longest_prefix: bool = False) -> tuple[Manifest, int]:
        return await self.inner.lookup(key, token_ids, longest_prefix)

    async def delete(self, cache_id: str, *, tenant: str) -> bool:
        return await self.inner.delete(cache_id, tenant=tenant)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Counts a read's damage on the way out; the exception still propagates."""
        try:
            yield
        except ChunksLost:
            self.outcomes.update(("miss", "missing_chunk_deleted"))
            raise
        except DataLoss:
            self.outcomes["corrupt_deleted"] += 1
            raise
