"""Fetch throughput of the PrefixStore over gRPC vs a raw redis-py GET of the same bytes.

Starts a throwaway redis-server and one store server per chunk size, stores real cache bytes
(a synthetic SmolLM2-shaped cache of 1, 16 and 64 MiB), then times, in the same run:
- raw: ``redis.Redis().get(key)`` of the whole value (no chunking, no verification);
- gRPC: ``PrefixStoreClient.fetch`` (manifest + chunks over gRPC, verified on both ends).
Prints MiB/s (median of --repeats) and the ratio gRPC / raw. Target (issue #3): >= 0.7.

    python -m service.bench.store_throughput [--sizes-mib 1,16,64] [--chunk-kib 256,1024,4096]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time

import redis

from service.bench.perf import synthetic_cache
from service.cache.ids import CacheKey
from service.local.processes import free_port
from service.store.client import PrefixStoreClient
from service.store.embedded import EmbeddedRedis

TOKEN = secrets.token_urlsafe(24)


def timed(fn, repeats: int, nbytes: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return nbytes / 2**20 / statistics.median(runs)


def start_store(redis_url: str, chunk_bytes: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "KVCOMPOSE_STORE_CHUNK_BYTES": str(chunk_bytes),
           "KVCOMPOSE_STORE_KEY_PREFIX": f"bench{chunk_bytes}",
           "KVCOMPOSE_STORE_SERVICE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "service.store.server", "--address", f"127.0.0.1:{port}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    with PrefixStoreClient(target, token=TOKEN, retries=30) as client:
        try:
            client.stat("0" * 64)
        except Exception:  # noqa: BLE001 - NOT_FOUND means it is up
            pass
    return proc, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,16,64")
    parser.add_argument("--chunk-kib", default="256,1024,4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    caches = {mib: synthetic_cache(mib) for mib in (int(x) for x in args.sizes_mib.split(","))}
    print(f"{'size':>7} {'chunk':>8} {'raw GET MiB/s':>14} {'gRPC Fetch MiB/s':>17} {'ratio':>6}")
    with EmbeddedRedis(maxmemory="2gb") as server:
        raw = redis.Redis.from_url(server.url)
        for chunk_kib in (int(x) for x in args.chunk_kib.split(",")):
            proc, target = start_store(server.url, chunk_kib * 1024)
            try:
                with PrefixStoreClient(target, token=TOKEN) as client:
                    for mib, (ids, data) in caches.items():
                        key = CacheKey("bench", "r", "t", {}, "float16", "default", selection_revision=1)
                        m, _ = client.put(key, ids, data)
                        raw.set("bench:raw", data)
                        assert raw.get("bench:raw") == data and client.fetch(m.cache_id)[1] == data
                        raw_speed = timed(lambda: raw.get("bench:raw"), args.repeats, len(data))
                        grpc_speed = timed(lambda m=m: client.fetch(m.cache_id), args.repeats, len(data))
                        print(f"{mib:>5}Mi {chunk_kib:>6}Ki {raw_speed:>14.0f} {grpc_speed:>17.0f} "
                              f"{grpc_speed / raw_speed:>6.2f}", flush=True)
                        client.delete(m.cache_id)
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
