"""The Python client of KVCompose Serve's public gRPC API: what ``kvcompose remote`` uses, with the
same defaults (answers up to ``service.protocol.DEFAULT_MAX_NEW_TOKENS`` tokens, greedy).

    from service.client import KVComposeClient

    with KVComposeClient("127.0.0.1:9000", token=open(token_file).read().strip()) as client:
        cache_id = client.compress(open("doc.txt").read(), {"press": "kvcompose", "compression_ratio": 0.5}).cache_id
        text, stats = client.ask("What does the document say?", cache_id=cache_id)
        print(client.stat(cache_id).manifest.total_bytes, client.list_models().models[0].id)
        client.delete(cache_id)

Errors are ``grpc.RpcError`` with the API's status codes (docs/api.md). A local ``make serve``
writes its token to ``~/.cache/kvcompose/instances/api-<port>/api-token`` (``service.serve.instance``).

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

from service.protocol import DEFAULT_MAX_NEW_TOKENS
from service.tls import TLSFiles, channel
from service.wire import api_client_options

APPLICATION = "kvcompose"  # Serve's gRPC proxy routes by this metadata when several apps run
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.25s", "maxBackoff": "2s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{"service": "kvcompose.v1.KVCompose"}],
                                               "retryPolicy": RETRY_POLICY}]})


class KVComposeClient:
    """One channel to the service; every call sends the token (``authorization: Bearer``), the
    tenant (``x-tenant``, for a service in development mode) and the ``application`` metadata.
    A context manager: ``close()`` at the end."""

    def __init__(self, address: str, token: str | None = None, tenant: str | None = None,
                 timeout_s: float = 900.0, tls: TLSFiles | None = None, retries: bool = True):
        """address: host:port of the API (``make serve``: 127.0.0.1:9000). token: the API bearer token.
        tenant: for a service without tokens (development mode). timeout_s: each call's deadline.
        tls: verify the service (its CA) and, for mutual TLS, present a certificate.
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
        """The request ``compress`` sends, also ``generate``'s ``context`` (compressed first unless stored).
        context: text (chat-templated by the service) or token ids; press: a spec (None: the model's
        default); codec "": the service's; task_prompts: expected questions (task-aware KVCompose);
        ttl_s 0: the store's default lifetime."""
        req = api.CompressRequest(press_json=json.dumps(press) if press is not None else "", codec=codec,
                                  task_prompts=list(task_prompts), ttl_s=ttl_s)
        if isinstance(context, str):
            req.text = context
        else:
            req.token_ids.ids.extend(context)
        return req

    def compress(self, context: str | Sequence[int], press: dict | None = None, codec: str = "",
                 task_prompts: Sequence[str] = (), ttl_s: int = 0) -> api.CompressResponse:
        """Store ``context``'s compressed cache (or find it stored: ``reused``); its ``cache_id`` names it."""
        return self.stub.Compress(self.compress_request(context, press, codec, task_prompts, ttl_s), **self.kw)

    def generate(self, question: str, cache_id: str | None = None, context: api.CompressRequest | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = (), repetition_penalty: float | None = None,
                 frequency_penalty: float | None = None, presence_penalty: float | None = None,
                 ) -> Iterator[api.GenerateResponse]:
        """Stream an answer; the last message carries the stats. Unset (None) settings take the
        model's defaults (``ListModels``' ``sampling_defaults_json``)."""
        req = api.GenerateRequest(question=question, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, stop=list(stop), seed=seed, repetition_penalty=repetition_penalty,
                                  frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        if cache_id:
            req.cache_id = cache_id
        elif context is not None:
            req.context.CopyFrom(context)
        return self.stub.Generate(req, **self.kw)

    def ask(self, question: str, **kwargs) -> tuple[str, api.GenerateStats]:
        """``generate`` collected: (the whole answer, its statistics)."""
        text, stats = [], None
        for msg in self.generate(question, **kwargs):
            text.append(msg.text)
            if msg.HasField("stats"):
                stats = msg.stats
        return "".join(text), stats

    def list_models(self) -> api.ListModelsResponse:
        """The served model: id, revision, layers, context limit, default press and codec."""
        return self.stub.ListModels(api.ListModelsRequest(), **self.kw)

    def stat(self, cache_id: str) -> store_pb.StatResponse:
        """A stored cache's manifest (NOT_FOUND if this tenant has none by that id)."""
        return self.stub.Stat(store_pb.StatRequest(cache_id=cache_id), **self.kw)

    def delete(self, cache_id: str) -> bool:
        """Delete a stored cache; False if there was none."""
        return self.stub.Delete(store_pb.DeleteRequest(cache_id=cache_id), **self.kw).deleted
