"""``run_local``: what ``make serve`` runs, the local stack until Ctrl-C or SIGTERM (then exit code 0),
and its banner."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path

import yaml

from service.config import StoreConfig
from service.local.stack import LocalStack
from service.local.terminal import own_terminal
from service.serve import instance
from service.serve.launch import CONFIG, local_engine_overrides


def run_local(config_path: Path = CONFIG, store_port: int = 50051, store_metrics_port: int = 9102,
              ray_metrics_port: int = 8080, tls: bool = False, state_dir: Path | None = None,
              host: str = "127.0.0.1") -> None:
    """``make serve``: the local stack, until Ctrl-C or SIGTERM, then everything stops in order and
    leaves nothing behind (Ray's session files live in a temporary directory removed at the end).
    REDIS_URL names an external Redis. The API token and, with ``tls`` (``make serve TLS=1``: the
    store and the API over TLS), a fresh local CA live in this instance's own state directory
    (``instance.py``: ``state_dir``, or one keyed by the API port), emptied at the end."""
    redis_url = StoreConfig.from_env().redis_url or None
    engine, deployments = local_engine_overrides()
    api_port = yaml.safe_load(Path(config_path).read_text())["grpc_options"]["port"]
    print("Deploying KVCompose Serve (first start converts the embedded model, ~1 min)...", flush=True)
    ray_dir = tempfile.mkdtemp(prefix="kvc-ray-")
    try:
        with own_terminal(), instance.claimed(instance.state_dir(api_port, state_dir)) as state, \
                LocalStack(config_path, redis_url=redis_url, args={"engine": engine},
                           deployments=deployments, store_port=store_port, store_metrics_port=store_metrics_port,
                           ray_init={"_metrics_export_port": ray_metrics_port, "_temp_dir": ray_dir},
                           api_token_file=instance.api_token_file(state),
                           tls_dir=instance.tls_dir(state) if tls else None, api_host=host) as stack:
            # after ray.init: Ray's core worker installs its own SIGTERM handler, which aborts
            signal.signal(signal.SIGTERM, _interrupt)
            print(READY.format(address=stack.address, port=stack.address.rsplit(":", 1)[1], store_port=store_port,
                               store_metrics=store_metrics_port, ray_metrics=ray_metrics_port,
                               transport=f"TLS, CA {instance.ca_file(state)}" if tls else "plaintext",
                               state=state, state_flag=f" --state-dir {state}" if state_dir else ""),
                  flush=True)
            _until_stopped()
    except KeyboardInterrupt:  # Ctrl-C while starting: LocalStack has stopped what it had started
        pass
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    print("Stopped.", flush=True)


def _until_stopped() -> None:
    """Until Ctrl-C or SIGTERM; then a second one must not cut the clean-up short."""
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("\nStopping KVCompose Serve...", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


READY = """
KVCompose Serve is up.
  gRPC API (kvcompose.v1.KVCompose): {address} ({transport})
  Prefix store (token-protected):     127.0.0.1:{store_port}
  Prometheus metrics:                 http://127.0.0.1:{store_metrics}/metrics (store), :{ray_metrics}/metrics (Ray)
  Token and CA (owner-only):          {state}
  Try:
    .venv/bin/kvcompose remote ask --addr 127.0.0.1:{port}{state_flag} --document examples/field-guide.md \\
      "How much weight can the robot carry?"
  Press Ctrl-C to stop.
"""
