"""The API's TLS front door for the local stack: Serve's gRPC proxy binds plaintext ports only, so
``make serve TLS=1`` puts this in front of it, as a Gateway does on Kubernetes (k8s/components/tls).

It terminates TLS and forwards every call byte for byte (no message is parsed) to the proxy on
loopback, with the caller's metadata, deadline and cancellation, and returns the proxy's status,
details and trailing metadata unchanged.

It holds nothing for a stranger: a call whose metadata carries no valid API token is refused
(UNAUTHENTICATED) when its headers arrive, before any of its body is read (HTTP/2 flow control then
stops the sender), and a message over the proxy's limit is refused by gRPC itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

from service.store.auth import Auth
from service.store.errors import PermissionDenied, Unauthenticated
from service.tls import TLSFiles, add_port
from service.wire import api_client_options, api_server_options

log = logging.getLogger(__name__)
# transport headers gRPC sets itself on the forwarded call
_HOP_HEADERS = ("user-agent", "grpc-", ":", "te", "content-type")
OPEN_METHODS = ("/ray.serve.RayServeAPIService/Healthz",)  # a load balancer's probe needs no token


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, upstream: grpc.aio.Channel, auth: Auth):
        self.upstream, self.auth = upstream, auth

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        refusal = self._refusal(details)
        if refusal is not None:
            async def refuse(requests, context: grpc.aio.ServicerContext):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)  # ``requests`` never read
            return grpc.stream_stream_rpc_method_handler(refuse)
        call = self.upstream.stream_stream(details.method, request_serializer=None, response_deserializer=None)

        async def forward(requests, context: grpc.aio.ServicerContext):
            metadata = tuple((k, v) for k, v in context.invocation_metadata() if not k.startswith(_HOP_HEADERS))
            upstream = call(requests, metadata=metadata, timeout=context.time_remaining())
            try:
                async for reply in upstream:
                    yield reply
                context.set_trailing_metadata(await upstream.trailing_metadata() or ())
            except grpc.aio.AioRpcError as e:
                context.set_trailing_metadata(e.trailing_metadata() or ())
                await context.abort(e.code(), e.details() or "")

        return grpc.stream_stream_rpc_method_handler(forward)

    def _refusal(self, details: grpc.HandlerCallDetails) -> str | None:
        """Why the call is refused before its body (None: forward it). Only the credential is checked
        here; the tenant and everything else is the Ingress's to judge."""
        if not self.auth.tokens or details.method in OPEN_METHODS:
            return None
        try:
            self.auth.tenant({k: v for k, v in details.invocation_metadata or () if isinstance(v, str)})
        except Unauthenticated as e:
            return str(e)
        except PermissionDenied:  # a bad x-tenant: the Ingress says what is wrong
            pass
        return None


class TLSFront:
    """``TLSFront(tls, upstream, tokens, max_request_bytes).start(address)``: serves ``address`` over
    TLS on its own thread and event loop until ``stop()``. tokens: the API's bearer tokens (token ->
    tenant; empty: development mode, nothing checked here); max_request_bytes: the proxy's own limit."""

    def __init__(self, tls: TLSFiles, upstream: str, tokens: dict[str, str], max_request_bytes: int):
        if not tls.serves:
            raise ValueError("the TLS front door needs a certificate and key")
        self.tls, self.upstream = tls, upstream
        self.auth, self.max_request_bytes = Auth(tokens), max_request_bytes
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)

    def start(self, address: str) -> TLSFront:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(address), self._loop).result(30)
        log.info("API TLS front door on %s -> %s", address, self.upstream)
        return self

    async def _start(self, address: str) -> int:
        self._channel = grpc.aio.insecure_channel(self.upstream, options=api_client_options())
        self._server = grpc.aio.server(handlers=[_Forward(self._channel, self.auth)],
                                       options=api_server_options(self.max_request_bytes))
        port = add_port(self._server, address, self.tls)
        await self._server.start()
        return port

    def stop(self) -> None:
        async def stop():
            await self._server.stop(grace=5)
            await self._channel.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
