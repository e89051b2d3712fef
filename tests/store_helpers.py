"""Real caches and real Redis for store tests (the shared server at 127.0.0.1:6379, or a throwaway one)."""

from __future__ import annotations

import json
import uuid

from service.cache import codec
from service.cache.ids import CacheKey
from service.config import StoreConfig
from service.engine.selection import SELECTION_REVISION
from service.store.redis_store import RedisStore, connect

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def make_cache(engine, ids: list[int], codec_name: str = "float16", tenant: str = "acme",
               press: dict | None = None) -> tuple[CacheKey, bytes]:
    press = {"press": "knorm", "compression_ratio": 0.5} if press is None else press
    kv, _ = engine.compress(ids, press, codec=codec_name)
    loaded = engine.loaded
    key = CacheKey(loaded.model_id, loaded.revision, loaded.tokenizer_digest, kv.meta.press, codec_name, tenant,
                   selection_revision=SELECTION_REVISION)
    return key, codec.encode(kv, codec_name)


def store_for(url: str = SHARED_REDIS, **overrides) -> RedisStore:
    """A store in its own key namespace (unless ``key_prefix`` is given), so tests never see each
    other's (or anyone's) keys."""
    overrides.setdefault("key_prefix", f"kvc-test-{uuid.uuid4().hex[:8]}")
    config = StoreConfig(redis_url=url, redis_retries=1, redis_timeout_s=2.0, **overrides)
    return RedisStore(connect(config, url), config)


def with_store(test, url: str = SHARED_REDIS, **overrides):
    """``await test(store)`` with a fresh namespaced store, wiping its keys afterwards; its result."""
    import asyncio

    async def main():
        store = store_for(url, **overrides)
        try:
            return await test(store)
        finally:
            await wipe(store)

    return asyncio.run(main())


async def fetched_bytes(store, cache_id: str, *, tenant: str) -> bytes:
    """A ``PrefixStore``'s verified bytes of one entry, joined."""
    return b"".join((await store.fetch(cache_id, tenant=tenant))[1])


async def wipe(store: RedisStore) -> None:
    async for name in store.redis.scan_iter(match=f"{store.config.key_prefix}:*", count=1000):
        await store.redis.delete(name)
    await store.close()


class ServerProcess:
    """A real PrefixStore gRPC server in its own process, configured by ``config`` through its env."""

    def __init__(self, config: StoreConfig, metrics_port: int = 0):
        from service.local.store_process import StoreProcess

        env = {f"KVCOMPOSE_STORE_{name.upper()}": json.dumps(value) if isinstance(value, dict) else str(value)
               for name, value in config.__dict__.items() if name != "redis_url"}
        env["KVCOMPOSE_STORE_SERVICE_TOKEN"] = config.service_token  # "" must not fall back to the caller's env
        self.config = config
        self.process = StoreProcess(config.redis_url, free_port(), env, metrics_port=metrics_port, tls=config.tls)

    @property
    def target(self) -> str:
        return self.process.address

    def __enter__(self) -> ServerProcess:
        self.process.start()
        return self

    def client(self, **kw):
        """A PrefixStoreClient of this server, with its service token unless ``token`` is given."""
        from service.store.client import PrefixStoreClient

        kw.setdefault("token", self.config.service_token or None)
        return PrefixStoreClient(self.target, **kw)

    def redis(self):
        """A plain client of the server's Redis (or cluster), for damaging entries behind its back."""
        import redis

        if self.config.redis_cluster:
            return redis.RedisCluster.from_url(self.config.redis_url)
        return redis.Redis.from_url(self.config.redis_url)

    def __exit__(self, *exc) -> None:
        self.process.stop()
        try:
            r = self.redis()
            for name in r.scan_iter(match=f"{self.config.key_prefix}:*", count=1000):
                r.delete(name)
        except Exception:  # noqa: BLE001 - the Redis may be gone already (outage tests)
            pass


def free_port() -> int:
    from service.local.processes import free_port as port

    return port()
