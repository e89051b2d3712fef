"""The public gRPC API's messages <-> engine arguments, and exceptions -> status codes.

Shared by the Ray Serve ingress and the standalone decode worker, so both answer alike.
"""

from __future__ import annotations

import json
import logging
import uuid

import grpc
from kvcompose.v1 import api_pb2 as api
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from service.config import RequestLimits
from service.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    AnswerStats,
    Cancelled,
    CompressResult,
    Overloaded,
    PressSpecError,
    Sampling,
)
from service.store.errors import StoreError, is_transient, unavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with the status code the client gets; ``retry_after_s``: when a retry may succeed
    (sent as ``retry-after-ms`` trailing metadata)."""

    def __init__(self, status: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # Ray ships exceptions between processes
        return ApiError, (self.status, str(self), self.retry_after_s)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after-ms", str(round(self.retry_after_s * 1000))),) if self.retry_after_s else ()


def to_status(e: BaseException, request_id: str) -> tuple[grpc.StatusCode, str]:
    """Exception -> (status, message). Unknown errors are logged with the request id, never sent."""
    cause = getattr(e, "cause", None) or e  # Ray wraps remote exceptions (RayTaskError.cause)
    if isinstance(cause, ApiError):
        return cause.status, str(cause)
    if isinstance(cause, StoreError):
        return cause.status, str(cause)
    if isinstance(cause, (PressSpecError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(cause)
    if isinstance(cause, Cancelled):
        return grpc.StatusCode.CANCELLED, str(cause)
    if isinstance(cause, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(cause)
    if isinstance(cause, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the service is at capacity (queue full): retry shortly"
    if isinstance(e, (RayActorError, ActorUnavailableError)) or isinstance(cause, (RayActorError,
                                                                                  ActorUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, "a replica failed while serving this request; retry it"
    if is_transient(cause):  # a Redis error from the Compressor's store: "retry", never INTERNAL
        return grpc.StatusCode.UNAVAILABLE, str(unavailable(cause))
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


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_text(name: str, text: str, limit: int, limit_name: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise _invalid(f"{name} is {size} bytes; the limit is {limit} (limits.{limit_name})")


def _check_texts(name: str, texts: list[str], count: int, count_name: str, size: int, size_name: str,
                 whitespace: bool = False) -> None:
    """whitespace: a text of spaces or newlines counts (a stop string such as "\n\n")."""
    if len(texts) > count:
        raise _invalid(f"{name}: {len(texts)} given; the limit is {count} (limits.{count_name})")
    for i, text in enumerate(texts):
        if not (text if whitespace else text.strip()):
            raise _invalid(f"{name}[{i}] is empty")
        _check_text(f"{name}[{i}]", text, size, size_name)


def compress_args(req: api.CompressRequest, served_model: str, limits: RequestLimits) -> dict:
    """Validated keyword arguments for ``CacheCompressor.compress`` (tenant excluded)."""
    if req.model and req.model != served_model:
        raise ApiError(grpc.StatusCode.NOT_FOUND, f"model {req.model!r} is not served here; ListModels shows "
                                                  f"{served_model!r}")
    which = req.WhichOneof("context")
    if which is None:
        raise _invalid("context: send text or token_ids")
    if which == "text":
        if not req.text.strip():
            raise _invalid("context.text is empty (or only whitespace)")
        _check_text("context.text", req.text, limits.max_document_bytes, "max_document_bytes")
        context = req.text
    else:
        context = list(req.token_ids.ids)
        if not context:
            raise _invalid("context.token_ids is empty")
    press = None
    if req.press_json:
        try:
            press = json.loads(req.press_json)
        except ValueError as e:
            raise _invalid(f"press_json is not valid JSON: {e}") from None
    if not 0 <= req.ttl_s <= limits.max_ttl_s:
        raise _invalid(f"ttl_s must be in [0, {limits.max_ttl_s}] seconds (0 = the store's default), got {req.ttl_s}")
    _check_texts("task_prompts", list(req.task_prompts), limits.max_task_prompts, "max_task_prompts",
                 limits.max_task_prompt_bytes, "max_task_prompt_bytes")
    return {"context": context, "press": press, "codec_name": req.codec or None,
            "task_prompts": list(req.task_prompts) or None, "ttl_s": req.ttl_s or None}


def compress_response(r: CompressResult) -> api.CompressResponse:
    return api.CompressResponse(
        cache_id=r.cache_id, original_tokens=r.original_tokens, layer_slots=r.layer_slots,
        kept_tokens_per_layer=r.kept_tokens_per_layer,
        kept_fraction=r.kept_fraction, stored_bytes=r.stored_bytes, uncompressed_bytes=r.uncompressed_bytes,
        reused=r.reused, seconds=r.seconds, model=r.model, press_json=json.dumps(r.press, sort_keys=True),
        codec=r.codec)


_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")  # unset = the model's default


def sampling_args(req: api.GenerateRequest, limits: RequestLimits) -> Sampling:
    if not req.question.strip():
        raise _invalid("question is empty")
    _check_text("question", req.question, limits.max_question_bytes, "max_question_bytes")
    max_new = req.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if max_new > limits.max_new_tokens:
        raise _invalid(f"max_new_tokens must be <= {limits.max_new_tokens} (limits.max_new_tokens), got {max_new}")
    if req.temperature > limits.max_temperature:
        raise _invalid(f"temperature must be <= {limits.max_temperature} (limits.max_temperature)")
    stop = [s for s in req.stop if s]
    _check_texts("stop", stop, limits.max_stop_strings, "max_stop_strings", limits.max_stop_bytes, "max_stop_bytes",
                 whitespace=True)
    try:
        penalties = {name: getattr(req, name) for name in _PENALTIES if req.HasField(name)}
        sampling = Sampling(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p or 1.0,
                            seed=req.seed if req.HasField("seed") else None, stop=tuple(stop), **penalties)
    except ValueError as e:
        raise _invalid(str(e)) from None
    return sampling


def list_models_response(info: dict) -> api.ListModelsResponse:
    """From ``Engine.info()``."""
    return api.ListModelsResponse(models=[api.ModelInfo(
        id=info["id"], revision=info["revision"], layers=info["layers"], max_context_tokens=info["max_context_tokens"],
        default_press_json=json.dumps(info["default_press"]), default_codec=info["default_codec"],
        sampling_defaults_json=json.dumps(info.get("sampling_defaults", {}), sort_keys=True))])


def stats_message(s: AnswerStats, cache_hit: bool, compressed: CompressResult | None) -> api.GenerateStats:
    return api.GenerateStats(
        cache_id=s.cache_id, cache_hit=cache_hit, cache_source=s.cache_source,
        time_to_first_token_s=s.time_to_first_token_s, new_tokens=s.new_tokens, seconds=s.seconds,
        context_tokens=s.context_tokens, kept_fraction=s.kept_fraction, timings=s.timings,
        compressed=compress_response(compressed) if compressed else None)


__all__ = ["ApiError", "compress_args", "compress_response", "error_dict", "list_models_response", "raise_error",
           "sampling_args", "stats_message", "to_status"]
