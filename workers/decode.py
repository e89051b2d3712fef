"""A standalone decode worker, outside Ray: serves ``KVCompose.Generate`` for cache ids by fetching
compact caches from the prefix store over gRPC. Any node that reaches the store can reuse them.

    python -m workers.decode --store HOST:PORT [--port 9100] [--store-token T]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import api_pb2_grpc as api_grpc

from service import api as conv
from service.answerer import Answerer
from service.config import EngineConfig
from service.engine import Engine
from service.store.auth import Auth
from service.store.client import PrefixStoreClient

log = logging.getLogger("workers.decode")


class DecodeWorker(api_grpc.KVComposeServicer):
    def __init__(self, answerer: Answerer, auth: Auth):
        self.answerer = answerer
        self.auth = auth

    async def Generate(self, request: api.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id, started = uuid.uuid4().hex[:12], time.perf_counter()
        try:
            tenant = self.auth.tenant(dict(context.invocation_metadata()))
            if request.WhichOneof("source") != "cache_id":
                raise conv.ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                                    "a decode worker answers from stored caches: send cache_id (Compress first)")
            sampling, stop = conv.sampling_args(request)
            first = None
            async for item in self.answerer.answer(tenant, request.cache_id, request.question, sampling, stop):
                if isinstance(item, str):
                    first = first or time.perf_counter() - started
                    yield api.GenerateResponse(text=item)
                else:
                    item.time_to_first_token_s = first or time.perf_counter() - started
                    yield api.GenerateResponse(stats=conv.stats_message(item, True, None))
        except Exception as e:  # noqa: BLE001 - a status, never a traceback
            status, message = conv.to_status(e, request_id)
            await context.abort(status, message)

    async def ListModels(self, request, context):
        loaded, config = self.answerer.engine.loaded, self.answerer.engine.config
        return api.ListModelsResponse(models=[api.ModelInfo(
            id=loaded.model_id, revision=loaded.revision, layers=loaded.model.config.num_hidden_layers,
            max_context_tokens=config.max_context_tokens, default_codec=config.codec)])


async def serve(store: str, address: str, store_token: str | None, lru_bytes: int) -> None:
    engine = Engine(EngineConfig.from_env())
    worker = DecodeWorker(Answerer(engine, PrefixStoreClient(store, token=store_token), lru_bytes), Auth())
    server = grpc.aio.server()
    api_grpc.add_KVComposeServicer_to_server(worker, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    service_name = api.DESCRIPTOR.services_by_name["KVCompose"].full_name
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    server.add_insecure_port(address)
    await server.start()
    log.info("decode worker serving on %s, fetching from the store at %s", address, store)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Standalone decode worker (KVCompose.Generate by cache id).")
    parser.add_argument("--store", required=True, help="PrefixStore address, host:port")
    parser.add_argument("--address", default="0.0.0.0:9100")
    parser.add_argument("--store-token", help="this worker's token at the store (a service token)")
    parser.add_argument("--lru-bytes", type=int, default=256 << 20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.store, args.address, args.store_token, args.lru_bytes))


if __name__ == "__main__":
    main()
