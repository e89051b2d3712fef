"""The PrefixStore server's Prometheus metrics (prometheus_client, on ``--metrics-address``).

The store runs outside Ray, so it exports its own endpoint instead of Ray's metrics agent. The
store's entry outcomes (hits, misses, damaged entries deleted) are read from ``MeteredStore.outcomes``
when scraped, so there is one count of each.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EntryOutcomes(Collector):
    def __init__(self, outcomes: Mapping[str, int]):
        self.outcomes = outcomes

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("kvcompose_store_entries", "Entry outcomes: hit (a verified Fetch), grant (a "
                                     "read grant: the decoder reads and verifies), miss (a chunk was evicted), "
                                     "corrupt_deleted, missing_chunk_deleted, put (new entry)",
                                     labels=["outcome"])
        for name, value in self.outcomes.items():
            family.add_metric([name], value)
        yield family


class StoreMetrics:
    def __init__(self, outcomes: Mapping[str, int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("kvcompose_store_requests", "PrefixStore calls by method and gRPC status code",
                                ["method", "code"], registry=self.registry)
        self.seconds = Histogram("kvcompose_store_request_seconds", "PrefixStore call latency by method",
                                 ["method"], buckets=_LATENCY_S, registry=self.registry)
        self.bytes_in = Counter("kvcompose_store_bytes_in", "Cache bytes received by Put", registry=self.registry)
        self.bytes_out = Counter("kvcompose_store_bytes_out", "Cache bytes sent by Fetch", registry=self.registry)
        self.redis_up = Gauge("kvcompose_store_redis_up", "1 while Redis answers the health check's PING",
                              registry=self.registry)
        self.tenant_bytes = Gauge("kvcompose_store_tenant_bytes", "Cache bytes each tenant stores, reconciled "
                                  "with what Redis holds every usage_refresh_s (its quota counts the same)",
                                  ["tenant"], registry=self.registry)
        self.registry.register(_EntryOutcomes(outcomes))

    def serve(self, address: str) -> None:
        """Expose ``/metrics`` on ``host:port`` (a background thread of this process)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
