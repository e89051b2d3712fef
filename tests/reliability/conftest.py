"""One real stack for the reliability suite: a supervised embedded Redis, the prefix store process,
Ray Serve with the gRPC proxy, and a tiny random Llama saved as a local model (fast and
deterministic: greedy answers are exact, so a wrong answer is detectable)."""

from __future__ import annotations

import grpc
import pytest

from service.client import KVComposeClient
from service.local.processes import free_port

DOCUMENT = "The blue lighthouse on Kessel Point was built in 1871 by the engineer Mara Quell. " * 12
QUESTION = "Who built the lighthouse?"
MAX_NEW = 8
FLOOD = "flood"  # the tenant with limits (test_tenants.py)
FLOOD_LIMITS = {"max_decodes": 1, "max_prefills": 1, "requests_per_s": 30, "burst": 30}  # of 2 CPU cores


@pytest.fixture(scope="package")
def stack(tiny_model_dir):
    with tiny_stack(tiny_model_dir, limits={"max_document_bytes": 1 << 20, "max_request_bytes": 4 << 20},
                    decode_batch={"memory_bytes": 2 << 20},  # ~11 rows of 180 KB; not 4k new tokens
                    tenant_limits={"tenants": {FLOOD: FLOOD_LIMITS}}) as stack:  # others: the defaults
        yield stack


@pytest.fixture(scope="package")
def client(stack):
    with KVComposeClient(stack.address, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="package")
def reference(client):
    """The right answer to QUESTION about DOCUMENT (greedy), and its cache id."""
    compressed = client.compress(DOCUMENT)
    text, _ = client.ask(QUESTION, cache_id=compressed.cache_id, max_new_tokens=MAX_NEW)
    return {"cache_id": compressed.cache_id, "answer": text}


def tiny_stack(model_dir, decoders: int = 1, decoder_options: dict | None = None, **args):
    """A LocalStack serving the tiny model (``args``: more app args; ``decoder_options``: the Decoder's
    deployment options)."""
    from service.local.stack import LocalStack

    small = {"ray_actor_options": {"num_cpus": 0.2}}
    decoder = {**small, "num_replicas": decoders, "autoscaling_config": None} if decoders > 1 else small
    decoder = {**decoder, **(decoder_options or {})}
    return LocalStack(
        args={"engine": {"model": str(model_dir), "codec": "float16", "max_context_tokens": 4096},
              "allow_unauthenticated": True, **args},  # development mode: tests name tenants in x-tenant
        deployments={"Ingress": small, "Compressor": small, "Decoder": decoder},
        top={"grpc_options": {"port": free_port()},
             "http_options": {"host": "127.0.0.1", "port": free_port()}},
        ray_init={"num_cpus": 2},
    )


def normal_request_works(client: KVComposeClient, reference: dict) -> None:
    """The service still answers right after whatever came before."""
    text, stats = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=MAX_NEW)
    assert text == reference["answer"] and stats.new_tokens > 0


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (str, bytes)):
            list(result)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK
