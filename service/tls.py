"""TLS for the gRPC hops we own (the prefix store, the standalone decode worker, the local API front
door) and their clients: one set of PEM files per process, laid out as cert-manager writes a
Certificate's Secret (``tls.crt``, ``tls.key``, ``ca.crt``), so a pod mounts its Secret and names
three files.

A server with TLS listens on a TLS port only: a plaintext client fails its handshake. With a
``ca_file`` and ``client_auth`` it also requires a client certificate signed by that CA (mutual
TLS). A client verifies the server against ``ca_file`` and presents its own certificate when it
has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSFiles:
    """cert_file / key_file: this process's certificate chain and key (a server's always; a
    client's for mutual TLS). ca_file: the CA that signs the other side. client_auth: a server
    requires client certificates signed by ``ca_file``. server_name: the name a client expects in
    the server's certificate when it differs from the host it dials (e.g. dialling an IP)."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_auth: bool = False
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("TLS needs both a certificate and its key (tls_cert_file and tls_key_file)")
        if self.client_auth and not (self.ca_file and self.cert_file):
            raise ValueError("mutual TLS (tls_client_auth) needs tls_ca_file (the clients' CA) and this "
                             "server's own tls_cert_file and tls_key_file")
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"TLS {name} {path!r} does not exist or is not a file")

    @property
    def serves(self) -> bool:
        """A server with these files serves TLS."""
        return bool(self.cert_file)

    @property
    def dials(self) -> bool:
        """A client with these files dials TLS (it has a CA to verify the server with)."""
        return bool(self.ca_file)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(_read(self.key_file), _read(self.cert_file))],
                                           root_certificates=_read(self.ca_file) if self.client_auth else None,
                                           require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        own = (_read(self.key_file), _read(self.cert_file)) if self.cert_file else (None, None)
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca_file), private_key=own[0],
                                            certificate_chain=own[1])

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def add_port(server: grpc.Server | grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    """Listen on ``address``: TLS when ``tls`` serves, else plaintext. Returns the port."""
    if tls is not None and tls.serves:
        return server.add_secure_port(address, tls.server_credentials())
    return server.add_insecure_port(address)


def channel(target: str, tls: TLSFiles | None, options: list | None = None, aio: bool = False):
    """A channel to ``target``: verified TLS when ``tls`` dials, else plaintext."""
    options = list(options or [])
    module = grpc.aio if aio else grpc
    if tls is not None and tls.dials:
        return module.secure_channel(target, tls.channel_credentials(), options=options + tls.channel_options())
    return module.insecure_channel(target, options=options)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()
