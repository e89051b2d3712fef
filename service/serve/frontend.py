"""What every process that serves the public API does around a call, in one place: authenticate,
validate against the limits, count, log, and turn any failure into one status code.

Used by the Ray Serve ``Ingress`` and the standalone ``workers/decode.py``, so both authenticate
and answer alike. A handler raises ``ApiError``; each transport sends it its own way (Serve's
proxy: set the code and raise; a plain grpc.aio server: ``context.abort``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from kvcompose.v1 import api_pb2 as api

from service.config import RequestLimits, TenantLimits
from service.protocol import Piece
from service.serve import messages
from service.serve.admission import Admission
from service.store.auth import Auth
from service.store.keys import CACHE_ID

log = logging.getLogger("ray.serve")

# (tenant, cache id, question, sampling, stop strings) -> answer text pieces, then AnswerStats
AnswerFn = Callable[..., AsyncIterator]
# (tenant, validated compress kwargs) -> CompressResult
CompressFn = Callable[[str, dict], object]


@dataclass
class Frontend:
    """auth: API bearer tokens; limits: request limits; metrics: a ``ServiceMetrics`` (None outside Ray).
    allow_unauthenticated: with no tokens, serve anyway in development mode (tenant from ``x-tenant``);
    otherwise no tokens is a configuration error. tenant_limits: each tenant's share (``admission``);
    admission: how they are enforced (``admission.admission_for``; None: in this process alone)."""

    auth: Auth
    limits: RequestLimits = field(default_factory=RequestLimits)
    metrics: object | None = None
    allow_unauthenticated: bool = False
    tenant_limits: TenantLimits = field(default_factory=TenantLimits)
    admission: Admission | None = None

    def __post_init__(self) -> None:
        check_api_auth(self.auth.tokens, self.allow_unauthenticated)
        if self.admission is None:
            self.admission = Admission(self.tenant_limits)
        if not self.auth.tokens:
            log.warning("no API tokens configured: development mode, the tenant is taken from 'x-tenant' metadata")

    def tenant(self, grpc_context) -> str:
        return self.auth.tenant(dict(grpc_context.invocation_metadata()))

    async def call(self, method: str, grpc_context, handler: Callable[[str], object]):
        """Run ``await handler(tenant)`` for a unary method, within the tenant's limits (Compress
        holds a prefill); errors leave as ``ApiError``."""
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            tenant = self.tenant(grpc_context)
            await self.admission.check_rate(tenant)
            if method == "Compress":
                async with self.admission.hold(tenant, "prefills"):
                    reply = await handler(tenant)
            else:
                reply = await handler(tenant)
        except Exception as e:  # noqa: BLE001 - every error leaves as a status, never a traceback
            raise self._failed(method, e, request_id) from None
        self._ok(method, request_id, started)
        return reply

    async def generate(self, request: api.GenerateRequest, grpc_context, answer: AnswerFn,
                       compress: CompressFn | None = None) -> AsyncIterator[api.GenerateResponse]:
        """Stream a Generate: text pieces, then the stats. ``compress`` None: only cache ids are
        accepted. It holds one of the tenant's decodes throughout, and a prefill while it compresses."""
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            tenant = self.tenant(grpc_context)
            await self.admission.check_rate(tenant)
            async with self.admission.hold(tenant, "decodes"):
                async for message in self._generate(request, tenant, started, answer, compress):
                    yield message
        except Exception as e:  # noqa: BLE001
            raise self._failed("Generate", e, request_id) from None
        self._ok("Generate", request_id, started)

    async def _compress_held(self, compress: CompressFn, tenant: str, context):
        async with self.admission.hold(tenant, "prefills"):
            return await compress(tenant, context)

    async def _generate(self, request: api.GenerateRequest, tenant: str, started: float, answer: AnswerFn,
                        compress: CompressFn | None) -> AsyncIterator[api.GenerateResponse]:
        sampling = messages.sampling_args(request, self.limits)
        compressed = None
        source = request.WhichOneof("source")
        if source == "context":
            if compress is None:
                raise messages.ApiError(grpc.StatusCode.INVALID_ARGUMENT, "this server answers from stored caches "
                                    "only: send cache_id (Compress first)")
            compressed = await self._compress_held(compress, tenant, request.context)
            cache_id = compressed.cache_id
        elif request.cache_id:
            if not CACHE_ID.match(request.cache_id):
                raise messages.ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                                    "cache_id must be 64 lowercase hex characters")
            cache_id = request.cache_id
        else:
            raise messages.ApiError(grpc.StatusCode.INVALID_ARGUMENT, "send cache_id or context")
        first, first_hop = None, None
        for attempt in (1, 2):
            try:
                admitted, asked = time.perf_counter() - started, time.time()
                async for item in answer(tenant, cache_id, request.question, sampling):
                    if isinstance(item, str | Piece):
                        now = time.time()
                        piece = item if isinstance(item, Piece) else Piece(item, now)  # in-process: sent now
                        if first is None:
                            first, first_hop = time.perf_counter() - started, now - piece.sent_unix
                        yield api.GenerateResponse(text=piece.text, sent_unix_s=piece.sent_unix)
                        continue
                    received = item.timings.pop("received_unix", asked)
                    item.timings.update(admission_s=admitted, to_decoder_s=max(0.0, received - asked),
                                        first_hop_s=max(0.0, first_hop or 0.0))
                    item.time_to_first_token_s = first or time.perf_counter() - started
                    item.seconds = time.perf_counter() - started
                    if self.metrics is not None:
                        self.metrics.ttft_s.observe(item.time_to_first_token_s)
                        self.metrics.decode_s.observe(item.seconds)
                    hit = compressed is None or compressed.reused
                    yield api.GenerateResponse(stats=messages.stats_message(item, hit, compressed))
                break
            except Exception as e:  # noqa: BLE001
                # Asked by text, the entry vanished between Compress and fetch (expired, deleted,
                # Redis restarted empty or evicting): compress it again, once, before anything was
                # sent. Twice gone: the client sent a document, so not NOT_FOUND but a retry later.
                if compressed is None or first is not None or not _not_found(e):
                    raise
                if attempt == 2:
                    raise messages.ApiError(grpc.StatusCode.ABORTED, "the document's cache was evicted again between "
                                        "compressing it and reading it (the store is short of memory); "
                                        "retry") from None
                compressed = await self._compress_held(compress, tenant, request.context)
                cache_id = compressed.cache_id

    def _failed(self, method: str, e: BaseException, request_id: str) -> messages.ApiError:
        status, message = messages.to_status(e, request_id)
        self._count(method, status.name)
        log.info("request=%s method=%s status=%s", request_id, method, status.name)
        cause = getattr(e, "cause", None) or e
        return messages.ApiError(status, message, getattr(cause, "retry_after_s", None))

    def _ok(self, method: str, request_id: str, started: float) -> None:
        self._count(method, "OK")
        log.info("request=%s method=%s status=OK seconds=%.3f", request_id, method, time.perf_counter() - started)

    def _count(self, method: str, status: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.inc(tags={"method": method, "status": status})


def check_api_auth(tokens: dict, allow_unauthenticated: bool) -> None:
    if not tokens and not allow_unauthenticated:
        raise ValueError("the API needs bearer tokens: set the app's auth_tokens {token: tenant} or "
                         "KVCOMPOSE_API_AUTH_TOKENS, or allow_unauthenticated: true for local development")


def _not_found(e: BaseException) -> bool:
    cause = getattr(e, "cause", None) or e
    return getattr(cause, "status", None) == grpc.StatusCode.NOT_FOUND
