"""The sampling settings through the API: penalties change the tokens, stop strings end the answer,
unset settings take the model's defaults (ListModels says which), and bad values are refused by name
with nothing lost."""

import json

import grpc
import pytest

from .conftest import MAX_NEW, QUESTION, code_of, normal_request_works


def test_penalties_change_the_answer_and_unset_means_the_models_default(client, reference):
    # the tiny model sets no penalties: an unset request is the plain greedy answer
    assert json.loads(client.list_models().models[0].sampling_defaults_json) == {}
    long = 24
    plain, _ = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=long)
    neutral, _ = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=long, repetition_penalty=1.0,
                            frequency_penalty=0.0, presence_penalty=0.0)
    assert neutral == plain
    for setting in ({"repetition_penalty": 10.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalised, stats = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=long, **setting)
        assert penalised != plain, setting
        assert stats.new_tokens > 0


def test_a_stop_string_ends_the_answer_before_it(client, reference):
    answer = reference["answer"]
    stop = answer.strip()[2:4]
    assert stop and stop in answer
    text, stats = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=MAX_NEW, stop=[stop])
    assert text == answer[: answer.index(stop)]
    assert stats.new_tokens < MAX_NEW


@pytest.mark.parametrize("setting", [{"repetition_penalty": 0.0}, {"repetition_penalty": 50.0},
                                     {"frequency_penalty": 3.0}, {"presence_penalty": float("nan")}])
def test_a_bad_penalty_is_refused_by_name_and_nothing_is_lost(client, reference, setting):
    name = next(iter(setting))
    try:
        list(client.generate(QUESTION, cache_id=reference["cache_id"], max_new_tokens=MAX_NEW, **setting))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and name in e.details(), e.details()
    else:
        pytest.fail(f"{setting} was accepted")
    assert code_of(lambda: client.stat(reference["cache_id"])) == grpc.StatusCode.OK
    normal_request_works(client, reference)


def test_a_whitespace_stop_string_is_a_stop_string(client, reference):
    """"\n\n" is a common stop string: accepted, unlike one that is empty."""
    text, _ = client.ask(QUESTION, cache_id=reference["cache_id"], max_new_tokens=MAX_NEW, stop=["\n\n"])
    assert text == reference["answer"].split("\n\n")[0]
