"""Bad, oversized and malformed requests through the real gRPC API: each gets its precise status
code and a message naming what to fix, and the next normal request is answered right."""

from __future__ import annotations

import json

import grpc
import pytest
from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import store_pb2 as store_pb

from .conftest import DOCUMENT, QUESTION, code_of, normal_request_works

INVALID, NOT_FOUND, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, \
    grpc.StatusCode.RESOURCE_EXHAUSTED


def compress(**fields) -> api.CompressRequest:
    return api.CompressRequest(**({"text": DOCUMENT} | fields))


def generate(cache_id: str | None = None, **fields) -> api.GenerateRequest:
    req = api.GenerateRequest(**({"question": QUESTION, "max_new_tokens": 4} | fields))
    if cache_id:
        req.cache_id = cache_id
    return req


ID = "REFERENCE"  # replaced by the stored document's cache id
# (name, method, request, expected code, words the message must contain)
CASES = [
    ("no context", "Compress", api.CompressRequest(), INVALID, "context"),
    ("empty text", "Compress", compress(text=""), INVALID, "empty"),
    ("whitespace text", "Compress", compress(text=" \n\t "), INVALID, "empty"),
    ("empty token ids", "Compress", api.CompressRequest(token_ids=api.TokenIds()), INVALID, "empty"),
    ("token id beyond vocab", "Compress", api.CompressRequest(token_ids=api.TokenIds(ids=[5, 10**9])), INVALID,
     "token ids"),
    ("document too long in tokens", "Compress", compress(text="word " * 6000), INVALID, "tokens"),
    ("document over max_document_bytes", "Compress", compress(text="x" * ((1 << 20) + 1)), INVALID,
     "max_document_bytes"),
    ("unrepresentable character", "Compress", compress(text="abc\x04def"), INVALID, "U+0004"),
    ("unknown model", "Compress", compress(model="gpt-5"), NOT_FOUND, "not served"),
    ("press not JSON", "Compress", compress(press_json="{oops"), INVALID, "press_json"),
    ("press not an object", "Compress", compress(press_json="[1, 2]"), INVALID, "press"),
    ("unknown press", "Compress", compress(press_json='{"press": "nope"}'), INVALID, "nope"),
    ("ratio too high", "Compress", compress(press_json='{"press": "knorm", "compression_ratio": 1.5}'), INVALID,
     "compression_ratio"),
    ("ratio NaN", "Compress", compress(press_json='{"press": "knorm", "compression_ratio": NaN}'), INVALID,
     "compression_ratio"),
    ("unknown press field", "Compress", compress(press_json='{"press": "knorm", "bogus": 1}'), INVALID, "bogus"),
    ("press needing a download", "Compress", compress(press_json='{"press": "qfilter"}'), INVALID, "qfilter"),
    ("unknown codec", "Compress", compress(codec="zip"), INVALID, "codec"),
    ("negative ttl", "Compress", compress(ttl_s=-5), INVALID, "ttl_s"),
    ("huge ttl", "Compress", compress(ttl_s=2**62), INVALID, "ttl_s"),
    ("too many task prompts", "Compress", compress(task_prompts=["q?"] * 17), INVALID, "max_task_prompts"),
    ("task prompt too long", "Compress", compress(task_prompts=["q" * 5000]), INVALID, "max_task_prompt_bytes"),
    ("empty task prompt", "Compress", compress(task_prompts=[" "]), INVALID, "task_prompts[0]"),
    ("task prompts without kvcompose", "Compress",
     compress(task_prompts=["q?"], press_json='{"press": "knorm", "compression_ratio": 0.5}'), INVALID, "task"),
    ("no source", "Generate", api.GenerateRequest(question="q?"), INVALID, "cache_id or context"),
    ("empty question", "Generate", generate(ID, question=""), INVALID, "question"),
    ("whitespace question", "Generate", generate(ID, question="   "), INVALID, "question"),
    ("question too long", "Generate", generate(ID, question="q" * (65 << 10)), INVALID, "max_question_bytes"),
    ("cache id not hex", "Generate", generate("nonsense"), INVALID, "64 lowercase hex"),
    ("cache id upper-case", "Generate", generate("A" * 64), INVALID, "64 lowercase hex"),
    ("unknown cache id", "Generate", generate("0" * 64), NOT_FOUND, "no cache"),
    ("max_new_tokens too large", "Generate", generate(ID, max_new_tokens=5000), INVALID, "max_new_tokens"),
    ("temperature NaN", "Generate", generate(ID, temperature=float("nan")), INVALID, "temperature"),
    ("temperature +inf", "Generate", generate(ID, temperature=float("inf")), INVALID, "temperature"),
    ("temperature negative", "Generate", generate(ID, temperature=-1), INVALID, "temperature"),
    ("temperature tiny", "Generate", generate(ID, temperature=1e-30), INVALID, "greedy"),
    ("max_new_tokens beyond the decoder's memory", "Generate", generate(ID, max_new_tokens=4000), INVALID,
     "memory_bytes"),
    ("top_p above 1", "Generate", generate(ID, top_p=1.5), INVALID, "top_p"),
    ("top_p NaN", "Generate", generate(ID, top_p=float("nan")), INVALID, "top_p"),
    ("top_p negative", "Generate", generate(ID, top_p=-0.5), INVALID, "top_p"),
    ("too many stop strings", "Generate", generate(ID, stop=["x"] * 9), INVALID, "max_stop_strings"),
    ("stop string too long", "Generate", generate(ID, stop=["s" * 300]), INVALID, "max_stop_bytes"),
    ("bad context inside Generate", "Generate", api.GenerateRequest(question="q?", context=compress(codec="zip")),
     INVALID, "codec"),
    ("question past the model window", "Generate", generate(ID, question="why " * 3900), INVALID, "positions"),
    ("Stat bad id", "Stat", store_pb.StatRequest(cache_id="xyz"), INVALID, "64 lowercase hex"),
    ("Stat unknown id", "Stat", store_pb.StatRequest(cache_id="f" * 64), NOT_FOUND, "no cache"),
    ("Delete bad id", "Delete", store_pb.DeleteRequest(cache_id="../../etc"), INVALID, "64 lowercase hex"),
    ("bad tenant name", "Stat:tenant", store_pb.StatRequest(cache_id="f" * 64), grpc.StatusCode.PERMISSION_DENIED,
     "x-tenant"),
]


@pytest.mark.parametrize("name, method, request_, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_precisely_and_the_service_stays_up(client, reference, name, method, request_, code,
                                                                  words):
    request_ = _with_reference(request_, reference["cache_id"])
    kw = dict(client.kw)
    if method == "Stat:tenant":
        method, kw["metadata"] = "Stat", kw["metadata"] + (("x-tenant", "bad tenant!"),)
    with pytest.raises(grpc.RpcError) as e:
        reply = getattr(client.stub, method)(request_, **kw)
        if method == "Generate":
            list(reply)
    assert e.value.code() == code, e.value.details()
    assert words in e.value.details() and "Traceback" not in e.value.details()
    normal_request_works(client, reference)


def test_at_least_forty_bad_inputs_are_tried():
    assert len(CASES) >= 40


def test_an_oversized_request_is_refused_fast_and_a_small_one_follows(client, reference):
    """64 MB is refused by the proxy's message limit (max_request_bytes), never tokenized."""
    import time

    assert code_of(lambda: client.compress("y" * (64 << 20))) == EXHAUSTED
    started = time.monotonic()
    normal_request_works(client, reference)
    assert time.monotonic() - started < 30


def _with_reference(request_, cache_id: str):
    copy = type(request_)()
    copy.CopyFrom(request_)
    if getattr(copy, "cache_id", None) == ID:
        copy.cache_id = cache_id
    return copy


def test_list_models_reports_the_limits_in_force(client):
    model = client.list_models().models[0]
    assert model.max_context_tokens == 4096 and json.loads(model.default_press_json)["press"] == "kvcompose"
