"""The store's one retry policy, for Redis (redis-py's own retries) and for the gRPC store client.

Exponential backoff with full jitter (redis-py's ``ExponentialWithJitterBackoff``: a random wait in
[0, 50 ms x 2^n], capped at 1 s), so clients that failed together (a Redis restart) do not retry in
lockstep. redis-py's asyncio ``RedisCluster`` takes only the retry count from it: it retries at once
after reloading the slot map (and waits 0.25 s after a CLUSTERDOWN), which is what a failover needs.
"""

from __future__ import annotations

from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

BASE_S, CAP_S = 0.05, 1.0


def backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=CAP_S, base=BASE_S)


def retry_policy(retries: int, errors: tuple[type[Exception], ...]) -> Retry:
    """Retry ``errors`` up to ``retries`` times with the store's backoff."""
    return Retry(backoff(), retries, supported_errors=errors)
