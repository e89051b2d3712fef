"""Per-tenant storage quotas (``RedisStore._reserve`` / ``reconcile``): the accounting follows what
Redis really holds through Put, Delete, TTL expiry and eviction, a tenant over its quota is refused
with the figures, and a tenant filling a Redis under memory pressure cannot push another tenant's
caches out (the control, without quotas, does). The usage is exported per tenant."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from conftest import random_ids
from redis import Redis
from store_helpers import ServerProcess, fetched_bytes, free_port, make_cache, with_store
from test_store_grpc import config

from service.store.embedded import EmbeddedRedis
from service.store.errors import NotFound, QuotaExceeded


@pytest.fixture(scope="module")
def caches(tiny_engine):
    """Six caches of the same size, of tenant "acme"."""
    return [(ids, *make_cache(tiny_engine, ids)) for ids in (random_ids(100, seed=300 + i) for i in range(6))]


def test_usage_follows_put_delete_expiry_and_eviction(caches, redis_target):
    (ids0, key, d0), (ids1, _, d1), (ids2, _, d2), (ids3, _, d3) = caches[:4]
    size = len(d0)

    async def go(store):
        a, _ = await store.put(key, ids0, d0)
        b, _ = await store.put(key, ids1, d1)
        assert await store.reconcile("acme") == 2 * size
        with pytest.raises(QuotaExceeded) as e:  # the figures: what it stores, the cache, the quota
            await store.put(key, ids2, d2)
        assert f"stores {2 * size} bytes" in str(e.value) and f"quota of {2 * size + size // 2}" in str(e.value)
        await store.delete(a.cache_id, tenant="acme")
        assert await store.reconcile("acme") == size
        c, _ = await store.put(key, ids2, d2)
        # Redis evicts behind the store's back: one chunk of b, all of c
        await store.redis.delete(store.keys.chunk("acme", b.cache_id, b.write_id, 1))
        await store.redis.delete(store.keys.manifest("acme", c.cache_id), *store._chunk_names(c))
        assert await store.reconcile("acme") == 0
        assert await store.redis.exists(*store._chunk_names(b)) == 0  # the broken entry's remains freed
        d, _ = await store.put(key, ids3, d3, ttl_s=1)
        assert await store.reconcile("acme") == size
        await asyncio.sleep(1.2)
        assert await store.reconcile("acme") == 0  # expired
        # a write in progress counts; one whose writer died long ago does not
        usage = store.keys.usage("acme")
        now_ms = int(time.time() * 1000)
        await store.redis.hset(usage, "1" * 64, f"{size} {now_ms + 60_000} w1 {now_ms}")
        await store.redis.hset(usage, "2" * 64, f"{size} {now_ms + 60_000} w2 {now_ms - 61_000}")
        assert await store.reconcile("acme") == size
        assert set(await store.redis.hkeys(usage)) == {b"1" * 64}

    with_store(go, **redis_target, chunk_bytes=4096, tenant_quota_bytes=2 * size + size // 2)


def test_a_put_over_quota_reconciles_first(caches):
    """Entries Redis evicted do not keep a tenant over its quota: the refused Put reconciles and fits."""
    (ids0, key, d0), (ids1, _, d1) = caches[:2]

    async def go(store):
        a, _ = await store.put(key, ids0, d0)
        await store.redis.delete(store.keys.manifest("acme", a.cache_id), *store._chunk_names(a))  # evicted
        b, existed = await store.put(key, ids1, d1)
        assert not existed and await store.reconcile("acme") == len(d1)

    with_store(go, chunk_bytes=4096, tenant_quota_bytes=len(d0) + 10)


def _fill(quota: int, caches, tiny_engine) -> tuple[int, int]:
    """Tenant "quiet" stores 3 caches in a Redis of little memory (volatile-lru, as shipped), then
    "flood" writes 60 more; returns (quiet's caches still whole, flood's Puts refused)."""
    quiet = caches[:3]
    flood = [make_cache(tiny_engine, ids, tenant="flood") + (ids,) for ids in
             (random_ids(100, seed=400 + i) for i in range(60))]
    size = len(quiet[0][2])

    async def go(store):
        for ids, key, data in quiet:
            await store.put(dataclass_tenant(key, "quiet"), ids, data)
        refused = 0
        for key, data, ids in flood:
            try:
                await store.put(key, ids, data)
            except QuotaExceeded:
                refused += 1
        whole = 0
        for ids, key, data in quiet:
            try:
                m, _ = await store.lookup(dataclass_tenant(key, "quiet"), ids)
                whole += await fetched_bytes(store, m.cache_id, tenant="quiet") == data
            except NotFound:
                pass
        return whole, refused

    with EmbeddedRedis() as redis:
        plain = Redis.from_url(redis.url)
        plain.config_set("maxmemory", plain.info("memory")["used_memory"] + 30 * size)  # 30 caches' worth; 63 come
        return with_store(go, redis.url, chunk_bytes=4096, tenant_quota_bytes=quota)


def dataclass_tenant(key, tenant: str):
    import dataclasses

    return dataclasses.replace(key, tenant=tenant)


def test_a_tenant_over_its_quota_cannot_evict_another_tenants_caches(caches, tiny_engine):
    size = len(caches[0][2])
    whole, refused = _fill(10 * size, caches, tiny_engine)  # flood may hold 10, quiet 3: fits in 30
    assert whole == 3 and refused == 50, (whole, refused)
    whole, refused = _fill(0, caches, tiny_engine)  # the control: no quotas, LRU over everyone's caches
    assert whole < 3 and refused == 0, (whole, refused)


def test_each_tenants_stored_bytes_are_exported(tiny_engine):
    ids = random_ids(100, seed=46)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    port = free_port()

    def stored() -> float | None:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        line = next((x for x in text.splitlines() if x.startswith('kvcompose_store_tenant_bytes{tenant="default"}')),
                    None)
        return None if line is None else float(line.split()[-1])

    def soon(expected: float) -> None:
        deadline = time.monotonic() + 10
        while stored() != expected:
            assert time.monotonic() < deadline, (stored(), expected)
            time.sleep(0.1)

    with ServerProcess(config(usage_refresh_s=0.2), metrics_port=port) as s, s.client() as client:
        m, _ = client.put(key, ids, data)
        soon(len(data))
        client.delete(m.cache_id)
        soon(0)
