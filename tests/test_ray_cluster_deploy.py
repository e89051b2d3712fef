"""Ray's public deploy path on a real multi-process cluster, as an operator (or KubeRay) runs it:
``ray start --head`` and ``ray start --address`` as separate processes, the project's Serve config
deployed with ``serve deploy`` (the YAML is the truth; only this machine's addresses are filled
in), answers over gRPC, then ``serve shutdown`` and the nodes stop, leaving no process behind."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from service.client import KVComposeClient
from service.local.processes import free_port
from service.local.store_process import StoreProcess
from service.serve.launch import APP, CONFIG, load_config
from service.store.embedded import EmbeddedRedis

BIN = Path(sys.executable).parent
# Ray's token authentication (the default for new clusters in Ray 2.60; the token is ~/.ray/auth_token):
# every node and CLI call of this cluster uses it.
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


def cli(*args: str, timeout: float = 120) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=timeout, env=ENV).stdout


def node(*args: str, temp_dir: str) -> subprocess.Popen:
    """One Ray node in the foreground (``--block``): SIGTERM stops it and everything it started."""
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--disable-usage-stats",
                             "--temp-dir", temp_dir, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)


@pytest.fixture
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")  # Ray's socket paths must stay short
    gcs_port, dashboard_port = free_port(), free_port()
    head = node("--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                str(dashboard_port), "--include-dashboard", "true", temp_dir=temp_dir)
    nodes = [head]
    try:
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait(lambda: " node_" in cli(str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs_port}"), 60)
        nodes.append(node("--address", f"127.0.0.1:{gcs_port}", temp_dir=temp_dir))
        _wait(lambda: cli(str(BIN / "ray"), "status", "--address", f"127.0.0.1:{gcs_port}").count(" node_") >= 2, 60)
        yield dashboard, nodes
    finally:
        for process in reversed(nodes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in nodes:
            process.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait(ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except subprocess.CalledProcessError:
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)


def test_serve_deploy_of_the_config_on_a_two_node_cluster_answers_over_grpc(ray_cluster, tiny_model_dir, tmp_path):
    dashboard, nodes = ray_cluster
    token = secrets.token_urlsafe(24)
    grpc_port = free_port()
    with EmbeddedRedis() as redis:
        store = StoreProcess(redis.url, free_port(), {"KVCOMPOSE_STORE_SERVICE_TOKEN": token}).start()
        try:
            config = load_config(
                CONFIG,
                args={"engine": {"model": str(tiny_model_dir), "max_context_tokens": 4096},
                      "store": {"redis_url": redis.url}, "store_address": store.address,
                      "auth_tokens": {"client-token": "default"}},
                deployments={name: {"ray_actor_options": {"num_cpus": 0.2}}
                             for name in ("Ingress", "Compressor", "Decoder")},
                proxy_location="HeadOnly",  # one gRPC port on this one machine
                http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options={"port": grpc_port})
            app = next(a for a in config["applications"] if a["name"] == APP)
            app["runtime_env"] = {"env_vars": {"KVCOMPOSE_STORE_SERVICE_TOKEN": token}}
            path = tmp_path / "serve.yaml"
            path.write_text(yaml.safe_dump(config))

            cli(str(BIN / "serve"), "deploy", str(path), "-a", dashboard)
            _wait(lambda: yaml.safe_load(cli(str(BIN / "serve"), "status", "-a", dashboard))
                  ["applications"][APP]["status"] == "RUNNING", 300)
            with KVComposeClient(f"127.0.0.1:{grpc_port}", token="client-token", timeout_s=120) as client:
                first = client.compress("The lighthouse on Kessel Point was built in 1871. " * 20)
                again = client.compress("The lighthouse on Kessel Point was built in 1871. " * 20)
                text, stats = client.ask("When was it built?", cache_id=first.cache_id, max_new_tokens=4)
            assert again.reused and again.cache_id == first.cache_id and stats.new_tokens > 0
            cli(str(BIN / "serve"), "shutdown", "-y", "-a", dashboard)
        finally:
            store.stop()
    children = [c for p in nodes for c in psutil.Process(p.pid).children(recursive=True)]
    for process in reversed(nodes):
        process.send_signal(signal.SIGTERM)
    for process in nodes:
        process.wait(timeout=60)
    time.sleep(2)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(c.pid, c.name()) for c in alive]
