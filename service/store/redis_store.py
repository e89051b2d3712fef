"""The prefix store on Redis: chunked entries, a manifest written last, verified reads.

Layout of one entry (all keys share the hash tag ``{tenant/cache_id}``, see ``keys.py``):

- ``...:chunk:<write_id>:<i>``: the cache bytes in ``chunk_bytes`` pieces, written first;
- ``...:manifest``: JSON metadata with size, chunk count, SHA-256 and XXH3-128, written last with SET NX,
  so a reader sees a complete entry or nothing, and concurrent writers never mix chunks (each
  writer names its chunks with its own ``write_id``; the loser deletes its own).

Every key carries the entry's TTL, refreshed on each hit. A read with a missing chunk raises
ChunksLost, a NotFound (entry deleted); a read whose bytes fail the read checksum (``checksum.py``)
raises DataLoss (entry deleted). Tenants are namespaces: a tenant's id never resolves in another
tenant's keys. It implements ``interface.PrefixStore``; ``metered.MeteredStore`` counts what it does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import redis.exceptions as rexc

from service.cache.format import (
    CorruptCacheError,
    check,
    digests,
    kept_tokens_per_layer,
    layer_shapes,
    version_of,
)
from service.cache.ids import CacheKey
from service.config import StoreConfig
from service.store.checksum import xxh3_128
from service.store.errors import (
    ChunksLost,
    DataLoss,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Unavailable,
    is_transient,
    unavailable,
)
from service.store.keys import CACHE_ID, Keys, check_tenant
from service.store.manifest import Manifest
from service.store.retry import redis_retry_policy

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
# Extend a key's TTL, never shorten it (a prefix-index set is shared by entries with other TTLs).
_EXTEND = "if redis.call('ttl', KEYS[1]) < tonumber(ARGV[1]) then return redis.call('expire', KEYS[1], ARGV[1]) end"
# Refresh an entry's usage record, unless the entry was deleted meanwhile.
_TOUCH_USAGE = ("if redis.call('hexists', KEYS[1], ARGV[1]) == 1 then "
                "return redis.call('hset', KEYS[1], ARGV[1], ARGV[2]) end return 0")
# Reserve quota atomically: drop expired records, sum the rest, record this entry if it fits.
# KEYS[1] usage hash; ARGV: cache id, bytes, expiry ms, now ms, quota bytes (0 = none), "write_id reserved_ms".
# Records "bytes expiry_ms write_id reserved_ms"; returns -1 when recorded, else the bytes in use.
_RESERVE = """
local used = 0
local all = redis.call('hgetall', KEYS[1])
for i = 1, #all, 2 do
  local bytes, expiry = string.match(all[i + 1], '(%d+) (%d+)')
  if tonumber(expiry) < tonumber(ARGV[4]) then redis.call('hdel', KEYS[1], all[i])
  elseif all[i] ~= ARGV[1] then used = used + tonumber(bytes) end
end
if tonumber(ARGV[5]) > 0 and used + tonumber(ARGV[2]) > tonumber(ARGV[5]) then return used end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[6])
return -1
"""
# Drop a usage record only if it is still this writer's (another writer of the same entry may own it).
_RELEASE_USAGE = ("if redis.call('hget', KEYS[1], ARGV[1]) == ARGV[2] then "
                  "return redis.call('hdel', KEYS[1], ARGV[1]) end return 0")
log = logging.getLogger(__name__)
_MGET_BATCH = 8  # chunks per round trip when reading
# A reserved entry with no manifest after this long: its writer died (younger: a Put in progress).
RESERVE_GRACE_S = 60.0
TOUCH_EVERY_S = 60.0  # a hit entry's TTL is refreshed at most this often (see _touch_later)
_TOUCHED_ENTRIES = 100_000  # bound of the refresh records (cleared when full)


def connect(config: StoreConfig, url: str) -> aioredis.Redis | aioredis.RedisCluster:
    """A redis-py client with the store's one retry policy and timeouts: ``RedisCluster`` when
    ``config.redis_cluster`` (it discovers the slots from ``url``'s node and follows failovers)."""
    retry = redis_retry_policy(config.redis_retries, (rexc.ConnectionError, rexc.TimeoutError))
    timeouts = {"socket_timeout": config.redis_timeout_s, "socket_connect_timeout": config.redis_timeout_s}
    if config.redis_cluster:
        return aioredis.RedisCluster.from_url(url, retry=retry, **timeouts)
    return aioredis.Redis.from_url(url, retry=retry, retry_on_error=[rexc.ConnectionError, rexc.TimeoutError],
                                   health_check_interval=30, **timeouts)


class RedisStore:
    """The prefix store on Redis (``interface.PrefixStore``), plus what only a Redis backend can do:
    ``stream`` (chunks as they are read), ``grant`` (chunk names for a direct reader) and
    ``get_or_create`` (single flight across replicas)."""

    def __init__(self, client: aioredis.Redis, config: StoreConfig):
        self.redis = client
        self.config = config
        self.keys = Keys(config.key_prefix)
        self._background: set[asyncio.Task] = set()
        self._touched: dict[tuple[str, str], float] = {}  # (tenant, cache id) -> last background TTL refresh
        self._ready = not isinstance(client, aioredis.RedisCluster)
        self._ready_lock = asyncio.Lock()

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
        ttl_s = self._ttl(ttl_s)
        if len(data) > self.config.max_entry_bytes:
            raise QuotaExceeded(f"cache is {len(data)} bytes; the store accepts at most {self.config.max_entry_bytes}")
        # One SHA-256 pass gives the format's body digest and the manifest's, then XXH3 for readers; off the loop.
        (body, digest), fast = await asyncio.to_thread(lambda: (digests(data), xxh3_128(data)))
        if expected_sha256 and digest != expected_sha256:
            raise InvalidArgument("uploaded bytes do not match the header's sha256")
        header = self._validate(key, context_ids, data, body)
        cache_id = key.cache_id(context_ids)
        async with self._redis_errors():
            existing = await self._manifest(tenant, cache_id)
            if existing is not None:
                await self._touch(existing)
                return existing, True
            created_ms = int(time.time() * 1000)
            write_id = uuid.uuid4().hex[:16]
            record = await self._reserve(tenant, cache_id, len(data), created_ms + ttl_s * 1000,
                                         f"{write_id} {created_ms}")
            size = self.config.chunk_bytes
            n_chunks = max(1, -(-len(data) // size))
            view = memoryview(data)
            pipe = self.redis.pipeline(transaction=False)
            for i in range(n_chunks):
                pipe.set(self.keys.chunk(tenant, cache_id, write_id, i), view[i * size : (i + 1) * size], ex=ttl_s)
            try:
                await pipe.execute()
            except BaseException:
                await self._release(tenant, cache_id, record)
                raise
            slots, per_token = layer_shapes(header)
            kept = kept_tokens_per_layer(data, header)
            aligned = len(context_ids) // self.config.block_tokens * self.config.block_tokens
            manifest = Manifest(cache_id, version_of(data), len(data), n_chunks, size, digest, len(context_ids), key,
                                created_ms, ttl_s, write_id, slots, per_token * len(context_ids),
                                key.cache_id(context_ids[:aligned]), tuple(kept) if kept != slots else (), fast)
            if not await self.redis.set(self.keys.manifest(tenant, cache_id), manifest.to_json(), nx=True, ex=ttl_s):
                committed = await self._manifest(tenant, cache_id)
                if committed is None or committed.write_id != write_id:  # another writer committed first
                    await self._delete_chunks(tenant, cache_id, write_id, n_chunks)
                    return await self.stat(cache_id, tenant=tenant), True
                # else: our own SET NX, applied, then retried by redis-py after its reply was lost
            await self._committed(tenant, cache_id, record)
            await self._index(manifest)
            return manifest, False

    def _validate(self, key: CacheKey, context_ids: Sequence[int], data: bytes, body_sha256: bytes) -> dict:
        """The whole structure of a Put, against its key and the model it names; nothing malformed is stored."""
        self._check_tokens(context_ids)
        try:
            header = check(data, body_sha256=body_sha256)
        except CorruptCacheError as e:
            raise InvalidArgument(f"uploaded bytes are not a valid cache: {e}") from None
        meta = header["meta"]
        shapes = self.config.model_shapes
        if shapes:
            if key.model_id not in shapes:
                raise InvalidArgument(f"model {key.model_id!r} is not served by this store ({sorted(shapes)})")
            heads, _, dim = next(t["shape"] for t in header["tensors"] if t["name"] == "v.0")
            if [header["layers"], heads, dim] != list(shapes[key.model_id]):
                raise InvalidArgument(f"cache has {header['layers']} layers x {heads} KV heads x {dim} dims; "
                                      f"{key.model_id} has {shapes[key.model_id]}")
        if meta["model_revision"] != key.model_revision or meta["press"] != key.press:
            raise InvalidArgument("cache bytes were made with another model revision or press than the key says")
        if header.get("codec") != key.codec or meta["model_id"] != key.model_id:
            raise InvalidArgument(
                f"cache bytes were made by {meta['model_id']} with codec {header.get('codec')}; "
                f"the key says {key.model_id} with codec {key.codec}")
        if int(meta["original_length"]) != len(context_ids):
            raise InvalidArgument(f"cache covers {meta['original_length']} context tokens; "
                                  f"context_ids has {len(context_ids)}")
        return header

    async def _reserve(self, tenant: str, cache_id: str, size: int, expiry_ms: int, writer: str) -> str:
        """Record the entry in its tenant's usage, atomically checked against the quota (one script);
        returns the record written. Over the quota, the usage is first made exact (``reconcile``:
        entries Redis evicted stop counting), so a refusal's figures are what the tenant holds."""
        quota = self.config.quota_of(tenant)
        for attempt in (1, 2):
            used = await self.redis.eval(_RESERVE, 1, self.keys.usage(tenant), cache_id, size, expiry_ms,
                                         int(time.time() * 1000), quota, writer)
            if used == -1:
                break
            if attempt == 1:
                await self.reconcile(tenant)
        else:
            raise QuotaExceeded(f"tenant {tenant!r} stores {used} bytes; this cache of {size} bytes would exceed "
                                f"its quota of {quota} bytes (tenant_quota_bytes / tenant_quotas): delete "
                                f"entries, wait for them to expire, or raise the quota")
        try:  # the tenants the store server reconciles and exports (best effort: another slot)
            await self.redis.sadd(self.keys.tenants(), tenant)
        except Exception as e:  # noqa: BLE001
            log.warning("could not list tenant %r for usage reports (%s: %s)", tenant, type(e).__name__, e)
        return f"{size} {expiry_ms} {writer}"

    async def reconcile(self, tenant: str) -> int:
        """Make the tenant's usage exact against what Redis holds; returns the bytes it stores. A
        record counts while its entry is whole (manifest and every chunk), or while its Put is in
        progress (no manifest yet, reserved under ``RESERVE_GRACE_S`` ago). Otherwise the entry
        expired, was deleted, evicted (whole or in part: its remains are deleted too) or its writer
        died, and the record goes, only if unchanged meanwhile (a new Put of the entry keeps its own)."""
        usage = self.keys.usage(tenant)
        async with self._redis_errors():
            records = {k.decode(): v.decode() for k, v in (await self.redis.hgetall(usage)).items()}
            ids = list(records)
            pipe = self.redis.pipeline(transaction=False)
            for cache_id in ids:
                pipe.get(self.keys.manifest(tenant, cache_id))
            manifests = [None if raw is None else Manifest.from_json(raw) for raw in await pipe.execute()]
            pipe = self.redis.pipeline(transaction=False)
            for m in filter(None, manifests):
                pipe.exists(*self._chunk_names(m))
            present = iter(await pipe.execute())
            now_ms, total = int(time.time() * 1000), 0
            for cache_id, m in zip(ids, manifests):
                size, expiry_ms, _, *reserved = records[cache_id].split()
                if m is not None and next(present) == m.chunk_count:
                    total += int(size)
                elif m is None and int(expiry_ms) > now_ms and reserved and \
                        now_ms - int(reserved[0]) < RESERVE_GRACE_S * 1000:
                    total += int(size)
                elif m is not None:
                    await self._drop(m)  # evicted in part: unreadable; free the rest
                else:
                    await self.redis.eval(_RELEASE_USAGE, 1, usage, cache_id, records[cache_id])
        return total

    async def _committed(self, tenant: str, cache_id: str, record: str) -> None:
        """The entry's record loses its reservation time: from now on, a missing manifest means the
        entry is gone (``reconcile``), not a Put in progress. Best effort: a record left reserved
        counts at most ``RESERVE_GRACE_S`` longer if its entry is evicted right away."""
        try:
            await self.redis.eval(_TOUCH_USAGE, 1, self.keys.usage(tenant), cache_id, record.rsplit(" ", 1)[0])
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark usage record of %s committed (%s: %s)", cache_id, type(e).__name__, e)

    async def _release(self, tenant: str, cache_id: str, record: str) -> None:
        """Undo this writer's reservation after its write failed (a record another writer of the same
        entry wrote since is left alone)."""
        try:
            await self.redis.eval(_RELEASE_USAGE, 1, self.keys.usage(tenant), cache_id, record)
        except Exception as e:  # noqa: BLE001 - best effort
            log.warning("could not release a usage record (%s: %s); it expires with its TTL", type(e).__name__, e)

    async def _index(self, m: Manifest) -> None:
        ends = self.keys.prefix_ends(m.key.tenant, m.prefix_id)
        await self.redis.sadd(ends, m.context_tokens)
        await self.redis.eval(_EXTEND, 1, ends, m.ttl_s)

    # -- reading ---------------------------------------------------------------------------------

    async def stat(self, cache_id: str, *, tenant: str, touch: bool = False) -> Manifest:
        """The manifest of a live entry, or NotFound. ``touch``: count it as a hit (refresh its TTL),
        as decoders do when they answer from their in-memory copy."""
        self._check_id(cache_id)
        async with self._redis_errors():
            m = await self._manifest(check_tenant(tenant), cache_id)
            if m is not None and touch:
                await self._touch(m)
        if m is None:
            raise NotFound(f"no cache {cache_id} (it may have expired or been deleted)")
        return m

    async def grant(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[str]]:
        """A read grant: (manifest, chunk key names) of the tenant's live entry, its TTL refreshed
        off the reply's path as a hit's is (whether the reader's bytes verify, the store does not see).
        Raises NotFound."""
        m = await self.stat(cache_id, tenant=tenant)
        self._touch_later(m)
        return m, self._chunk_names(m)

    def _touch_later(self, m: Manifest) -> None:
        """Refresh a hit entry's TTL off the reply's path, at most once per ``min(TOUCH_EVERY_S, ttl / 10)``
        per entry in this process: a document many decoders read costs a refresh a minute, not one
        per read (each is a round trip per chunk key); its TTL is hours, so a late minute changes nothing."""
        key, now = (m.key.tenant, m.cache_id), time.monotonic()
        if now - self._touched.get(key, -math.inf) < min(TOUCH_EVERY_S, m.ttl_s / 10):
            return
        if len(self._touched) >= _TOUCHED_ENTRIES:
            self._touched.clear()
        self._touched[key] = now
        task = asyncio.create_task(self._touch(m, quiet=True))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _chunk_names(self, m: Manifest) -> list[str]:
        return self.keys.chunks(m.key.tenant, m.cache_id, m.write_id, m.chunk_count)

    async def fetch(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[bytes]]:
        """(manifest, verified chunks). Raises NotFound (ChunksLost: a chunk was evicted) or DataLoss."""
        m, chunks = await self.stream(cache_id, tenant=tenant)
        return m, [c async for c in chunks]

    async def stream(self, cache_id: str, *, tenant: str) -> tuple[Manifest, AsyncIterator[bytes]]:
        """(manifest, chunks). Chunks are hashed as they stream; the iterator raises ChunksLost (a chunk
        was evicted) or DataLoss (checksum) at the point of failure, deleting the entry, so a consumer
        must only use bytes from an iteration that completed."""
        m = await self.stat(cache_id, tenant=tenant)
        names = self._chunk_names(m)
        async with self._redis_errors():
            first = await self.redis.mget(names[:_MGET_BATCH])
        if any(chunk is None for chunk in first):  # found before anything is sent: a clean miss
            await self._missing(m)
        return m, self._stream(m, names, first)

    async def _stream(self, m: Manifest, names: list[str], first: list[bytes]) -> AsyncIterator[bytes]:
        (digest, expected), total = m.read_check(), 0
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
                    if m.xxh3_128:
                        digest.update(chunk)  # about 20 us per MiB: inline
                    else:
                        await asyncio.to_thread(digest.update, chunk)  # SHA-256 frees the GIL: beside the loop
                    total += len(chunk)
                    yield chunk
            except BaseException:
                if pending is not None:
                    pending.cancel()
                raise
        if total != m.total_bytes or digest.digest() != expected:
            await self._drop(m)
            raise DataLoss(f"cache {m.cache_id} failed its checksum; it was deleted")
        self._touch_later(m)  # off the reply's path

    async def _missing(self, m: Manifest) -> None:
        await self._drop(m)
        raise ChunksLost(f"cache {m.cache_id} lost chunks (evicted); it was deleted")

    async def lookup(self, key: CacheKey, token_ids: Sequence[int],
                     longest_prefix: bool = False) -> tuple[Manifest, int]:
        """(manifest, matched tokens) of the exact context, or of the longest stored context that
        is a prefix of ``token_ids``. Raises NotFound."""
        tenant = check_tenant(key.tenant)
        self._check_tokens(token_ids)
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

    async def delete(self, cache_id: str, *, tenant: str) -> bool:
        self._check_id(cache_id)
        async with self._redis_errors():
            m = await self._manifest(check_tenant(tenant), cache_id)
            if m is None:
                return False
            await self._drop(m)
        return True

    async def _drop(self, m: Manifest) -> None:
        tenant = m.key.tenant
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.manifest(tenant, m.cache_id))  # first: the entry disappears at once
        for i in range(m.chunk_count):
            pipe.delete(self.keys.chunk(tenant, m.cache_id, m.write_id, i))
        pipe.hdel(self.keys.usage(tenant), m.cache_id)  # (another slot on a cluster: redis-py splits by node)
        async with self._redis_errors():
            await pipe.execute()

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
                    await self._touch(m, quiet=True)  # reuse is a hit
                    return m, False
                token = uuid.uuid4().hex
                acquired = await self.redis.set(lock, token, nx=True, px=lease_ms)
                if not acquired:  # ours after all if the first SET NX applied and only its reply was lost
                    acquired = await self.redis.get(lock) == token.encode()
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
                try:
                    await self.redis.eval(_RENEW, 1, lock, token, lease_ms)
                except Exception as e:  # noqa: BLE001 - e.g. a failover: renew next period (the lease has two more)
                    log.warning("renewing the lease of %s failed (%s: %s)", lock, type(e).__name__, e)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            try:
                await self.redis.eval(_RELEASE, 1, lock, token)
            except Exception:  # noqa: BLE001 - the lease expires by itself
                pass

    # -- helpers ---------------------------------------------------------------------------------

    async def _manifest(self, tenant: str, cache_id: str) -> Manifest | None:
        raw = await self.redis.get(self.keys.manifest(tenant, cache_id))
        return None if raw is None else Manifest.from_json(raw)

    async def _touch(self, m: Manifest, quiet: bool = False) -> None:
        """Refresh the TTL of every key of a hit entry: manifest, chunks, its prefix-index set and its
        usage record (``quiet``: a failure only skips the refresh). The index set and the usage record
        live in other slots of a cluster: refreshing them is best effort, so a hit does not fail
        because another shard is down."""
        tenant = m.key.tenant
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(self.keys.manifest(tenant, m.cache_id), m.ttl_s)
        for i in range(m.chunk_count):
            pipe.expire(self.keys.chunk(tenant, m.cache_id, m.write_id, i), m.ttl_s)
        expiry_ms = int(time.time() * 1000) + m.ttl_s * 1000
        try:
            await pipe.execute()
        except Exception as e:
            if not quiet:
                raise
            log.warning("refreshing the TTL of %s failed (%s: %s)", m.cache_id, type(e).__name__, e)
            return
        try:
            ends = self.keys.prefix_ends(tenant, m.prefix_id)
            await self.redis.sadd(ends, m.context_tokens)  # re-indexed if a stale-length sweep dropped it
            await self.redis.eval(_EXTEND, 1, ends, m.ttl_s)
            await self.redis.eval(_TOUCH_USAGE, 1, self.keys.usage(tenant), m.cache_id,
                                  f"{m.total_bytes} {expiry_ms} {m.write_id}")
        except Exception as e:  # noqa: BLE001 - best effort (see above); the keys keep their TTLs
            log.warning("refreshing the index and usage of %s failed (%s: %s)", m.cache_id, type(e).__name__, e)

    def _ttl(self, ttl_s: int | None) -> int:
        if not ttl_s:
            return self.config.default_ttl_s
        if not 1 <= ttl_s <= self.config.max_ttl_s:
            raise InvalidArgument(f"ttl_s must be in [1, {self.config.max_ttl_s}] seconds (0 = the default "
                                  f"{self.config.default_ttl_s}), got {ttl_s}")
        return ttl_s

    def _check_tokens(self, token_ids: Sequence[int]) -> None:
        if not token_ids:
            raise InvalidArgument("token ids are empty")
        if len(token_ids) > self.config.max_context_tokens:
            raise InvalidArgument(f"{len(token_ids)} token ids; the store takes at most "
                                  f"{self.config.max_context_tokens} (max_context_tokens)")

    @staticmethod
    def _check_id(cache_id: str) -> None:
        if not CACHE_ID.match(cache_id):
            raise InvalidArgument("cache_id must be 64 lowercase hex characters")

    async def _load_slots(self) -> None:
        """A cluster client loads its slot map once, before any concurrent use: redis-py's asyncio
        cluster client, first used by several coroutines at once, can close a connection another
        one is still using while it sets up (seen here about once in 30 cold starts)."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                await self.redis.initialize()
                self._ready = True

    @asynccontextmanager
    async def _redis_errors(self):
        try:
            await self._load_slots()
            yield
        except Exception as e:
            if _out_of_memory(e):
                raise QuotaExceeded("Redis is full (maxmemory) and has nothing left to evict; retry later or "
                                    "give it more memory") from None
            if is_transient(e):
                raise unavailable(e) from None
            raise


def _out_of_memory(e: BaseException) -> bool:
    """Redis refused a write for want of memory: a command's own OOM error, or the same refusal of a
    write inside one of our scripts (which redis-py sees as a script's ResponseError)."""
    return isinstance(e, rexc.OutOfMemoryError) or (
        isinstance(e, rexc.ResponseError) and "OOM command not allowed" in str(e))
