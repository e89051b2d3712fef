"""Prometheus metrics through Ray's metrics agent (scraped from every node's metrics export port)."""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Histogram

_LATENCY_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class ServiceMetrics:
    def __init__(self) -> None:
        self.requests = Counter("kvcompose_requests_total", "gRPC requests by method and status",
                                tag_keys=("method", "status"))
        self.compress_s = Histogram("kvcompose_compress_seconds", "Compress latency (reuse included)",
                                    boundaries=_LATENCY_S, tag_keys=("reused",))
        self.decode_s = Histogram("kvcompose_decode_seconds", "Generate latency", boundaries=_LATENCY_S)
        self.ttft_s = Histogram("kvcompose_time_to_first_token_seconds", "Generate time to first token",
                                boundaries=_LATENCY_S)
        self.cache = Counter("kvcompose_cache_lookups_total", "Caches found (hit) or prefilled (miss)",
                             tag_keys=("result",))
        self.bytes_stored = Counter("kvcompose_bytes_stored_total", "Bytes of caches written to the store")
        self.bytes_fetched = Counter("kvcompose_bytes_fetched_total", "Bytes of caches fetched by decoders")
        self.fetches = Counter("kvcompose_fetches_total", "Caches fetched by decoders, by path: direct (a read "
                               "grant), fetch (the store's stream, fallbacks included), fallback (a read "
                               "grant's read failed)",
                               tag_keys=("path",))
        self.store_entries = Counter("kvcompose_store_entries_total", "Entries the Compressor wrote to Redis "
                                     "itself (outcome=put); the store server counts those written through it",
                                     tag_keys=("outcome",))
        self.kept_fraction = Histogram("kvcompose_kept_fraction",
                                       "Fraction of context tokens kept by compression (net of head-wise evictions)",
                                       boundaries=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])


class TallyExport:
    """Exports a tally kept by Ray-free code (name -> count so far) to a Ray counter tagged by name:
    each ``export`` adds what grew since the last (Ray counters take increments, not totals)."""

    def __init__(self, counter: Counter, tag: str, start: Mapping[str, int] | None = None):
        self.counter, self.tag = counter, tag
        self.sent = dict(start or {})

    def export(self, tally: Mapping[str, int]) -> None:
        for name, count in tally.items():
            if count > self.sent.get(name, 0):
                self.counter.inc(count - self.sent.get(name, 0), tags={self.tag: name})
                self.sent[name] = count
