"""A standalone decode worker, outside Ray: serves ``KVCompose.Generate`` for cache ids by fetching
compact caches from the prefix store over gRPC. Any node that reaches the store can reuse them.

    python -m workers.decode --store HOST:PORT [--address 127.0.0.1:9100] [--config serve_config.yaml]

It reads the same Serve config as the Ray deployment (engine settings, API tokens, request
limits) and answers through the same ``Frontend``, so it authenticates exactly as the Ingress
does: API tokens from the config's ``auth_tokens`` or ``KVCOMPOSE_API_AUTH_TOKENS``. The store token
comes from ``KVCOMPOSE_STORE_SERVICE_TOKEN`` (or ``--store-token``).

TLS: ``--tls-cert-file``/``--tls-key-file`` make it serve TLS only (``--tls-ca-file`` with
``--tls-client-auth``: clients must present a certificate signed by that CA). Its hop to the store
follows the store settings (``KVCOMPOSE_STORE_TLS_*``, see ``StoreConfig``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import api_pb2_grpc as api_grpc

from service.config import BatchLimits, EngineConfig, RequestLimits, StoreConfig, TenantLimits, api_auth_tokens
from service.engine.engine import Engine
from service.serve import messages
from service.serve.admission import admission_for
from service.serve.answerer import Answerer
from service.serve.frontend import Frontend
from service.store.auth import Auth
from service.store.client import AsyncPrefixStoreClient, PrefixStoreClient
from service.tls import TLSFiles, add_port
from service.wire import api_server_options

log = logging.getLogger("workers.decode")


class DecodeWorker(api_grpc.KVComposeServicer):
    def __init__(self, answerer: Answerer, frontend: Frontend):
        self.answerer = answerer
        self.frontend = frontend

    async def Generate(self, request: api.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            async for message in self.frontend.generate(request, context, self.answerer.answer):
                yield message
        except messages.ApiError as e:
            await context.abort(e.status, str(e), e.trailing_metadata())

    async def ListModels(self, request, context):
        async def handler(tenant: str) -> api.ListModelsResponse:
            return messages.list_models_response(self.answerer.engine.info())

        try:
            return await self.frontend.call("ListModels", context, handler)
        except messages.ApiError as e:
            await context.abort(e.status, str(e), e.trailing_metadata())


async def serve(store: str, address: str, config_path: Path, store_token: str | None,
                tls: TLSFiles | None = None) -> None:
    from service.serve.app import AppArgs
    from service.serve.launch import app_args, load_config

    args: AppArgs = app_args(load_config(config_path))
    limits = RequestLimits(**args.limits)
    engine = Engine(EngineConfig.from_env(**args.engine))
    store_config = StoreConfig.from_env(**{**args.store, "service_token": store_token})  # None: from the env
    answerer = Answerer(engine, AsyncPrefixStoreClient(PrefixStoreClient.from_config(store, store_config)),
                        args.decode_lru_bytes,
                        batch=BatchLimits(**args.decode_batch))
    tenant_limits = TenantLimits(**args.tenant_limits)
    worker = DecodeWorker(answerer, Frontend(Auth(api_auth_tokens(args.auth_tokens)), limits,
                                             allow_unauthenticated=args.allow_unauthenticated,
                                             tenant_limits=tenant_limits,
                                             admission=admission_for(tenant_limits, store_config)))
    server = grpc.aio.server(options=api_server_options(limits.max_request_bytes))
    api_grpc.add_KVComposeServicer_to_server(worker, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    service_name = api.DESCRIPTOR.services_by_name["KVCompose"].full_name
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    add_port(server, address, tls)
    await server.start()
    log.info("decode worker serving on %s over %s, fetching from the store at %s", address,
             "TLS" if tls is not None and tls.serves else "plaintext", store)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    from service.serve.launch import CONFIG

    parser = argparse.ArgumentParser(description="Standalone decode worker (KVCompose.Generate by cache id).")
    parser.add_argument("--store", required=True, help="PrefixStore address, host:port")
    parser.add_argument("--address", default="127.0.0.1:9100", help="where to listen, host:port")
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="the Serve config whose app args (engine, auth_tokens, limits) this worker follows")
    parser.add_argument("--store-token", help="this worker's service token at the store "
                                              "(default: KVCOMPOSE_STORE_SERVICE_TOKEN)")
    parser.add_argument("--tls-cert-file", default="", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--tls-key-file", default="", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-ca-file", default="", help="CA of client certificates (with --tls-client-auth)")
    parser.add_argument("--tls-client-auth", action="store_true", help="require client certificates (mutual TLS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        tls = TLSFiles(args.tls_cert_file, args.tls_key_file, args.tls_ca_file, args.tls_client_auth)
    except ValueError as e:
        parser.error(str(e))
    asyncio.run(serve(args.store, args.address, args.config, args.store_token, tls))


if __name__ == "__main__":
    main()
