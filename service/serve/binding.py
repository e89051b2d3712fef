"""Where the local stack listens: every port on loopback but the API's door.

Ray 2.60 has no bind-address setting for most of its listeners:

- Ray's own servers (GCS, raylet, object manager, workers, agents, its metrics) bind the node's
  IP, or every interface, unless the node is "local Ray" (loopback only). ``ray.init`` turns a
  ``_node_ip_address`` of 127.0.0.1 into the machine's IP; Ray's single-machine mode
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and Windows) keeps 127.0.0.1, and
  then every one of them binds loopback.
- Serve's gRPC proxy and each replica's inter-deployment gRPC server bind ``[::]`` (hard-coded,
  no option). A worker setup hook (``bind_serve_grpc``) rebinds them to ``KVCOMPOSE_SERVE_GRPC_HOST``.

Neither is a promise Ray makes, so ``check_one_door`` reads what the stack's processes really bind
and TLS mode refuses to start when anything but the door is reachable from other hosts.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

GRPC_HOST_ENV = "KVCOMPOSE_SERVE_GRPC_HOST"
SETUP_HOOK = "service.serve.binding.bind_serve_grpc"
_LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_WILDCARDS = ("[::]", "::", "0.0.0.0", "")


def bind_serve_grpc() -> None:
    """Ray worker setup hook: Serve's gRPC proxy and replica servers bind ``KVCOMPOSE_SERVE_GRPC_HOST``
    instead of every interface (no-op when it is unset)."""
    host = os.environ.get(GRPC_HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl, replica

    def rebound(add):
        def add_port(server, address: str) -> int:
            bind, _, port = address.rpartition(":")
            return add(server, f"{bracketed(host)}:{port}" if bind in _WILDCARDS else address)
        return add_port

    default_impl.add_grpc_address = rebound(default_impl.add_grpc_address)  # the proxy (looked up per call)
    replica.add_port_to_grpc_server = rebound(replica.add_port_to_grpc_server)  # inter-deployment server


@contextmanager
def local_ray(grpc_host: str) -> Iterator[dict]:
    """Around ``ray.init``: Ray's node on loopback and Serve's gRPC servers on ``grpc_host``.
    Yields the ``runtime_env`` entries to start Ray with (the setup hook)."""
    import ray._private.ray_constants as ray_constants

    saved = {k: os.environ.get(k) for k in (_LOCAL_RAY_ENV, GRPC_HOST_ENV)}
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_RAY_ENV], os.environ[GRPC_HOST_ENV] = "0", grpc_host  # for Ray's processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read the variable when it imported Ray
    try:
        yield {"worker_process_setup_hook": SETUP_HOOK}
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    pid: int
    process: str

    @property
    def loopback(self) -> bool:
        host = self.host.removeprefix("::ffff:")  # an IPv4 address on a dual-stack socket
        return ipaddress.ip_address(host).is_loopback


def listeners(root: int | None = None) -> list[Listener]:
    """Every TCP socket listening in process ``root`` (default: this one) and its descendants."""
    top = psutil.Process(root)
    found = []
    for process in [top, *top.children(recursive=True)]:
        try:
            name = process.name()
            sockets = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [Listener(s.laddr.ip, s.laddr.port, process.pid, name)
                  for s in sockets if s.status == psutil.CONN_LISTEN]
    return found


class ExposedPorts(RuntimeError):
    """TLS mode would serve something other than its door to other hosts."""


def check_one_door(door: tuple[str, int], root: int | None = None) -> list[Listener]:
    """Raise ``ExposedPorts`` naming every listener of the stack that other hosts can reach, except
    the door (host, port). Returns all listeners."""
    found = listeners(root)
    exposed = [x for x in found if not x.loopback and (x.port != door[1] or not _same_host(x.host, door[0]))]
    if exposed:
        names = ", ".join(f"{x.host}:{x.port} ({x.process}, pid {x.pid})" for x in exposed)
        raise ExposedPorts(
            f"TLS mode refused to start: {names} would be reachable from other hosts beside the TLS "
            f"door on {door[0]}:{door[1]}. This Ray cannot bind them to 127.0.0.1 (see "
            "service/serve/binding.py); run without --tls, or on a host whose other interfaces are firewalled")
    return found


def _same_host(bound: str, configured: str) -> bool:
    return bound.removeprefix("::ffff:") == configured.strip("[]") or configured in _WILDCARDS


def bracketed(host: str) -> str:
    """``host`` as it goes before ``:port`` (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def dialed(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host``."""
    return "127.0.0.1" if host in _WILDCARDS else bracketed(host)


def names_of(host: str) -> tuple[str, ...]:
    """The names a server bound to ``host`` is dialed by from other hosts (for its certificate)."""
    if host in _WILDCARDS:
        return tuple(dict.fromkeys((socket.gethostname(), socket.getfqdn())))
    return () if host in ("127.0.0.1", "localhost") else (host.strip("[]"),)
