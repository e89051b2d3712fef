"""Cache-affinity routing through the real stack: 2 Decoder replicas, 4 documents, 100 mixed
questions. With the affinity router each document is fetched from the store about once; with
Serve's default router (power of two choices), measured in the same test, about once per replica."""

from __future__ import annotations

import concurrent.futures
import time

import grpc

from service.client import KVComposeClient

DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


def fetches_for_100_questions(address: str, documents: list[str]) -> int:
    """Store fetches (answers whose cache came from the store, not a replica's memory)."""
    with KVComposeClient(address, timeout_s=120) as client:
        ids = [client.compress(doc).cache_id for doc in documents]
        jobs = [ids[i % len(ids)] for i in range(100)]

        def ask(cache_id: str) -> str:
            for _ in range(50):  # RESOURCE_EXHAUSTED says retry: a client of this stack's small admission does
                try:
                    return client.ask("What is this about?", cache_id=cache_id, max_new_tokens=4)[1].cache_source
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.1)
            raise AssertionError("never admitted")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # below the replicas' limit: no spill-over
            sources = list(pool.map(ask, jobs))
    return sources.count("store")


def test_affinity_fetches_each_document_about_once(stack):
    from service.serve.launch import deploy

    docs = [f"Document {n}: the {word} ledger lists {n * 7} ships and one lighthouse." for n, word in
            enumerate(("amber", "brass", "cedar", "dune"))]
    with_affinity = fetches_for_100_questions(stack.address, docs)
    decoder = next(d for d in stack.config["applications"][0]["deployments"] if d["name"] == "Decoder")
    decoder["request_router_config"] = {"request_router_class": DEFAULT_ROUTER}
    deploy(stack.config)
    others = [d.replace("ledger", "register") for d in docs]  # new caches, not yet in any replica
    with_default = fetches_for_100_questions(stack.address, others)
    print(f"store fetches for 100 questions on 4 documents: affinity {with_affinity}, default {with_default}")
    assert with_affinity <= 5  # each document about once (a race at the very start may add one)
    assert with_default > with_affinity
