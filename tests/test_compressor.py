"""The Compressor replica's concurrency: one prefill at a time, and a document already stored is
answered while a prefill runs, never behind it."""

from __future__ import annotations

import asyncio

from conftest import random_ids
from store_helpers import with_store

from service.compressor import CacheCompressor

PRESS = {"press": "knorm", "compression_ratio": 0.5}


def test_a_stored_document_does_not_wait_behind_a_prefill(tiny_engine):
    stored, new = random_ids(200, seed=81), random_ids(220, seed=82)

    async def go(store):
        compressor = CacheCompressor(tiny_engine, store)
        first = await compressor.compress("default", stored, PRESS)
        async with compressor._model_lock:  # a prefill is running on this replica
            again = await asyncio.wait_for(compressor.compress("default", stored, PRESS), timeout=10)
            assert again.reused and again.cache_id == first.cache_id
            waiting = asyncio.create_task(compressor.compress("default", new, PRESS))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # a new document needs the model: it waits its turn
        assert not (await waiting).reused
        assert compressor.prefills == 2

    with_store(go)
