"""Cache-affinity routing for the Decoder, on Ray Serve's request-router extension point.

A Generate for a cache goes to a Decoder replica that already holds that cache decoded, so a
document is fetched from the store and decoded about once per replica set instead of once per
replica; unless that replica is overloaded (``overloaded_at`` queued or running requests), when
the request goes to the least loaded replica like any other. Serve LLM's prefix-cache-affinity
router is the model; the key here is exact: (tenant, cache id), the Decoder call's first two
arguments.

What a replica holds is learned two ways: where this router sent the cache before (immediate,
per Ingress replica), and the replicas' own reports (``Decoder.record_routing_stats``, every few
seconds), which also cover other Ingress replicas and LRU evictions. A cache no replica holds yet
goes to its rendezvous-hash home among the replicas, so concurrent first requests for one
document (from any Ingress replica) meet on the same replica instead of each fetching it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica


class CacheAffinityRouter(RequestRouter):
    def initialize_state(self, overloaded_at: int = 16, remembered: int = 100_000) -> None:
        self.overloaded_at = overloaded_at
        self.remembered = remembered  # bound on ``owner``: the most recently routed caches
        self.owner: OrderedDict[str, ReplicaID] = OrderedDict()  # "tenant/cache id" -> replica last sent to

    @staticmethod
    def _cache(request: PendingRequest | None) -> str | None:
        args = request.args if request is not None else ()
        return f"{args[0]}/{args[1]}" if len(args) >= 2 and isinstance(args[1], str) else None

    def _holder(self, cache: str, candidates: list[RunningReplica]) -> RunningReplica:
        """The replica known to hold ``cache``, else its rendezvous-hash home."""
        by_id = {r.replica_id: r for r in candidates}
        if self.owner.get(cache) in by_id:
            return by_id[self.owner[cache]]
        reported = next((r for r in candidates if cache in (r.routing_stats or {}).get("cache_ids", ())), None)
        if reported is not None:
            return reported
        return max(candidates, key=lambda r: hashlib.sha256(f"{cache}|{r.replica_id.unique_id}".encode()).digest())

    def _busy(self, replica: RunningReplica) -> bool:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        return queued is not None and queued >= min(self.overloaded_at, replica.max_ongoing_requests)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranked groups: the cache's holder first (unless busy), then every replica (Serve takes the
        least loaded one of a group that is not full)."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        cache = self._cache(pending_request)
        holder = self._holder(cache, candidate_replicas) if cache and candidate_replicas else None
        if holder is not None and not self._busy(holder):
            return [[holder], candidate_replicas]
        return [candidate_replicas] if candidate_replicas else []

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        cache = self._cache(pending_request)
        if cache is not None:
            self.owner[cache] = replica_id
            self.owner.move_to_end(cache)
            while len(self.owner) > self.remembered:
                self.owner.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        self.owner = OrderedDict((cache, rid) for cache, rid in self.owner.items() if rid in live)
