"""The Compressor replica's concurrency: one prefill at a time, and a document already stored is
answered while a prefill runs, never behind it."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import random_ids
from store_helpers import with_store

from service.serve.compressor import CacheCompressor
from service.serve.metrics import TallyExport
from service.store.manifest import Manifest

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


class Recorded:
    """Stands in for a ``ray.util.metrics.Counter`` (which cannot be read back): its increments."""

    def __init__(self):
        self.increments = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.increments.append((value, tags))


def test_the_compressors_own_writes_count_as_stored_entries(tiny_engine):
    """The Compressor writes caches to Redis itself, never through the store server's Put, so it
    counts its entries too, and its deployment exports them (``ray_kvcompose_store_entries_total``)."""
    counter = Recorded()
    export = TallyExport(counter, "outcome")

    async def go(store):
        compressor = CacheCompressor(tiny_engine, store)
        for ids in (random_ids(90, seed=85), random_ids(90, seed=85), random_ids(95, seed=86)):
            await compressor.compress("default", ids, PRESS)
            export.export(compressor.store.outcomes)  # as ``app.Compressor.compress`` does after each
        return compressor.store.outcomes["put"]

    assert with_store(go) == 2  # the second is reused: nothing written
    assert counter.increments == [(1, {"outcome": "put"}), (1, {"outcome": "put"})]


def test_kept_tokens_mean_the_same_in_the_engine_the_api_and_the_store(tiny_engine):
    """A head-wise press stores padded slots; every layer reports tokens net of evictions, also on a hit."""
    headwise = {"press": "kvcompose", "compression_ratio": 0.6, "structured": False}
    ids = random_ids(240, seed=83)
    _, stats = tiny_engine.compress(ids, headwise)

    async def go(store):
        compressor = CacheCompressor(tiny_engine, store)
        made = await compressor.compress("default", ids, headwise)
        again = await compressor.compress("default", ids, headwise)
        manifest = await store.stat(made.cache_id, tenant="default")
        return made, again, manifest

    made, again, manifest = with_store(go)
    assert again.reused
    for result in (made, again):
        assert result.kept_tokens_per_layer == pytest.approx(stats.kept_tokens_per_layer)
        assert result.kept_fraction == pytest.approx(stats.kept_fraction)
    assert sum(made.layer_slots) > sum(made.kept_tokens_per_layer)  # padding to the busiest head is not "kept"
    assert json.loads(manifest.to_json())["kept_tokens_per_layer"]


def test_manifests_of_dense_presses_keep_their_old_form_and_newer_fields_are_skipped(tiny_engine):
    async def go(store):
        made = await CacheCompressor(tiny_engine, store).compress("default", random_ids(200, seed=84), PRESS)
        return await store.stat(made.cache_id, tenant="default")

    manifest = with_store(go)
    data = json.loads(manifest.to_json())
    assert "kept_tokens_per_layer" not in data  # what stores before this field wrote and read
    assert manifest.kept_tokens() == [float(n) for n in manifest.layer_slots]
    newer = json.dumps({**data, "a_later_field": 1}).encode()
    assert Manifest.from_json(newer) == manifest


def test_a_request_makes_its_press_spec_canonical_once(tiny_engine, monkeypatch):
    """The compressor, the engine and ``build`` all take the spec; only the first one works it out."""
    from service.engine.presses import registry

    made = []
    real = registry._canonical

    def counted(spec, where):
        if not where:  # the top of a spec, not its nested parts
            made.append(spec)
        return real(spec, where)

    monkeypatch.setattr(registry, "_canonical", counted)

    async def go(store):
        return await CacheCompressor(tiny_engine, store).compress("default", random_ids(64, seed=84),
                                                                  {"press": "KVCompose", "compression_ratio": 0.5})

    result = with_store(go)
    assert len(made) == 1
    assert result.press["press"] == "kvcompose" and "agg_head" in result.press  # the canonical form was used
