"""The prefix store on Redis: chunked entries, a manifest written last, verified reads.

Layout of one entry (all keys share the hash tag ``{tenant/cache_id}``, see ``keys.py``):

- ``...:chunk:<write_id>:<i>``: the cache bytes in ``chunk_bytes`` pieces, written first;
- ``...:manifest``: JSON metadata with size, chunk count and SHA-256, written last with SET NX,
  so a reader sees a complete entry or nothing, and concurrent writers never mix chunks (each
  writer names its chunks with its own ``write_id``; the loser deletes its own).

Every key carries the entry's TTL, refreshed on each hit. A read with a missing chunk is a miss
(entry deleted, counted); a read whose bytes fail the SHA-256 raises DataLoss (entry deleted,
counted). Tenants are namespaces: a tenant's id never resolves in another tenant's keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from service.codec import FORMAT_VERSION, CorruptCacheError, layer_shapes, read_header
from service.config import StoreConfig
from service.store.errors import DataLoss, InvalidArgument, NotFound, QuotaExceeded, Unavailable
from service.store.ids import CacheKey
from service.store.keys import CACHE_ID, Keys, check_tenant
from service.store.manifest import Manifest

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_MGET_BATCH = 8  # chunks per round trip when reading


def connect(config: StoreConfig, url: str) -> aioredis.Redis:
    """A redis-py client with the store's one retry policy and timeouts."""
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), config.redis_retries)
    return aioredis.Redis.from_url(
        url, retry=retry, retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
        socket_timeout=config.redis_timeout_s, socket_connect_timeout=config.redis_timeout_s,
        health_check_interval=30,
    )


class RedisStore:
    """Async prefix store. ``counters`` tracks hits, misses and damaged entries for metrics."""

    def __init__(self, client: aioredis.Redis, config: StoreConfig):
        self.redis = client
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.counters = {"hits": 0, "misses": 0, "corrupt_deleted": 0, "missing_chunk_deleted": 0, "puts": 0}
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.redis.aclose()

    # -- writing ---------------------------------------------------------------------------------

    async def put(self, key: CacheKey, context_ids: Sequence[int], data: bytes, ttl_s: int | None = None,
                  expected_sha256: bytes | None = None) -> tuple[Manifest, bool]:
        """Store ``data`` (cache bytes, see codec) for this key and context; returns (manifest, existed).

        expected_sha256: the uploader's digest of ``data``, checked against the one the manifest records.
        """
        tenant = check_tenant(key.tenant)
        ttl_s = ttl_s or self.config.default_ttl_s
        if len(data) > self.config.max_entry_bytes:
            raise QuotaExceeded(f"cache is {len(data)} bytes; the store accepts at most {self.config.max_entry_bytes}")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())  # once, off the event loop
        if expected_sha256 and digest != expected_sha256:
            raise InvalidArgument("uploaded bytes do not match the header's sha256")
        header = self._validate(key, context_ids, data)
        cache_id = key.cache_id(context_ids)
        async with self._redis_errors():
            existing = await self._manifest(tenant, cache_id)
            if existing is not None:
                await self._touch(existing)
                return existing, True
            await self._check_quota(tenant, len(data))
            write_id = uuid.uuid4().hex[:16]
            size = self.config.chunk_bytes
            n_chunks = max(1, -(-len(data) // size))
            view = memoryview(data)
            pipe = self.redis.pipeline(transaction=False)
            for i in range(n_chunks):
                pipe.set(self.keys.chunk(tenant, cache_id, write_id, i), view[i * size : (i + 1) * size], ex=ttl_s)
            await pipe.execute()
            slots, per_token = layer_shapes(header)
            manifest = Manifest(cache_id, FORMAT_VERSION, len(data), n_chunks, size, digest, len(context_ids), key,
                                int(time.time() * 1000), ttl_s, write_id, slots, per_token * len(context_ids))
            if not await self.redis.set(self.keys.manifest(tenant, cache_id), manifest.to_json(), nx=True, ex=ttl_s):
                await self._delete_chunks(tenant, cache_id, write_id, n_chunks)  # another writer committed first
                return await self.stat(tenant, cache_id), True
            await self._index(manifest, context_ids)
            self.counters["puts"] += 1
            return manifest, False

    def _validate(self, key: CacheKey, context_ids: Sequence[int], data: bytes) -> dict:
        if not context_ids:
            raise InvalidArgument("context_ids is empty")
        try:
            header = read_header(data)
        except CorruptCacheError as e:
            raise InvalidArgument(f"uploaded bytes are not a valid cache: {e}") from None
        meta = header["meta"]
        if header.get("codec") != key.codec or meta["model_id"] != key.model_id:
            raise InvalidArgument(
                f"cache bytes were made by {meta['model_id']} with codec {header.get('codec')}; "
                f"the key says {key.model_id} with codec {key.codec}")
        if int(meta["original_length"]) != len(context_ids):
            raise InvalidArgument(f"cache covers {meta['original_length']} context tokens; "
                                  f"context_ids has {len(context_ids)}")
        return header

    async def _check_quota(self, tenant: str, size: int) -> None:
        quota = self.config.tenant_quota_bytes
        if not quota:
            return
        now_ms = int(time.time() * 1000)
        used, expired = 0, []
        for cache_id, value in (await self.redis.hgetall(self.keys.usage(tenant))).items():
            nbytes, expiry_ms = (int(x) for x in value.split())
            if expiry_ms < now_ms:
                expired.append(cache_id)
            else:
                used += nbytes
        if expired:
            await self.redis.hdel(self.keys.usage(tenant), *expired)
        if used + size > quota:
            raise QuotaExceeded(f"tenant {tenant!r} holds {used} bytes; storing {size} more exceeds its quota "
                                f"of {quota} bytes (delete entries or wait for them to expire)")

    async def _index(self, m: Manifest, context_ids: Sequence[int]) -> None:
        tenant = m.key.tenant
        block = self.config.block_tokens
        aligned = len(context_ids) // block * block
        ends = self.keys.prefix_ends(tenant, m.key.cache_id(context_ids[:aligned]))
        expiry_ms = m.created_unix_ms + m.ttl_s * 1000
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(ends, len(context_ids))
        pipe.expire(ends, m.ttl_s)
        pipe.hset(self.keys.usage(tenant), m.cache_id, f"{m.total_bytes} {expiry_ms}")
        await pipe.execute()

    # -- reading ---------------------------------------------------------------------------------

    async def stat(self, tenant: str, cache_id: str) -> Manifest:
        """The manifest of a live entry, or NotFound."""
        self._check_id(cache_id)
        async with self._redis_errors():
            m = await self._manifest(check_tenant(tenant), cache_id)
        if m is None:
            raise NotFound(f"no cache {cache_id} (it may have expired)")
        return m

    async def fetch(self, tenant: str, cache_id: str) -> tuple[Manifest, AsyncIterator[bytes]]:
        """(manifest, chunks). Chunks are hashed as they stream; the iterator raises NotFound (a chunk
        was evicted) or DataLoss (checksum) at the point of failure, deleting the entry, so a consumer
        must only use bytes from an iteration that completed."""
        m = await self.stat(tenant, cache_id)
        names = [self.keys.chunk(m.key.tenant, cache_id, m.write_id, i) for i in range(m.chunk_count)]
        async with self._redis_errors():
            first = await self.redis.mget(names[:_MGET_BATCH])
        if any(chunk is None for chunk in first):  # found before anything is sent: a clean miss
            await self._missing(m)
        return m, self._stream(m, names, first)

    async def _stream(self, m: Manifest, names: list[str], first: list[bytes]) -> AsyncIterator[bytes]:
        digest, total = hashlib.sha256(), 0
        batch, pending = first, None
        for start in range(0, len(names), _MGET_BATCH):
            if start:
                async with self._redis_errors():
                    batch = await pending
            following = names[start + _MGET_BATCH : start + 2 * _MGET_BATCH]
            # read the next batch from Redis while this one is hashed and sent
            pending = asyncio.ensure_future(self.redis.mget(following)) if following else None
            try:
                for chunk in batch:
                    if chunk is None:
                        await self._missing(m)
                    await asyncio.to_thread(digest.update, chunk)  # hashlib frees the GIL: hash beside the loop
                    total += len(chunk)
                    yield chunk
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
        if total != m.total_bytes or digest.digest() != m.sha256:
            await self._drop(m, "corrupt_deleted")
            raise DataLoss(f"cache {m.cache_id} failed its checksum; it was deleted")
        self.counters["hits"] += 1
        task = asyncio.create_task(self._touch(m, quiet=True))  # off the reply's path
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _missing(self, m: Manifest) -> None:
        await self._drop(m, "missing_chunk_deleted")
        self.counters["misses"] += 1
        raise NotFound(f"cache {m.cache_id} lost chunks (evicted); it was deleted")

    async def get(self, tenant: str, cache_id: str) -> tuple[Manifest, bytes]:
        """The whole verified cache bytes."""
        m, chunks = await self.fetch(tenant, cache_id)
        return m, b"".join([c async for c in chunks])

    async def lookup(self, key: CacheKey, token_ids: Sequence[int], longest_prefix: bool) -> tuple[Manifest, int]:
        """(manifest, matched tokens) of the exact context, or of the longest stored context that
        is a prefix of ``token_ids``. Raises NotFound."""
        tenant = check_tenant(key.tenant)
        async with self._redis_errors():
            if not longest_prefix:
                m = await self._manifest(tenant, key.cache_id(token_ids))
                if m is None:
                    raise NotFound("no cache for this exact context")
                return m, len(token_ids)
            block = self.config.block_tokens
            for aligned in range(len(token_ids) // block * block, -1, -block):
                ends_key = self.keys.prefix_ends(tenant, key.cache_id(token_ids[:aligned]))
                ends = sorted((int(n) for n in await self.redis.smembers(ends_key)), reverse=True)
                for n in (n for n in ends if n <= len(token_ids)):
                    m = await self._manifest(tenant, key.cache_id(token_ids[:n]))
                    if m is not None:
                        return m, n
                    await self.redis.srem(ends_key, n)  # the entry is gone: forget the stale length
        raise NotFound("no stored context is a prefix of these tokens")

    # -- deleting --------------------------------------------------------------------------------

    async def delete(self, tenant: str, cache_id: str) -> bool:
        self._check_id(cache_id)
        async with self._redis_errors():
            m = await self._manifest(check_tenant(tenant), cache_id)
            if m is None:
                return False
            await self._drop(m)
        return True

    async def _drop(self, m: Manifest, counter: str | None = None) -> None:
        tenant = m.key.tenant
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.manifest(tenant, m.cache_id))  # first: the entry disappears at once
        for i in range(m.chunk_count):
            pipe.delete(self.keys.chunk(tenant, m.cache_id, m.write_id, i))
        pipe.hdel(self.keys.usage(tenant), m.cache_id)
        await pipe.execute()
        if counter:
            self.counters[counter] += 1

    async def _delete_chunks(self, tenant: str, cache_id: str, write_id: str, n: int) -> None:
        await self.redis.delete(*[self.keys.chunk(tenant, cache_id, write_id, i) for i in range(n)])

    # -- single flight ---------------------------------------------------------------------------

    async def get_or_create(self, key: CacheKey, context_ids: Sequence[int],
                            compute: Callable[[], Awaitable[bytes]], ttl_s: int | None = None) -> tuple[Manifest, bool]:
        """The stored entry for this context, computing and storing it if absent; (manifest, created).

        Across every replica, one caller computes a given document at a time: it holds a Redis lock
        with a lease it renews while computing; the others wait for the entry. If the holder dies,
        its lease expires and a waiter takes over.
        """
        tenant = check_tenant(key.tenant)
        cache_id = key.cache_id(context_ids)
        lock = self.keys.lock(tenant, cache_id)
        deadline = time.monotonic() + self.config.wait_s
        lease_ms = int(self.config.lock_lease_s * 1000)
        while True:
            async with self._redis_errors():
                m = await self._manifest(tenant, cache_id)
                if m is not None:
                    return m, False
                token = uuid.uuid4().hex
                acquired = await self.redis.set(lock, token, nx=True, px=lease_ms)
            if acquired:
                async with self._lease(lock, token, lease_ms):
                    data = await compute()
                    m, existed = await self.put(key, context_ids, data, ttl_s)
                    return m, not existed
            if time.monotonic() > deadline:
                raise Unavailable(f"waited {self.config.wait_s:.0f} s for another replica to compress this context")
            await asyncio.sleep(0.05)

    @asynccontextmanager
    async def _lease(self, lock: str, token: str, lease_ms: int):
        async def renew():
            while True:
                await asyncio.sleep(lease_ms / 3000)
                await self.redis.eval(_RENEW, 1, lock, token, lease_ms)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            try:
                await self.redis.eval(_RELEASE, 1, lock, token)
            except rexc.RedisError:
                pass  # the lease expires by itself

    # -- helpers ---------------------------------------------------------------------------------

    async def _manifest(self, tenant: str, cache_id: str) -> Manifest | None:
        raw = await self.redis.get(self.keys.manifest(tenant, cache_id))
        return None if raw is None else Manifest.from_json(raw)

    async def _touch(self, m: Manifest, quiet: bool = False) -> None:
        """Refresh the TTL of every key of a hit entry (``quiet``: a failure only skips the refresh)."""
        tenant = m.key.tenant
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(self.keys.manifest(tenant, m.cache_id), m.ttl_s)
        for i in range(m.chunk_count):
            pipe.expire(self.keys.chunk(tenant, m.cache_id, m.write_id, i), m.ttl_s)
        try:
            await pipe.execute()
        except rexc.RedisError:
            if not quiet:
                raise

    @staticmethod
    def _check_id(cache_id: str) -> None:
        if not CACHE_ID.match(cache_id):
            raise InvalidArgument("cache_id must be 64 lowercase hex characters")

    @asynccontextmanager
    async def _redis_errors(self):
        try:
            yield
        except (rexc.ConnectionError, rexc.TimeoutError, OSError) as e:
            raise Unavailable(f"Redis is unreachable ({type(e).__name__}); retry shortly") from None
