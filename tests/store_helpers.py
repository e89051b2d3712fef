"""Real caches and real Redis for store tests (the shared server at 127.0.0.1:6379, or a throwaway one)."""

from __future__ import annotations

import uuid

from service import codec
from service.config import StoreConfig
from service.store.ids import CacheKey
from service.store.redis_store import RedisStore, connect

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def make_cache(engine, ids: list[int], codec_name: str = "float16", tenant: str = "acme",
               press: dict | None = None) -> tuple[CacheKey, bytes]:
    press = {"press": "knorm", "compression_ratio": 0.5} if press is None else press
    kv, _ = engine.compress(ids, press, codec=codec_name)
    loaded = engine.loaded
    key = CacheKey(loaded.model_id, loaded.revision, loaded.tokenizer_digest, kv.meta.press, codec_name, tenant)
    return key, codec.encode(kv, codec_name)


def store_for(url: str = SHARED_REDIS, **overrides) -> RedisStore:
    """A store in its own key namespace (unless ``key_prefix`` is given), so tests never see each
    other's (or anyone's) keys."""
    overrides.setdefault("key_prefix", f"kvc-test-{uuid.uuid4().hex[:8]}")
    config = StoreConfig(redis_url=url, redis_retries=1, redis_timeout_s=2.0, **overrides)
    return RedisStore(connect(config, url), config)


async def wipe(store: RedisStore) -> None:
    async for name in store.redis.scan_iter(match=f"{store.config.key_prefix}:*", count=1000):
        await store.redis.delete(name)
    await store.close()
