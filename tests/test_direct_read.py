"""Read grants: the store grants, the decoder reads the chunks from Redis itself as a read-only user,
verifies every byte, and falls back to the store's Fetch (misses, DATA_LOSS) on anything else."""

import random
import time
import uuid

import pytest
import redis
from conftest import random_ids
from store_helpers import ServerProcess, make_cache

from service.cache import codec
from service.cache.format import check, kept_tokens_per_layer
from service.config import StoreConfig
from service.store.acl import READER, reader_rules, reader_url
from service.store.direct import DirectReader, DirectReadFailed
from service.store.embedded import EmbeddedRedis
from service.store.errors import DataLoss, NotFound

PASSWORD = "reader-pw/with:odd@chars"


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis(reader_password=PASSWORD) as r:
        yield r


@pytest.fixture(scope="module")
def server(redis_server):
    config = StoreConfig(redis_url=redis_server.url, service_token="svc", chunk_bytes=4096, redis_retries=1,
                         key_prefix="kvc")  # the reader user may read kvc:* only
    with ServerProcess(config) as s:
        yield s


@pytest.fixture
def direct_client(server, redis_server):
    with server.client(direct=DirectReader(redis_server.reader_url)) as client:
        yield client


def stored(server, engine, tenant: str = "default", seed: int = 1):
    ids = random_ids(300, seed=seed)
    key, data = make_cache(engine, ids, "int8", tenant=tenant)
    with server.client(tenant=tenant) as client:
        manifest, _ = client.put(key, ids, data)
    assert manifest.chunk_count > 2  # several chunks: the pipelined MGETs and the piece-wise decode are used
    return manifest, data


def damage(server, tenant: str, cache_id: str, index: int, how: str) -> None:
    r = server.redis()
    name = next(r.scan_iter(match=f"kvc:{{{tenant}/{cache_id}}}:chunk:*:{index}"))
    if how == "delete":
        r.delete(name)
    else:
        chunk = bytearray(r.get(name))
        chunk[len(chunk) // 2] ^= 0x01
        r.set(name, bytes(chunk), keepttl=True)


def test_a_granted_read_returns_the_stored_bytes_read_directly(server, direct_client, tiny_engine):
    manifest, data = stored(server, tiny_engine, seed=1)
    m, chunks = direct_client.fetch_chunks(manifest.cache_id)
    assert b"".join(chunks) == data and m.cache_id == manifest.cache_id
    assert len(chunks) == manifest.chunk_count  # as stored, not copied into one buffer
    assert direct_client.read_counts() == {"direct": 1, "fetch": 0, "fallback": 0}
    # the chunks decode as the joined bytes do, without the codec hashing them again
    from_chunks, from_bytes = codec.decode(chunks, verified=True), codec.decode(data)
    assert all((a == b).all() for a, b in zip(from_chunks.keys + from_chunks.values,
                                              from_bytes.keys + from_bytes.values))


def test_a_grant_is_for_the_callers_tenant_only(server, direct_client, tiny_engine):
    manifest, _ = stored(server, tiny_engine, tenant="acme", seed=2)
    with pytest.raises(NotFound):
        direct_client.fetch_chunks(manifest.cache_id, tenant="globex")  # the id of another tenant's entry
    _, names = direct_client.grant(manifest.cache_id, tenant="acme")
    assert names and all(k.startswith(f"kvc:{{acme/{manifest.cache_id}}}:chunk:") for k in names)
    assert direct_client.fetch_chunks(manifest.cache_id, tenant="acme")[1]
    assert direct_client.read_counts()["fallback"] == 0


@pytest.mark.parametrize("how,error", [("flip", DataLoss), ("delete", NotFound)])
def test_a_damaged_or_missing_chunk_is_never_returned_and_the_store_decides(server, direct_client, tiny_engine,
                                                                          how, error):
    """The direct read refuses it; the fallback Fetch finds the same damage: DATA_LOSS or a miss,
    and the store deletes the entry."""
    manifest, _ = stored(server, tiny_engine, seed=3 if how == "flip" else 4)
    damage(server, "default", manifest.cache_id, 1, how)
    with pytest.raises(error):
        direct_client.fetch_chunks(manifest.cache_id)
    assert direct_client.read_counts() == {"direct": 0, "fetch": 0, "fallback": 1}
    with pytest.raises(NotFound):
        direct_client.stat(manifest.cache_id)  # the entry is gone for everyone


def test_the_reader_verifies_every_byte_itself(redis_server, server, tiny_engine):
    manifest, data = stored(server, tiny_engine, seed=5)
    reader = DirectReader(redis_server.reader_url, batch=2)
    with server.client() as client:
        _, grant_names = client.grant(manifest.cache_id)
    assert b"".join(reader.read(grant_names, len(data), manifest.xxh3_128, manifest.sha256)) == data
    with pytest.raises(DirectReadFailed, match="checksum"):
        reader.read(grant_names, len(data), bytes(16), manifest.sha256)  # any other digest
    with pytest.raises(DirectReadFailed, match="checksum"):
        reader.read(grant_names[:-1], len(data), manifest.xxh3_128, manifest.sha256)  # a chunk short
    with pytest.raises(DirectReadFailed, match="missing"):
        reader.read([*grant_names, grant_names[0] + "x"], len(data), manifest.xxh3_128, manifest.sha256)
    reader.close()


def test_wrong_reader_credentials_or_no_redis_fall_back_to_fetch(server, redis_server, tiny_engine):
    """The first fetch falls back; then direct reads pause, so later fetches do not pay for it."""
    manifest, data = stored(server, tiny_engine, seed=6)
    wrong = redis_server.reader_url.replace("%40", "%41")
    for url in (wrong, "redis://127.0.0.1:1/0"):
        with server.client(direct=DirectReader(url, timeout_s=1.0)) as client:
            assert client.fetch(manifest.cache_id)[1] == data
            assert client.read_counts() == {"direct": 0, "fetch": 1, "fallback": 1}
            assert client.fetch(manifest.cache_id)[1] == data
            assert client.read_counts() == {"direct": 0, "fetch": 2, "fallback": 1} and not client.direct.usable()


def test_a_cluster_without_the_reader_user_falls_back_and_never_fails_a_decoder(tiny_engine, redis_cluster):
    """A cluster client connects when it is made: a wrong user must not break the client's
    construction (a Decoder that cannot start) nor escape as an error."""
    ids = random_ids(300, seed=9)
    key, data = make_cache(tiny_engine, ids, "int8", tenant="default")
    config = StoreConfig(redis_url=redis_cluster.url, redis_cluster=True, service_token="svc", chunk_bytes=4096,
                         key_prefix=f"kvc-direct-{uuid.uuid4().hex[:6]}")
    wrong = redis_cluster.url.replace("redis://", "redis://nobody:wrong@")
    with ServerProcess(config) as server, server.client(direct=DirectReader(wrong, cluster=True)) as client:
        m, _ = client.put(key, ids, data)
        assert client.fetch(m.cache_id)[1] == data
        assert client.read_counts() == {"direct": 0, "fetch": 1, "fallback": 1}


def test_the_reader_user_can_only_read_the_stores_keys(redis_server):
    admin, reader = redis.Redis.from_url(redis_server.url), redis.Redis.from_url(redis_server.reader_url)
    name = f"kvc:{{t/{uuid.uuid4().hex}}}:chunk:w:0"
    admin.set(name, b"bytes", ex=60)
    admin.set("other:key", b"secret", ex=60)
    assert reader.get(name) == b"bytes" and reader.mget([name]) == [b"bytes"]
    refused = [lambda: reader.get("other:key"), lambda: reader.set(name, b"x"), lambda: reader.delete(name),
               lambda: reader.expire(name, 1), lambda: reader.keys("*"), lambda: reader.scan(0),
               lambda: reader.flushall(), lambda: reader.execute_command("ACL", "LIST"),
               lambda: reader.config_get("*"), lambda: reader.eval("return 1", 0)]
    for call in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    assert admin.get(name) == b"bytes"
    assert READER in redis_server.reader_url


def test_the_reader_user_survives_a_supervised_restart():
    with EmbeddedRedis(reader_password="pw", supervise=True, check_s=0.1) as r:
        r.process.kill()
        reader = redis.Redis.from_url(r.reader_url, retry_on_error=[redis.exceptions.ConnectionError])
        deadline = time.monotonic() + 10
        while r.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.ping()


def test_a_cluster_entry_is_read_from_the_node_holding_its_slot(tiny_engine, redis_cluster):
    """As the reader user, created on every node with the same rules: it discovers the cluster and
    reads the entry's slot from its master."""
    ids = random_ids(400, seed=7)
    key, data = make_cache(tiny_engine, ids, "int8", tenant="default")
    prefix = f"kvc-direct-{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    for port in redis_cluster.ports:
        redis_cluster.node(port).acl_setuser(READER, reset=True)  # fresh for this test's prefix
        redis_cluster.node(port).execute_command("ACL", "SETUSER", READER, *reader_rules(password, prefix))
    url = reader_url(redis_cluster.url, password)
    config = StoreConfig(redis_url=redis_cluster.url, redis_cluster=True, service_token="svc", chunk_bytes=4096,
                         key_prefix=prefix)
    with ServerProcess(config) as server, server.client(direct=DirectReader(url, cluster=True)) as client:
        m, _ = client.put(key, ids, data)
        assert client.fetch(m.cache_id)[1] == data
        assert client.read_counts() == {"direct": 1, "fetch": 0, "fallback": 0}


@pytest.mark.parametrize("press", [None, {"press": "kvcompose", "compression_ratio": 0.6, "structured": False}])
def test_decode_reads_any_split_of_the_bytes(tiny_engine, press):
    """Dense, and head-wise (eviction masks, read by the store for kept tokens too)."""
    _, data = make_cache(tiny_engine, random_ids(200, seed=8), "int8", press=press)
    whole, header = codec.decode(data), check(data)
    rng = random.Random(0)
    for _ in range(5):  # cuts anywhere: inside the prefix, the header, a tensor, the digest; empty pieces
        cuts = sorted(rng.sample(range(1, len(data)), 12) + [0, 0, 5, len(data)])
        pieces = [data[a:b] for a, b in zip(cuts, cuts[1:])]
        kv = codec.decode(pieces)
        assert all((a == b).all() for a, b in zip(kv.keys + kv.values, whole.keys + whole.values))
        assert all((a is None and b is None) or (a == b).all() for a, b in zip(kv.evicted, whole.evicted))
        assert kept_tokens_per_layer(pieces, header) == kept_tokens_per_layer(data, header)
    assert (press is not None) == any(e is not None for e in whole.evicted)
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1
    with pytest.raises(codec.CorruptCacheError, match="checksum"):
        codec.decode([bytes(damaged[:1000]), bytes(damaged[1000:])])
