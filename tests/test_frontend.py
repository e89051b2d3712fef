"""The Frontend's Generate by text when the store loses the entry between Compress and the fetch:
compressed again once; gone twice (a store evicting under memory pressure) is ABORTED, a status the
client retries, never NOT_FOUND for a document the client sent."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from kvcompose.v1 import api_pb2 as api

from service.protocol import AnswerStats, CompressResult
from service.serve.frontend import Frontend
from service.serve.messages import ApiError
from service.store.auth import Auth
from service.store.errors import NotFound


class Context:
    def invocation_metadata(self):
        return (("x-tenant", "acme"),)

def generate(losses: int) -> tuple[list, int]:
    """Generate by text against a store that loses the entry ``losses`` times; (messages, compresses)."""
    compresses = []

    async def compress(tenant, context):
        compresses.append(tenant)
        return CompressResult("a" * 64, 10, [5], [5.0], 100, 200, len(compresses) > 1, 0.1, "m",
                              {"press": "kvcompose"}, "float16")

    async def answer(tenant, cache_id, question, sampling):
        if len(compresses) <= losses:
            raise NotFound(f"no cache {cache_id}")
        yield "forty-two"
        yield AnswerStats(cache_id, "store", 0.0, 1, 0.0, 100)

    async def run():
        frontend = Frontend(Auth({}), allow_unauthenticated=True)
        request = api.GenerateRequest(question="q?", max_new_tokens=4)
        request.context.text = "a document"
        return [m async for m in frontend.generate(request, Context(), answer, compress)]

    return asyncio.run(run()), len(compresses)

def test_an_entry_lost_once_is_compressed_again():
    messages, compresses = generate(losses=1)
    assert messages[0].text == "forty-two" and compresses == 2

def test_an_entry_lost_twice_is_aborted_for_a_retry_not_not_found():
    with pytest.raises(ApiError) as e:
        generate(losses=2)
    assert e.value.status == grpc.StatusCode.ABORTED and "retry" in str(e.value)
