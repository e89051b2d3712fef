"""The short soak (``kvcompose bench soak`` runs about 2,000 requests over 20 minutes): mixed
requests through the running service, every answer the status it should have, and after warm-up
no process of the service grows in memory, threads or open files, Redis stays within maxmemory and
no temporary files pile up."""

from __future__ import annotations

from service.bench import soak

from .conftest import DOCUMENT


def test_a_short_soak_leaks_nothing(stack):
    docs = [f"Record {i}. " + DOCUMENT for i in range(4)]
    report = soak.run(stack, docs, requests=240, duration_s=60, clients=3, sample_s=4, warmup=0.35, ttl_s=30)
    assert sum(report.outcomes.values()) == 240
    assert not report.unexpected, (report.unexpected[:5], report.outcomes)
    assert not report.leaks(), soak.table(report)
    assert len(report.growth()) >= 5  # the launcher, Redis, the store, Ray's processes and replicas were watched
