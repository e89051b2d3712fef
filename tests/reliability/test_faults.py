"""Faults under load: 16 concurrent clients while Redis is killed (and restarted by its supervisor)
and a Decoder replica is killed. Every request gets the right answer or UNAVAILABLE / ABORTED /
CANCELLED, never a wrong answer and never INTERNAL; afterwards every request succeeds."""

from __future__ import annotations

import collections
import threading
import time

import grpc

from service.api_client import KVComposeClient

from .conftest import DOCUMENT, MAX_NEW, QUESTION, normal_request_works

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
CLIENTS = 16


def _kill_decoder_replica() -> None:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Decoder" in a["name"]]
    assert names, "no Decoder replica found"
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)


def test_faults_under_load_never_serve_a_wrong_answer(stack, client, reference):
    context = client.compress_request(DOCUMENT)
    outcomes: collections.Counter = collections.Counter()
    wrong: list[str] = []
    stop = threading.Event()

    def load(i: int) -> None:
        with KVComposeClient(stack.address, timeout_s=60) as c:
            for _ in range(200):  # bounded
                if stop.is_set():
                    return
                try:
                    text, _ = c.ask(QUESTION, context=context, max_new_tokens=MAX_NEW)
                    if text != reference["answer"]:
                        wrong.append(text)
                    outcomes["OK"] += 1
                except grpc.RpcError as e:
                    outcomes[e.code().name] += 1
                    if e.code() not in RETRYABLE:
                        wrong.append(f"{e.code().name}: {e.details()}")
                    time.sleep(0.2)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        stack.redis.process.kill()  # Redis dies; its supervisor restarts it, empty
        time.sleep(4)
        _kill_decoder_replica()
        time.sleep(6)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not wrong, wrong[:5]
    assert outcomes["OK"] > CLIENTS and stack.redis.restarts >= 1, outcomes
    for _ in range(3):  # afterwards: the new cache is built again and every request succeeds
        text, _ = client.ask(QUESTION, context=context, max_new_tokens=MAX_NEW)
        assert text == reference["answer"]
    reference["cache_id"] = client.compress(DOCUMENT).cache_id  # Redis came back empty
    normal_request_works(client, reference)
