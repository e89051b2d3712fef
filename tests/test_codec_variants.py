"""The accuracy runner's precision layouts (``service.bench.codec_variants``): read back as described,
with their bytes estimated from the codecs' own."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import meta, random_ids, tiny_llama

from service.bench import codec_variants
from service.bench.runner import AccuracyRun, _nbytes, _through_codec
from service.cache import codec
from service.engine.prefill import prefill
from service.engine.presses import build


@pytest.fixture(scope="module")
def kv():
    model = tiny_llama(layers=4, seed=3)
    return prefill(model, random_ids(160, seed=5), build({"press": "kvcompose", "compression_ratio": 0.5}), meta(160))


def test_the_residual_keeps_the_sinks_and_the_latest_slots_exact(kv):
    back, k4v2, exact = _through_codec(kv, "k4v2-res"), _through_codec(kv, "k4v2"), kv.to(dtype=torch.float16)
    s, r = codec_variants.SINKS, codec_variants.RECENT
    for got, coded, want in zip(back.keys + back.values, k4v2.keys + k4v2.values, exact.keys + exact.values):
        assert torch.equal(got[:, :s], want[:, :s]) and torch.equal(got[:, -r:], want[:, -r:])
        assert torch.equal(got[:, s:-r], coded[:, s:-r]) and not torch.equal(got[:, s:-r], want[:, s:-r])
    extra = sum(2 * 2 * (s + r) * k.shape[0] * k.shape[2] for k in kv.keys)
    assert _nbytes(kv, "k4v2-res") == len(codec.encode(kv, "k4v2")) + extra


def test_the_layers_given_the_most_slots_are_int8(kv):
    back, k4v2, int8 = (_through_codec(kv, n) for n in ("k4v2-top", "k4v2", "int8"))
    top = max(range(kv.num_layers), key=lambda i: kv.layer_lengths[i])
    low = min(range(kv.num_layers), key=lambda i: kv.layer_lengths[i])
    assert kv.layer_lengths[top] > kv.layer_lengths[low]  # the global allocation gave layers different widths
    assert torch.equal(back.keys[top], int8.keys[top]) and torch.equal(back.values[top], int8.values[top])
    assert torch.equal(back.keys[low], k4v2.keys[low])
    assert len(codec.encode(kv, "k4v2")) < _nbytes(kv, "k4v2-top") < len(codec.encode(kv, "int8"))


def test_an_unknown_variant_is_refused(kv):
    with pytest.raises(ValueError, match="unknown codec variant 'k4v3'"):
        codec_variants.read_back(kv, "k4v3")


def test_variant_rows_are_written_beside_the_codec_rows(tiny_engine, tmp_path):
    out = tmp_path / "results.csv"
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1"], 1, [{"press": "kvcompose"}], [0.5], task_prompts=(),
                                           codecs=("k4v2", "k4v2-res"), codec_presses=("kvcompose",))
    rows = {r["press"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"none", "kvcompose", "kvcompose@k4v2", "kvcompose@k4v2-res"}
    assert int(rows["kvcompose@k4v2-res"]["bytes_stored"]) > int(rows["kvcompose@k4v2"]["bytes_stored"])
