"""Delete and expiry take effect on every replica, even for caches a Decoder holds in memory."""

from __future__ import annotations

import time

import grpc
import pytest

from .conftest import MAX_NEW, QUESTION, normal_request_works


def _ask(client, cache_id):
    return client.ask(QUESTION, cache_id=cache_id, max_new_tokens=MAX_NEW)


def test_a_deleted_cache_is_not_answered_from_decoder_memory(client, reference):
    cache_id = client.compress("A short note about the harbour master, who keeps a ledger of ships.").cache_id
    _ask(client, cache_id)
    assert _ask(client, cache_id)[1].cache_source == "memory"  # the Decoder holds it decoded
    assert client.delete(cache_id)
    time.sleep(0.3)  # the documented staleness bound (revalidate_s = 0.25 s)
    with pytest.raises(grpc.RpcError) as e:
        _ask(client, cache_id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        client.stat(cache_id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    again = client.compress("A short note about the harbour master, who keeps a ledger of ships.")
    assert not again.reused and again.cache_id == cache_id  # compressed anew, same identity
    normal_request_works(client, reference)


def test_an_expired_cache_is_not_answered_from_decoder_memory(client, reference):
    cache_id = client.compress("The night ferry leaves at nine and returns before dawn.", ttl_s=2).cache_id
    _ask(client, cache_id)
    assert _ask(client, cache_id)[1].cache_source == "memory"
    time.sleep(3.0)  # no hit for longer than the TTL
    with pytest.raises(grpc.RpcError) as e:
        _ask(client, cache_id)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    normal_request_works(client, reference)


def test_answering_from_memory_keeps_the_entry_alive(client):
    cache_id = client.compress("Gulls circle the pier every morning at low tide.", ttl_s=2).cache_id
    for _ in range(6):  # 3 s of hits from memory: each revalidation refreshes the TTL
        _ask(client, cache_id)
        time.sleep(0.5)
    assert client.stat(cache_id).manifest.cache_id == cache_id


def test_a_decoder_reads_a_fetched_cache_directly_as_the_read_only_user(client, reference):
    """``make serve``'s embedded Redis has the read grants' user and the Decoders its URL: a cache a
    Decoder does not hold is read from Redis directly after a grant, not streamed by the store."""
    from ray import serve

    def paths() -> dict:
        return serve.get_app_handle("kvcompose").counters.remote().result()["decoder"]["fetch_paths"]

    before = paths()
    cache_id = client.compress("A lighthouse keeper counts the ships that pass the northern cape.").cache_id
    text, stats = _ask(client, cache_id)
    assert stats.cache_source == "store" and text
    after = paths()
    assert after["direct"] == before["direct"] + 1
    assert (after["fetch"], after["fallback"]) == (before["fetch"], before["fallback"])
