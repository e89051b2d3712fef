"""One local instance, one set of secrets: ``kvcompose serve`` keeps its API token and its local CA
in a directory of its own, keyed by its API port (or ``--state-dir``), so two instances on one
machine never overwrite or delete each other's; ``kvcompose remote`` finds them by the port it dials.

The directory and its subdirectories are owner-only (0700), the token and private keys 0600.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def state_dir(api_port: int, explicit: Path | str | None = None) -> Path:
    """``explicit``, or the instance's directory under the cache dir, named by its API port."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    from service.config import EngineConfig

    return EngineConfig().cache_dir / "instances" / f"api-{api_port}"


def api_token_file(state: Path) -> Path:
    return state / "api-token"


def tls_dir(state: Path) -> Path:
    """The local CA's files (``server/`` and ``client/``, cert-manager's layout)."""
    return state / "tls"


def ca_file(state: Path) -> Path:
    """What a client of the API verifies it with, under TLS."""
    return tls_dir(state) / "server" / "ca.crt"


def for_address(address: str, explicit: Path | str | None = None) -> Path | None:
    """The state directory of the instance a client dials: ``explicit``, else the one keyed by the
    address's port when the host is this machine, else None."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    host, _, port = address.rpartition(":")
    return state_dir(int(port)) if host in LOCAL_HOSTS and port.isdigit() else None


@contextmanager
def claimed(state: Path) -> Iterator[Path]:
    """Hold ``state`` for one running instance: created owner-only, locked so that a second instance
    on the same API port or directory is refused (ValueError, a clear CLI error) before it writes
    anything, and emptied of the secrets at the end (removed too if this created it)."""
    created = not state.exists()
    state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.mkdir(mode=0o700, exist_ok=True)
    if state.stat().st_uid != os.getuid():
        raise ValueError(f"state directory {state} belongs to another user")
    state.chmod(0o700)
    lock = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise ValueError(f"another kvcompose serve is running with state directory {state} (the same API "
                           "port or --state-dir): stop it, or give this one other ports or --state-dir") from None
    try:
        yield state
    finally:
        api_token_file(state).unlink(missing_ok=True)
        shutil.rmtree(tls_dir(state), ignore_errors=True)
        (state / "lock").unlink(missing_ok=True)
        os.close(lock)
        if created:
            try:
                state.rmdir()
            except OSError:  # something else was put there: leave it
                pass
