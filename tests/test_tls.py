"""TLS with real handshakes: the prefix store and the standalone decode worker serve TLS from
configuration, their clients verify them, a wrong CA and plaintext are refused, and mutual TLS
requires a client certificate."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import grpc
import pytest
import yaml
from conftest import models_once_up, random_ids
from store_helpers import SHARED_REDIS, ServerProcess, make_cache

from service.client import KVComposeClient
from service.config import StoreConfig
from service.local.processes import free_port
from service.local_ca import LocalCA
from service.serve.launch import CONFIG
from service.store.client import PrefixStoreClient
from service.store.errors import NotFound, Unavailable
from service.tls import TLSFiles

TOKEN = "svc-tls-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Our CA's server and client certificates, and a stranger CA's."""
    root = tmp_path_factory.mktemp("pki")
    ours, stranger = LocalCA.create(), LocalCA.create("Some other CA")
    return {"server": ours.issue(root / "server"), "client": ours.issue(root / "client"),
            "stranger": stranger.issue(root / "stranger")}


def only_ca(files: TLSFiles) -> TLSFiles:
    return TLSFiles(ca_file=files.ca_file)


def store_server(pki, client_auth: bool) -> ServerProcess:
    s = pki["server"]
    return ServerProcess(StoreConfig(redis_url=SHARED_REDIS, service_token=TOKEN,
                                     key_prefix=f"kvc-tls-{uuid.uuid4().hex[:8]}", tls_cert_file=s.cert_file,
                                     tls_key_file=s.key_file, tls_ca_file=s.ca_file, tls_client_auth=client_auth))


def refused(target: str, tls: TLSFiles | None) -> bool:
    """The handshake (or plaintext) call fails; nothing reaches the store."""
    with PrefixStoreClient(target, token=TOKEN, retries=0, deadline_s=5, tls=tls) as client:
        try:
            client.stat("0" * 64, tenant="acme")
        except Unavailable:
            return True
        except Exception:  # noqa: BLE001 - any answer means the call got through
            return False
    return False


def test_the_store_serves_tls_and_refuses_plaintext_and_strangers(pki, tiny_engine):
    ids = random_ids(120, seed=61)
    key, data = make_cache(tiny_engine, ids)
    with store_server(pki, client_auth=False) as server:
        with PrefixStoreClient(server.target, token=TOKEN, tls=only_ca(pki["server"])) as client:
            manifest, _ = client.put(key, ids, data, tenant="acme")
            assert client.fetch(manifest.cache_id, tenant="acme")[1] == data
        assert refused(server.target, None)  # plaintext
        assert refused(server.target, only_ca(pki["stranger"]))  # a server our CA did not sign, to this client


def test_mutual_tls_requires_a_client_certificate_from_our_ca(pki):
    with store_server(pki, client_auth=True) as server:
        assert refused(server.target, only_ca(pki["server"]))  # no client certificate
        assert refused(server.target, pki["stranger"])  # a certificate from another CA
        with PrefixStoreClient(server.target, token=TOKEN, tls=pki["client"]) as client:
            with pytest.raises(NotFound):  # the handshake holds: the store answers (a miss)
                client.stat("0" * 64, tenant="acme")


def test_tls_settings_are_checked_before_anything_starts(pki, tmp_path):
    with pytest.raises(ValueError, match="both a certificate and its key"):
        TLSFiles(cert_file=pki["server"].cert_file)
    with pytest.raises(ValueError, match="does not exist"):
        TLSFiles(ca_file=str(tmp_path / "missing.crt"))
    with pytest.raises(ValueError, match="needs tls_ca_file"):
        _ = StoreConfig(tls_cert_file=pki["server"].cert_file, tls_key_file=pki["server"].key_file,
                    tls_client_auth=True).tls
    assert StoreConfig().tls is None


def test_the_decode_worker_serves_mutual_tls(pki, tiny_model_dir, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    config["applications"][0]["args"]["engine"]["model"] = str(tiny_model_dir)
    config["applications"][0]["args"]["auth_tokens"] = {"tok-alpha": "alpha"}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    port, s = free_port(), pki["server"]
    worker = subprocess.Popen([sys.executable, "-m", "workers.decode", "--store", "127.0.0.1:1", "--address",
                               f"127.0.0.1:{port}", "--config", str(path), "--tls-cert-file", s.cert_file,
                               "--tls-key-file", s.key_file, "--tls-ca-file", s.ca_file, "--tls-client-auth"],
                              env={**os.environ})
    target = f"127.0.0.1:{port}"
    try:
        with KVComposeClient(target, token="tok-alpha", tls=pki["client"], timeout_s=10) as ok:
            assert models_once_up(ok).models[0].id == str(tiny_model_dir)
        for tls in (None, only_ca(s), pki["stranger"]):  # plaintext, no client certificate, a stranger
            with KVComposeClient(target, token="tok-alpha", tls=tls, timeout_s=5, retries=False) as outsider:
                with pytest.raises(grpc.RpcError) as e:
                    outsider.list_models()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        worker.terminate()
        worker.wait(10)


def test_a_tls_store_answers_plaintext_health_probes_on_their_own_port(pki):
    """The kubelet's gRPC probe speaks no TLS: ``--health-address`` serves gRPC health alone."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.store.server import start_server

    s = pki["server"]
    config = StoreConfig(redis_url=SHARED_REDIS, service_token=TOKEN, tls_cert_file=s.cert_file,
                         tls_key_file=s.key_file)
    health_port = free_port()

    async def go():
        server = await start_server(config, "127.0.0.1:0", health_address=f"127.0.0.1:{health_port}")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
                stub = health_pb2_grpc.HealthStub(probe)
                for _ in range(50):  # SERVING once the store has seen Redis
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.1)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plain:  # the store itself: TLS only
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop()

    asyncio.run(go())
