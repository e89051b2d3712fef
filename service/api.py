"""The public gRPC API's messages <-> engine arguments, and exceptions -> status codes.

Shared by the Ray Serve ingress and the standalone decode worker, so both answer alike.
"""

from __future__ import annotations

import json
import logging
import uuid

import grpc
from kvcompose.v1 import api_pb2 as api

from service.answerer import AnswerStats
from service.compressor import CompressResult
from service.decode import Sampling
from service.presses import PressSpecError
from service.store.errors import StoreError

log = logging.getLogger(__name__)
MAX_NEW_TOKENS_LIMIT = 4096


class ApiError(Exception):
    """An error with the status code the client gets."""

    def __init__(self, status: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # Ray ships exceptions between processes
        return ApiError, (self.status, str(self))


def to_status(e: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """Exception -> (status, message). Unknown errors are logged with the request id, never sent."""
    cause = getattr(e, "cause", None) or e  # Ray wraps remote exceptions (RayTaskError.cause)
    if isinstance(cause, ApiError):
        return cause.status, str(cause)
    if isinstance(cause, StoreError):
        return cause.status, str(cause)
    if isinstance(cause, (PressSpecError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    log.error("request %s failed", request_id, exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error (request {request_id}); the server logged the details"


def error_dict(e: BaseException) -> dict:
    """A picklable error for crossing deployment boundaries."""
    request_id = uuid.uuid4().hex[:12]
    status, message = to_status(e, request_id)
    return {"error": {"status": status.name, "message": message}}


def raise_error(d: dict) -> None:
    if "error" in d:
        status = grpc.StatusCode[d["error"]["status"]]
        raise ApiError(status, d["error"]["message"])


def compress_args(req: api.CompressRequest, served_model: str) -> dict:
    """Validated keyword arguments for ``CacheCompressor.compress`` (tenant excluded)."""
    if req.model and req.model != served_model:
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"model {req.model!r} is not served here; ListModels shows "
                                                  f"{served_model!r}")
    which = req.WhichOneof("context")
    if which is None:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "context: send text or token_ids")
    context = req.text if which == "text" else list(req.token_ids.ids)
    press = None
    if req.press_json:
        try:
            press = json.loads(req.press_json)
        except ValueError as e:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"press_json is not valid JSON: {e}") from None
    if req.ttl_s < 0:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "ttl_s must be >= 0")
    return {"context": context, "press": press, "codec_name": req.codec or None,
            "task_prompts": list(req.task_prompts) or None, "ttl_s": req.ttl_s or None}


def compress_response(r: CompressResult) -> api.CompressResponse:
    return api.CompressResponse(
        cache_id=r.cache_id, original_tokens=r.original_tokens, kept_tokens_per_layer=r.layer_slots,
        kept_fraction=r.kept_fraction, stored_bytes=r.stored_bytes, uncompressed_bytes=r.uncompressed_bytes,
        reused=r.reused, seconds=r.seconds, model=r.model, press_json=json.dumps(r.press, sort_keys=True),
        codec=r.codec)


def sampling_args(req: api.GenerateRequest) -> tuple[Sampling, tuple[str, ...]]:
    if not req.question.strip():
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "question is empty")
    max_new = req.max_new_tokens or 64
    if max_new > MAX_NEW_TOKENS_LIMIT:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be <= {MAX_NEW_TOKENS_LIMIT}")
    try:
        sampling = Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p or 1.0,
                            seed=req.seed if req.HasField("seed") else None)
    except ValueError as e:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return sampling, tuple(s for s in req.stop if s)


def stats_message(s: AnswerStats, cache_hit: bool, compressed: CompressResult | None) -> api.GenerateStats:
    return api.GenerateStats(
        cache_id=s.cache_id, cache_hit=cache_hit, cache_source=s.cache_source,
        time_to_first_token_s=s.time_to_first_token_s, new_tokens=s.new_tokens, seconds=s.seconds,
        compressed=compress_response(compressed) if compressed else None)


__all__ = ["ApiError", "compress_args", "compress_response", "error_dict", "raise_error",
           "sampling_args", "stats_message", "to_status"]
