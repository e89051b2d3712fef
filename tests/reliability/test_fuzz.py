"""Hypothesis fuzzing of CompressRequest and GenerateRequest through the real API: whatever a client
sends, the answer is OK or a client-error status, never INTERNAL or UNKNOWN, and the service stays up."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvcompose.v1 import api_pb2 as api

from .conftest import DOCUMENT, normal_request_works

SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TEXT = st.text(max_size=40)
PRESS = st.one_of(TEXT, st.sampled_from(['{"press": "knorm", "compression_ratio": 0.5}', '{"press": "kvcompose"}',
                                         '{"compose": []}', '{"press": "snapkv", "window_size": -3}', "null",
                                         '{"press": "kvcompose", "compression_ratio": 1e309}']))


def compress_requests():
    return st.builds(
        lambda text, ids, use_ids, model, press, codec, prompts, ttl: api.CompressRequest(
            **({"token_ids": api.TokenIds(ids=ids)} if use_ids else {"text": DOCUMENT[:200] + text}),
            model=model, press_json=press, codec=codec, task_prompts=prompts, ttl_s=ttl),
        TEXT, st.lists(st.integers(0, 2**32 - 1), max_size=20), st.booleans(),
        st.sampled_from(["", "nope"]), PRESS, st.sampled_from(["", "int8", "float32", "x"]),
        st.lists(TEXT, max_size=3), st.integers(-(2**63), 2**63 - 1))


@FUZZ
@given(request_=compress_requests())
def test_fuzzed_compress(client, reference, request_):
    _check(lambda: client.stub.Compress(request_, **client.kw))


@FUZZ
@given(question=TEXT, cache_id=st.one_of(st.just("REF"), TEXT), max_new=st.integers(0, 2**32 - 1),
       temperature=st.floats(width=32), top_p=st.floats(width=32), seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
       stop=st.lists(TEXT, max_size=10))
def test_fuzzed_generate(client, reference, question, cache_id, max_new, temperature, top_p, seed, stop):
    req = api.GenerateRequest(question=question, cache_id=reference["cache_id"] if cache_id == "REF" else cache_id,
                              max_new_tokens=min(max_new, 8) if max_new < 4096 else max_new,
                              temperature=temperature, top_p=top_p, stop=stop)
    if seed is not None:
        req.seed = seed
    _check(lambda: list(client.stub.Generate(req, **client.kw)))


def _check(call) -> None:
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() not in SERVER_FAULTS, (e.code(), e.details())


def test_the_service_answers_after_fuzzing(client, reference):
    normal_request_works(client, reference)
