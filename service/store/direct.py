"""Read grants, the decoder's side: read an entry's chunks from Redis directly, verified.

The store's gRPC Fetch moves every byte through one Python process (Redis -> store -> decoder);
here the store only answers who may read what (``PrefixStore.Grant``: the manifest and the chunk
key names of the caller's tenant's entry) and the decoder reads the chunks itself, pipelined MGETs
of ``batch`` chunks each on one connection to the node holding the entry's slot (all of an entry's
keys share one hash tag: ``keys.py``), as the read-only user of ``acl.py``.

Every byte is verified against the manifest's read checksum before it is returned. Anything else
(a missing chunk, a digest mismatch, Redis unreachable or refusing the user) raises
``DirectReadFailed``, and the caller fetches through the store, which turns a missing chunk into
a miss and damage into DATA_LOSS, deleting the entry, as it always has: those outcomes and the
write path stay the store's.
"""

from __future__ import annotations

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.store.checksum import read_check

BATCH_CHUNKS = 16  # chunks per MGET (16 MiB at the default chunk size): measured in `bench perf`
# redis-py reads the socket 64 KiB at a time by default; a chunk at a time reads 1 MiB values
# 15-30% faster (measured with hiredis, 16 and 256 MiB). The bench's reference reads alike.
READ_BYTES = 1 << 20


class DirectReadFailed(Exception):
    """The granted chunks could not be read whole and verified; fetch through the store instead."""


class DirectReader:
    def __init__(self, url: str, cluster: bool = False, timeout_s: float = 10.0, batch: int = BATCH_CHUNKS):
        # one immediate retry: a connection dropped by a Redis restart reconnects; any longer outage
        # is the fallback's (the store client's retries)
        options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "socket_read_size": READ_BYTES,
                   "retry": Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,))}
        self.redis = redis.RedisCluster.from_url(url, **options) if cluster else redis.Redis.from_url(url, **options)
        self.batch = batch

    def close(self) -> None:
        self.redis.close()

    def _node(self, key: str) -> redis.Redis:
        if isinstance(self.redis, redis.RedisCluster):
            return self.redis.get_redis_connection(self.redis.get_node_from_key(key))
        return self.redis

    def _mget(self, names: list[str]) -> list[bytes]:
        if not names:
            raise DirectReadFailed("the grant names no chunks")
        try:
            pipe = self._node(names[0]).pipeline(transaction=False)
            for start in range(0, len(names), self.batch):
                pipe.mget(names[start : start + self.batch])
            chunks = [chunk for batch in pipe.execute() for chunk in batch]
        except (rexc.RedisError, OSError) as e:
            raise DirectReadFailed(f"Redis refused or failed the read ({type(e).__name__}: {e})") from None
        if any(chunk is None for chunk in chunks):
            raise DirectReadFailed("a chunk is missing (evicted or deleted)")
        return chunks

    @staticmethod
    def verify(chunks: list[bytes], total_bytes: int, xxh3_128: bytes, sha256: bytes) -> list[bytes]:
        """``chunks`` if their bytes are the manifest's, else DirectReadFailed."""
        digest, expected = read_check(xxh3_128, sha256)
        for chunk in chunks:
            digest.update(chunk)
        if sum(map(len, chunks)) != total_bytes or digest.digest() != expected:
            raise DirectReadFailed("the chunks failed the manifest's checksum")
        return chunks

    def read(self, names: list[str], total_bytes: int, xxh3_128: bytes, sha256: bytes) -> list[bytes]:
        """The chunks named, in order, verified (their bytes joined are the entry's)."""
        return self.verify(self._mget(names), total_bytes, xxh3_128, sha256)
