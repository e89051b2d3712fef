"""Per-tenant admission at the API (``TenantLimits``): a token bucket of calls per second and caps
on prefills and decodes in flight. Checked before any work starts, so a refused call costs nothing
and holds nothing; what was admitted is released however the call ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from service.config import TenantLimits
from service.serve.messages import ApiError

KINDS = {"prefills": "max_prefills", "decodes": "max_decodes"}


@dataclass
class _Bucket:
    tokens: float
    at: float


class Admission:
    """The retry hint of a refusal says when a retry is likely to get in, counting the tenant's other
    recent refusals (decaying, half-life about 0.7 s): 16 clients refused together are told to come
    back spread over the time the tenant's share serves them, not all at the next free moment."""

    def __init__(self, limits: TenantLimits, clock: Callable[[], float] = time.monotonic):
        self.limits, self.clock = limits, clock
        self._buckets: dict[str, _Bucket] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        self._refused: dict[tuple[str, str], _Bucket] = {}  # recent refusals, decaying
        # how long one lasts (EWMA): the retry hint of a refused one, when one of the tenant's ends
        self._typical_s = {kind: 1.0 for kind in KINDS}

    def check_rate(self, tenant: str) -> None:
        """Take one call from the tenant's bucket, or refuse it with the wait until one is there."""
        limits = self.limits.of(tenant)
        rate = limits.requests_per_s
        if not rate:
            return
        burst = limits.burst or max(1.0, rate)
        now = self.clock()
        bucket = self._buckets.setdefault(tenant, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens + self._refusal(tenant, "rate", now)) / rate
            raise exhausted(f"tenant {tenant!r} is over its {rate:g} requests/s (tenant_limits.requests_per_s)", wait)
        bucket.tokens -= 1

    @contextmanager
    def hold(self, tenant: str, kind: str) -> Iterator[None]:
        """One prefill or decode of ``tenant`` in flight for the block, or refused if it has its limit."""
        limit = getattr(self.limits.of(tenant), KINDS[kind])
        key = (tenant, kind)
        held = self._inflight.get(key, 0)
        if limit and held >= limit:
            waiting = self._refusal(tenant, kind, self.clock())
            raise exhausted(f"tenant {tenant!r} has {held} {kind} in flight, its limit "
                            f"(tenant_limits.{KINDS[kind]})", self._typical_s[kind] * (1 + waiting / limit))
        self._inflight[key] = held + 1
        started = self.clock()
        try:
            yield
        finally:
            self._inflight[key] -= 1
            if not self._inflight[key]:
                del self._inflight[key]
            self._typical_s[kind] = 0.8 * self._typical_s[kind] + 0.2 * (self.clock() - started)

    def _refusal(self, tenant: str, kind: str, now: float) -> float:
        """Count one refusal; the tenant's recent refusals before it (decayed)."""
        seen = self._refused.setdefault((tenant, kind), _Bucket(0.0, now))
        before = seen.tokens * math.exp(-(now - seen.at))
        seen.tokens, seen.at = before + 1, now
        return before

    def inflight(self, tenant: str, kind: str) -> int:
        return self._inflight.get((tenant, kind), 0)


def exhausted(reason: str, retry_after_s: float) -> ApiError:
    wait = min(30.0, max(0.05, retry_after_s))
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{reason}; retry in {wait:.2f} s", retry_after_s=wait)
