"""Per-tenant admission at the API (``TenantLimits``): a token bucket of calls per second and caps
on prefills and decodes in flight. Checked before any work starts, so a refused call costs nothing
and holds nothing; what was admitted is released however the call ends.

With ``shared`` (``shared_limits.SharedLimits``: the limits in Redis) a tenant's share holds across
every API process together. While that Redis does not answer, each process falls back to enforcing
the limits on its own calls (fail open to the local limit, logged once per outage, Redis tried
again every ``RETRY_SHARED_S``): a Redis outage must not take down answers that need no Redis
(Decoders answer from the caches they hold), and the local limits still bound every process.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import redis.exceptions as rexc

from service.config import StoreConfig, TenantLimits
from service.serve.messages import ApiError
from service.serve.shared_limits import SharedLimits
from service.store.errors import is_transient
from service.store.keys import Keys

KINDS = {"prefills": "max_prefills", "decodes": "max_decodes"}
SHARED_TIMEOUT_S = 0.5  # a Redis that has not answered a limit check by then counts as down
RETRY_SHARED_S = 5.0  # after a Redis failure, limits are local for this long before Redis is tried again
log = logging.getLogger("ray.serve")


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class _Fading:
    """A count that fades by e every second (half-life about 0.7 s): a tenant's recent refusals."""

    count: float
    at: float

    def add(self, now: float) -> float:
        """Count one at ``now``; the faded count before it."""
        before = self.count * math.exp(-(now - self.at))
        self.count, self.at = before + 1, now
        return before


class Admission:
    """The retry hint of a refusal says when a retry is likely to get in, counting the tenant's other
    recent refusals (decaying, half-life about 0.7 s): 16 clients refused together are told to come
    back spread over the time the tenant's share serves them, not all at the next free moment."""

    def __init__(self, limits: TenantLimits, clock: Callable[[], float] = time.monotonic,
                 shared: SharedLimits | None = None):
        self.limits, self.clock, self.shared = limits, clock, shared
        self._buckets: dict[str, _Bucket] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        self._refused: dict[tuple[str, str], _Fading] = {}  # recent refusals
        # how long one lasts (EWMA): the retry hint of a refused one, when one of the tenant's ends
        self._typical_s = {kind: 1.0 for kind in KINDS}
        self._local_until = -math.inf  # limits are this process's alone until then (Redis failed)

    async def check_rate(self, tenant: str) -> None:
        """Take one call from the tenant's bucket, or refuse it with the wait until one is there."""
        limits = self.limits.of(tenant)
        rate = limits.requests_per_s
        if not rate:
            return
        burst = limits.burst or max(1.0, rate)
        if self._use_shared():
            try:
                wait = await self.shared.take(tenant, rate, burst)
            except Exception as e:  # noqa: BLE001 - only Redis failures (see _fell_back)
                self._fell_back(e)
            else:
                if wait:
                    raise _over_rate(tenant, rate, wait, "across all replicas")
                return
        self._check_rate_locally(tenant, rate, burst)

    def _check_rate_locally(self, tenant: str, rate: float, burst: float) -> None:
        now = self.clock()
        bucket = self._buckets.setdefault(tenant, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            raise _over_rate(tenant, rate, (1 - bucket.tokens + self._refusal(tenant, "rate", now)) / rate,
                             "in this process")
        bucket.tokens -= 1

    @asynccontextmanager
    async def hold(self, tenant: str, kind: str) -> AsyncIterator[None]:
        """One prefill or decode of ``tenant`` in flight for the block, or refused if it has its limit."""
        limit = getattr(self.limits.of(tenant), KINDS[kind])
        if not limit:
            yield
            return
        lease = None
        if self._use_shared():
            try:
                lease = await self.shared.acquire(tenant, kind, limit)
            except Exception as e:  # noqa: BLE001 - only Redis failures (see _fell_back)
                self._fell_back(e)
            if isinstance(lease, int):
                raise self._over_inflight(tenant, kind, limit, lease, "across all replicas")
        key = (tenant, kind)
        held = self._inflight.get(key, 0)
        if lease is None and held >= limit:
            raise self._over_inflight(tenant, kind, limit, held, "in this process")
        self._inflight[key] = held + 1
        started = self.clock()
        try:
            yield
        finally:
            if lease is not None:
                self.shared.release(lease)
            self._inflight[key] -= 1
            if not self._inflight[key]:
                del self._inflight[key]
            self._typical_s[kind] = 0.8 * self._typical_s[kind] + 0.2 * (self.clock() - started)

    def _over_inflight(self, tenant: str, kind: str, limit: int, held: int, where: str) -> ApiError:
        waiting = self._refusal(tenant, kind, self.clock())
        return exhausted(f"tenant {tenant!r} has {held} {kind} in flight {where}, its limit "
                         f"(tenant_limits.{KINDS[kind]} = {limit})", self._typical_s[kind] * (1 + waiting / limit))

    def _use_shared(self) -> bool:
        return self.shared is not None and time.monotonic() >= self._local_until

    def _fell_back(self, e: Exception) -> None:
        """Redis did not answer: limits are this process's own for ``RETRY_SHARED_S``. Anything else
        is a bug and propagates (INTERNAL), rather than silently dropping the cluster-wide share."""
        if not (isinstance(e, (rexc.RedisError, OSError, TimeoutError)) or is_transient(e)):
            raise e
        if self._local_until == -math.inf or time.monotonic() - self._local_until > RETRY_SHARED_S:
            log.warning("tenant limits: Redis did not answer (%s: %s); enforcing them per process until it "
                        "does (each process allows a tenant its whole share)", type(e).__name__, e)
        self._local_until = time.monotonic() + RETRY_SHARED_S

    def _refusal(self, tenant: str, kind: str, now: float) -> float:
        """Count one refusal; the tenant's recent refusals before it (faded)."""
        return self._refused.setdefault((tenant, kind), _Fading(0.0, now)).add(now)

    def inflight(self, tenant: str, kind: str) -> int:
        """This process's admitted ``kind`` calls of ``tenant`` now in flight."""
        return self._inflight.get((tenant, kind), 0)


def admission_for(limits: TenantLimits, store: StoreConfig) -> Admission:
    """The process's admission: shared through the store's Redis (its URL and credentials, as the
    store's own clients have them) when ``limits.cluster_wide`` and this process has that URL."""
    if not limits.cluster_wide:
        return Admission(limits)
    if not store.redis_url:
        log.warning("tenant limits are per process here: no Redis URL (REDIS_URL) to share them through")
        return Admission(limits)
    from service.store.redis_store import connect

    # a limit check must not wait out the store's retries: one quick try, then the local limits
    quick = dataclasses.replace(store, redis_timeout_s=SHARED_TIMEOUT_S, redis_retries=0)
    return Admission(limits, shared=SharedLimits(connect(quick, store.redis_url), Keys(store.key_prefix),
                                                 limits.lease_s))


def _over_rate(tenant: str, rate: float, wait: float, where: str) -> ApiError:
    return exhausted(f"tenant {tenant!r} is over its {rate:g} requests/s {where} (tenant_limits.requests_per_s)",
                     wait)


def exhausted(reason: str, retry_after_s: float) -> ApiError:
    wait = min(30.0, max(0.05, retry_after_s))
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{reason}; retry in {wait:.2f} s", retry_after_s=wait)
