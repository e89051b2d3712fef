"""Tenants who compete: a tenant flooding the service is held to its share (RESOURCE_EXHAUSTED with a
retry hint) and another tenant's time to first token stays within 3x of its quiet value.

Measured on 2 cores (quiet tenant's median time to the first piece of the answer by cache id, 16
flooding threads that follow the hints): 14 ms alone, 31 ms with the flood held to 1 decode and 1
prefill (2.2x). An earlier version of this test read the time of the last piece (4 tokens) and
found 29 and 43-48 ms ("within 2x"); the quiet tenant's answer shares the Decoder's steps with the
flood's one decode, and each refused request still costs the proxy and the Ingress CPU here."""

from __future__ import annotations

import collections
import re
import statistics
import threading
import time

import grpc

from service.client import KVComposeClient

from .conftest import DOCUMENT, FLOOD, FLOOD_LIMITS, QUESTION

FLOODERS = 16


def ttft_s(client: KVComposeClient, cache_id: str) -> float:
    started, first = time.perf_counter(), None
    for message in client.generate(QUESTION, cache_id=cache_id, max_new_tokens=4):
        if message.text and first is None:  # the first piece (the stream is read to its end)
            first = time.perf_counter() - started
    return first


def median_ttft(client: KVComposeClient, cache_id: str, n: int = 9) -> float:
    return statistics.median(ttft_s(client, cache_id) for _ in range(n))


def test_a_flooding_tenant_is_held_to_its_share_and_others_keep_their_speed(stack):
    with KVComposeClient(stack.address, tenant="quiet", timeout_s=60) as quiet, \
            KVComposeClient(stack.address, tenant=FLOOD, timeout_s=60) as flood:
        quiet_cache = quiet.compress(DOCUMENT).cache_id
        flood_cache = flood.compress(DOCUMENT).cache_id
        ttft_s(quiet, quiet_cache)  # warm: the Decoder's LRU holds it
        alone = median_ttft(quiet, quiet_cache)

        outcomes: collections.Counter = collections.Counter()
        hints, stop = [], threading.Event()

        def flooder(i: int) -> None:
            with KVComposeClient(stack.address, tenant=FLOOD, timeout_s=60, retries=False) as c:
                n = 0
                while not stop.is_set():
                    n += 1
                    method = "Compress" if n % 4 == 0 else "Generate"
                    try:
                        if method == "Compress":  # a new document now and then: prefills
                            c.compress(f"Flood document {i}-{n}. " + DOCUMENT[: 200 + n])
                        else:  # long answers: decodes
                            c.ask(QUESTION, cache_id=flood_cache, max_new_tokens=48)
                        outcomes["OK"] += 1
                    except grpc.RpcError as e:
                        outcomes[e.code().name] += 1
                        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            hint = dict(e.trailing_metadata() or ()).get("retry-after-ms")
                            hints.append((method, hint, e.details()))
                            wait = re.search(r"retry in ([0-9.]+) s", e.details() or "")
                            time.sleep(float(wait.group(1)) if wait else 0.1)  # a client that follows the hint

        threads = [threading.Thread(target=flooder, args=(i,)) for i in range(FLOODERS)]
        for t in threads:
            t.start()
        try:
            time.sleep(2)
            flooded = median_ttft(quiet, quiet_cache)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
    assert set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes["OK"] > 0 and outcomes["RESOURCE_EXHAUSTED"] > 0, outcomes
    # the hint: in the message always; as retry-after-ms metadata too on unary calls (Serve's proxy
    # drops a stream's trailing metadata when it fails)
    assert all("retry in" in details and "tenant_limits." in details for _, _, details in hints), hints[:3]
    assert all(hint and int(hint) > 0 for method, hint, _ in hints if method == "Compress"), hints[:3]
    figures = (f"quiet tenant's TTFT {alone * 1000:.0f} ms alone, {flooded * 1000:.0f} ms while {FLOOD!r} floods "
               f"({FLOOD_LIMITS}): {outcomes}")
    print(figures)
    assert flooded <= 3 * alone, figures
