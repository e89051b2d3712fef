"""What makes the shared cache trustworthy: every key of a hit entry lives on, quotas hold under
concurrent Puts, and a Put whose structure is not exactly a cache of its key is never stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct

import pytest
from conftest import random_ids
from store_helpers import make_cache, with_store

from service.cache import codec
from service.store.errors import InvalidArgument, QuotaExceeded


@pytest.fixture(scope="module")
def cache(tiny_engine):
    ids = random_ids(300, seed=61)
    key, data = make_cache(tiny_engine, ids)
    return key, ids, data


def test_a_hit_refreshes_the_prefix_index_and_the_usage_record(cache, redis_target):
    """Regression: hits refreshed manifest and chunks only, so a live entry fell out of Lookup and quota."""
    key, ids, data = cache

    async def go(store):
        m, _ = await store.put(key, ids, data, ttl_s=3)
        ends = store.keys.prefix_ends("acme", m.prefix_id)
        for _ in range(4):  # 4 s of hits on a 3 s TTL
            await asyncio.sleep(1)
            await store.fetch(m.cache_id, tenant="acme")
            await asyncio.sleep(0.05)  # the refresh runs off the reply's path
        assert await store.redis.ttl(ends) >= 2
        found, matched = await store.lookup(key, ids + [7, 8], longest_prefix=True)
        assert found.cache_id == m.cache_id and matched == len(ids)
        usage = await store.redis.hget(store.keys.usage("acme"), m.cache_id)
        expiry_ms = int(usage.split()[1])
        assert expiry_ms > (m.created_unix_ms + 3000)  # moved forward by the hits

    with_store(go, **redis_target)


def test_concurrent_puts_cannot_exceed_the_quota(tiny_engine, redis_target):
    """Regression: check-then-write let concurrent Puts all pass the quota check."""
    caches = [make_cache(tiny_engine, random_ids(100, seed=70 + i)) for i in range(6)]
    size = len(caches[0][1])

    async def go(store):
        async def put(key, ids, data):
            try:
                await store.put(key, ids, data)
                return True
            except QuotaExceeded:
                return False

        stored = await asyncio.gather(*[put(k, random_ids(100, seed=70 + i), d)
                                        for i, (k, d) in enumerate(caches)])
        assert sum(stored) == 2  # the quota holds exactly two entries, however the Puts interleave

    with_store(go, **redis_target, tenant_quota_bytes=2 * size + size // 2)


def _rewrite(data: bytes, edit) -> bytes:
    """A cache whose header is edited, re-framed with a valid digest (what a forger could send)."""
    magic, version, hlen = struct.unpack_from("<8sII", data)
    header = json.loads(data[16 : 16 + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    body = struct.pack("<8sII", magic, version, len(raw)) + raw + data[16 + hlen : -32]
    return body + hashlib.sha256(body).digest()


def _first(name):
    return lambda h: next(t for t in h["tensors"] if t["name"] == name)


MALFORMED = {
    "no meta": lambda h: h.pop("meta"),
    "no tensors": lambda h: h.update(tensors=[]),
    "layers not an int": lambda h: h.update(layers="4"),
    "more layers than tensors": lambda h: h.update(layers=h["layers"] + 1),
    "unknown dtype": lambda h: _first("k.0")(h).update(dtype="float64"),
    "shape does not match bytes": lambda h: _first("v.0")(h).update(shape=[2, 1, 1]),
    "offset outside the payload": lambda h: _first("k.0")(h).update(offset=10**9),
    "negative offset": lambda h: _first("k.0")(h).update(offset=-4),
    "unexpected tensor name": lambda h: _first("e.0")(h).update(name="x.0") if any(
        t["name"] == "e.0" for t in h["tensors"]) else _first("v.0")(h).update(name="w.0"),
    "context shorter than the slots": lambda h: h["meta"].update(original_length=1),
    "codec unknown": lambda h: h.update(codec="int3"),
}


@pytest.mark.parametrize("what", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_cache_is_invalid_argument_and_never_stored(cache, what):
    key, ids, data = cache
    bad = _rewrite(data, MALFORMED[what])

    async def go(store):
        with pytest.raises(InvalidArgument, match="not a valid cache|does not|cache bytes|covers"):
            await store.put(key, ids, bad)
        assert [k async for k in store.redis.scan_iter(match=f"{store.config.key_prefix}:*")] == []

    with_store(go)
    with pytest.raises(codec.CorruptCacheError):
        codec.decode(bad)


def test_a_cache_of_another_shape_than_its_model_is_refused(cache):
    key, ids, data = cache

    async def go(store):
        with pytest.raises(InvalidArgument, match="KV heads"):
            await store.put(key, ids, data)

    with_store(go, model_shapes={key.model_id: [30, 3, 64]})

    async def unknown_model(store):
        with pytest.raises(InvalidArgument, match="not served by this store"):
            await store.put(key, ids, data)

    with_store(unknown_model, model_shapes={"another-model": [30, 3, 64]})


@pytest.mark.parametrize("ttl_s", [-5, 2**62])
def test_out_of_range_ttl_is_invalid_argument(cache, ttl_s):
    key, ids, data = cache

    async def go(store):
        with pytest.raises(InvalidArgument, match="ttl_s"):
            await store.put(key, ids, data, ttl_s=ttl_s)

    with_store(go)


def test_a_lookup_longer_than_the_limit_is_refused_at_once(cache):
    key, ids, _ = cache

    async def go(store):
        with pytest.raises(InvalidArgument, match="max_context_tokens"):
            await store.lookup(key, list(range(5000)) * 300, longest_prefix=True)

    with_store(go)


def test_a_failed_write_releases_only_its_own_usage_record(cache, redis_target):
    """Two writers of one entry: the one whose write fails must not erase the other's reservation."""
    key, ids, data = cache

    async def go(store):
        cache_id = key.cache_id(ids)
        mine = await store._reserve("acme", cache_id, len(data), 10**13, "writer-a")
        theirs = await store._reserve("acme", cache_id, len(data), 10**13, "writer-b")
        await store._release("acme", cache_id, mine)  # writer A failed after B reserved
        assert (await store.redis.hget(store.keys.usage("acme"), cache_id)).decode() == theirs
        await store._release("acme", cache_id, theirs)
        assert await store.redis.hget(store.keys.usage("acme"), cache_id) is None

    with_store(go, **redis_target)
