"""8k contexts with the real embedded model (SmolLM2's window is 8,192 positions): a 7,699-token
document is prefilled and compressed with the default KVCompose, stored in Redis, fetched
verified, and its needle is still answered; what does not fit the window is refused with a message. Time and
memory at 8k are measured by ``kvcompose bench perf`` (docs/performance.md), not here."""

from __future__ import annotations

import pytest
from store_helpers import fetched_bytes, make_cache, with_store

from service.bench.haystack import needle_document
from service.cache import codec

pytestmark = pytest.mark.model


def test_an_8k_document_is_compressed_stored_fetched_and_answered(smollm2):
    doc, question, needle = needle_document(smollm2.loaded.tokenizer, 8000)
    ids = smollm2.context_ids(doc)
    assert 7_600 <= len(ids) <= 8_000
    key, data = make_cache(smollm2, ids, press={"press": "kvcompose", "compression_ratio": 0.5})
    kv = codec.decode(data)
    assert abs(sum(kv.layer_lengths) / (kv.num_layers * len(ids)) - 0.5) < 0.01

    async def round_trip(store):
        manifest, _ = await store.put(key, ids, data)
        return await fetched_bytes(store, manifest.cache_id, tenant=key.tenant)

    fetched = with_store(round_trip)
    assert fetched == data
    answer = smollm2.answer(codec.decode(fetched), question)
    assert needle in answer  # lost when scoring placed queries past the window (to position 15.4k)
    assert answer == smollm2.answer(kv, question)  # the stored cache answers as the one in memory
    room = smollm2.window - len(ids)
    with pytest.raises(ValueError, match="model's 8192"):
        smollm2.answer(kv, "Why? " * room)  # the question would run past the window
