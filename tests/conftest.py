"""Shared fixtures: a tiny random Llama (unit tests) and the real embedded SmolLM2 (marked ``model``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The GPU kernels (Triton) run on the CPU in Triton's interpreter. It must be chosen before anything
# imports triton (transformers and kvpress do), so here; only code that asks for the fused scorer uses it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from service.cache.kvcache import CacheMeta  # noqa: E402
from service.config import EngineConfig  # noqa: E402
from service.engine.attention import use_per_layer_attention  # noqa: E402
from service.engine.models import LoadedModel, embedded_model_dir, tokenizer_digest  # noqa: E402

TINY_VOCAB = 49152  # SmolLM2's tokenizer, so text round-trips through the tiny model too


def tiny_llama(layers: int = 4, seed: int = 0, window: int = 4096) -> LlamaForCausalLM:
    """A random Llama small enough for unit tests: 4 query heads sharing 2 KV heads (GQA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=window, rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config).eval()
    use_per_layer_attention(model)
    return model


@pytest.fixture(scope="session")
def smollm2_dir():
    return embedded_model_dir(EngineConfig().cache_dir)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny(tokenizer) -> LoadedModel:
    return LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "seed-0", tokenizer_digest(tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a local model directory (what a service replica loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(layers=4, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    from service.engine.engine import Engine

    return Engine(EngineConfig(model="tiny-llama", codec="float32"), loaded=tiny)


@pytest.fixture(scope="session")
def smollm2():
    from service.engine.engine import Engine

    return Engine(EngineConfig())


def meta(length: int, press: dict | None = None) -> CacheMeta:
    return CacheMeta("tiny-llama", "seed-0", length, press or {})


def random_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2000, (n,), generator=g).tolist()


def plain_transformers_logits(model, context: list[int], question: list[int]) -> torch.Tensor:
    """Logits at the question positions from one plain transformers forward (stock SDPA, no cache)."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            return model(torch.tensor([context + question])).logits[0, -len(question):].float()
    finally:
        use_per_layer_attention(model)


@pytest.fixture(scope="session")
def redis_cluster():
    """A real 3-master, 3-replica Redis Cluster on loopback ports, shared by the session's tests
    (tests that kill nodes start their own)."""
    from service.store.embedded_cluster import EmbeddedRedisCluster

    with EmbeddedRedisCluster() as cluster:
        yield cluster


@pytest.fixture(params=["single", "cluster"])
def redis_target(request) -> dict:
    """``with_store`` arguments for the shared single Redis, then for the session's Redis Cluster."""
    from store_helpers import SHARED_REDIS

    if request.param == "single":
        return {"url": SHARED_REDIS}
    return {"url": request.getfixturevalue("redis_cluster").url, "redis_cluster": True}


def models_once_up(client, deadline_s: float = 120.0):
    """``client.list_models()`` once the server it dials is up (a starting worker answers UNAVAILABLE)."""
    import time

    import grpc

    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return client.list_models()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.3)
