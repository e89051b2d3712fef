"""The best a direct-read fetch design could do, against a raw GET and today's gRPC Fetch.

Direct reads (not built) would have a decoder ask the store for a manifest over gRPC, then read
the chunk keys from Redis itself and verify them (XXH3-128). This measures that path's floor in
one run: ``Stat`` over gRPC + one MGET of the chunks + verification, beside redis-py's GET of the
same bytes in one value, today's Fetch and a bare ``Stat``. The chunk keys' write id is read here
with one more small GET (a real design would return it in the authenticated Stat reply), about
0.1 ms a real one would not pay. Prints medians in ms and ratios to GET.

    python benchmarks/fetch_direct_bound.py [--sizes-mib 1,16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import redis

from service.bench.perf import _StoreStack, synthetic_cache
from service.store.checksum import read_check
from service.store.ids import CacheKey
from service.store.keys import Keys

TENANT = "default"


def measure(mib: int, repeats: int) -> dict[str, float]:
    ids, data = synthetic_cache(mib)
    with _StoreStack() as client:
        raw = redis.Redis.from_url(client.redis_url)
        raw.set("bench:raw", data)
        manifest, _ = client.put(CacheKey("bench", "r", "t", {}, "float16", TENANT), ids, data)
        keys = Keys()

        def direct() -> bytes:
            m = client.stat(manifest.cache_id)
            write_id = json.loads(raw.get(keys.manifest(TENANT, m.cache_id)))["write_id"]  # see above
            out = b"".join(raw.mget([keys.chunk(TENANT, m.cache_id, write_id, i) for i in range(m.chunk_count)]))
            digest, expected = read_check(m.xxh3_128, m.sha256)
            digest.update(out)
            if digest.digest() != expected:
                raise RuntimeError("direct read failed verification")
            return out

        reads = {"get": lambda: raw.get("bench:raw"), "fetch": lambda: client.fetch(manifest.cache_id)[1],
                 "stat + mget": direct, "stat": lambda: client.stat(manifest.cache_id)}
        for read in reads.values():
            read()  # warm: connections and channel
        times: dict[str, list[float]] = {name: [] for name in reads}
        for _ in range(repeats):  # interleaved
            for name, read in reads.items():
                start = time.perf_counter()
                read()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,16")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    for mib in (int(x) for x in args.sizes_mib.split(",")):
        ms = measure(mib, args.repeats)
        print(f"{mib} MiB: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
              + f"; GET / (stat + mget) {ms['get'] / ms['stat + mget']:.2f}, GET / fetch {ms['get'] / ms['fetch']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
