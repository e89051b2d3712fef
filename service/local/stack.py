"""``LocalStack``: the whole service on this machine, for ``make serve``, benchmarks and tests."""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from service.config import EngineConfig, RequestLimits, StoreConfig, api_auth_tokens
from service.local.processes import free_port
from service.local.quiet import startup_quieted
from service.local.store_process import StoreProcess
from service.serve import binding
from service.serve.launch import APP, CONFIG, app_args, deep_merge, deploy, give_redis_url, load_config
from service.serve.tls_front import TLSFront
from service.store.embedded import EmbeddedRedis
from service.tls import TLSFiles

log = logging.getLogger(__name__)


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
        with startup_quieted():
            return self._start()

    def _start(self) -> LocalStack:
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
        top = deep_merge({"http_options": {"host": "127.0.0.1"}}, self.top)  # Serve's HTTP proxy: unused, local
        self.config = load_config(self.config_path, args=args, deployments=self.deployments, **top)
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
                            "logging_level": logging.WARNING,  # "Started a local Ray instance" and the like
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
