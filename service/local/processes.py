"""Helper processes on this machine: free ports, children that die with their parent, and
``SupervisedProcess``, which starts one, waits until it serves, restarts it when it dies and stops it.

Imports nothing else of the service: the store (torch-free) builds ``EmbeddedRedis`` on it.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
import threading
import time
from typing import Self

log = logging.getLogger(__name__)


def dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that Linux ends it when the process that started it dies, so a crashed test or
    launcher leaves no redis-server or store behind: util-linux's ``setpriv --pdeathsig`` (where it
    is missing, ``argv`` as it is). Not a ``preexec_fn``: that forces a full fork() of a process
    running gRPC's threads, whose fork handlers can abort the child before it execs. Linux tracks
    the starting *thread*: start helpers from a thread that lives as long as they should (the main
    thread, a supervisor), never from a short-lived one."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "SIGTERM", "--", *argv] if setpriv else list(argv)


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


class SupervisedProcess:
    """One helper process on ``port``: ``start()`` returns once it serves, ``stop()`` ends it.

    supervise: a watcher thread starts it again on its port whenever it dies (checked every
    ``check_s``), and keeps trying after a failed restart; ``restarts`` counts the restarts. The
    watcher starts every later process: Linux ends a helper when the thread that started it ends
    (``dying_with_parent``), and the watcher lives as long as supervision.

    A subclass says how to start it (``_spawn``), when it serves (``_serving``) and what to tell
    when it does not start (``_failure``).
    """

    name = "helper process"  # in logs and errors
    start_timeout_s = 30.0
    poll_s = 0.05
    graceful = True  # stop() sends SIGTERM (and SIGKILL after 10 s); False: SIGKILL at once

    def __init__(self, port: int, supervise: bool = False, check_s: float = 0.5):
        self.port = port
        self.process: subprocess.Popen | None = None
        self.supervise, self.check_s, self.restarts = supervise, check_s, 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def _spawn(self) -> subprocess.Popen:
        raise NotImplementedError

    def _serving(self) -> bool:
        """One probe: does the process answer yet?"""
        raise NotImplementedError

    def _failure(self) -> str:
        """Why the process did not start, for the error (its log's tail, say)."""
        return "see its output above"

    def start(self) -> Self:
        self._stopping.clear()
        with self._lock:
            self._launch()
        if self.supervise and (self._watcher is None or not self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._watch, name=f"{self.name}-supervisor", daemon=True)
            self._watcher.start()
        return self

    def _launch(self) -> None:
        """(under the lock) Start the process and wait until it serves; on failure kill it and raise."""
        self.process = self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._serving():
            if self.process.poll() is not None or time.monotonic() > deadline:
                how = "did not start" if self.process.poll() is None else f"exited (code {self.process.returncode})"
                self._kill()
                raise RuntimeError(f"{self.name} on port {self.port} {how}: {self._failure()}")
            time.sleep(self.poll_s)

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_s):
            with self._lock:
                process = self.process
                if self._stopping.is_set() or (process is not None and process.poll() is None):
                    continue
                if process is not None:  # None: an earlier restart failed, already told
                    log.warning("%s on port %d exited (code %s); restarting it", self.name, self.port,
                                process.returncode)
                try:
                    self._launch()
                    self.restarts += 1
                    log.warning("%s restarted on port %d", self.name, self.port)
                except (OSError, RuntimeError) as e:
                    self.process = None
                    log.error("restarting %s failed: %s; trying again", self.name, e)

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the process, as a crash would (a supervised one comes back)."""
        with self._lock:
            if self.process is not None:
                self.process.kill()

    def stop(self) -> None:
        """Stop the process and its supervision."""
        self._stopping.set()
        with self._lock:  # never beside a supervisor restart
            if self.process is not None and self.process.poll() is None:
                if self.graceful:
                    self.process.terminate()
                    try:
                        self.process.wait(10)
                        return
                    except subprocess.TimeoutExpired:
                        pass
                self._kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
