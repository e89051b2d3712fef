"""A thin Python client of the public KVCompose gRPC API (CLI ``remote`` commands, tests, examples).

Retries are gRPC's own (a service config ``retryPolicy``): a call that ends UNAVAILABLE before any
reply arrived (the proxy or a replica restarting, the store briefly away) is tried again, up to 5
attempts with jittered exponential backoff. Every API call is safe to repeat: Compress is
content-addressed, Generate is retried only before its stream has produced anything, Stat and
Delete are idempotent. Other codes (a refusal, RESOURCE_EXHAUSTED, a deadline) are never retried.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from kvcompose.v1 import api_pb2 as api
from kvcompose.v1 import api_pb2_grpc as api_grpc
from kvcompose.v1 import store_pb2 as store_pb

from service.tls import TLSFiles, channel
from service.wire import api_client_options

APPLICATION = "kvcompose"  # Serve's gRPC proxy routes by this metadata when several apps run
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.25s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{"service": "kvcompose.v1.KVCompose"}],
                                               "retryPolicy": RETRY_POLICY}]})


class KVComposeClient:
    def __init__(self, address: str, token: str | None = None, tenant: str | None = None,
                 timeout_s: float = 900.0, tls: TLSFiles | None = None, retries: bool = True):
        """tls: verify the service (its CA) and, for mutual TLS, present a certificate.
        retries: gRPC's retry policy above (False: every call is tried once)."""
        options = api_client_options() + [("grpc.enable_retries", int(retries))]
        if retries:
            options.append(("grpc.service_config", SERVICE_CONFIG))
        self.channel = channel(address, tls, options)
        self.stub = api_grpc.KVComposeStub(self.channel)
        metadata = [("application", APPLICATION)]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        if tenant:
            metadata.append(("x-tenant", tenant))
        self.kw = {"metadata": tuple(metadata), "timeout": timeout_s}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> KVComposeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def compress_request(context: str | Sequence[int], press: dict | None = None, codec: str = "",
                         task_prompts: Sequence[str] = (), ttl_s: int = 0) -> api.CompressRequest:
        req = api.CompressRequest(press_json=json.dumps(press) if press is not None else "", codec=codec,
                                  task_prompts=list(task_prompts), ttl_s=ttl_s)
        if isinstance(context, str):
            req.text = context
        else:
            req.token_ids.ids.extend(context)
        return req

    def compress(self, context: str | Sequence[int], press: dict | None = None, codec: str = "",
                 task_prompts: Sequence[str] = (), ttl_s: int = 0) -> api.CompressResponse:
        return self.stub.Compress(self.compress_request(context, press, codec, task_prompts, ttl_s), **self.kw)

    def generate(self, question: str, cache_id: str | None = None, context: api.CompressRequest | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> Iterator[api.GenerateResponse]:
        req = api.GenerateRequest(question=question, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, stop=list(stop))
        if seed is not None:
            req.seed = seed
        if cache_id:
            req.cache_id = cache_id
        elif context is not None:
            req.context.CopyFrom(context)
        return self.stub.Generate(req, **self.kw)

    def ask(self, question: str, **kwargs) -> tuple[str, api.GenerateStats]:
        text, stats = [], None
        for msg in self.generate(question, **kwargs):
            text.append(msg.text)
            if msg.HasField("stats"):
                stats = msg.stats
        return "".join(text), stats

    def list_models(self) -> api.ListModelsResponse:
        return self.stub.ListModels(api.ListModelsRequest(), **self.kw)

    def stat(self, cache_id: str) -> store_pb.StatResponse:
        return self.stub.Stat(store_pb.StatRequest(cache_id=cache_id), **self.kw)

    def delete(self, cache_id: str) -> bool:
        return self.stub.Delete(store_pb.DeleteRequest(cache_id=cache_id), **self.kw).deleted
