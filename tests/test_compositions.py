"""Every ordered pair of presses composes correctly, or is refused at spec time saying why.

Correct means: the kept fraction of tokens is the product of the parts' kept fractions, ThinK's
pruned channels survive, the cache decodes, and the model keeps no state of the composition.
"""

import itertools

import pytest
import torch
from conftest import meta, random_ids, tiny_llama
from transformers import DynamicCache

from service.engine.decode import question_logits
from service.engine.prefill import _evicted_mask, collect, prefill
from service.engine.presses import PressSpecError, build, canonical

LENGTH, LAYERS = 128, 4
SNAP = {"press": "snapkv", "compression_ratio": 0.5, "window_size": 16}
PARTS = {  # name -> (spec, fraction of tokens it keeps)
    "kvcompose": ({"press": "kvcompose", "compression_ratio": 0.5}, 0.5),
    "kvcompose-one-pass": ({"press": "kvcompose", "compression_ratio": 0.5, "replay_context": False,
                            "scorer": "attention"}, 0.5),
    "kvcompose-headwise": ({"press": "kvcompose", "compression_ratio": 0.5, "structured": False}, 0.5),
    "think": ({"press": "think", "key_channel_compression_ratio": 0.5}, 1.0),
    "knorm": ({"press": "knorm", "compression_ratio": 0.5}, 0.5),
    "snapkv": (SNAP, 0.5),
    "streamingllm": ({"press": "streamingllm", "compression_ratio": 0.25}, 0.75),
    "criticaladakv": ({"press": "criticaladakv", "inner": SNAP}, 0.5),
}
PAIRS = list(itertools.product(PARTS, repeat=2))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS, seed=5)


def refusal(first: str, second: str) -> str | None:
    """What the spec check must say about this order (None: it must work)."""
    if first in ("kvcompose-headwise", "criticaladakv"):
        return "must come last"
    if "kvcompose" in first and "kvcompose" in second:
        return "can appear once"
    if "kvcompose" in first and second in ("snapkv", "criticaladakv"):
        return "keep_token_lower_bound to at least 17"
    if second == "kvcompose-one-pass" and first != "think":
        return "replay_context=false"
    return None


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_ordered_pair(model, first, second):
    spec = {"compose": [PARTS[first][0], PARTS[second][0]]}
    expected_refusal = refusal(first, second)
    if expected_refusal:
        with pytest.raises(PressSpecError, match="compose\\[1\\]|compose\\[0\\]") as e:
            canonical(spec)
        assert expected_refusal in str(e.value)
        return
    press = build(spec)
    kv = prefill(model, random_ids(LENGTH, seed=7), press, meta(LENGTH))
    kept = sum(kv.kept_tokens_per_layer()) / (LAYERS * LENGTH)
    product = PARTS[first][1] * PARTS[second][1]
    assert kept == pytest.approx(product, abs=2 / LENGTH + 1e-6), (kept, product)
    if "think" in (first, second):  # half of every head's key channels are zero
        for keys in kv.keys:
            assert (keys.abs().sum(dim=1) == 0).sum().item() == keys.shape[0] * keys.shape[2] // 2
    assert question_logits(model, kv, random_ids(4, seed=9)).isfinite().all()
    assert not model.model._forward_pre_hooks
    assert all(layer.self_attn.masked_key_indices is None for layer in model.model.layers)


def test_a_windowed_scorer_after_kvcompose_works_with_enough_slots_per_layer(model):
    spec = {"compose": [{"press": "kvcompose", "compression_ratio": 0.5, "keep_token_lower_bound": 17}, SNAP]}
    kv = prefill(model, random_ids(LENGTH, seed=7), build(spec), meta(LENGTH))
    assert sum(kv.layer_lengths) / (LAYERS * LENGTH) == pytest.approx(0.25, abs=2 / LENGTH)


def test_declared_ratio_is_the_product(model):
    press = build({"compose": [PARTS["kvcompose"][0], PARTS["knorm"][0]]})
    assert press.compression_ratio == pytest.approx(0.75)


def test_a_press_leaves_the_model_as_it_found_it_and_can_be_reused(model):
    press = build({"press": "kvcompose", "compression_ratio": 0.5, "structured": False})
    ids = random_ids(LENGTH, seed=3)
    cache = DynamicCache()
    with torch.inference_mode(), press(model):
        model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    assert not model.model._forward_pre_hooks  # the context-ids hook went with the block
    assert press._state == {}
    # the head masks are the press's result, shaped like each layer's cache; the modules carry them as
    # kvpress's marks (its pipeline decodes after the block), until collect takes them off
    assert press.head_masks
    for i, mask in press.head_masks.items():
        assert mask.dtype == torch.bool and mask.shape == cache.layers[i].keys.shape[1:3]
        assert _evicted_mask(model.model.layers[i].self_attn.masked_key_indices, cache.layers[i]).equal(mask)
    kv = collect(model, cache, meta(LENGTH), press)
    assert any(e is not None for e in kv.evicted)  # collect moved them into the cache
    assert all(layer.self_attn.masked_key_indices is None for layer in model.model.layers)
    with press(model):  # entering again starts a new document
        assert press.head_masks == {}
    first = prefill(model, ids, press, meta(LENGTH))
    again = prefill(model, ids, press, meta(LENGTH))
    assert first.layer_lengths == again.layer_lengths
    assert all(torch.equal(a, b) for a, b in zip(first.keys, again.keys))
