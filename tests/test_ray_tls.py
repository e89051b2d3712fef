"""The per-pod Ray certificates of k8s/components/ray-tls: ``python -m service.ray_tls`` signs a pod's
certificate from the Ray CA's cert-manager Secret, and Ray's own gRPC TLS (RAY_USE_TLS: the server
and channel helpers Ray's Python side uses) accepts it by pod IP and by the head Service's name, and
refuses a certificate that does not name the address dialled or comes from another CA."""

from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ray._common.tls_utils import add_port_to_grpc_server
from ray._private.grpc_utils import init_grpc_channel

from service.local_ca import LocalCA
from service.ray_tls import main

HEAD_SERVICE = "kvcompose-raycluster-x7k2p-head-svc.kvcompose.svc.cluster.local"
SERVICE_NAMES = ["127.0.0.1", "localhost", "*.kvcompose.svc.cluster.local"]


def ca_secret(directory: Path, ca: LocalCA | None = None) -> Path:
    """``ca`` written as cert-manager writes a CA Certificate's Secret."""
    ca = ca or LocalCA.create("kvcompose-ray-ca")
    directory.mkdir(parents=True)
    pem = ca.cert.public_bytes(serialization.Encoding.PEM)
    (directory / "tls.crt").write_bytes(pem)
    (directory / "ca.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(ca.key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
    return directory


def pod_cert(tmp_path: Path, ca_dir: Path, pod: str, names: list[str]) -> Path:
    out = tmp_path / pod / "tls"
    assert main(["--ca-dir", str(ca_dir), "--out", str(out), *names]) == 0
    return out


def test_a_pod_certificate_chains_to_the_ray_ca_and_names_the_pod(tmp_path):
    ca = LocalCA.create("kvcompose-ray-ca", days=100)
    out = pod_cert(tmp_path, ca_secret(tmp_path / "ca", ca), "pod", ["10.1.2.3", *SERVICE_NAMES])
    cert = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    cert.verify_directly_issued_by(ca.cert)
    assert x509.load_pem_x509_certificate((out / "ca.crt").read_bytes()) == ca.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.1.2.3"),
                                                            ipaddress.ip_address("127.0.0.1")}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "*.kvcompose.svc.cluster.local"}
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)  # mutual TLS
    key = serialization.load_pem_private_key((out / "tls.key").read_bytes(), password=None)
    assert key.public_key() == cert.public_key() and (out / "tls.key").stat().st_mode & 0o077 == 0
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc  # 365 days asked, the CA has 100


def ray_env(monkeypatch, files: Path) -> None:
    """What the ray-tls component sets on every Ray container."""
    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(files / "tls.crt"))
    monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(files / "tls.key"))
    monkeypatch.setenv("RAY_TLS_CA_CERT", str(files / "ca.crt"))


def ray_call(monkeypatch, server_files: Path, client_files: Path, server_name: str | None = None) -> bool:
    """One call between two Ray pods over Ray's TLS, the server's files under the server's env and
    the client's under the client's; whether it got through."""
    ray_env(monkeypatch, server_files)
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = add_port_to_grpc_server(server, "127.0.0.1:0")
    server.start()
    try:
        ray_env(monkeypatch, client_files)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else None
        with init_grpc_channel(f"127.0.0.1:{port}", options=options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # a failed handshake, nothing else
        return False
    finally:
        server.stop(None)


def test_ray_tls_accepts_pod_certificates_by_ip_and_by_the_head_service_name(tmp_path, monkeypatch):
    ca_dir = ca_secret(tmp_path / "ca")
    head = pod_cert(tmp_path, ca_dir, "head", SERVICE_NAMES)
    worker = pod_cert(tmp_path, ca_dir, "worker", ["10.1.2.4", *SERVICE_NAMES])
    assert ray_call(monkeypatch, head, worker)                # by IP (the head dials workers so)
    assert ray_call(monkeypatch, head, worker, HEAD_SERVICE)  # by the head Service (workers dial the GCS so)


def test_ray_tls_refuses_a_certificate_without_the_dialled_ip_or_from_another_ca(tmp_path, monkeypatch):
    ca_dir = ca_secret(tmp_path / "ca")
    head = pod_cert(tmp_path, ca_dir, "head", SERVICE_NAMES)
    elsewhere = pod_cert(tmp_path, ca_dir, "elsewhere", ["10.9.9.9"])  # another pod's IP only
    stranger = pod_cert(tmp_path, ca_secret(tmp_path / "stranger-ca"), "stranger", SERVICE_NAMES)
    assert ray_call(monkeypatch, head, head)  # the control: the same call goes through
    assert not ray_call(monkeypatch, elsewhere, head)
    assert not ray_call(monkeypatch, head, elsewhere, "kvcompose-raycluster-x.other.svc.cluster.local")
    assert not ray_call(monkeypatch, stranger, head)  # the client does not trust another CA's server
    assert not ray_call(monkeypatch, head, stranger)  # nor the server another CA's client


@pytest.mark.parametrize("name", ["$(POD_IP)", "", "10.0.0.300", "a b", "*"])
def test_a_name_that_is_neither_an_ip_nor_a_dns_name_is_refused(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exit_:
        main(["--ca-dir", str(ca_secret(tmp_path / "ca")), "--out", str(tmp_path / "out"), name])
    assert exit_.value.code == 2 and "not an IP address or DNS name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_secret_that_is_not_a_usable_ca_is_refused(tmp_path, capsys):
    leaf = pod_cert(tmp_path, ca_secret(tmp_path / "ca"), "leaf", ["127.0.0.1"])  # a leaf as "CA"
    mismatched = ca_secret(tmp_path / "mismatched")
    (mismatched / "tls.key").write_bytes((leaf / "tls.key").read_bytes())
    for ca_dir, says in [(leaf, "is not a CA certificate"), (mismatched, "is not the ECDSA key of"),
                         (tmp_path / "missing", "No such file")]:
        assert main(["--ca-dir", str(ca_dir), "--out", str(tmp_path / "out"), "127.0.0.1"]) == 1
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
