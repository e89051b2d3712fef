"""Tenant limits shared by every API process through Redis (``admission.Admission`` uses it).

Per tenant, in one Redis Cluster slot (``Keys.limits``):

- ``rate``: a hash, the token bucket (tokens, when) and the tenant's recent refusals (decaying), so
  the retry hint spreads clients refused on any replica. One script takes a token or refuses.
- ``prefills`` / ``decodes``: a sorted set of leases (lease id -> expiry). A process renews its
  leases every ``lease_s / 3``; a crashed process stops renewing, so its slots come back within
  ``lease_s``. Acquiring drops expired leases, counts and adds in one script.

Every time is Redis's own (``TIME``), so the replicas need no common clock. Scripts are replicated
by their effects (Redis >= 5), so a replica or a cluster failover sees the same state.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict

import redis.asyncio as aioredis

from service.store.keys import Keys

log = logging.getLogger("ray.serve")

# KEYS[1] the bucket; ARGV rate/s, burst. Returns "0" when a token was taken, else the seconds until
# a retry is likely to get one (counting the tenant's recent refusals, half-life about 0.7 s).
_TAKE = """
local t = redis.call('time')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('hmget', KEYS[1], 'tokens', 'at', 'refused', 'refused_at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - (tonumber(b[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  local before = (tonumber(b[3]) or 0) * math.exp(-math.max(0, now - (tonumber(b[4]) or now)))
  redis.call('hset', KEYS[1], 'refused', tostring(before + 1), 'refused_at', tostring(now))
  wait = (1 - tokens + before) / rate
end
redis.call('hset', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('pexpire', KEYS[1], math.ceil((burst / rate + 10) * 1000))
return tostring(wait)
"""
# KEYS[1] the leases of one kind; ARGV lease id, limit, lease ms. Returns -1 when leased, else the
# number held (the limit reached).
_ACQUIRE = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
local held = redis.call('zcard', KEYS[1])
if held >= tonumber(ARGV[2]) then return held end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('pexpire', KEYS[1], 2 * tonumber(ARGV[3]))
return -1
"""
# KEYS[1] the leases of one kind; ARGV lease ms, then this process's lease ids (XX: a lease
# released meanwhile stays released).
_RENEW = """
local t = redis.call('time')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('zadd', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('pexpire', KEYS[1], 2 * tonumber(ARGV[1]))
return 0
"""


class SharedLimits:
    """The Redis side of admission. Its calls raise redis-py's errors; the caller decides what a
    Redis that does not answer means (``Admission`` falls back to its own process's limits)."""

    def __init__(self, redis: aioredis.Redis | aioredis.RedisCluster, keys: Keys, lease_s: float):
        self.redis, self.keys, self.lease_ms = redis, keys, int(lease_s * 1000)
        self._take = redis.register_script(_TAKE)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._held: defaultdict[str, set[str]] = defaultdict(set)  # leases key -> lease ids of this process
        self._renewer: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    async def take(self, tenant: str, rate: float, burst: float) -> float:
        """One call from the tenant's bucket: 0.0, or the hint (seconds) of a refusal."""
        return float(await self._take(keys=[self.keys.limits(tenant, "rate")], args=[repr(rate), repr(burst)]))

    async def acquire(self, tenant: str, kind: str, limit: int) -> tuple[str, str] | int:
        """A lease (key, id) on one of the tenant's ``kind`` slots, or the number in flight (refused)."""
        key, lease = self.keys.limits(tenant, kind), uuid.uuid4().hex
        held = await self._acquire(keys=[key], args=[lease, limit, self.lease_ms])
        if held != -1:
            return int(held)
        self._held[key].add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever())
        return key, lease

    def release(self, lease: tuple[str, str]) -> None:
        """Give the slot back, off the caller's path (a cancelled call cannot interrupt it); if Redis
        does not answer, the lease expires by itself within ``lease_s``."""
        key, lease_id = lease
        self._held[key].discard(lease_id)
        if not self._held[key]:
            del self._held[key]
        task = asyncio.create_task(self._release(key, lease_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, key: str, lease_id: str) -> None:
        try:
            await self.redis.zrem(key, lease_id)
        except Exception as e:  # noqa: BLE001 - the lease expires within lease_s
            log.warning("tenant limits: releasing a lease failed (%s: %s); it expires by itself", type(e).__name__, e)

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_ms / 3000)
            for key, leases in list(self._held.items()):
                try:
                    await self._renew(keys=[key], args=[self.lease_ms, *leases])
                except Exception as e:  # noqa: BLE001 - two more periods before the leases lapse
                    log.warning("tenant limits: renewing leases failed (%s: %s)", type(e).__name__, e)
