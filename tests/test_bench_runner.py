"""The accuracy runner: presses replayed on one recorded prefill equal the presses run alone; resume."""

import csv

import pytest
import torch
from conftest import meta, random_ids, tiny_llama

from service.bench.runner import AccuracyRun, label, record, run_press, with_ratio
from service.engine.prefill import collect, prefill
from service.engine.presses import build
from service.engine.presses.kvcompose import KVComposePress


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("spec", [
    {"press": "snapkv", "compression_ratio": 0.5, "window_size": 16},
    {"press": "pyramidkv", "compression_ratio": 0.6, "window_size": 16, "beta": 4},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                 {"press": "tova", "compression_ratio": 0.5}]},
    {"press": "adakv", "inner": {"press": "expectedattention", "compression_ratio": 0.5}},
    {"press": "kvcompose", "compression_ratio": 0.5},
    {"press": "kvcompose", "compression_ratio": 0.5, "replay_context": False},
    {"press": "kvcompose", "compression_ratio": 0.5, "replay_context": False, "scorer": "attention"},
], ids=lambda s: label(s))
def test_a_press_on_recorded_inputs_equals_the_press_alone(model, spec):
    ids = random_ids(300, seed=12)
    alone = prefill(model, ids, build(spec), meta(300))
    press = build(spec)
    replayed = collect(model, run_press(model, press, record(model, ids)), meta(300), press)
    assert alone.layer_lengths == replayed.layer_lengths
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(alone.keys + alone.values,
                                                                replayed.keys + replayed.values))


@pytest.mark.parametrize("ratio", [0.3, 0.75])
def test_kvcompose_scores_once_and_selects_per_ratio(model, ratio):
    ids = random_ids(300, seed=13)
    rec = record(model, ids)
    scorer = KVComposePress(compression_ratio=0.5)
    run_press(model, scorer, rec)
    cache = rec.cache()
    selector = KVComposePress(compression_ratio=ratio)
    selector.compress_with_scores(scorer.last_selection["scores"], cache)
    fast = collect(model, cache, meta(300), selector)
    alone = prefill(model, ids, KVComposePress(compression_ratio=ratio), meta(300))
    assert fast.layer_lengths == alone.layer_lengths
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast.keys, alone.keys))


def test_with_ratio_sets_every_compression_ratio():
    spec = with_ratio({"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                                   {"press": "snapkv"}]}, 0.75)
    assert spec["compose"][0]["key_channel_compression_ratio"] == 0.5
    assert spec["compose"][1]["compression_ratio"] == 0.75


def test_rows_are_appended_and_a_rerun_resumes(tiny_engine, tmp_path):
    out = tmp_path / "results.csv"
    presses = [{"press": "snapkv", "window_size": 8}, {"press": "streamingllm"}]
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1", "vt"], 1, presses, [0.5])
    rows = list(csv.DictReader(out.open()))
    assert {(r["task"], r["press"]) for r in rows} == {
        (t, p) for t in ("niah_single_1", "vt") for p in ("none", "snapkv", "streamingllm", "kvcompose-aware")}
    assert all(0 <= float(r["score"]) <= 100 for r in rows)
    assert all(float(r["kept_fraction"]) < 0.6 for r in rows if r["press"] != "none")
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1", "vt"], 1, presses, [0.5])
    assert len(list(csv.DictReader(out.open()))) == len(rows)  # nothing recomputed
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1", "vt"], 1, presses, [0.5, 0.75])
    assert len(list(csv.DictReader(out.open()))) == len(rows) + 2 * 3  # only the new ratio


def test_task_prompt_and_codec_rows(tiny_engine, tmp_path):
    out = tmp_path / "results.csv"
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1"], 1, [{"press": "streamingllm"}], [0.5],
                                           task_prompts=("question", "paraphrase", "unrelated"),
                                           codecs=("int8", "int4"))
    rows = {r["press"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"none", "streamingllm", "kvcompose-aware", "kvcompose-aware-paraphrase",
                         "kvcompose-aware-unrelated", "none@int8", "streamingllm@int8", "none@int4",
                         "streamingllm@int4"}
    for name in ("none", "streamingllm"):  # same cache, stored as int8 and read back: same slots and bytes
        kept = {rows[name + suffix]["kept_fraction"] for suffix in ("", "@int8", "@int4")}
        assert len(kept) == 1
        assert rows[name + "@int8"]["bytes_int8"] == rows[name]["bytes_int8"] == rows[name + "@int8"]["bytes_stored"]
        assert rows[name]["bytes_stored"] == rows[name]["bytes_float16"]  # uncoded rows are stored as float16
        assert int(rows[name + "@int4"]["bytes_stored"]) < int(rows[name + "@int8"]["bytes_stored"])


def test_a_results_file_with_other_columns_is_refused_not_appended_to(tiny_engine, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("model,length,task,sample,press,ratio\n")
    with pytest.raises(ValueError, match="has the columns"):
        AccuracyRun(tiny_engine, out, 256)
    assert out.read_text() == "model,length,task,sample,press,ratio\n"


def test_codec_rows_only_for_the_presses_asked(tiny_engine, tmp_path):
    out = tmp_path / "results.csv"
    AccuracyRun(tiny_engine, out, 256).run(["niah_single_1"], 1, [{"press": "streamingllm"}, {"press": "knorm"}],
                                           [0.5], task_prompts=(), codecs=("int8",), codec_presses=("knorm",))
    assert {r["press"] for r in csv.DictReader(out.open())} == {"none", "streamingllm", "knorm", "knorm@int8"}


def test_a_codec_row_answers_from_the_decoded_bytes(tiny_engine):
    from service.bench.runner import _through_codec
    from service.cache import codec

    kv = prefill(tiny_engine.loaded.model, random_ids(64), None, meta(64))
    back = _through_codec(kv, "int8")
    assert back.keys[0].dtype == torch.float16
    assert torch.equal(back.keys[0], codec.decode(codec.encode(kv.to(dtype=torch.float16), "int8")).keys[0])
    assert not torch.equal(back.keys[0].float(), kv.keys[0])  # int8 is lossy: these are not the float32 keys


@pytest.mark.parametrize("spec", [
    {"press": "kvcompose"},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, {"press": "kvcompose"}]},
    {"press": "kvcompose", "scorer": "compactor"},
], ids=["kvcompose", "think+kvcompose", "kvcompose-compactor"])
def test_runner_scores_kvcompose_once_per_sample_and_equals_each_ratio_alone(tiny_engine, tmp_path, spec):
    from service.bench import ruler

    model = tiny_engine.loaded.model
    sample = ruler.generate("niah_single_1", tiny_engine.loaded.tokenizer, 256, 0)
    ids = tiny_engine.context_ids(sample.context)
    rec, scored = record(model, ids), {}
    run = AccuracyRun(tiny_engine, tmp_path / "r.csv", 256)
    for ratio in (0.3, 0.8):
        fast = run._compress(rec, "x", with_ratio(spec, ratio), sample, scored)
        alone = prefill(model, ids, build(with_ratio(spec, ratio)), meta(len(ids)))
        assert fast.layer_lengths == alone.layer_lengths
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fast.keys + fast.values, alone.keys + alone.values))
    # one scoring served both ratios; a kvpress scorer takes the ratio (Compactor blends by it)
    assert list(scored) == ["x"] and scored["x"][2] == (0.8 if "scorer" in spec else None)


def test_one_pass_kvcompose_has_rows_of_its_own():
    assert label({"press": "kvcompose"}) == "kvcompose"
    assert label({"press": "kvcompose", "scorer": "attention"}) == "kvcompose-attention"  # differs at 8k
    assert label({"press": "kvcompose", "replay_context": False, "scorer": "attention"}) == "kvcompose-1pass"
    assert label({"compose": [{"press": "think"}, {"press": "kvcompose", "replay_context": False,
                                                   "scorer": "attention"}]}) == "think+kvcompose-1pass"
    # one pass by default scores as Compactor, and computes the same rows
    assert label({"press": "kvcompose", "replay_context": False}) == "kvcompose-compactor"
    assert label({"press": "kvcompose", "scorer": "compactor"}) == "kvcompose-compactor"
