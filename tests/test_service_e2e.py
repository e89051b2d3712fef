"""The distributed service end to end: a two-node Ray cluster on this machine, Serve's gRPC proxy,
the prefix store, and a standalone decode worker, all called through plain grpcio clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from service.bench.haystack import needle_document
from service.client import KVComposeClient
from service.local.processes import free_port

pytestmark = pytest.mark.model
SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def stack():
    from ray.cluster_utils import Cluster

    from service.local.stack import LocalStack

    prefix = f"kvc-e2e-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"compress_node": 1}})
    decode_node = cluster.add_node(num_cpus=2, resources={"decode_node": 1})
    grpc_port = free_port()
    stack = LocalStack(
        # decoders read granted chunks directly (the shared Redis has no reader user: its default one)
        redis_url=SHARED_REDIS, args={"store": {"key_prefix": prefix, "redis_read_url": SHARED_REDIS},
                                      "allow_unauthenticated": True},
        deployments={"Compressor": {"ray_actor_options": {"resources": {"compress_node": 0.1}}},
                     "Decoder": {"ray_actor_options": {"resources": {"decode_node": 0.1}}}},
        top={"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": free_port()},
             "grpc_options": {"port": grpc_port}},
        ray_init={"address": cluster.address},
    )
    try:
        with stack:
            yield {"address": stack.address, "store": stack.store, "decode_node": decode_node.node_id,
                   "prefix": prefix, "token": stack.config["applications"][0]["runtime_env"]["env_vars"][
                       "KVCOMPOSE_STORE_SERVICE_TOKEN"]}
    finally:
        cluster.shutdown()
        import redis

        r = redis.Redis.from_url(SHARED_REDIS)
        for name in r.scan_iter(match=f"{prefix}:*", count=1000):
            r.delete(name)


def counters() -> dict:
    from ray import serve

    return serve.get_app_handle("kvcompose").counters.remote().result()


def replica_nodes(deployment: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:kvcompose:{deployment}"),
                                  ("state", "=", "ALIVE")])
    return {a.node_id for a in actors}


@pytest.fixture(scope="module")
def document():
    from transformers import AutoTokenizer

    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
    return needle_document(tokenizer, 2000)


def test_compress_once_then_answer_three_questions_on_another_node(stack, document):
    doc, question, needle = document
    assert replica_nodes("Decoder") == {stack["decode_node"]}
    assert stack["decode_node"] not in replica_nodes("Compressor")
    with KVComposeClient(stack["address"]) as client:
        compressed = client.compress(doc, {"press": "kvcompose", "compression_ratio": 0.5})
        assert not compressed.reused and 1900 <= compressed.original_tokens <= 2100
        assert abs(compressed.kept_fraction - 0.5) < 0.02 and len(compressed.kept_tokens_per_layer) == 30
        assert compressed.stored_bytes < 0.55 * compressed.uncompressed_bytes
        answers = []
        for q in (question, "What is the color of the sky in the text?", "Summarise the text in five words."):
            text, stats = client.ask(q, cache_id=compressed.cache_id, max_new_tokens=24)
            answers.append((text, stats))
        assert needle in answers[0][0]
        assert [s.cache_source for _, s in answers] == ["store", "memory", "memory"]
        assert all(s.cache_hit and s.new_tokens > 0 for _, s in answers)
    c = counters()
    assert c["compressor"]["prefills"] == 1  # the document was prefilled once
    assert c["decoder"]["fetches"] == 1      # the decode node fetched it, after a grant from the prefix store
    assert c["decoder"]["fetch_paths"] == {"direct": 1, "fetch": 0, "fallback": 0}


def test_same_text_twice_reuses_the_cache(stack, document):
    doc, question, needle = document
    with KVComposeClient(stack["address"]) as client:
        context = client.compress_request(doc, {"press": "kvcompose", "compression_ratio": 0.5})
        text, stats = client.ask(question, context=context, max_new_tokens=24)
        assert stats.cache_hit and stats.compressed.reused and needle in text
        again = client.compress(doc, {"press": "kvcompose", "compression_ratio": 0.5})
        assert again.reused and again.cache_id == stats.cache_id
    assert counters()["compressor"]["prefills"] == 1


def test_errors_arrive_as_status_codes(stack, document):
    with KVComposeClient(stack["address"]) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.compress("some text", {"press": "snapkv", "compression_ratio": 1.5})
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "compression_ratio" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.ask("hi?", cache_id="0" * 64)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            client.ask("hi?", cache_id="nonsense")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Traceback" not in e.value.details()
        models = client.list_models().models
        assert models[0].id == "smollm2-135m-instruct" and models[0].layers == 30


def test_standalone_decode_worker_answers_from_the_store(stack, document):
    doc, question, needle = document
    with KVComposeClient(stack["address"]) as client:
        cache_id = client.compress(doc, {"press": "kvcompose", "compression_ratio": 0.5}).cache_id
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "workers.decode", "--store", stack["store"].address,
                               "--address", f"127.0.0.1:{port}"],
                              env={**os.environ, "KVCOMPOSE_STORE_SERVICE_TOKEN": stack["token"],
                                   "KVCOMPOSE_API_AUTH_TOKENS": '{"e2e-token": "default"}'})
    try:
        deadline = time.monotonic() + 120
        with KVComposeClient(f"127.0.0.1:{port}", token="e2e-token") as client:
            while True:
                try:
                    client.list_models()
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline or worker.poll() is not None:
                        raise
                    time.sleep(0.5)
            text, stats = client.ask(question, cache_id=cache_id, max_new_tokens=24)
        assert needle in text and stats.cache_source == "store"
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_cancelled_compress_does_not_break_the_next_ones(stack, document):
    """Regression: a prefill cancelled by its client kept running after the model lock was released,
    and the next Compress failed with INTERNAL. Now both next caches are bit-identical to a fresh
    process's (one thread, as a Ray replica with fractional CPUs runs)."""
    doc, _, _ = document
    long_doc = doc + doc[: len(doc) // 4]  # ~2.5k tokens: many seconds of prefill here
    small = ["The orchard has eleven pear trees and one old walnut.", "Tide tables are printed every Monday."]
    press = {"press": "kvcompose", "compression_ratio": 0.5}
    with KVComposeClient(stack["address"]) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.stub.Compress(client.compress_request(long_doc, press), metadata=client.kw["metadata"], timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        started = time.monotonic()
        results = [client.compress(text, press) for text in small]
        digests = [client.stat(r.cache_id).manifest.sha256.hex() for r in results]
        # the cancelled prefill stopped (it would take well over 10 s) and left nothing stored
        assert time.monotonic() - started < 10
        lookup = client.compress_request(long_doc, press)
        with pytest.raises(grpc.RpcError) as e:
            client.stub.Compress(lookup, metadata=client.kw["metadata"], timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not stored: it must be computed again
    code = (
        "import hashlib; from service.cache import codec; from service.engine.engine import Engine; "
        f"e = Engine(); print(' '.join(hashlib.sha256(codec.encode(e.compress(t, {press!r})[0], 'float16'))"
        f".hexdigest() for t in {small!r}))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    assert digests == fresh


def test_the_readmes_first_example_answers_right_and_stops(stack, capsys, monkeypatch):
    """The command the README shows first, against the real service with SmolLM2: exactly the answer
    the README shows, ended by the model (not cut at the token limit, not repeating itself)."""
    import shlex
    from pathlib import Path

    from service import cli
    from service.serve import instance

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "kvcompose remote ask" in line and "examples/" in line)
    argv = shlex.split(line)[1:]  # drop the program, keep its arguments
    argv[argv.index("--addr") + 1] = stack["address"]
    argv[argv.index("--document") + 1] = str(root / argv[argv.index("--document") + 1])
    shown = readme.split("It prints, verbatim", 1)[1].split("```\n", 2)[1].splitlines()
    monkeypatch.setattr(instance, "for_address", lambda *_: None)  # no token: dev stack
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == shown[0] + "\n"
    assert "600 kilograms" in out
    assert "cut at" not in err and "repetitive" not in err, err
    assert err.split(" · ")[2:3] == shown[1].split(" · ")[2:3]  # "kept 50% of 754 tokens"


def test_an_entropy_coded_int4_cache_is_stored_fetched_and_answers_on_another_node(stack, document):
    """``--codec int4+zstd`` end to end: the Compressor encodes it (format version 3: int4's packed
    tensors, each a zstd frame), the store keeps it below int4's bytes, and the decode node fetches,
    decodes, unpacks and answers from it."""
    doc, question, needle = document
    press = {"press": "kvcompose", "compression_ratio": 0.5}
    with KVComposeClient(stack["address"]) as client:
        stored = client.compress(doc, press, codec="int4+zstd")
        assert stored.codec == "int4+zstd" and not stored.reused
        assert stored.stored_bytes < 0.15 * stored.uncompressed_bytes  # 0.5 kept x int4's 5/16, less zstd's share
        manifest = client.stat(stored.cache_id).manifest
        assert manifest.format_version == 3 and manifest.key.codec == "int4+zstd"
        text, stats = client.ask(question, cache_id=stored.cache_id, max_new_tokens=24)
        assert stats.cache_source == "store" and needle in text
