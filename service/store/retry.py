"""The store's one retry policy, for Redis (redis-py's own retries) and for the gRPC store client.

Exponential backoff with equal jitter (redis-py's ``EqualJitterBackoff``: before retry n a wait in
[x/2, x] with x = min(1 s, 50 ms x 2^n)). The jitter keeps clients that failed together (a Redis
restart) from retrying in lockstep; its floor makes the window a policy rides out known:
``ridden_out_s(6)`` = 1.75 s, the default. The asyncio Redis clients need redis-py's asyncio
``Retry``: handed the synchronous one they never await it, and a dropped connection fails at once.
redis-py's asyncio ``RedisCluster`` takes only the retry count from it: it retries at once after
reloading the slot map (and waits 0.25 s after a CLUSTERDOWN), which is what a failover needs.

Every Redis command the store sends is safe to send twice: chunk SETs rewrite the same bytes, the
manifest's and the lock's SET NX recognise their own earlier success (``redis_store``), and the
scripts and set/hash updates end in the same state when repeated.
"""

from __future__ import annotations

from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

BASE_S, CAP_S = 0.05, 1.0


def backoff() -> EqualJitterBackoff:
    return EqualJitterBackoff(cap=CAP_S, base=BASE_S)


def retry_policy(retries: int, errors: tuple[type[Exception], ...]) -> Retry:
    """Retry ``errors`` up to ``retries`` times with the store's backoff (synchronous callers)."""
    return Retry(backoff(), retries, supported_errors=errors)


def redis_retry_policy(retries: int, errors: tuple[type[Exception], ...]) -> AsyncRetry:
    """The same policy for redis-py's asyncio clients."""
    return AsyncRetry(backoff(), retries, supported_errors=errors)


def ridden_out_s(retries: int) -> float:
    """The least time ``retries`` retries wait in all: an outage shorter than this is always ridden
    out (redis-py counts failures from 1 when it computes a backoff)."""
    return sum(min(CAP_S, BASE_S * 2**n) / 2 for n in range(1, retries + 1))
