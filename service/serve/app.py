"""Ray Serve deployments and the application builder (``import_path: service.serve.app:build_app``).

    Ingress (KVCompose gRPC, Serve's gRPC proxy)
      ├── Compressor: engine + Redis prefix store (single flight); GPU actors in production
      └── Decoder:    engine + PrefixStore gRPC client + LRU; fetches caches by id, never from memory

The Serve config file (``serve_config.yaml``) is the deployment's truth: builder ``args`` carry the
typed settings, ``deployments`` carry replicas, autoscaling and ``ray_actor_options``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import store_pb2 as store_pb
from ray import serve
from ray.serve.handle import DeploymentHandle

from service.config import BatchLimits, EngineConfig, RequestLimits, StoreConfig, TenantLimits, api_auth_tokens
from service.protocol import Piece
from service.serve import messages
from service.serve.frontend import Frontend
from service.store.auth import Auth


@dataclass
class AppArgs:
    """The builder's ``args``: engine settings, store settings, and how decoders reach the store.

    store: StoreConfig fields; secrets (``redis_url`` with a password, ``service_token``) are best left
        out and given as environment variables (``REDIS_URL``, ``KVCOMPOSE_STORE_SERVICE_TOKEN``).
    store_address: host:port of the PrefixStore gRPC server decoders fetch from.
    auth_tokens: client bearer token -> tenant for the public API (or ``KVCOMPOSE_API_AUTH_TOKENS`` in the
        replicas' environment, e.g. from a Kubernetes Secret). None at all is refused, unless
    allow_unauthenticated: development mode, the tenant taken from ``x-tenant`` metadata (logged).
    decode_lru_bytes: decoded caches a Decoder replica keeps in memory.
    limits: RequestLimits fields (what one request may ask for).
    decode_batch: BatchLimits fields of every Decoder replica's decode loop (max_batch, max_waiting, memory_bytes).
    tenant_limits: TenantLimits fields (each tenant's calls per second, prefills and decodes in flight).
    """

    engine: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)
    store_address: str = "127.0.0.1:50051"
    auth_tokens: dict = field(default_factory=dict)
    allow_unauthenticated: bool = False
    decode_lru_bytes: int = 256 << 20
    limits: dict = field(default_factory=dict)
    decode_batch: dict = field(default_factory=dict)
    tenant_limits: dict = field(default_factory=dict)


@serve.deployment(name="Compressor")
class Compressor:
    """Prefill + compress + store. Replicas are GPU actors in production (``num_gpus`` in the config)."""

    def __init__(self, engine: EngineConfig, store: dict):
        from service.engine.engine import Engine
        from service.serve.compressor import CacheCompressor
        from service.serve.metrics import ServiceMetrics, TallyExport
        from service.store.redis_store import RedisStore, connect

        store_config = StoreConfig.from_env(**store)
        self.worker = CacheCompressor(Engine(engine),
                                      RedisStore(connect(store_config, store_config.redis_url), store_config))
        self.metrics = ServiceMetrics()
        self._entries = TallyExport(self.metrics.store_entries, "outcome")  # what it wrote to Redis itself

    async def compress(self, tenant: str, kwargs: dict) -> dict:
        try:
            r = await self.worker.compress(tenant, **kwargs)
        except Exception as e:  # noqa: BLE001 - errors cross the handle as data
            return messages.error_dict(e)
        finally:
            self._entries.export(self.worker.store.outcomes)
        self.metrics.compress_s.observe(r.seconds, tags={"reused": str(r.reused).lower()})
        self.metrics.cache.inc(tags={"result": "hit" if r.reused else "miss"})
        if not r.reused:
            self.metrics.bytes_stored.inc(r.stored_bytes)
            self.metrics.kept_fraction.observe(r.kept_fraction)
        return {"result": r}

    def counters(self) -> dict:
        return {"prefills": self.worker.prefills}

    def model_info(self) -> dict:
        return self.worker.engine.info()


@serve.deployment(name="Decoder")
class Decoder:
    """Answers from caches fetched through the PrefixStore gRPC client (so it may run on any node)."""

    def __init__(self, engine: EngineConfig, store: dict, store_address: str, lru_bytes: int,
                 decode_batch: BatchLimits):
        from service.engine.engine import Engine
        from service.serve.answerer import Answerer
        from service.serve.metrics import ServiceMetrics, TallyExport

        self.store = _store_client(store, store_address)
        self.worker = Answerer(Engine(engine), self.store, lru_bytes, batch=decode_batch)
        self.metrics = ServiceMetrics()
        self._fetch_paths = TallyExport(self.metrics.fetches, "path", self.store.read_counts())  # how it read caches

    async def generate(self, tenant: str, cache_id: str, question: str, sampling) -> AsyncIterator:
        received = time.time()
        try:
            async for item in self.worker.answer(tenant, cache_id, question, sampling):
                if isinstance(item, str):
                    yield {"text": item, "at": time.time()}  # one Ray message: coalesced by the loop
                else:
                    item.timings["received_unix"] = received
                    if item.fetched_bytes:  # Ray counters take positive increments only
                        self.metrics.bytes_fetched.inc(item.fetched_bytes)
                        self._fetch_paths.export(self.store.read_counts())
                    yield {"stats": item}
        except Exception as e:  # noqa: BLE001
            yield messages.error_dict(e)

    def counters(self) -> dict:
        loop = self.worker.decoder
        return {"fetches": self.worker.fetches, "fetch_paths": self.store.read_counts(),
                "lru_entries": len(self.worker.lru.items), "decode_steps": loop.steps, "peak_batch": loop.peak_batch}

    async def record_routing_stats(self) -> dict:  # async: runs on the replica's loop, beside the LRU's users
        """Read by the cache-affinity router (``service.serve.routing``): which caches this replica holds."""
        return {"cache_ids": [f"{tenant}/{cache_id}" for tenant, cache_id in self.worker.lru.items],
                **self.worker.decoder.load()}


@serve.deployment(name="Ingress")
class Ingress:
    """The KVCompose gRPC service; methods are named as in api.proto (Serve's gRPC proxy routes by name)."""

    def __init__(self, compressor: DeploymentHandle, decoder: DeploymentHandle, store: dict, store_address: str,
                 auth_tokens: dict, limits: RequestLimits, allow_unauthenticated: bool,
                 tenant_limits: TenantLimits | None = None):
        from service.serve.admission import admission_for
        from service.serve.metrics import ServiceMetrics

        self.compressor = compressor
        self.decoder = decoder
        tenant_limits = tenant_limits or TenantLimits()
        self.frontend = Frontend(Auth(api_auth_tokens(auth_tokens)), limits, ServiceMetrics(),
                                 allow_unauthenticated, tenant_limits,
                                 admission_for(tenant_limits, StoreConfig.from_env(**store)))
        self.store = _store_client(store, store_address)
        self._model: dict | None = None

    async def _model_info(self) -> dict:
        if self._model is None:
            self._model = await self.compressor.model_info.remote()
        return self._model

    async def _compress(self, tenant: str, req: api.CompressRequest):
        model = await self._model_info()
        args = messages.compress_args(req, model["id"], self.frontend.limits)
        out = await self.compressor.compress.remote(tenant, args)
        messages.raise_error(out)
        return out["result"]

    async def _answer(self, tenant: str, cache_id: str, question: str, sampling) -> AsyncIterator:
        stream = self.decoder.options(stream=True).generate.remote(tenant, cache_id, question, sampling)
        async for item in stream:
            messages.raise_error(item)
            yield Piece(item["text"], item["at"]) if "text" in item else item["stats"]

    async def _unary(self, method: str, grpc_context, handler, empty):
        try:
            return await self.frontend.call(method, grpc_context, handler)
        except messages.ApiError as e:
            _send_error(grpc_context, e)
            return empty

    async def Compress(self, request: api.CompressRequest, grpc_context) -> api.CompressResponse:
        async def handler(tenant: str) -> api.CompressResponse:
            return messages.compress_response(await self._compress(tenant, request))

        return await self._unary("Compress", grpc_context, handler, api.CompressResponse())

    async def Generate(self, request: api.GenerateRequest, grpc_context) -> AsyncIterator[api.GenerateResponse]:
        try:
            async for message in self.frontend.generate(request, grpc_context, self._answer, self._compress):
                yield message
        except messages.ApiError as e:
            _send_error(grpc_context, e)
            raise  # a streaming method must raise for Serve's proxy to send the code set above

    async def ListModels(self, request: api.ListModelsRequest, grpc_context) -> api.ListModelsResponse:
        async def handler(tenant: str) -> api.ListModelsResponse:
            return messages.list_models_response(await self._model_info())

        return await self._unary("ListModels", grpc_context, handler, api.ListModelsResponse())

    async def Stat(self, request: store_pb.StatRequest, grpc_context) -> store_pb.StatResponse:
        async def handler(tenant: str) -> store_pb.StatResponse:
            manifest = await self.store.stat(request.cache_id, tenant=tenant)
            return store_pb.StatResponse(manifest=manifest.to_proto(store_pb))

        return await self._unary("Stat", grpc_context, handler, store_pb.StatResponse())

    async def Delete(self, request: store_pb.DeleteRequest, grpc_context) -> store_pb.DeleteResponse:
        async def handler(tenant: str) -> store_pb.DeleteResponse:
            deleted = await self.store.delete(request.cache_id, tenant=tenant)
            return store_pb.DeleteResponse(deleted=deleted)

        return await self._unary("Delete", grpc_context, handler, store_pb.DeleteResponse())

    async def counters(self) -> dict:
        return {"compressor": await self.compressor.counters.remote(), "decoder": await self.decoder.counters.remote()}


def _send_error(grpc_context, e: messages.ApiError) -> None:
    grpc_context.set_code(e.status)
    grpc_context.set_details(str(e))
    if e.trailing_metadata():
        grpc_context.set_trailing_metadata(list(e.trailing_metadata()))


def _store_client(store: dict, address: str):
    """The prefix store as ``interface.PrefixStore``, over gRPC."""
    from service.store.client import AsyncPrefixStoreClient, PrefixStoreClient

    return AsyncPrefixStoreClient(PrefixStoreClient.from_config(address, StoreConfig.from_env(**store)))


def build_app(args: dict) -> serve.Application:
    """Application builder for the Serve config (``serve deploy``, KubeRay's serveConfigV2): Serve
    applies the config's deployment options itself."""
    return application(args)


def application(args: dict, options: dict[str, dict] | None = None) -> serve.Application:
    """The application: ``args`` (AppArgs) typed and validated once, here, the typed settings bound
    to the deployments; ``options`` ({deployment name: ``Deployment.options`` arguments}) are the
    config's deployment options, for Ray's public ``serve.run``, which does not read the config.

    Store settings are checked here but bound as the config's dict: each replica completes them
    with ``StoreConfig.from_env`` from its own environment, so secrets (``REDIS_URL`` with a
    password, the service token, from Kubernetes Secrets) never enter Ray's deployment state.
    """
    a = AppArgs(**(args or {}))
    engine, limits, batch = EngineConfig(**a.engine), RequestLimits(**a.limits), BatchLimits(**a.decode_batch)
    tenant_limits = TenantLimits(**a.tenant_limits)
    StoreConfig(**a.store)  # fail fast, naming the field
    unknown = set(options or {}) - {"Ingress", "Compressor", "Decoder"}
    if unknown:
        raise ValueError(f"options for unknown deployments {sorted(unknown)}: the application has Ingress, "
                         "Compressor and Decoder")

    def configured(deployment: serve.Deployment) -> serve.Deployment:
        return deployment.options(**(options or {}).get(deployment.name, {}))

    return configured(Ingress).bind(
        configured(Compressor).bind(engine, a.store),
        configured(Decoder).bind(engine, a.store, a.store_address, a.decode_lru_bytes, batch),
        a.store, a.store_address, a.auth_tokens, limits, a.allow_unauthenticated, tenant_limits,
    )
