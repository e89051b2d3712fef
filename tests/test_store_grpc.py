"""The PrefixStore over real gRPC sockets: round trips, every status code, health and reflection."""

import uuid

import grpc
import pytest
from conftest import random_ids
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from kvcompose.v1 import store_pb2 as pb
from store_helpers import SHARED_REDIS, ServerProcess, make_cache

from service.config import StoreConfig
from service.store.embedded import EmbeddedRedis
from service.store.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)


def config(url: str = SHARED_REDIS, **kw) -> StoreConfig:
    kw.setdefault("service_token", "test-service-token")
    return StoreConfig(redis_url=url, key_prefix=f"kvc-test-{uuid.uuid4().hex[:8]}", chunk_bytes=4096,
                       redis_retries=1, redis_timeout_s=2.0, **kw)


@pytest.fixture(scope="module")
def server():
    with ServerProcess(config(tenant_quota_bytes=10 << 20)) as s:
        yield s


@pytest.mark.parametrize("codec_name", ["float16", "bfloat16", "float32", "int8", "int4", "k4v2+zstd"])
def test_put_fetch_round_trip_is_bit_exact(server, tiny_engine, codec_name):
    ids = random_ids(250, seed=41)
    key, data = make_cache(tiny_engine, ids, codec_name, tenant="default")
    with server.client() as client:
        m, existed = client.put(key, ids, data)
        assert not existed and m.total_bytes == len(data) and m.key.codec == codec_name
        fetched_manifest, fetched = client.fetch(m.cache_id)
        assert fetched == data and fetched_manifest.cache_id == m.cache_id
        assert client.stat(m.cache_id).chunk_count == m.chunk_count
        found, matched = client.lookup(key, ids + [1, 2, 3], longest_prefix=True)
        assert found.cache_id == m.cache_id and matched == 250
        assert client.delete(m.cache_id)
        with pytest.raises(NotFound):
            client.fetch(m.cache_id)


def test_status_codes(server, tiny_engine):
    ids = random_ids(120, seed=43)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    with server.client() as client:
        with pytest.raises(InvalidArgument, match="64 lowercase hex"):
            client.stat("not-an-id")
        with pytest.raises(NotFound):
            client.stat("0" * 64)
        with pytest.raises(InvalidArgument, match="context tokens"):
            client.put(key, ids[:-1], data)
        m, _ = client.put(key, ids, data)
        # flip one stored byte behind the server's back
        redis = server.redis()
        name = next(redis.scan_iter(match=f"{server.config.key_prefix}:{{default/{m.cache_id}}}:chunk:*:0"))
        chunk = bytearray(redis.get(name))
        chunk[-1] ^= 0xFF
        redis.set(name, bytes(chunk))
        with pytest.raises(DataLoss, match="checksum"):
            client.fetch(m.cache_id)
        with pytest.raises(NotFound):
            client.stat(m.cache_id)  # the damaged entry is gone
    with server.client(tenant="bad tenant!") as client:
        with pytest.raises(PermissionDenied, match="x-tenant"):
            client.stat("0" * 64)


def test_another_tenants_id_is_not_found(server, tiny_engine):
    ids = random_ids(100, seed=44)
    key, data = make_cache(tiny_engine, ids, tenant="alpha")
    with server.client(tenant="alpha") as alpha, \
            server.client(tenant="beta") as beta:
        m, _ = alpha.put(key, ids, data)
        with pytest.raises(NotFound):
            beta.fetch(m.cache_id)
        with pytest.raises(NotFound):
            beta.stat(m.cache_id)
        assert not beta.delete(m.cache_id)
        assert alpha.fetch(m.cache_id)[1] == data


def test_quota_is_resource_exhausted(tiny_engine):
    ids = random_ids(100, seed=45)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    with ServerProcess(config(tenant_quota_bytes=len(data) + 1)) as s, s.client() as client:
        client.put(key, ids, data)
        with pytest.raises(QuotaExceeded, match="quota"):
            other_ids = ids[:-1] + [3]
            _, other = make_cache(tiny_engine, other_ids, tenant="default")
            client.put(key, other_ids, other)  # a second entry does not fit
    with ServerProcess(config(max_entry_bytes=100)) as s, s.client() as client:
        with pytest.raises(QuotaExceeded, match="exceeds the store's limit"):
            client.put(key, ids, data)  # refused from the header, before the bytes arrive


def test_every_call_needs_a_service_token(tiny_engine):
    with ServerProcess(config(service_token="svc", auth_tokens={"svc-next": "*"})) as s:
        ids = random_ids(80, seed=46)
        key, data = make_cache(tiny_engine, ids, tenant="acme")
        with s.client(token="svc") as service:  # a service token acts for the tenant it names
            m, _ = service.put(key, ids, data, tenant="acme")
            assert service.fetch(m.cache_id, tenant="acme")[1] == data
            with pytest.raises(NotFound):
                service.fetch(m.cache_id, tenant="other")
        with s.client(token="svc-next", tenant="acme") as rotated:
            assert rotated.stat(m.cache_id).cache_id == m.cache_id
        calls = [lambda c: c.put(key, ids, data, tenant="acme"), lambda c: c.fetch(m.cache_id, tenant="acme"),
                 lambda c: c.stat(m.cache_id, tenant="acme"), lambda c: c.lookup(key, ids, tenant="acme"),
                 lambda c: c.delete(m.cache_id, tenant="acme")]
        for token, message in ((None, "Bearer"), ("wrong", "not valid")):
            with s.client(token=token) as outsider:
                for call in calls:
                    with pytest.raises(Unauthenticated, match=message):
                        call(outsider)
        with s.client(token="svc", tenant="acme") as service:
            assert service.fetch(m.cache_id)[1] == data  # nothing an outsider sent changed the entry


def test_a_store_without_a_token_does_not_start():
    with pytest.raises(RuntimeError, match="exited"):
        with ServerProcess(config(service_token="")):
            pass
    with pytest.raises(ValueError, match="service tokens"):
        config(auth_tokens={"s3cret": "acme"})


def test_redis_down_is_unavailable_then_recovers(tiny_engine):
    ids = random_ids(90, seed=47)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    with EmbeddedRedis() as redis, ServerProcess(config(redis.url)) as s, \
            s.client(retries=0, deadline_s=10) as client:
        m, _ = client.put(key, ids, data)
        redis.stop()
        with pytest.raises(Unavailable, match="Redis is unreachable"):
            client.stat(m.cache_id)
        redis.start()
        m2, existed = client.put(key, ids, data)  # Redis came back empty; the next call succeeds
        assert not existed and client.fetch(m2.cache_id)[1] == data


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.target)
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="kvcompose.v1.PrefixStore"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "kvcompose.v1.PrefixStore" in names and "grpc.health.v1.Health" in names
    channel.close()


def test_without_redis_url_the_server_starts_its_own_redis(tiny_engine):
    ids = random_ids(60, seed=48)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    with ServerProcess(config("")) as s, s.client() as client:
        m, _ = client.put(key, ids, data)
        assert client.fetch(m.cache_id)[1] == data


def test_the_store_exports_prometheus_metrics(tiny_engine):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    from store_helpers import free_port

    ids = random_ids(120, seed=47)
    key, data = make_cache(tiny_engine, ids, tenant="default")
    port = free_port()
    with ServerProcess(config(), metrics_port=port) as s, s.client() as client:
        m, _ = client.put(key, ids, data)
        client.fetch(m.cache_id)
        client.grant(m.cache_id)
        with pytest.raises(NotFound):
            client.stat("0" * 64)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("kvcompose_store_requests_total", (("code", "OK"), ("method", "Put")))] == 1
    assert samples[("kvcompose_store_requests_total", (("code", "NOT_FOUND"), ("method", "Stat")))] == 1
    assert samples[("kvcompose_store_bytes_in_total", ())] == len(data)
    assert samples[("kvcompose_store_bytes_out_total", ())] == len(data)
    assert samples[("kvcompose_store_entries_total", (("outcome", "hit"),))] == 1
    assert samples[("kvcompose_store_entries_total", (("outcome", "put"),))] == 1
    assert samples[("kvcompose_store_entries_total", (("outcome", "grant"),))] == 1
    assert samples[("kvcompose_store_requests_total", (("code", "OK"), ("method", "Grant")))] == 1
    assert samples[("kvcompose_store_request_seconds_count", (("method", "Fetch"),))] == 1
    assert samples[("kvcompose_store_redis_up", ())] == 1


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 21) + 5])
def test_a_hand_framed_chunk_is_the_proto_message(size):
    """Fetch replies and Put chunks are framed by hand (no message copy); both ends parse them as the proto."""
    from service.wire import chunk_frame

    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert chunk_frame(chunk) == pb.FetchResponse(chunk=chunk).SerializeToString()
    assert chunk_frame(memoryview(chunk)) == pb.PutRequest(chunk=chunk).SerializeToString()
    assert pb.FetchResponse.FromString(chunk_frame(chunk)).chunk == chunk
