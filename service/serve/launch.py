"""Deploy the Serve config, and the one-command local stack behind ``make serve``.

``deploy`` takes Ray Serve's public path (``serve.start`` + ``serve.run``) with every setting read
from the config file, after applying overrides, so the YAML stays the truth.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from service.config import EngineConfig, RequestLimits, StoreConfig, api_auth_tokens
from service.serve import binding, instance
from service.serve.tls_front import TLSFront
from service.store.embedded import EmbeddedRedis, dying_with_parent, free_port
from service.tls import TLSFiles

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


def deploy(config: dict) -> None:
    """Ray Serve's public path: ``serve.start`` with the config's proxy, gRPC and logging options,
    then ``serve.run`` of the application built with the config's args and deployment options (the
    app's ``runtime_env`` given to each deployment's actors). Returns when the app is RUNNING;
    deploying again updates it in place."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from service.serve.app import application

    schema = ServeDeploySchema.model_validate(config)
    if [a.name for a in schema.applications] != [APP]:
        raise ValueError(f"the config must hold the one application {APP!r}")
    (app,) = schema.applications
    serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump(),
                grpc_options=schema.grpc_options.model_dump(), logging_config=schema.logging_config)
    serve.run(application(app.args, deployment_options(app.model_dump(exclude_unset=True))), name=APP,
              route_prefix=app.route_prefix, logging_config=app.logging_config or schema.logging_config)


def deployment_options(app: dict) -> dict[str, dict]:
    """{deployment name: ``Deployment.options`` arguments} of one application of a Serve config,
    with the application's runtime_env (env_vars merged) in every deployment's actor options."""
    env = app.get("runtime_env") or {}
    options = {}
    for d in app.get("deployments", []):
        d = copy.deepcopy(d)
        name = d.pop("name")
        if env:
            actor = d.setdefault("ray_actor_options", {})
            own = actor.get("runtime_env") or {}
            actor["runtime_env"] = {**env, **own, "env_vars": {**env.get("env_vars", {}), **own.get("env_vars", {})}}
        options[name] = d
    return options


class StoreProcess:
    """``python -m service.store.server`` as a child process (used by the local stack and tests).

    supervise: start it again on its port whenever it dies (checked every ``check_s``), as
    Kubernetes restarts the store's pod; its clients ride out the gap (``retry.py``) or answer
    UNAVAILABLE. ``restarts`` counts them.
    """

    def __init__(self, redis_url: str, port: int, env: dict | None = None, host: str = "127.0.0.1",
                 metrics_port: int = 0, tls: TLSFiles | None = None, supervise: bool = False,
                 check_s: float = 0.2):
        self.redis_url, self.port, self.env, self.host = redis_url, port, env or {}, host
        self.metrics_port = metrics_port  # 0: no /metrics endpoint
        self.tls = tls  # the files its health check dials with (the server reads its own from env)
        self.supervise, self.check_s, self.restarts = supervise, check_s, 0
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> StoreProcess:
        self._stopping.clear()
        with self._lock:
            self._launch()
        if self.supervise and (self._watcher is None or not self._watcher.is_alive()):
            # the watcher starts every later process: Linux ends a helper when the thread that
            # started it ends (``dying_with_parent``), and this thread lives as long as supervision
            self._watcher = threading.Thread(target=self._watch, name="store-supervisor", daemon=True)
            self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(self.check_s):
            with self._lock:
                if self._stopping.is_set() or self.process.poll() is None:
                    continue
                log.warning("the prefix store exited (code %s); restarting it", self.process.returncode)
                try:
                    self._launch()
                    self.restarts += 1
                except RuntimeError as e:
                    log.error("restarting the prefix store failed: %s; trying again", e)

    def _launch(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from service.tls import channel

        env = {**os.environ, "REDIS_URL": self.redis_url, **self.env}
        metrics = ["--metrics-address", f"{self.host}:{self.metrics_port}"] if self.metrics_port else []
        self.process = subprocess.Popen(dying_with_parent([sys.executable, "-m", "service.store.server", "--address",
                                                           f"{self.host}:{self.port}", *metrics]), env=env,
                                        start_new_session=True)  # a terminal's Ctrl-C reaches only the launcher
        with channel(self.address, self.tls) as health_channel:
            stub = health_pb2_grpc.HealthStub(health_channel)
            for _ in range(300):
                if self.process.poll() is not None:
                    raise RuntimeError("the store server exited; see its log above")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError("the store server did not become healthy")

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (a supervised one comes back)."""
        with self._lock:
            if self.process is not None:
                self.process.kill()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:  # never beside a supervisor restart
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                self.process.wait(10)


def give_redis_url(app: dict, redis_url: str) -> None:
    """Hand the store's Redis URL (with its password) to the deployments that write to Redis, the
    Compressors (caches) and the Ingress (tenant limits' shared counters), in their actors'
    ``runtime_env``: not in the app's args, and not to Decoders, which get the reader's URL only."""
    for writer in (d for d in app["deployments"] if d["name"] in ("Ingress", "Compressor")):
        actor = writer.setdefault("ray_actor_options", {})
        actor.setdefault("runtime_env", {}).setdefault("env_vars", {})["REDIS_URL"] = redis_url


def app_args(config: dict):
    """The kvcompose application's builder args of a Serve config, typed."""
    from service.serve.app import AppArgs

    app = next(a for a in config["applications"] if a["name"] == APP)
    return AppArgs(**app.get("args", {}))


@dataclass
class LocalStack:
    """Everything on this machine, for ``make serve``, benchmarks and tests: Redis (embedded and
    supervised unless ``redis_url``), the prefix store with a fresh random service token (given to
    the replicas through the app's runtime_env), Ray (started unless already connected) and Serve.

    args / deployments / top: overrides of the Serve config (see ``load_config``). The store,
    its metrics and Serve's HTTP proxy listen on 127.0.0.1, and so does Ray when started here
    (``binding.local_ray``); the API (Serve's gRPC proxy, or the TLS door) on ``api_host``. Unless API
    tokens are configured (or ``allow_unauthenticated``) the API gets a fresh token per run
    (``api_token``), also written to ``api_token_file`` (mode 0600) when given, for local clients.

    tls_dir: run the hops we own over TLS, with a fresh local CA (``service.local_ca``) whose files
    go here: the store serves mutual TLS (the replicas present a client certificate), and the API
    is served over TLS by a front door (``tls_front``) on the configured gRPC port, Serve's
    plaintext proxy moving to a free loopback port behind it. Clients verify with
    ``tls_dir/server/ca.crt``. It refuses to start if any other listener of the stack is reachable
    from other hosts (``binding.check_one_door``).
    """

    config_path: Path = CONFIG
    redis_url: str | None = None
    store_port: int = 0
    store_metrics_port: int = 0
    args: dict = field(default_factory=dict)
    deployments: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)
    ray_init: dict = field(default_factory=dict)
    api_token_file: Path | None = None
    api_token: str | None = None
    tls_dir: Path | None = None
    api_host: str = "127.0.0.1"
    redis: EmbeddedRedis | None = None
    store: StoreProcess | None = None
    front: TLSFront | None = None
    config: dict | None = None

    def start(self) -> LocalStack:
        import ray

        from service.engine.models import model_shape

        token = secrets.token_urlsafe(32)
        replica_env = {"KVCOMPOSE_STORE_SERVICE_TOKEN": token}
        if self.redis_url is None:
            # with the read-only user of read grants: Decoders read fetched caches from it directly
            self.redis = EmbeddedRedis(supervise=True, reader_password=secrets.token_urlsafe(24)).start()
            self.redis_url = self.redis.url
            replica_env["KVCOMPOSE_STORE_REDIS_READ_URL"] = self.redis.reader_url
            log.info("no REDIS_URL: started an embedded, supervised redis-server at %s", self.redis.safe_url)
        # "": the URL (maybe with a password) reaches the writers by environment (give_redis_url)
        args = {**self.args, "store": {**self.args.get("store", {}), "redis_url": ""}}
        http = {**yaml.safe_load(Path(self.config_path).read_text()).get("http_options", {}), "host": "127.0.0.1"}
        self.config = load_config(self.config_path, args=args, deployments=self.deployments,
                                  **{"http_options": http, **self.top})
        app = next(a for a in self.config["applications"] if a["name"] == APP)
        typed = app_args(self.config)
        engine = EngineConfig(**typed.engine)
        # The store refuses Puts whose cache does not have the served model's shape.
        shapes = json.dumps({engine.model: model_shape(engine)})
        store = StoreConfig.from_env(**typed.store)
        app["args"]["store"]["redis_cluster"] = store.redis_cluster  # the replicas and the store agree
        env = {"KVCOMPOSE_STORE_SERVICE_TOKEN": token, "KVCOMPOSE_STORE_MODEL_SHAPES": shapes,
               "KVCOMPOSE_STORE_KEY_PREFIX": store.key_prefix,
               "KVCOMPOSE_STORE_REDIS_CLUSTER": str(store.redis_cluster).lower(),
               # both writers (the store and the Compressors) hold tenants to the same quotas
               "KVCOMPOSE_STORE_TENANT_QUOTA_BYTES": str(store.tenant_quota_bytes),
               "KVCOMPOSE_STORE_TENANT_QUOTAS": json.dumps(store.tenant_quotas)}
        client_tls = self._tls(env, app["args"]["store"]) if self.tls_dir is not None else None
        self.store = StoreProcess(self.redis_url, self.store_port or free_port(), env,
                                  metrics_port=self.store_metrics_port, tls=client_tls, supervise=True).start()
        app["args"]["store_address"] = self.store.address
        if not typed.auth_tokens and not typed.allow_unauthenticated:
            self.api_token = secrets.token_urlsafe(32)
            app["args"]["auth_tokens"] = {self.api_token: "default"}
            if self.api_token_file is not None:
                self._write_api_token(self.api_token)
        app.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(replica_env)
        give_redis_url(app, self.redis_url)
        limits = RequestLimits(**typed.limits)
        # read by Serve's proxy when it starts (it inherits this environment through the local raylet)
        os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(limits.max_request_bytes)
        if not ray.is_initialized():
            with binding.local_ray("127.0.0.1" if self.tls_dir is not None else self.api_host) as hook:
                ray.init(**{"namespace": "serve", "include_dashboard": False, "log_to_driver": False,
                            **self.ray_init, "runtime_env": {**self.ray_init.get("runtime_env", {}), **hook}})
        public_port = self.config["grpc_options"]["port"]
        if self.tls_dir is not None:  # Serve's plaintext proxy behind the TLS front door, on loopback
            self.config["grpc_options"]["port"] = free_port()
        deploy(self.config)
        if self.tls_dir is not None:
            self.front = TLSFront(TLSFiles(*self._server_files()), f"127.0.0.1:{self.config['grpc_options']['port']}",
                                  api_auth_tokens(app["args"].get("auth_tokens", {})), limits.max_request_bytes
                                  ).start(f"{binding.bracketed(self.api_host)}:{public_port}")
            binding.check_one_door((self.api_host, self.front.port))
        return self

    def _server_files(self) -> tuple[str, str, str]:
        server = self.tls_dir / "server"
        return str(server / "tls.crt"), str(server / "tls.key"), str(server / "ca.crt")

    def _tls(self, store_env: dict, store_args: dict) -> TLSFiles:
        """A fresh local CA; the store serves mutual TLS with its server certificate and the replicas
        present a client certificate. Returns the client's files."""
        from service.local_ca import LOCAL_NAMES, LocalCA

        ca = LocalCA.create()
        ca.issue(self.tls_dir / "server", names=(*LOCAL_NAMES, *binding.names_of(self.api_host)))
        client = ca.issue(self.tls_dir / "client")
        cert, key, authority = self._server_files()
        store_env.update({"KVCOMPOSE_STORE_TLS_CERT_FILE": cert, "KVCOMPOSE_STORE_TLS_KEY_FILE": key,
                          "KVCOMPOSE_STORE_TLS_CA_FILE": authority, "KVCOMPOSE_STORE_TLS_CLIENT_AUTH": "true"})
        store_args.update({"tls_cert_file": client.cert_file, "tls_key_file": client.key_file,
                           "tls_ca_file": client.ca_file})
        return client

    @property
    def api_tls(self) -> TLSFiles | None:
        """What a client of the API verifies it with (None: plaintext)."""
        return TLSFiles(ca_file=self._server_files()[2]) if self.tls_dir is not None else None

    def _write_api_token(self, token: str) -> None:
        """This run's API token, readable only by this user (``kvcompose remote`` finds it)."""
        self.api_token_file.parent.mkdir(parents=True, exist_ok=True)
        self.api_token_file.unlink(missing_ok=True)
        fd = os.open(self.api_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)

    @property
    def address(self) -> str:
        """The public gRPC API (the TLS front door's when ``tls_dir``)."""
        port = self.front.port if self.front is not None else self.config["grpc_options"]["port"]
        return f"{binding.dialed(self.api_host)}:{port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if self.front is not None:
                self.front.stop()
            if ray.is_initialized():
                serve.shutdown()
        finally:
            if self.store is not None:
                self.store.stop()
            if self.redis is not None:
                self.redis.__exit__()
            if self.api_token_file is not None:
                self.api_token_file.unlink(missing_ok=True)
            ray.shutdown()  # last: Ray may end this process if anything touches it afterwards

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


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
        with instance.claimed(instance.state_dir(api_port, state_dir)) as state, \
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
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print("\nStopping KVCompose Serve...", flush=True)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    print("Stopped.", flush=True)


def local_engine_overrides() -> tuple[dict, dict]:
    """(engine args, deployment options) from ``KVCOMPOSE_<FIELD>`` variables, over the config file's:
    ``KVCOMPOSE_DEVICE=cuda make serve`` runs on this machine's GPU in bfloat16 (unless
    ``KVCOMPOSE_COMPUTE_DTYPE`` says float16), the Compressor and the Decoder sharing it (half a GPU
    each in Ray's accounting)."""
    engine = EngineConfig.env_values()
    if "cache_dir" in engine:
        engine["cache_dir"] = str(engine["cache_dir"])  # Serve's args are plain data
    deployments = {}
    if engine.get("device", "cpu").startswith("cuda"):
        deployments = {name: {"ray_actor_options": {"num_gpus": 0.5}} for name in ("Compressor", "Decoder")}
        engine.setdefault("compute_dtype", "bfloat16")  # the file's float32 is the CPU's (refused on CUDA)
    return engine, deployments


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
