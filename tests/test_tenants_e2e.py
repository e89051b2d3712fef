"""Tenants through the real service (Ray Serve, two Ingress replicas, the prefix store, Redis): a
tenant's rate holds across both replicas, and a tenant compressing past its storage quota is refused
while every cache of another tenant still answers, without a second prefill, in a Redis with no
room for both (the same without quotas, at the store level: ``test_store_quota.py``)."""

from __future__ import annotations

import collections
import threading
import time

import grpc
import pytest
from redis import Redis
from reliability.conftest import DOCUMENT, QUESTION, tiny_stack

from service.client import KVComposeClient

RATE, SECONDS = 10, 4.0
FILLER_QUOTA = 250_000  # bytes: about 3 of the tiny model's caches of DOCUMENT


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    stack = tiny_stack(tiny_model_dir, tenant_limits={"tenants": {"metered": {"requests_per_s": RATE, "burst": 5}}},
                       store={"tenant_quotas": {"filler": FILLER_QUOTA}})
    stack.deployments["Ingress"] = {**stack.deployments["Ingress"], "num_replicas": 2}
    with stack:
        yield stack


def prefills() -> int:
    from ray import serve

    return serve.get_app_handle("kvcompose").counters.remote().result()["compressor"]["prefills"]


def test_a_tenants_rate_holds_across_two_ingress_replicas(stack):
    from ray import serve

    ingress = serve.status().applications["kvcompose"].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2, ingress
    outcomes: collections.Counter = collections.Counter()
    refusals: list[str] = []
    with KVComposeClient(stack.address, tenant="metered", retries=False) as warm:
        warm.list_models()  # the Ingress has the model's info before the clock starts
    time.sleep(1)  # the bucket refills

    def caller(deadline: float) -> None:
        with KVComposeClient(stack.address, tenant="metered", retries=False) as c:
            while time.monotonic() < deadline:
                try:
                    c.list_models()
                    outcomes["OK"] += 1
                except grpc.RpcError as e:
                    outcomes[e.code().name] += 1
                    refusals.append(e.details())
                    time.sleep(0.01)

    deadline = time.monotonic() + SECONDS
    threads = [threading.Thread(target=caller, args=(deadline,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = 5 + RATE * SECONDS
    print(f"{RATE} requests/s over 2 Ingress replicas for {SECONDS:g} s: {dict(outcomes)} ({expected:g} expected)")
    assert set(outcomes) == {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert abs(outcomes["OK"] - expected) <= 0.1 * expected, (outcomes, expected)
    assert all("tenant_limits.requests_per_s" in d and "across all replicas" in d and "retry in" in d
               for d in refusals), refusals[:3]


def test_a_tenant_past_its_quota_leaves_the_others_caches_answering(stack):
    quiet_docs = [f"Quiet document {i}. " + DOCUMENT for i in range(3)]
    with KVComposeClient(stack.address, tenant="quiet", timeout_s=120) as quiet, \
            KVComposeClient(stack.address, tenant="filler", timeout_s=120, retries=False) as filler:
        kept = [quiet.compress(doc) for doc in quiet_docs]
        # Room for the filler's quota, not for 8 of its caches (~670 kB). The slack covers Redis's own
        # transient memory (client buffers while a cache is written): at 150 kB it once evicted a quiet cache.
        redis = Redis.from_url(stack.redis_url)
        redis.config_set("maxmemory", redis.info("memory")["used_memory"] + FILLER_QUOTA + 250_000)
        before = prefills()
        stored, refused = [], []
        for i in range(8):
            try:
                stored.append(filler.compress(f"Filler document {i}. " + DOCUMENT).stored_bytes)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused.append(e.details())
        assert stored and refused and sum(stored) <= FILLER_QUOTA, (stored, refused)
        assert all(f"quota of {FILLER_QUOTA} bytes" in d and "tenant 'filler' stores" in d for d in refused), refused
        after_filler = prefills()  # (a refused Compress has prefilled: the quota is checked when the cache is written)
        for doc, compressed in zip(quiet_docs, kept):
            text, stats = quiet.ask(QUESTION, context=quiet.compress_request(doc), max_new_tokens=4)
            assert stats.cache_hit and stats.compressed.reused and stats.cache_id == compressed.cache_id, stats
        assert prefills() == after_filler == before + len(stored) + len(refused)  # quiet's caches: no prefill
