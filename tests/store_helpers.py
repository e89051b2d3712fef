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


def with_store(test, url: str = SHARED_REDIS, **overrides) -> None:
    """Run ``await test(store)`` with a fresh namespaced store, wiping its keys afterwards."""
    import asyncio

    async def main() -> None:
        store = store_for(url, **overrides)
        try:
            await test(store)
        finally:
            await wipe(store)

    asyncio.run(main())


async def wipe(store: RedisStore) -> None:
    async for name in store.redis.scan_iter(match=f"{store.config.key_prefix}:*", count=1000):
        await store.redis.delete(name)
    await store.close()


class ServerProcess:
    """A real PrefixStore gRPC server (``python -m service.store.server``) in its own process."""

    def __init__(self, config: StoreConfig):
        self.config = config
        self.port = free_port()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        import json
        import os
        import subprocess
        import sys

        env = {**os.environ, "REDIS_URL": self.config.redis_url}
        for name, value in self.config.__dict__.items():
            if name != "redis_url":
                env[f"KVCOMPOSE_STORE_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
        self.process = subprocess.Popen([sys.executable, "-m", "service.store.server", "--address", self.target],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_serving()
        return self

    def _wait_serving(self) -> None:
        import time

        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"store server exited: {self.process.stderr.read().decode()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("store server did not become healthy")

    def redis(self):
        """A plain client of the server's Redis, for damaging entries behind its back."""
        import redis

        return redis.Redis.from_url(self.config.redis_url)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(10)
        try:
            r = self.redis()
            for name in r.scan_iter(match=f"{self.config.key_prefix}:*", count=1000):
                r.delete(name)
        except Exception:  # noqa: BLE001 - the Redis may be gone already (outage tests)
            pass


def free_port() -> int:
    from service.store.embedded import free_port as port

    return port()
