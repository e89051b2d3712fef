"""One store interface: the Redis store and the gRPC client behave the same through ``PrefixStore``,
with one argument order, and ``MeteredStore`` counts around either one."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import random_ids
from store_helpers import SHARED_REDIS, ServerProcess, fetched_bytes, make_cache, store_for, wipe

from service.config import StoreConfig
from service.store.client import AsyncPrefixStoreClient
from service.store.errors import NotFound
from service.store.interface import PrefixStore
from service.store.metered import MeteredStore


@pytest.fixture(scope="module")
def server():
    config = StoreConfig(redis_url=SHARED_REDIS, key_prefix=f"kvc-test-{uuid.uuid4().hex[:8]}", chunk_bytes=4096,
                         service_token="interface-token", redis_retries=1, redis_timeout_s=2.0)
    with ServerProcess(config) as s:
        yield s


async def _behaviour(store: PrefixStore, key, ids: list[int], data: bytes) -> None:
    assert isinstance(store, PrefixStore)
    m, existed = await store.put(key, ids, data)
    assert not existed and m.total_bytes == len(data) and m.key.codec == key.codec
    again, existed = await store.put(key, ids, data)
    assert existed and again.cache_id == m.cache_id
    assert await fetched_bytes(store, m.cache_id, tenant="acme") == data
    stat = await store.stat(m.cache_id, tenant="acme", touch=True)
    assert (stat.cache_id, stat.sha256, stat.layer_slots, stat.kept_tokens()) == \
        (m.cache_id, m.sha256, m.layer_slots, m.kept_tokens())
    found, matched = await store.lookup(key, ids + [5, 6, 7], longest_prefix=True)
    assert found.cache_id == m.cache_id and matched == len(ids)
    with pytest.raises(NotFound):
        await store.lookup(key, ids + [5, 6, 7])  # exact: not stored
    with pytest.raises(NotFound):  # another tenant never sees the entry, and cannot delete it
        await store.stat(m.cache_id, tenant="globex")
    assert not await store.delete(m.cache_id, tenant="globex")
    assert await store.delete(m.cache_id, tenant="acme")
    assert not await store.delete(m.cache_id, tenant="acme")
    with pytest.raises(NotFound):
        await store.fetch(m.cache_id, tenant="acme")


def test_redis_store_and_grpc_client_behave_the_same(tiny_engine, server):
    ids = random_ids(180, seed=91)
    key, data = make_cache(tiny_engine, ids, tenant="acme")

    async def go():
        redis_store = store_for()
        try:
            await _behaviour(redis_store, key, ids, data)
        finally:
            await wipe(redis_store)
        grpc_store = AsyncPrefixStoreClient(server.client())
        try:
            await _behaviour(grpc_store, key, ids, data)
        finally:
            grpc_store.close()

    asyncio.run(go())


def test_metered_store_counts_around_any_backend(tiny_engine, server):
    ids = random_ids(150, seed=92)
    key, data = make_cache(tiny_engine, ids, tenant="acme")

    async def go():
        metered = MeteredStore(AsyncPrefixStoreClient(server.client()))
        try:
            m, _ = await metered.put(key, ids, data)
            await metered.put(key, ids, data)  # already there: not a new entry
            await metered.fetch(m.cache_id, tenant="acme")
            await metered.delete(m.cache_id, tenant="acme")
            with pytest.raises(NotFound):
                await metered.fetch(m.cache_id, tenant="acme")  # gone, not damaged: no outcome
        finally:
            metered.inner.close()
        return metered.outcomes

    outcomes = asyncio.run(go())
    assert outcomes["put"] == 1 and outcomes["hit"] == 1
    assert outcomes["miss"] == outcomes["corrupt_deleted"] == outcomes["missing_chunk_deleted"] == 0
