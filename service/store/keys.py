"""Every Redis key of the store is built here, laid out for Redis Cluster slots.

- All keys of one entry (manifest, chunks, single-flight lock) share the hash tag
  ``{<tenant>/<cache id>}``: one slot, so multi-key commands (MGET of chunks, deletes) never span
  slots, and one entry's keys replicate in order (chunks before manifest) on one shard.
- A prefix-index set is tagged by its block prefix ``{<tenant>/<prefix id>}``: index sets spread
  over the slots like entries.
- A tenant's usage hash (quota accounting) is one key in its own slot ``{tenant/<tenant>}``, on
  purpose: the quota check and the reservation are one atomic script, which needs one key. It is
  small (a field per live entry) and touched once per Put and per hit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TENANT = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
CACHE_ID = re.compile(r"^[0-9a-f]{64}$")


def check_tenant(tenant: str) -> str:
    if not TENANT.match(tenant):
        raise ValueError("tenant must be 0-64 characters of [A-Za-z0-9._-]")
    return tenant


@dataclass(frozen=True)
class Keys:
    prefix: str = "kvc"

    def _entry(self, tenant: str, cache_id: str) -> str:
        return f"{self.prefix}:{{{tenant}/{cache_id}}}"

    def manifest(self, tenant: str, cache_id: str) -> str:
        return self._entry(tenant, cache_id) + ":manifest"

    def chunk(self, tenant: str, cache_id: str, write_id: str, index: int) -> str:
        return self._entry(tenant, cache_id) + f":chunk:{write_id}:{index}"

    def chunks(self, tenant: str, cache_id: str, write_id: str, count: int) -> list[str]:
        """An entry's chunk keys in order (their values joined are its bytes)."""
        return [self.chunk(tenant, cache_id, write_id, i) for i in range(count)]

    def lock(self, tenant: str, cache_id: str) -> str:
        return self._entry(tenant, cache_id) + ":lock"

    def prefix_ends(self, tenant: str, block_id: str) -> str:
        """Context lengths of entries whose block-aligned prefix has id ``block_id``."""
        return self._entry(tenant, block_id) + ":ends"

    def limits(self, tenant: str, what: str) -> str:
        """The tenant's shared API limits (``service/serve/shared_limits.py``): ``rate`` (its token
        bucket), ``prefills`` and ``decodes`` (leases in flight); one slot per tenant."""
        return f"{self.prefix}:{{limits/{tenant}}}:{what}"

    def usage(self, tenant: str) -> str:
        """Hash cache id -> "bytes expiry_ms write_id reserved_ms" of the tenant's entries (quota
        accounting; ``RedisStore.reconcile``)."""
        return f"{self.prefix}:{{tenant/{tenant}}}:usage"

    def tenants(self) -> str:
        """Set of the tenants that ever stored an entry (whose usage the store server reconciles)."""
        return f"{self.prefix}:tenants"
