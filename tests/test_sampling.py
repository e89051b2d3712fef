"""Repetition, frequency and presence penalties (vLLM's ``SamplingParams`` names): the arithmetic,
the checks, the model's defaults, and that they change what the decode loop picks; and a model's
default stop strings, which end an answer that names none, their text kept."""

import copy

import pytest
import torch
from conftest import random_ids

from service.engine.batching import Request, decode_tokens
from service.engine.decode import penalise
from service.engine.engine import Engine
from service.protocol import Sampling


def test_each_penalty_moves_only_the_seen_tokens_as_defined():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = [0, 1, 0]  # token 0 twice, token 1 once
    assert torch.equal(penalise(logits, seen, Sampling(repetition_penalty=2.0)), torch.tensor([1.0, -4.0, 1.0, 0.5]))
    assert torch.equal(penalise(logits, seen, Sampling(frequency_penalty=0.5)), torch.tensor([1.0, -2.5, 1.0, 0.5]))
    assert torch.equal(penalise(logits, seen, Sampling(presence_penalty=0.5)), torch.tensor([1.5, -2.5, 1.0, 0.5]))
    assert torch.equal(logits, torch.tensor([2.0, -2.0, 1.0, 0.5]))  # the caller's logits are left as they were
    assert penalise(logits, [], Sampling(repetition_penalty=2.0)) is logits
    assert penalise(logits, seen, Sampling(repetition_penalty=1.0, frequency_penalty=0.0)) is logits


def test_penalties_run_where_the_logits_are():
    """Under a meta default device (as on a GPU host): the token ids are made on the logits' device."""
    logits = torch.tensor([2.0, -2.0, 1.0], device="cpu")
    with torch.device("meta"):
        out = penalise(logits, [0, 2], Sampling(repetition_penalty=2.0, presence_penalty=0.1))
    assert out.device.type == "cpu"
    assert torch.allclose(out, torch.tensor([0.9, -2.0, 0.4]))


@pytest.mark.parametrize("field, value", [("repetition_penalty", 0.0), ("repetition_penalty", float("nan")),
                                          ("repetition_penalty", 11.0), ("frequency_penalty", 2.5),
                                          ("presence_penalty", -3.0), ("presence_penalty", float("nan"))])
def test_out_of_range_penalties_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Sampling(**{field: value})


def test_a_penalty_changes_the_greedy_tokens_and_stops_a_loop(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(100), {})
    model, q = tiny_engine.loaded.model, random_ids(4, seed=2)
    plain = decode_tokens(model, [Request(kv, q, Sampling(max_new_tokens=24))])[0]
    assert len(set(plain)) < len(plain)  # the tiny random model repeats itself, so the test can fail
    strict = decode_tokens(model, [Request(kv, q, Sampling(max_new_tokens=24, presence_penalty=2.0,
                                                           repetition_penalty=10.0))])[0]
    assert strict != plain and len(set(strict)) > len(set(plain))
    # the same request in a batch beside an unpenalised one: each row keeps its own settings
    both = decode_tokens(model, [Request(kv, q, Sampling(max_new_tokens=24)),
                                 Request(kv, q, Sampling(max_new_tokens=24, presence_penalty=2.0,
                                                         repetition_penalty=10.0))])
    assert both == [plain, strict]


def test_unset_penalties_take_the_models_generation_config(tiny):
    model = tiny.model
    before = model.generation_config
    try:
        # as from a generation_config.json that sets two penalties (presence_penalty: not a transformers
        # field, kept as an attribute as from_pretrained keeps it)
        model.generation_config = copy.deepcopy(before)
        model.generation_config.repetition_penalty, model.generation_config.presence_penalty = 1.3, 0.4
        engine = Engine(loaded=tiny)
        assert engine.sampling_defaults == {"repetition_penalty": 1.3, "presence_penalty": 0.4}
        assert engine.info()["sampling_defaults"] == engine.sampling_defaults
        kv, _ = engine.compress(random_ids(60), {})
        _, unset = engine.prepare(kv, "q", Sampling())
        assert (unset.repetition_penalty, unset.presence_penalty, unset.frequency_penalty) == (1.3, 0.4, None)
        _, chosen = engine.prepare(kv, "q", Sampling(repetition_penalty=1.0))
        assert chosen.repetition_penalty == 1.0  # an explicit 1 (off) is not replaced by the default
    finally:
        model.generation_config = before
    assert Engine(loaded=tiny).sampling_defaults == {}  # a model that sets none: no penalty


def test_a_kept_stop_string_ends_the_answer_with_its_text_up_to_its_whitespace():
    from service.engine.text_stream import TextStream

    class Chars:  # one character a token
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    def run(stream):
        text = "".join(stream.add(ord(c)) for c in "It weighs 2.5 tonnes. Then it drifts")
        return text + stream.finish(), stream.stopped

    assert run(TextStream(Chars(), (". ",), keep_stop=True)) == ("It weighs 2.5 tonnes.", True)
    assert run(TextStream(Chars(), (". ",))) == ("It weighs 2.5 tonnes", True)


def test_the_models_default_stop_applies_only_where_a_request_names_none(tiny):
    kv_ids, question = random_ids(60), "q"
    engine = Engine(loaded=tiny)
    kv, _ = engine.compress(kv_ids, {})
    free = engine.answer(kv, question, Sampling(max_new_tokens=12))
    assert len(free) > 4
    stop = free[2:4]
    engine.sampling_defaults = {"stop": [stop]}  # as a model's defaults would set it
    assert engine.answer(kv, question, Sampling(max_new_tokens=12)) == free[: free.index(stop) + len(stop)]
    other = free[5:7] if free[5:7] and free[5:7] not in free[:5] else free[-1]
    assert engine.answer(kv, question, Sampling(max_new_tokens=12, stop=(other,))) == free[: free.index(other)]
