"""The PrefixStore on a real Redis Cluster losing a master under load (over real gRPC sockets).

Eight clients Put and Fetch while one master is SIGKILLed. Its replica is promoted. Every call
either succeeds with verified, exactly-right bytes or fails with UNAVAILABLE and succeeds on a
retry; entries written (and replicated) before the kill all stay readable; nothing wrong or
partial is ever returned.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from conftest import random_ids
from store_helpers import ServerProcess, make_cache

from service.config import StoreConfig
from service.store.embedded_cluster import EmbeddedRedisCluster
from service.store.errors import NotFound, Unavailable

CLIENTS = 8
RETRY_FOR_S = 30.0  # failover takes ~node timeout (1 s) + election; this is a generous bound


class Outcomes:
    """What every call ended as, across the clients."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok = self.unavailable = self.lost_after_ack = 0
        self.wrong: list[str] = []

    def add(self, **counts) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def retried(outcomes: Outcomes, call, *args):
    """Retry a call while it is UNAVAILABLE (the failover), counting each; anything else is final."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            return call(*args)
        except Unavailable:
            outcomes.add(unavailable=1)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_master_dies_under_load_and_no_wrong_or_partial_cache_is_served(tiny_engine):
    # Distinct payloads (any 300-token cache is valid under any 300 ids), so serving one entry's
    # bytes for another's would be seen.
    payloads = [make_cache(tiny_engine, random_ids(300, seed=s), tenant="default") for s in range(5)]
    key = payloads[0][0]
    expected: dict[str, bytes] = {}
    with EmbeddedRedisCluster() as cluster:
        config = StoreConfig(redis_url=cluster.url, redis_cluster=True, service_token="svc", chunk_bytes=4096,
                             redis_retries=1, redis_timeout_s=2.0)
        with ServerProcess(config) as server:
            with server.client(retries=0) as client:  # each UNAVAILABLE reaches the test
                before = []
                for i in range(24):
                    data = payloads[i % len(payloads)][1]
                    before.append(client.put(key, random_ids(300, seed=1000 + i), data)[0].cache_id)
                    expected[before[-1]] = data
            assert len({cluster.master_of(f"{{default/{c}}}") for c in before}) == 3  # on every shard
            cluster.wait_replicated()

            outcomes, stop = Outcomes(), threading.Event()

            def client_loop(n: int) -> None:
                try:
                    client_calls(n)
                except Exception as e:  # noqa: BLE001 - any other outcome (INTERNAL, DATA_LOSS...) fails the test
                    outcomes.wrong.append(f"client {n}: {type(e).__name__}: {e}")

            def client_calls(n: int) -> None:
                rng = random.Random(n)
                with server.client(retries=0) as c:
                    i = 0
                    while not stop.is_set():
                        own = random_ids(300, seed=10_000 * (n + 1) + i)
                        data = payloads[(n + i) % len(payloads)][1]
                        i += 1
                        m, _ = retried(outcomes, c.put, key, own, data)
                        with outcomes.lock:
                            expected[m.cache_id] = data
                        for cache_id, written_before in ((rng.choice(before), True), (m.cache_id, False)):
                            try:
                                _, got = retried(outcomes, c.fetch, cache_id)
                            except NotFound:
                                if written_before:
                                    outcomes.wrong.append(f"replicated entry {cache_id} lost")
                                outcomes.add(lost_after_ack=1)  # acknowledged, not yet replicated, master died
                                continue
                            if got != expected[cache_id]:
                                outcomes.wrong.append(f"{cache_id}: another entry's bytes")
                            outcomes.add(ok=1)

            threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(2.0)
            victim = cluster.master_of(f"{{default/{before[0]}}}")
            ok_before_kill = outcomes.ok
            cluster.kill(victim)
            cluster.wait_healthy()  # the replica took over
            time.sleep(3.0)  # and the load goes on against the new master
            stop.set()
            for t in threads:
                t.join(timeout=RETRY_FOR_S * 3)

            assert not any(t.is_alive() for t in threads)
            assert not outcomes.wrong, outcomes.wrong
            assert victim not in cluster.masters_by_port()
            assert ok_before_kill > 0 and outcomes.ok > ok_before_kill + CLIENTS  # served through and after
            assert outcomes.unavailable > 0  # the calls did meet the dead master
            assert outcomes.lost_after_ack <= CLIENTS  # at most each client's last unreplicated write
            with server.client() as c:  # every entry written before the kill is still exactly there
                for cache_id in before:
                    assert c.fetch(cache_id)[1] == expected[cache_id]
    print(f"failover under load: {outcomes.ok} verified calls, {outcomes.unavailable} UNAVAILABLE "
          f"(retried), {outcomes.lost_after_ack} acknowledged writes lost with the master")


def test_a_fresh_cluster_serves_the_grpc_store_like_a_single_redis(tiny_engine, redis_cluster):
    """Put, Fetch, Stat(touch), Lookup (longest prefix), Delete over gRPC against the session cluster."""
    ids = random_ids(600, seed=6)
    key, data = make_cache(tiny_engine, ids, "int8", tenant="default")
    config = StoreConfig(redis_url=redis_cluster.url, redis_cluster=True, service_token="svc", chunk_bytes=8192,
                         block_tokens=256, key_prefix="kvc-cluster-grpc")
    with ServerProcess(config) as server, server.client() as client:
        m, existed = client.put(key, ids, data)
        assert not existed and client.fetch(m.cache_id)[1] == data
        assert client.stat(m.cache_id, touch=True).cache_id == m.cache_id
        found, matched = client.lookup(key, ids + random_ids(40, seed=7), longest_prefix=True)
        assert found.cache_id == m.cache_id and matched == 600
        assert client.delete(m.cache_id)
        with pytest.raises(NotFound):
            client.fetch(m.cache_id)


def test_the_url_kubernetes_builds_for_a_managed_cluster_gives_a_tls_cluster_client():
    """k8s builds REDIS_URL as $(REDIS_SCHEME)://$(REDIS_USERNAME):$(REDIS_PASSWORD)@$(REDIS_HOST)/0."""
    from redis.asyncio import RedisCluster
    from redis.asyncio.connection import SSLConnection

    from service.store.redis_store import connect

    url = "rediss://default:s3cret@clustercfg.example.internal:6379/0"
    client = connect(StoreConfig(redis_url=url, redis_cluster=True), url)  # connects lazily, on first use
    assert isinstance(client, RedisCluster)
    kwargs = client.connection_kwargs
    assert kwargs["connection_class"] is SSLConnection
    assert (kwargs["username"], kwargs["password"]) == ("default", "s3cret")


def test_a_cluster_that_cannot_be_reached_is_unavailable_not_internal():
    """No node answers (the one named is down): every call is UNAVAILABLE (retry), the store stays up."""
    import asyncio

    from store_helpers import free_port, store_for

    async def go():
        store = store_for(f"redis://127.0.0.1:{free_port()}/0", redis_cluster=True)
        try:
            with pytest.raises(Unavailable):
                await store.stat("0" * 64, tenant="default")
        finally:
            await store.close()

    asyncio.run(go())
