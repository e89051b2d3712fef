"""Per-layer causal masks: layers of different lengths decode as if each had its own correct mask."""

import pytest
import torch
from conftest import meta, plain_transformers_logits, random_ids, tiny_llama

from service.cache.kvcache import CompressedKV
from service.engine.decode import question_logits
from service.engine.prefill import prefill
from service.engine.presses import build

UNEVEN = [
    {"press": "kvcompose", "compression_ratio": 0.6},
    {"press": "pyramidkv", "compression_ratio": 0.6, "window_size": 16, "beta": 4},
    {"press": "kvcompose", "compression_ratio": 0.6, "structured": False},
    {"press": "adakv", "inner": {"press": "snapkv", "compression_ratio": 0.6}},
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("spec", UNEVEN, ids=lambda s: s["press"] + ("-unstructured" if "structured" in s else ""))
def test_multi_token_question_stays_causal_on_shorter_layers(model, spec):
    kv = prefill(model, random_ids(400), build(spec), meta(400))
    lengths = kv.layer_lengths
    assert len(set(lengths)) > 1 or any(e is not None for e in kv.evicted), "press must leave layers uneven"
    question = random_ids(12, seed=5)
    changed = question[:-1] + [(question[-1] + 1) % 1000 + 10]
    a, b = question_logits(model, kv, question), question_logits(model, kv, changed)
    assert torch.allclose(a[:-1], b[:-1], atol=1e-5), (a[:-1] - b[:-1]).abs().max()
    assert not torch.allclose(a[-1], b[-1], atol=1e-5)


def test_evicted_slots_are_invisible(model):
    kv = prefill(model, random_ids(300), build(UNEVEN[2]), meta(300))
    layer = next(i for i, e in enumerate(kv.evicted) if e is not None)
    question = random_ids(6, seed=7)
    before = question_logits(model, kv, question)
    values = [v.clone() for v in kv.values]
    values[layer][kv.evicted[layer]] = 1e4  # garbage in evicted slots only
    after = question_logits(model, CompressedKV(kv.keys, values, kv.evicted, kv.meta), question)
    assert torch.allclose(before, after, atol=1e-5)


def test_uncompressed_cache_matches_plain_transformers(model):
    context, question = random_ids(200), random_ids(9, seed=3)
    kv = prefill(model, context, None, meta(200))
    ours = question_logits(model, kv, question)
    plain = plain_transformers_logits(model, context, question)
    assert torch.allclose(ours, plain, atol=1e-5), (ours - plain).abs().max()
