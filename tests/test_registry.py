"""Every offline kvpress press builds from a JSON spec, compresses and decodes; bad specs name the field."""

from pathlib import Path

import pytest
from conftest import meta, random_ids, tiny_llama

from service.engine.decode import question_logits
from service.engine.prefill import prefill
from service.engine.presses import PressSpecError, build, canonical
from service.engine.presses.registry import PRESSES

INNER = {"press": "snapkv", "compression_ratio": 0.5}
EXTRA = {
    "think": {"key_channel_compression_ratio": 0.5},
    "perlayercompression": {"inner": INNER, "compression_ratios": [0.5] * 4},
    "criticalkv": {"inner": INNER},
    "simlayerkv": {},
}
NEEDS_NAMED_MODEL = {"kvzip", "kvgrad"}  # they load the tokenizer by the model's name: tested on SmolLM2
OFFLINE = sorted(set(PRESSES) - {"expectedattentionstats"} - NEEDS_NAMED_MODEL)


def spec_for(name: str) -> dict:
    if name in EXTRA:
        return {"press": name, **EXTRA[name]}
    params = canonical({"press": name, **({"inner": INNER} if _wraps(name) else {})})
    spec = {"press": name}
    if "compression_ratio" in params:
        spec["compression_ratio"] = 0.5
    if "inner" in params or "base_press" in params:
        spec["inner" if "inner" in params else "base_press"] = INNER
    return spec


def _wraps(name: str) -> bool:
    try:
        canonical({"press": name})
        return False
    except PressSpecError as e:
        return "inner: required" in str(e) or "base_press: required" in str(e)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("name", OFFLINE)
def test_press_compresses_and_decodes(model, name):
    kv = prefill(model, random_ids(256), build(spec_for(name)), meta(256))
    assert kv.num_layers == 4
    assert question_logits(model, kv, random_ids(5, seed=4)).isfinite().all()
    if name not in ("think", "simlayerkv"):
        assert sum(kv.kept_tokens_per_layer()) < 4 * 256


def test_canonical_fills_defaults_so_equal_presses_have_equal_specs():
    assert canonical({"press": "SnapKV", "compression_ratio": 0.5}) == canonical(
        '{"press": "snapkv", "compression_ratio": 0.5, "window_size": 64}')
    assert canonical(None) == {} and build({}) is None


def test_press_names_are_the_documented_ones_and_old_spellings_still_work():
    """docs/architecture.md lists the presses; an unknown one is refused listing the same names."""
    documented = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    assert "`kvpress_kvcompose`" in documented and "kvpress_kvcompose" in PRESSES
    for spelling in ("kvpress_kvcompose", "kvpresskvcompose", "KVPress-KVCompose"):
        assert canonical({"press": spelling})["press"] == "kvpress_kvcompose"
    with pytest.raises(PressSpecError) as err:
        canonical({"press": "tovaa"})
    assert str(err.value).endswith("known: " + ", ".join(sorted(PRESSES))) and "kvpress_kvcompose, " in str(err.value)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"press": "nope"}, "press: unknown press"),
        ({"press": "snapkv", "compression_ratio": 1.0}, "compression_ratio: must be in"),
        ({"press": "snapkv", "compression_ratio": -0.1}, "compression_ratio: must be in"),
        ({"press": "snapkv", "windowsize": 3}, "windowsize: unknown parameter"),
        ({"press": "snapkv", "window_size": "big"}, "window_size: must be a number"),
        ({"press": "kvcompose", "structured": "yes"}, "structured: must be true or false"),
        ({"compose": [{"press": "think"}, {"press": "tova", "compression_ratio": 2}]}, "compose[1].compression_ratio"),
        ({"press": "adakv"}, "inner: required"),
        ({"press": "adakv", "inner": {"press": "snapkv", "bad": 1}}, "inner.bad: unknown parameter"),
        ({"press": "kvcompose", "agg_task": "median"}, "agg_task must be 'max' or 'mean'"),
        ({"compression_ratio": 0.5}, "press: missing"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(PressSpecError) as err:
        build(spec)
    assert field in str(err.value)


@pytest.mark.parametrize("name", ["duoattention", "qfilter", "kvzap", "fastkvzip", "restorekv", "lukv",
                                  "expectedattentionstats"])
def test_presses_that_need_downloads_are_refused_clearly(name):
    with pytest.raises(PressSpecError, match="needs .* not available here"):
        build({"press": name})


def test_decoding_time_presses_are_refused_for_stored_caches():
    with pytest.raises(PressSpecError, match="compresses during generation"):
        build({"press": "decoding", "base_press": INNER})


def test_task_prompts_go_into_every_task_aware_press_at_construction():
    """Task prompts are a construction argument, reaching a KVCompose nested in a composition; a spec
    with no press that scores by them is refused, not silently task-agnostic."""
    from service.engine.presses import presses_in
    from service.engine.presses.kvcompose import KVComposePress

    ids = [[5, 6, 7], [8, 9]]
    composed = build({"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                                  {"press": "kvcompose", "compression_ratio": 0.5}]}, ids)
    scorers = [p for p in presses_in(composed) if isinstance(p, KVComposePress)]
    assert len(scorers) == 1 and scorers[0].task_ids == ids
    assert build({"press": "kvcompose", "compression_ratio": 0.5}).task_ids is None
    with pytest.raises(PressSpecError, match="task-aware press"):
        build({"press": "snapkv", "compression_ratio": 0.5}, ids)
