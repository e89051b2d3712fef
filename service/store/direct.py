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
write path stay the store's. When Redis cannot be reached or refuses the user, direct reads pause
for ``pause_s`` (``usable``), so a misconfigured reader costs each fetch nothing, not a timeout.
"""

from __future__ import annotations

import threading
import time

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.store.checksum import read_check

BATCH_CHUNKS = 16  # chunks per MGET (16 MiB at the default chunk size): measured in `bench perf`
# redis-py reads the socket 64 KiB at a time by default; a chunk at a time reads 1 MiB values
# 15-30% faster (measured with hiredis, 16 and 256 MiB). The bench's reference reads alike.
READ_BYTES = 1 << 20
CONNECT_S = 1.0  # Redis is in the decoder's own cluster: longer means unreachable (then Fetch)
PAUSE_S = 30.0
# Redis unreachable, the user refused, or (on a cluster) the slot map stale after a failover
_UNUSABLE = (rexc.ConnectionError, rexc.TimeoutError, rexc.AuthenticationError, rexc.NoPermissionError,
             rexc.MovedError, rexc.AskError, rexc.ClusterError, rexc.RedisClusterException, OSError)


class DirectReadFailed(Exception):
    """The granted chunks could not be read whole and verified; fetch through the store instead."""


class DirectReader:
    def __init__(self, url: str, cluster: bool = False, timeout_s: float = 10.0, batch: int = BATCH_CHUNKS,
                 pause_s: float = PAUSE_S):
        self.url, self.cluster, self.timeout_s, self.batch, self.pause_s = url, cluster, timeout_s, batch, pause_s
        self._client: redis.Redis | redis.RedisCluster | None = None  # made at first use (a cluster connects)
        self._lock = threading.Lock()
        self._paused_until = 0.0

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def usable(self) -> bool:
        """False while direct reads pause after Redis was unreachable or refused the user."""
        return time.monotonic() >= self._paused_until

    def _redis(self) -> redis.Redis | redis.RedisCluster:
        with self._lock:
            if self._client is None:
                # one immediate retry: a connection dropped by a Redis restart reconnects; any longer
                # outage is the fallback's (the store client's retries)
                options = {"socket_timeout": self.timeout_s, "socket_connect_timeout": min(self.timeout_s, CONNECT_S),
                           "socket_read_size": READ_BYTES,
                           "retry": Retry(NoBackoff(), 1, supported_errors=(rexc.ConnectionError,))}
                factory = redis.RedisCluster if self.cluster else redis.Redis
                self._client = factory.from_url(self.url, **options)
            return self._client

    def _node(self, key: str) -> redis.Redis:
        client = self._redis()
        if isinstance(client, redis.RedisCluster):
            return client.get_redis_connection(client.get_node_from_key(key))
        return client

    def _mget(self, names: list[str]) -> list[bytes]:
        if not names:
            raise DirectReadFailed("the grant names no chunks")
        try:
            pipe = self._node(names[0]).pipeline(transaction=False)
            for start in range(0, len(names), self.batch):
                pipe.mget(names[start : start + self.batch])
            chunks = [chunk for batch in pipe.execute() for chunk in batch]
        except _UNUSABLE as e:
            self._paused_until = time.monotonic() + self.pause_s
            if self.cluster:
                self.close()  # rediscover the slots when reads resume
            raise DirectReadFailed(f"Redis unreachable or refused the reader ({type(e).__name__}: {e}); "
                                   f"direct reads pause for {self.pause_s:g} s") from None
        except rexc.RedisError as e:
            raise DirectReadFailed(f"Redis failed the read ({type(e).__name__}: {e})") from None
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
