"""Capacity model of the prefix store: bytes per context token, and documents per GB of Redis.

For each model shape (layers x KV heads x head dim) and codec, encodes synthetic caches with the
project's codec (what the store holds, header included) at two lengths and takes the slope, so
the figure is the stored bytes per kept token. SmolLM2 is the embedded model; the 8B and 70B rows
use the published shapes (Llama-3.1-8B: 32 x 8 x 128, Qwen3-8B: 36 x 8 x 128, Llama-3.1-70B:
80 x 8 x 128). Then it stores real entries in a throwaway redis-server and measures Redis's memory
per stored byte (chunk keys, manifest, index), and prints, for a document of --tokens tokens, its
entry size and how many such entries one GB of Redis memory holds at each compression ratio.

    python -m service.bench.capacity [--tokens 2048] [--ratios 0,0.5,0.75,0.9]
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import torch

from service.cache import codec
from service.cache.ids import CacheKey
from service.cache.kvcache import CacheMeta, CompressedKV
from service.config import StoreConfig
from service.store.embedded import EmbeddedRedis
from service.store.redis_store import RedisStore, connect

MODELS = {  # name: (layers, kv heads, head dim)
    "SmolLM2-135M": (30, 3, 64),
    "Llama-3.1-8B": (32, 8, 128),
    "Qwen3-8B": (36, 8, 128),
    "Llama-3.1-70B": (80, 8, 128),
}
ENCODINGS = {  # label: (codec, fraction of key channels kept: ThinK prunes channels, the codec drops them)
    "float16": ("float16", 1.0),
    "int8": ("int8", 1.0),
    "ThinK 0.5 + int8": ("int8", 0.5),
}
GB = 10**9


def synthetic(shape: tuple[int, int, int], tokens: int, key_channels: float) -> CompressedKV:
    layers, heads, dim = shape
    g = torch.Generator().manual_seed(tokens)
    keys = [torch.randn(heads, tokens, dim, generator=g).half() for _ in range(layers)]
    pruned = dim - int(dim * key_channels)
    for k in keys:
        k[:, :, :pruned] = 0  # ThinK's pruned channels are zero for every token
    values = [torch.randn(heads, tokens, dim, generator=g).half() for _ in range(layers)]
    return CompressedKV(keys, values, [None] * layers, CacheMeta("capacity", "r", tokens, {}))


def bytes_per_token(shape: tuple[int, int, int], codec_name: str, key_channels: float) -> float:
    short, long = (len(codec.encode(synthetic(shape, n, key_channels), codec_name)) for n in (128, 256))
    return (long - short) / 128


def redis_overhead(entry_bytes: int, entries: int = 8) -> float:
    """Redis memory used per stored cache byte, measured with real entries of ``entry_bytes``."""
    layers, heads, dim = MODELS["SmolLM2-135M"]
    tokens = max(1, entry_bytes // (layers * heads * dim * 4))
    data = codec.encode(synthetic(MODELS["SmolLM2-135M"], tokens, 1.0), "float16")
    ids = list(range(tokens))

    async def measure(url: str) -> float:
        config = StoreConfig(redis_url=url, key_prefix=f"capacity-{uuid.uuid4().hex[:6]}")
        store = RedisStore(connect(config, url), config)
        before = (await store.redis.info("memory"))["used_memory"]
        for i in range(entries):
            key = CacheKey("capacity", "r", "t", {}, "float16", f"t{i}", selection_revision=1)
            await store.put(key, ids, data)
        after = (await store.redis.info("memory"))["used_memory"]
        await store.close()
        return (after - before) / (entries * len(data))

    with EmbeddedRedis(maxmemory="4gb") as redis:
        return asyncio.run(measure(redis.url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="document length the table is for")
    parser.add_argument("--ratios", default="0,0.5,0.75,0.9", help="compression ratios (fraction of tokens dropped)")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    overhead = redis_overhead(16 << 20)
    print(f"Redis memory per stored byte (measured, 16 MiB entries, 1 MiB chunks): {overhead:.3f}\n")
    head = " | ".join(f"{args.tokens} tok @ {r:g}: MB / per GB" for r in ratios)
    print(f"| model (layers x KV heads x dim) | codec | bytes/token | {head} |")
    print("|---|---|---:|" + "---:|" * len(ratios))
    for name, shape in MODELS.items():
        for label, (codec_name, key_channels) in ENCODINGS.items():
            per_token = bytes_per_token(shape, codec_name, key_channels)
            cells = []
            for r in ratios:
                entry = per_token * args.tokens * (1 - r)
                cells.append(f"{entry / 1e6:,.1f} / {int(GB // (entry * overhead)):,}")  # whole entries
            print(f"| {name} ({' x '.join(map(str, shape))}) | {label} | {per_token:,.0f} | {' | '.join(cells)} |",
                  flush=True)


if __name__ == "__main__":
    main()
