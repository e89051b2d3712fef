"""The one prefix-store interface: what the decoders and the API read and write through.

Two classes implement it: ``redis_store.RedisStore`` (in the store server and the compressors) and
``client.AsyncPrefixStoreClient`` (over gRPC, in decoders). One argument order everywhere: the entry
first, its tenant by keyword; a ``CacheKey`` carries its own tenant. Counting calls and outcomes is
``metered.MeteredStore``'s job, around either one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from service.cache.ids import CacheKey
from service.store.manifest import Manifest


@runtime_checkable
class PrefixStore(Protocol):
    async def put(self, key: CacheKey, context_ids: Sequence[int], data: bytes,
                  ttl_s: int | None = None) -> tuple[Manifest, bool]:
        """Store cache bytes (``cache.codec``) for this context: (manifest, existed already)."""
        ...

    async def fetch(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[bytes]]:
        """(manifest, its verified chunks). Raises NotFound or DataLoss; never returns partial bytes."""
        ...

    async def stat(self, cache_id: str, *, tenant: str, touch: bool = False) -> Manifest:
        """The manifest of a live entry, or NotFound; ``touch`` refreshes its TTL as a hit does."""
        ...

    async def lookup(self, key: CacheKey, token_ids: Sequence[int],
                     longest_prefix: bool = False) -> tuple[Manifest, int]:
        """(manifest, matched tokens): the exact context, or its longest stored prefix. Raises NotFound."""
        ...

    async def delete(self, cache_id: str, *, tenant: str) -> bool:
        """Delete an entry; False when there was none."""
        ...
