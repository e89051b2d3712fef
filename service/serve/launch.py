"""Deploy the Serve config, and the one-command local stack behind ``make serve``.

``deploy`` makes the same calls as ``serve run config.yaml`` (start Serve with the file's proxy and
gRPC options, then deploy its applications), after applying overrides, so the YAML stays the truth.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
CONFIG = Path(__file__).with_name("serve_config.yaml")
APP = "kvcompose"


def load_config(path: Path = CONFIG, args: dict | None = None, deployments: dict | None = None,
                **top: object) -> dict:
    """The Serve config with overrides: ``args`` deep-merged into the app's builder args,
    ``deployments`` {name: {option: value}} merged into deployment options, ``top`` replacing top-level keys."""
    config = copy.deepcopy(yaml.safe_load(Path(path).read_text()))
    config.update(top)
    app = next(a for a in config["applications"] if a["name"] == APP)
    _merge(app.setdefault("args", {}), args or {})
    for name, options in (deployments or {}).items():
        target = next((d for d in app["deployments"] if d["name"] == name), None)
        if target is None:
            raise ValueError(f"no deployment {name!r} in {path}")
        _merge(target, options)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Ray's own schema: fail before anything starts
    return config


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def deploy(config: dict, timeout_s: float = 900) -> None:
    """Start Serve (proxies, gRPC options from the config) and deploy; wait until RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
    client.deploy_apps(schema, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploying {APP} failed: {status.message}")
        time.sleep(1)
    raise TimeoutError(f"{APP} not RUNNING after {timeout_s:.0f} s")


class StoreProcess:
    """``python -m service.store.server`` as a child process (used by the local stack and tests)."""

    def __init__(self, redis_url: str, port: int, env: dict | None = None):
        self.redis_url, self.port, self.env = redis_url, port, env or {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> StoreProcess:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        env = {**os.environ, "REDIS_URL": self.redis_url, **self.env}
        self.process = subprocess.Popen([sys.executable, "-m", "service.store.server", "--address",
                                         f"0.0.0.0:{self.port}"], env=env)
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(300):
                if self.process.poll() is not None:
                    raise RuntimeError("the store server exited; see its log above")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError("the store server did not become healthy")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def run_local(config_path: Path = CONFIG, store_port: int = 50051) -> None:
    """Everything on this machine: Redis (embedded unless REDIS_URL), the store, Ray, Serve. Blocks."""
    import ray

    from service.store.embedded import EmbeddedRedis

    redis = None
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        redis = EmbeddedRedis().start()
        redis_url = redis.url
        log.info("no REDIS_URL: started an embedded redis-server at %s", redis_url)
    store = StoreProcess(redis_url, store_port).start()
    try:
        config = load_config(config_path, args={"store": {"redis_url": redis_url}, "store_address": store.address})
        ray.init(namespace="serve", include_dashboard=False, log_to_driver=False)
        print("Deploying KVCompose Serve (first start converts the embedded model, ~1 min)...", flush=True)
        deploy(config)
        port = config["grpc_options"]["port"]
        print(READY.format(port=port), flush=True)
        while True:
            time.sleep(3600)
    finally:
        store.stop()
        if redis:
            redis.stop()


READY = """
KVCompose Serve is up.
  gRPC API (kvcompose.v1.KVCompose): 127.0.0.1:{port}
  Try:
    .venv/bin/kvcompose remote ask --addr 127.0.0.1:{port} --document k8s/README.md "Which port does the gRPC API use?"
  Press Ctrl-C to stop.
"""
