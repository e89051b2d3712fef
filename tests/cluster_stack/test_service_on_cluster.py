"""The whole service (store process, Ray Serve replicas, gRPC API) on a real Redis Cluster, with the
cluster named only by ``store: {redis_url, redis_cluster: true}``, as ``make serve`` takes it."""

from __future__ import annotations

import time

import grpc
import pytest

from service.client import KVComposeClient
from tests.reliability.conftest import DOCUMENT, MAX_NEW, QUESTION, tiny_stack


@pytest.fixture(scope="module")
def client(tiny_model_dir, redis_cluster):
    stack = tiny_stack(tiny_model_dir, store={"redis_cluster": True, "key_prefix": "kvc-stack-on-cluster"})
    stack.redis_url = redis_cluster.url
    with stack, KVComposeClient(stack.address, timeout_s=120) as c:
        yield c


def test_compress_answer_reuse_and_delete_through_the_service_on_a_cluster(client):
    first = client.compress(DOCUMENT)
    again = client.compress(DOCUMENT)
    assert first.cache_id == again.cache_id and again.reused  # prefilled once, found in the cluster
    text, stats = client.ask(QUESTION, cache_id=first.cache_id, max_new_tokens=MAX_NEW)
    by_text, _ = client.ask(QUESTION, context=client.compress_request(DOCUMENT), max_new_tokens=MAX_NEW)
    assert stats.new_tokens > 0 and text == by_text
    assert client.delete(first.cache_id)
    time.sleep(0.5)  # past the Decoder's revalidation interval (0.25 s) for its in-memory copy
    with pytest.raises(grpc.RpcError) as gone:
        client.ask(QUESTION, cache_id=first.cache_id, max_new_tokens=MAX_NEW)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
