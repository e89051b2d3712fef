"""The PrefixStore gRPC server: thin methods over ``RedisStore`` (counted by ``MeteredStore``), standard
health and reflection.

    KVCOMPOSE_STORE_SERVICE_TOKEN=... python -m service.store.server --address 127.0.0.1:50051
    # REDIS_URL unset: starts an embedded redis-server; every call needs the service token
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import time
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvcompose.v1 import store_pb2 as pb
from kvcompose.v1 import store_pb2_grpc as pb_grpc

from service.config import StoreConfig
from service.malloc import keep_freed_memory
from service.store.acl import redacted
from service.store.auth import Auth, store_auth
from service.store.embedded import EmbeddedRedis
from service.store.errors import InvalidArgument, QuotaExceeded, StoreError, is_transient, unavailable
from service.store.manifest import key_from_proto
from service.store.metered import MeteredStore
from service.store.metrics import StoreMetrics
from service.store.redis_store import RedisStore, connect
from service.tls import add_port
from service.wire import chunk_frame, store_options

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PrefixStore"].full_name


def _status(e: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an error leaves as (unexpected ones are logged with a request id)."""
    if isinstance(e, StoreError):
        return e.status, str(e)
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e)
    if is_transient(e):  # a Redis error the store did not wrap: still "retry", never INTERNAL
        return grpc.StatusCode.UNAVAILABLE, str(unavailable(e))
    request_id = uuid.uuid4().hex[:12]
    log.exception("PrefixStore.%s failed (request %s)", method, request_id)
    return grpc.StatusCode.INTERNAL, f"internal error (request {request_id})"


@contextlib.asynccontextmanager
async def _call(servicer: PrefixStoreServicer, context: grpc.aio.ServicerContext, method: str):
    """Every call: its tenant from the credentials, its metrics, and errors as statuses, never tracebacks."""
    start = time.perf_counter()

    def record(code: grpc.StatusCode) -> None:  # before the status leaves, so a scrape after a reply sees it
        servicer.metrics.requests.labels(method, code.name).inc()
        servicer.metrics.seconds.labels(method).observe(time.perf_counter() - start)

    try:
        yield servicer.auth.tenant(dict(context.invocation_metadata()))
    except asyncio.CancelledError:
        record(grpc.StatusCode.CANCELLED)  # the client went away
        raise
    except Exception as e:  # noqa: BLE001
        code, message = _status(e, method)
        record(code)
        await context.abort(code, message)
    else:
        record(grpc.StatusCode.OK)


def _unary(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        async with _call(self, context, fn.__name__) as tenant:
            return await fn(self, request, context, tenant)
    return wrapper


def _streaming(fn):
    @functools.wraps(fn)
    async def wrapper(self, request, context):
        async with _call(self, context, fn.__name__) as tenant:
            async for item in fn(self, request, context, tenant):
                yield item
    return wrapper


class PrefixStoreServicer(pb_grpc.PrefixStoreServicer):
    def __init__(self, store: MeteredStore, config: StoreConfig, auth: Auth, metrics: StoreMetrics):
        self.store = store
        self.config = config
        self.auth = auth
        self.metrics = metrics

    @_unary
    async def Put(self, requests, context, tenant):
        header, parts, size = None, [], 0
        async for req in requests:
            if req.HasField("header"):
                if header is not None:
                    raise InvalidArgument("Put stream has two headers")
                header = req.header
                if header.total_bytes > self.config.max_entry_bytes:  # refuse before receiving it
                    raise QuotaExceeded(f"total_bytes {header.total_bytes} exceeds the store's limit "
                                        f"{self.config.max_entry_bytes}")
            else:
                if header is None:
                    raise InvalidArgument("Put stream must start with a header")
                size += len(req.chunk)
                if size > header.total_bytes:
                    raise InvalidArgument("Put stream sent more bytes than its header's total_bytes")
                parts.append(req.chunk)
        if header is None or size != header.total_bytes:
            raise InvalidArgument(f"Put stream ended after {size} of {header.total_bytes if header else '?'} bytes")
        self.metrics.bytes_in.inc(size)
        manifest, existed = await self.store.put(key_from_proto(header.key, tenant), list(header.context_ids),
                                                 b"".join(parts), header.ttl_s or None,
                                                 expected_sha256=header.sha256 or None)
        return pb.PutResponse(manifest=manifest.to_proto(pb), existed=existed)

    @_streaming
    async def Fetch(self, request, context, tenant):
        """Replies are serialized ``FetchResponse`` messages (see ``add_to_server``)."""
        manifest, chunks = await self.store.stream(request.cache_id, tenant=tenant)
        yield pb.FetchResponse(manifest=manifest.to_proto(pb)).SerializeToString()
        async for chunk in chunks:
            self.metrics.bytes_out.inc(len(chunk))
            yield chunk_frame(chunk)

    @_unary
    async def Stat(self, request, context, tenant):
        manifest = await self.store.stat(request.cache_id, tenant=tenant, touch=request.touch)
        return pb.StatResponse(manifest=manifest.to_proto(pb))

    @_unary
    async def Lookup(self, request, context, tenant):
        if not request.token_ids:
            raise InvalidArgument("token_ids is empty")
        manifest, matched = await self.store.lookup(key_from_proto(request.key, tenant), list(request.token_ids),
                                                    request.longest_prefix)
        return pb.LookupResponse(found=True, cache_id=manifest.cache_id, matched_tokens=matched,
                                 manifest=manifest.to_proto(pb))

    @_unary
    async def Grant(self, request, context, tenant):
        manifest, names = await self.store.grant(request.cache_id, tenant=tenant)
        return pb.GrantResponse(manifest=manifest.to_proto(pb), chunk_keys=names)

    @_unary
    async def Delete(self, request, context, tenant):
        return pb.DeleteResponse(deleted=await self.store.delete(request.cache_id, tenant=tenant))


async def _watch_redis(store: RedisStore, health_servicer, metrics: StoreMetrics, period_s: float = 2.0) -> None:
    """Health follows Redis: NOT_SERVING while it is unreachable (readiness probes drain the pod)."""
    while True:
        try:
            await store.redis.ping()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        metrics.redis_up.set(status == health_pb2.HealthCheckResponse.SERVING)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)
        await asyncio.sleep(period_s)


async def _watch_usage(store: RedisStore, metrics: StoreMetrics) -> None:
    """Every tenant's stored bytes, reconciled with what Redis holds (entries evicted or expired stop
    counting toward its quota here too, not only when a Put needs the room), as a metric."""
    while True:
        try:
            for raw in await store.redis.smembers(store.keys.tenants()):
                tenant = raw.decode()
                metrics.tenant_bytes.labels(tenant).set(await store.reconcile(tenant))
        except Exception as e:  # noqa: BLE001 - next period (Redis down shows in redis_up and health)
            log.warning("reconciling tenants' usage failed (%s: %s)", type(e).__name__, e)
        await asyncio.sleep(store.config.usage_refresh_s)


class _Handlers:
    """Catches the generated registration's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def add_to_server(servicer: PrefixStoreServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that Fetch's replies leave as the servicer serialized
    them (``wire.chunk_frame``): the wire format is the proto's, the per-MiB copies are gone."""
    caught = _Handlers()
    pb_grpc.add_PrefixStoreServicer_to_server(servicer, caught)
    handlers = {**caught.handlers, "Fetch": caught.handlers["Fetch"]._replace(response_serializer=None)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


@dataclass(eq=False)
class StoreServer:
    """A running store server (``start_server``): its port, and ``stop`` for all it started."""

    port: int
    store: RedisStore
    _server: grpc.aio.Server
    _probe: grpc.aio.Server | None  # the plaintext health port, if any
    _watchers: tuple[asyncio.Task, ...]  # health and usage; held here so they live as long as the server

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (calls in flight get ``grace`` seconds), then the health port, the watchers
        and the Redis connections."""
        await self._server.stop(grace)
        if self._probe is not None:
            await self._probe.stop(None)
        for task in self._watchers:
            task.cancel()
        await self.store.close()


async def start_server(config: StoreConfig, address: str = "127.0.0.1:0", metrics_address: str = "",
                       health_address: str = "") -> StoreServer:
    """Start serving on ``address`` (port 0 = any free port).
    ``metrics_address`` (host:port): where Prometheus scrapes ``/metrics`` ("" = not exported).
    ``health_address``: gRPC health alone, in plaintext, for probes that cannot speak TLS (the
    kubelet's gRPC probe): it tells whether the store serves, nothing else.

    ``config.redis_url`` must be set (``serve`` starts an embedded Redis when it is not).
    """
    auth = store_auth([config.service_token, *config.auth_tokens], config.allow_unauthenticated)
    if not auth.tokens:
        log.warning("the prefix store runs WITHOUT authentication (allow_unauthenticated): development only")
    store = RedisStore(connect(config, config.redis_url), config)
    server = grpc.aio.server(options=store_options())
    metered = MeteredStore(store)
    metrics = StoreMetrics(metered.outcomes)
    if metrics_address:
        metrics.serve(metrics_address)
    add_to_server(PrefixStoreServicer(metered, config, auth, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = add_port(server, address, config.tls)
    await server.start()
    watchers = (asyncio.create_task(_watch_redis(store, health_servicer, metrics)),
                asyncio.create_task(_watch_usage(store, metrics)))
    probe = None
    if health_address:
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        probe.add_insecure_port(health_address)
        await probe.start()
    return StoreServer(port, store, server, probe, watchers)


async def serve(config: StoreConfig, address: str, metrics_address: str = "", health_address: str = "") -> None:
    embedded = None
    if config.redis_cluster and not config.redis_url:
        raise SystemExit("redis_cluster is set but REDIS_URL is not: name a node of the Redis Cluster")
    if not config.redis_url:
        embedded = EmbeddedRedis().start()
        config = StoreConfig(**{**config.__dict__, "redis_url": embedded.url})
        log.info("no REDIS_URL: started an embedded redis-server at %s", embedded.safe_url)
    running = await start_server(config, address, metrics_address, health_address)
    tls = config.tls
    mode = "plaintext" if tls is None or not tls.serves else "mutual TLS" if tls.client_auth else "TLS"
    log.info("PrefixStore serving on port %d over %s (Redis %s)", running.port, mode, redacted(config.redis_url))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # stop cleanly: finish calls in flight (5 s), no traceback
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await running.stop(grace=5)
        if embedded:
            embedded.stop()
        log.info("PrefixStore stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the PrefixStore gRPC server.")
    parser.add_argument("--address", default="127.0.0.1:50051", help="where to listen, host:port "
                        "(0.0.0.0:50051 for other hosts; keep it behind a network policy)")
    parser.add_argument("--metrics-address", default="", help="where Prometheus scrapes /metrics, host:port "
                        "(e.g. 127.0.0.1:9102; default: not exported)")
    parser.add_argument("--health-address", default="", help="gRPC health alone, in plaintext, host:port, for "
                        "probes that cannot speak TLS (e.g. 0.0.0.0:50052 for the kubelet; default: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keep_freed_memory()  # Fetch streams chunks: reuse freed pages (service/malloc.py)
    asyncio.run(serve(StoreConfig.from_env(), args.address, args.metrics_address, args.health_address))


if __name__ == "__main__":
    main()
