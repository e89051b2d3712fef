"""Ray Serve deployments and the application builder (``import_path: service.serve.app:build_app``).

    Ingress (KVCompose gRPC, Serve's gRPC proxy)
      ├── Compressor: engine + Redis prefix store (single flight); GPU actors in production
      └── Decoder:    engine + PrefixStore gRPC client + LRU; fetches caches by id, never from memory

The Serve config file (``serve_config.yaml``) is the deployment's truth: builder ``args`` carry the
typed settings, ``deployments`` carry replicas, autoscaling and ``ray_actor_options``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import store_pb2 as store_pb
from ray import serve
from ray.serve.handle import DeploymentHandle

from service import api as conv
from service.config import EngineConfig, StoreConfig
from service.store.auth import Auth

log = logging.getLogger("ray.serve")  # Serve formats it (JSON) with the request id


@dataclass
class AppArgs:
    """The builder's ``args``: engine settings, store settings, and how decoders reach the store.

    store: StoreConfig fields; secrets (``redis_url`` with a password, ``service_token``) are best left
        out and given as environment variables (``REDIS_URL``, ``KVCOMPOSE_STORE_SERVICE_TOKEN``).
    store_address: host:port of the PrefixStore gRPC server decoders fetch from.
    auth_tokens: client bearer token -> tenant for the public API; empty = no auth (x-tenant metadata).
    decode_lru_bytes: decoded caches a Decoder replica keeps in memory.
    """

    engine: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)
    store_address: str = "127.0.0.1:50051"
    auth_tokens: dict = field(default_factory=dict)
    decode_lru_bytes: int = 256 << 20


@serve.deployment(name="Compressor")
class Compressor:
    """Prefill + compress + store. Replicas are GPU actors in production (``num_gpus`` in the config)."""

    def __init__(self, engine: dict, store: dict):
        from service.compressor import CacheCompressor
        from service.engine import Engine
        from service.serve.metrics import ServiceMetrics
        from service.store.redis_store import RedisStore, connect

        store_config = StoreConfig.from_env(**store)
        self.worker = CacheCompressor(Engine(EngineConfig(**engine)),
                                      RedisStore(connect(store_config, store_config.redis_url), store_config))
        self.metrics = ServiceMetrics()

    async def compress(self, tenant: str, kwargs: dict) -> dict:
        try:
            r = await self.worker.compress(tenant, **kwargs)
        except Exception as e:  # noqa: BLE001 - errors cross the handle as data
            return conv.error_dict(e)
        self.metrics.compress_s.observe(r.seconds, tags={"reused": str(r.reused).lower()})
        self.metrics.cache.inc(tags={"result": "hit" if r.reused else "miss"})
        if not r.reused:
            self.metrics.bytes_stored.inc(r.stored_bytes)
            self.metrics.kept_fraction.observe(r.kept_fraction)
        return {"result": r}

    def counters(self) -> dict:
        return {"prefills": self.worker.prefills}

    def model_info(self) -> dict:
        loaded, config = self.worker.engine.loaded, self.worker.engine.config
        return {"id": loaded.model_id, "revision": loaded.revision, "layers": loaded.model.config.num_hidden_layers,
                "max_context_tokens": config.max_context_tokens, "default_press": config.default_press,
                "default_codec": config.codec}


@serve.deployment(name="Decoder")
class Decoder:
    """Answers from caches fetched through the PrefixStore gRPC client (so it may run on any node)."""

    def __init__(self, engine: dict, store: dict, store_address: str, lru_bytes: int):
        from service.answerer import Answerer
        from service.engine import Engine
        from service.serve.metrics import ServiceMetrics

        self.worker = Answerer(Engine(EngineConfig(**engine)),
                               _store_client(store, store_address), lru_bytes)
        self.metrics = ServiceMetrics()

    async def generate(self, tenant: str, cache_id: str, question: str, sampling, stop: tuple) -> AsyncIterator:
        try:
            async for item in self.worker.answer(tenant, cache_id, question, sampling, stop):
                if isinstance(item, str):
                    yield {"text": item}
                else:
                    if item.fetched_bytes:  # Ray counters take positive increments only
                        self.metrics.bytes_fetched.inc(item.fetched_bytes)
                    yield {"stats": item}
        except Exception as e:  # noqa: BLE001
            yield conv.error_dict(e)

    def counters(self) -> dict:
        return {"fetches": self.worker.fetches, "lru_entries": len(self.worker.lru.items)}


@serve.deployment(name="Ingress")
class Ingress:
    """The KVCompose gRPC service; methods are named as in api.proto (Serve's gRPC proxy routes by name)."""

    def __init__(self, compressor: DeploymentHandle, decoder: DeploymentHandle, store: dict, store_address: str,
                 auth_tokens: dict):
        from service.serve.metrics import ServiceMetrics

        self.compressor = compressor
        self.decoder = decoder
        self.auth = Auth(auth_tokens)
        self.store = _store_client(store, store_address)
        self.metrics = ServiceMetrics()
        self._model: dict | None = None

    async def _model_info(self) -> dict:
        if self._model is None:
            self._model = await self.compressor.model_info.remote()
        return self._model

    def _fail(self, method: str, grpc_context, e: BaseException, request_id: str) -> None:
        status, message = conv.to_status(e, request_id)
        grpc_context.set_code(status)
        grpc_context.set_details(message)
        self.metrics.requests.inc(tags={"method": method, "status": status.name})
        log.info("request=%s method=%s status=%s", request_id, method, status.name)

    def _ok(self, method: str, request_id: str, started: float) -> None:
        self.metrics.requests.inc(tags={"method": method, "status": "OK"})
        log.info("request=%s method=%s status=OK seconds=%.3f", request_id, method, time.perf_counter() - started)

    def _tenant(self, grpc_context) -> str:
        return self.auth.tenant(dict(grpc_context.invocation_metadata()))

    async def _compress(self, tenant: str, req: api.CompressRequest):
        model = await self._model_info()
        out = await self.compressor.compress.remote(tenant, conv.compress_args(req, model["id"]))
        conv.raise_error(out)
        return out["result"]

    async def Compress(self, request: api.CompressRequest, grpc_context) -> api.CompressResponse:
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            result = await self._compress(self._tenant(grpc_context), request)
        except Exception as e:  # noqa: BLE001
            self._fail("Compress", grpc_context, e, request_id)
            return api.CompressResponse()
        self._ok("Compress", request_id, started)
        return conv.compress_response(result)

    async def Generate(self, request: api.GenerateRequest, grpc_context) -> AsyncIterator[api.GenerateResponse]:
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            tenant = self._tenant(grpc_context)
            sampling, stop = conv.sampling_args(request)
            compressed = None
            if request.WhichOneof("source") == "context":
                compressed = await self._compress(tenant, request.context)
                cache_id = compressed.cache_id
            elif request.cache_id:
                cache_id = request.cache_id
            else:
                raise conv.ApiError(grpc.StatusCode.INVALID_ARGUMENT, "send cache_id or context")
            first = None
            stream = self.decoder.options(stream=True).generate.remote(tenant, cache_id, request.question,
                                                                        sampling, stop)
            async for item in stream:
                conv.raise_error(item)
                if "text" in item:
                    first = first or time.perf_counter() - started
                    yield api.GenerateResponse(text=item["text"])
                    continue
                stats = item["stats"]
                stats.time_to_first_token_s = first or time.perf_counter() - started
                stats.seconds = time.perf_counter() - started
                hit = compressed is None or compressed.reused
                self.metrics.ttft_s.observe(stats.time_to_first_token_s)
                self.metrics.decode_s.observe(stats.seconds)
                yield api.GenerateResponse(stats=conv.stats_message(stats, hit, compressed))
        except Exception as e:  # noqa: BLE001
            self._fail("Generate", grpc_context, e, request_id)
            # A streaming method must raise for Serve's proxy to send the code set above.
            raise conv.ApiError(grpc_context.code(), grpc_context.details()) from None
        self._ok("Generate", request_id, started)

    async def ListModels(self, request: api.ListModelsRequest, grpc_context) -> api.ListModelsResponse:
        m = await self._model_info()
        return api.ListModelsResponse(models=[api.ModelInfo(
            id=m["id"], revision=m["revision"], layers=m["layers"], max_context_tokens=m["max_context_tokens"],
            default_press_json=json.dumps(m["default_press"]), default_codec=m["default_codec"])])

    async def Stat(self, request: store_pb.StatRequest, grpc_context) -> store_pb.StatResponse:
        return await self._store_call("Stat", grpc_context, lambda t: store_pb.StatResponse(
            manifest=self.store.stat(request.cache_id, tenant=t)), store_pb.StatResponse)

    async def Delete(self, request: store_pb.DeleteRequest, grpc_context) -> store_pb.DeleteResponse:
        return await self._store_call("Delete", grpc_context, lambda t: store_pb.DeleteResponse(
            deleted=self.store.delete(request.cache_id, tenant=t)), store_pb.DeleteResponse)

    async def _store_call(self, method: str, grpc_context, call, empty):
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            reply = await asyncio.to_thread(call, self._tenant(grpc_context))
        except Exception as e:  # noqa: BLE001
            self._fail(method, grpc_context, e, request_id)
            return empty()
        self._ok(method, request_id, started)
        return reply

    async def counters(self) -> dict:
        return {"compressor": await self.compressor.counters.remote(), "decoder": await self.decoder.counters.remote()}


def _store_client(store: dict, address: str):
    from service.store.client import PrefixStoreClient

    return PrefixStoreClient(address, token=StoreConfig.from_env(**store).service_token or None)


def build_app(args: dict) -> serve.Application:
    """Application builder for the Serve config (``args`` -> AppArgs)."""
    a = AppArgs(**(args or {}))
    EngineConfig(**a.engine), StoreConfig(**a.store)  # fail fast on bad settings, with the field's name
    return Ingress.bind(
        Compressor.bind(a.engine, a.store),
        Decoder.bind(a.engine, a.store, a.store_address, a.decode_lru_bytes),
        a.store, a.store_address, a.auth_tokens,
    )
