"""The Redis store against real Redis: commit order, verification, TTLs, tenants, quotas, single flight."""

import asyncio
import hashlib
import json
import threading

import pytest
import xxhash
from conftest import random_ids
from store_helpers import fetched_bytes, make_cache, store_for, wipe, with_store

from service.cache import codec
from service.store.embedded import EmbeddedRedis
from service.store.errors import DataLoss, InvalidArgument, NotFound, QuotaExceeded, Unavailable
from service.store.metered import MeteredStore


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def cache(tiny_engine):
    ids = random_ids(300, seed=21)
    key, data = make_cache(tiny_engine, ids)
    return key, ids, data


@pytest.mark.parametrize("codec_name", ["float16", "bfloat16", "float32", "int8"])
def test_round_trip_is_bit_exact_for_every_codec(tiny_engine, codec_name, redis_target):
    ids = random_ids(200, seed=3)
    key, data = make_cache(tiny_engine, ids, codec_name)

    async def go(store):
        m, existed = await store.put(key, ids, data)
        assert not existed and m.chunk_count == -(-len(data) // 4096)
        assert await fetched_bytes(store, m.cache_id, tenant="acme") == data
        again, existed = await store.put(key, ids, data)
        assert existed and again.cache_id == m.cache_id

    with_store(go, **redis_target, chunk_bytes=4096)
    assert codec.decode(data).meta.original_length == 200


def test_a_write_killed_midway_leaves_nothing_readable(cache, redis_target):
    key, ids, data = cache

    async def go(store):
        original = store.redis.set

        async def crash_on_manifest(name, *a, **kw):
            if str(name).endswith(":manifest"):
                raise ConnectionError("process killed")
            return await original(name, *a, **kw)

        store.redis.set = crash_on_manifest
        with pytest.raises(Unavailable):
            await store.put(key, ids, data)
        store.redis.set = original
        chunks = [k async for k in store.redis.scan_iter(match=f"{store.config.key_prefix}:*chunk*")]
        assert chunks, "chunks were written before the crash"
        assert all([await store.redis.ttl(k) > 0 for k in chunks])  # orphans expire by themselves
        with pytest.raises(NotFound):
            await store.stat(key.cache_id(ids), tenant="acme")
        with pytest.raises(NotFound):
            await store.lookup(key, ids, longest_prefix=False)

    with_store(go, **redis_target, chunk_bytes=1024)


@pytest.mark.parametrize("older", [False, True], ids=["xxh3", "sha256-only entry"])
def test_a_flipped_byte_is_data_loss_and_the_entry_is_gone(cache, redis_target, older):
    """Reads verify the manifest's XXH3-128; entries stored before it was recorded, their SHA-256."""
    key, ids, data = cache

    async def go(store):
        m, _ = await store.put(key, ids, data)
        assert m.xxh3_128 == xxhash.xxh3_128(data).digest() and m.sha256 == hashlib.sha256(data).digest()
        if older:  # the manifest as a store before XXH3-128 wrote it: still verified, by SHA-256
            raw = json.loads(await store.redis.get(store.keys.manifest("acme", m.cache_id)))
            del raw["xxh3_128"]
            await store.redis.set(store.keys.manifest("acme", m.cache_id), json.dumps(raw), keepttl=True)
            assert await fetched_bytes(store, m.cache_id, tenant="acme") == data
        name = store.keys.chunk("acme", m.cache_id, m.write_id, 1)
        chunk = bytearray(await store.redis.get(name))
        chunk[100] ^= 0x10
        await store.redis.set(name, bytes(chunk))
        metered = MeteredStore(store)
        with pytest.raises(DataLoss, match="checksum"):
            await metered.fetch(m.cache_id, tenant="acme")
        assert metered.outcomes["corrupt_deleted"] == 1 and metered.outcomes["hit"] == 0
        with pytest.raises(NotFound):
            await store.stat(m.cache_id, tenant="acme")

    with_store(go, **redis_target, chunk_bytes=2048)


def test_an_evicted_chunk_is_a_miss_and_the_entry_is_deleted(cache, redis_target):
    key, ids, data = cache

    async def go(store):
        m, _ = await store.put(key, ids, data)
        await store.redis.delete(store.keys.chunk("acme", m.cache_id, m.write_id, 2))
        metered = MeteredStore(store)
        with pytest.raises(NotFound, match="evicted"):
            await metered.fetch(m.cache_id, tenant="acme")
        assert metered.outcomes["missing_chunk_deleted"] == metered.outcomes["miss"] == 1
        assert await store.redis.exists(store.keys.manifest("acme", m.cache_id)) == 0

    with_store(go, **redis_target, chunk_bytes=2048)


def test_tenants_cannot_see_each_other(cache, tiny_engine, redis_target):
    key, ids, data = cache

    async def go(store):
        m, _ = await store.put(key, ids, data)
        with pytest.raises(NotFound):
            await store.stat(m.cache_id, tenant="other")
        with pytest.raises(NotFound):
            await store.fetch(m.cache_id, tenant="other")
        assert not await store.delete(m.cache_id, tenant="other")
        import dataclasses

        other = dataclasses.replace(key, tenant="other")
        assert other.cache_id(ids) != m.cache_id
        with pytest.raises(NotFound):
            await store.lookup(other, ids, longest_prefix=True)
        assert (await store.stat(m.cache_id, tenant="acme")).cache_id == m.cache_id

    with_store(go, **redis_target)


def test_hits_refresh_the_ttl(cache, redis_target):
    key, ids, data = cache

    async def go(store):
        m, _ = await store.put(key, ids, data, ttl_s=100)
        name = store.keys.manifest("acme", m.cache_id)
        await store.redis.expire(name, 5)
        await store.fetch(m.cache_id, tenant="acme")
        for _ in range(50):  # the refresh runs after the reply
            if await store.redis.ttl(name) > 90:
                break
            await asyncio.sleep(0.02)
        assert await store.redis.ttl(name) > 90

    with_store(go, **redis_target, chunk_bytes=4096)


def test_longest_prefix_lookup_finds_the_document_under_a_question(tiny_engine, redis_target):
    doc = random_ids(600, seed=8)
    key, data = make_cache(tiny_engine, doc)

    async def go(store):
        m, _ = await store.put(key, doc, data)
        found, matched = await store.lookup(key, doc + random_ids(30, seed=9), longest_prefix=True)
        assert found.cache_id == m.cache_id and matched == 600
        with pytest.raises(NotFound):
            await store.lookup(key, doc[:599] + random_ids(30, seed=9), longest_prefix=True)
        with pytest.raises(NotFound):
            await store.lookup(key, doc + [5], longest_prefix=False)
        short_key, short = make_cache(tiny_engine, doc[:100])
        s, _ = await store.put(short_key, doc[:100], short)
        found, matched = await store.lookup(key, doc[:300], longest_prefix=True)
        assert found.cache_id == s.cache_id and matched == 100

    with_store(go, **redis_target, block_tokens=256)


def test_quota_and_size_limits(cache, redis_target):
    key, ids, data = cache

    async def over_quota(store):
        await store.put(key, ids, data)
        with pytest.raises(QuotaExceeded, match="quota"):
            await store.put(key, ids[:-1] + [7], data)  # a second entry does not fit

    async def too_big(store):
        with pytest.raises(QuotaExceeded, match="at most 100"):
            await store.put(key, ids, data)

    with_store(over_quota, **redis_target, tenant_quota_bytes=len(data) + 10)
    with_store(too_big, **redis_target, max_entry_bytes=100)


def test_bad_uploads_are_refused(cache, redis_target):
    key, ids, data = cache

    async def go(store):
        with pytest.raises(InvalidArgument, match="checksum"):
            await store.put(key, ids, data[:-1] + bytes([data[-1] ^ 1]))
        with pytest.raises(InvalidArgument, match="context tokens"):
            await store.put(key, ids[:-1], data)
        import dataclasses

        with pytest.raises(InvalidArgument, match="codec"):
            await store.put(dataclasses.replace(key, codec="int8"), ids, data)

    with_store(go, **redis_target)


def test_redis_down_is_unavailable_and_the_store_recovers(cache):
    key, ids, data = cache
    with EmbeddedRedis() as redis:

        async def go(store):
            m, _ = await store.put(key, ids, data)
            redis.stop()
            with pytest.raises(Unavailable):
                await store.stat(m.cache_id, tenant="acme")
            redis.start()  # empty again: it keeps nothing on disk
            with pytest.raises(NotFound):
                await store.stat(m.cache_id, tenant="acme")
            m2, existed = await store.put(key, ids, data)
            assert not existed and await fetched_bytes(store, m2.cache_id, tenant="acme") == data

        with_store(go, redis.url)


def test_two_concurrent_compressions_of_one_document_run_the_model_once(tiny_engine, redis_target):
    """Two replicas (threads with their own event loop and Redis connection) ask for the same document."""
    ids = random_ids(400, seed=31)
    runs, lock = [], threading.Lock()
    prefix = store_for(**redis_target).config.key_prefix
    # Only the key's fields are needed; derived here, once: the two threads share one model, and
    # presses must not run on it from two threads at once (a real replica has its own model).
    key, _ = make_cache(tiny_engine, ids[:10])

    def replica(results):
        async def go():
            store = store_for(**redis_target, key_prefix=prefix)

            async def compute():
                with lock:
                    runs.append(1)
                _, data = await asyncio.to_thread(make_cache, tiny_engine, ids)
                await asyncio.sleep(0.3)  # hold the lock long enough for the other replica to wait
                return data

            results.append(await store.get_or_create(key, ids, compute))
            await store.close()

        asyncio.run(go())

    results: list = []
    threads = [threading.Thread(target=replica, args=(results,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1
    assert {m.cache_id for m, _ in results} == {results[0][0].cache_id}
    assert sorted(created for _, created in results) == [False, True]

    run(wipe(store_for(**redis_target, key_prefix=prefix)))


def test_a_full_redis_refuses_writes_as_resource_exhausted_never_internal(tiny_engine):
    """Filled past maxmemory with keys it may not evict: a Put (whose quota script writes) is
    QuotaExceeded (RESOURCE_EXHAUSTED, retry later), and works again once there is room."""
    import redis

    ids = random_ids(200, seed=77)
    key, data = make_cache(tiny_engine, ids)
    with EmbeddedRedis() as server:
        plain = redis.Redis.from_url(server.url)
        plain.config_set("maxmemory", plain.info("memory")["used_memory"] + (4 << 20))
        filler = 0
        try:
            while True:  # small values: nothing is left at the end, not even room for a script's write
                plain.set(f"fill:{filler}", b"x" * 4096)
                filler += 1
        except redis.exceptions.OutOfMemoryError:
            pass

        async def full(store):
            with pytest.raises(QuotaExceeded, match="Redis is full"):
                await store.put(key, ids, data)
            plain.delete(*[f"fill:{i}" for i in range(filler)])
            m, existed = await store.put(key, ids, data)
            assert not existed and await fetched_bytes(store, m.cache_id, tenant="acme") == data

        with_store(full, url=server.url)
