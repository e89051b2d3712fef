"""Two ``kvcompose serve`` instances on one machine, on different ports, side by side (one plaintext
keyed by its port, one ``--tls --state-dir``): each keeps its own API token, CA and Redis password
(owner-only files, on no command line, in no log); each embedded Redis refuses clients without the
password; both answer; a third on a taken port is refused before it writes anything; stopping one
leaves the other answering. Light stacks: the tiny model, 0.2 CPU per replica (``serve_config``)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from service.client import KVComposeClient
from service.local.processes import free_port
from service.tls import TLSFiles
from tests.test_redis_auth import UNAUTHENTICATED, raw_reply
from tests.test_serve_command import ROOT, serve_config

DOCUMENT = "The lighthouse on Kessel Point was built in 1871. " * 20


@dataclass
class Instance:
    process: subprocess.Popen
    log: Path
    port: int
    state: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text()

    def client(self) -> KVComposeClient:
        ca = self.state / "tls" / "server" / "ca.crt"
        return KVComposeClient(self.address, token=(self.state / "api-token").read_text().strip(), timeout_s=120,
                               tls=TLSFiles(ca_file=str(ca)) if ca.exists() else None)

    def redis(self) -> tuple[int, str]:
        """Its embedded redis-server's port and ``default`` password, read as its owner can: from the
        config file in the server's working directory (its command line shows neither)."""
        (server,) = [p for p in psutil.Process(self.process.pid).children(recursive=True)
                     if p.name() == "redis-server"]
        port = next(c.laddr.port for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
        line = next(line for line in (Path(server.cwd()) / "secrets.conf").read_text().splitlines()
                    if line.startswith("user default on >"))
        return port, line.split()[3][1:]


def start(tmp_path: Path, name: str, model_dir: Path, env: dict, state: Path | None = None,
          *extra: str) -> Instance:
    config, port = serve_config(tmp_path / f"{name}.yaml", model_dir)
    log = tmp_path / f"{name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--config", str(config), "--store-port", str(free_port()),
         "--store-metrics-port", str(free_port()), "--ray-metrics-port", str(free_port()),
         *(["--state-dir", str(state)] if state else []), *extra],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    default = Path(env["XDG_CACHE_HOME"]) / "kvcompose" / "instances" / f"api-{port}"
    return Instance(process, log, port, state or default)


def wait_up(instance: Instance, deadline: float) -> None:
    while "KVCompose Serve is up" not in instance.output():
        assert instance.process.poll() is None, instance.output()[-3000:]
        assert time.monotonic() < deadline, "serve did not come up"
        time.sleep(0.5)


def answers(instance: Instance) -> None:
    with instance.client() as client:
        cache_id = client.compress(DOCUMENT).cache_id
        _, stats = client.ask("When was it built?", cache_id=cache_id, max_new_tokens=4)
        assert stats.new_tokens > 0


def stop(instance: Instance) -> None:
    instance.process.send_signal(signal.SIGTERM)
    assert instance.process.wait(timeout=120) == 0, instance.output()[-3000:]


def test_two_instances_run_side_by_side_and_stopping_one_leaves_the_other(tiny_model_dir, tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="kvc-t-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "TMPDIR": str(scratch), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("REDIS_URL", None)  # each its own embedded Redis, as on a laptop
    a = start(tmp_path, "a", tiny_model_dir, env)
    b = start(tmp_path, "b", tiny_model_dir, env, tmp_path / "b-state", "--tls")
    try:
        deadline = time.monotonic() + 360
        wait_up(a, deadline)
        wait_up(b, deadline)
        tokens = {(i.state / "api-token").read_text() for i in (a, b)}
        assert len(tokens) == 2  # its own token each
        for i in (a, b):
            assert stat.S_IMODE(i.state.stat().st_mode) == 0o700
            assert stat.S_IMODE((i.state / "api-token").stat().st_mode) == 0o600
        assert (b.state / "tls" / "server" / "ca.crt").exists() and not (a.state / "tls").exists()
        answers(a)
        answers(b)

        redis = {i.port: i.redis() for i in (a, b)}
        assert len({password for _, password in redis.values()}) == 2
        command_lines = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
        for i, (port, password) in zip((a, b), redis.values()):
            for command in UNAUTHENTICATED:
                assert raw_reply(port, *command).startswith(b"-NOAUTH"), command
            assert password not in command_lines and password not in i.output()
            assert (i.state / "api-token").read_text() not in i.output()

        # the `remote` client finds each one's token (and B's CA) by the port it dials, or --state-dir
        (tmp_path / "doc.txt").write_text(DOCUMENT)
        for i, flags in ((a, []), (b, ["--state-dir", str(b.state)])):
            remote = subprocess.run([sys.executable, "-m", "service.cli", "remote", "ask", "--addr", i.address,
                                     *flags, "--document", str(tmp_path / "doc.txt"), "--max-new-tokens", "2",
                                     "When was it built?"], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=180)
            assert remote.returncode == 0, remote.stderr[-2000:]

        # a second instance on A's port is refused before it overwrites A's token
        token_a = (a.state / "api-token").read_text()
        clash = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--config", str(tmp_path / "a.yaml")],
                               cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
        assert clash.returncode == 2 and "another kvcompose serve is running" in clash.stderr, clash.stderr[-2000:]
        assert (a.state / "api-token").read_text() == token_a

        stop(a)
        assert not a.state.exists()  # A's secrets went with it...
        assert (b.state / "api-token").exists() and (b.state / "tls" / "server" / "ca.crt").exists()  # ...B's stay
        answers(b)  # and B still answers
        stop(b)
        assert not b.state.exists()
    finally:
        for i in (a, b):
            if i.process.poll() is None:
                os.killpg(i.process.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)

