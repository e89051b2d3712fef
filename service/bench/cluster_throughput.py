"""Aggregate Fetch throughput of the store on a 3-master Redis Cluster vs one Redis, in the same run.

One entry's chunks live in one slot (one shard), so a single Fetch reads one master; parallel
Fetches of different entries spread over the masters. This stores --entries synthetic
SmolLM2-shaped caches of --mib MiB each through ``RedisStore`` (what the store server runs), then
fetches all of them --parallel at a time, SHA-256-verified, and prints MiB/s (median of
--repeats) on one Redis and on the cluster, and the ratio cluster / single.

    python -m service.bench.cluster_throughput [--entries 12] [--mib 16] [--parallel 1,4,12]

On a machine with fewer cores than masters the cluster cannot run faster: every redis-server and
the client share the same cores. The figure that carries over is the ratio on real hardware.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from service.bench.perf import synthetic_cache
from service.cache.ids import CacheKey
from service.config import StoreConfig
from service.store.embedded import EmbeddedRedis
from service.store.embedded_cluster import EmbeddedRedisCluster
from service.store.redis_store import RedisStore, connect


async def fetch_rate(store: RedisStore, cache_ids: list[str], parallel: int, repeats: int, nbytes: int) -> float:
    gate = asyncio.Semaphore(parallel)

    async def one(cache_id: str) -> None:
        async with gate:
            _, chunks = await store.stream(cache_id, tenant="default")
            async for _ in chunks:
                pass

    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in cache_ids))
        runs.append(time.perf_counter() - start)
    return nbytes * len(cache_ids) / 2**20 / statistics.median(runs)


async def measure(url: str, cluster: bool, entries: int, mib: int, parallels: list[int], repeats: int) -> dict:
    config = StoreConfig(redis_url=url, redis_cluster=cluster, key_prefix=f"bench-{uuid.uuid4().hex[:6]}")
    store = RedisStore(connect(config, url), config)
    ids, data = synthetic_cache(mib)
    key = CacheKey("bench", "r", "t", {}, "float16", "default", selection_revision=1)
    cache_ids = [(await store.put(key, [i, *ids[1:]], data))[0].cache_id for i in range(entries)]
    rates = {p: await fetch_rate(store, cache_ids, p, repeats, len(data)) for p in parallels}
    await store.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=12)
    parser.add_argument("--mib", type=int, default=16, help="size of one entry")
    parser.add_argument("--parallel", default="1,4,12", help="fetches in flight at once")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parallels = [int(p) for p in args.parallel.split(",")]
    with EmbeddedRedis(maxmemory="4gb") as single:
        one = asyncio.run(measure(single.url, False, args.entries, args.mib, parallels, args.repeats))
    with EmbeddedRedisCluster(maxmemory="2gb") as cluster:
        many = asyncio.run(measure(cluster.url, True, args.entries, args.mib, parallels, args.repeats))
    print(f"{args.entries} entries x {args.mib} MiB, verified Fetch through RedisStore")
    print(f"{'parallel':>8} {'1 Redis MiB/s':>14} {'cluster MiB/s':>14} {'ratio':>6}")
    for p in parallels:
        print(f"{p:>8} {one[p]:>14.0f} {many[p]:>14.0f} {many[p] / one[p]:>6.2f}")


if __name__ == "__main__":
    main()
