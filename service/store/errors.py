"""Store errors; each maps to one gRPC status code (``status``), used by the server and the client."""

from __future__ import annotations

import grpc
import redis.exceptions as rexc


class StoreError(Exception):
    status = grpc.StatusCode.INTERNAL


class NotFound(StoreError):
    status = grpc.StatusCode.NOT_FOUND


class ChunksLost(NotFound):
    """An entry's chunks were evicted under it; the entry has been deleted (a miss)."""


class InvalidArgument(StoreError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class DataLoss(StoreError):
    """Stored bytes failed their checksum; the entry has been deleted."""

    status = grpc.StatusCode.DATA_LOSS


class Unavailable(StoreError):
    """Redis cannot be reached; retry later (the store reconnects by itself)."""

    status = grpc.StatusCode.UNAVAILABLE


class QuotaExceeded(StoreError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(StoreError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StoreError):
    status = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(StoreError):
    """The store does not have this method (an older version, e.g. mid rolling upgrade)."""

    status = grpc.StatusCode.UNIMPLEMENTED


BY_STATUS = {cls.status: cls for cls in (NotFound, InvalidArgument, DataLoss, Unavailable, QuotaExceeded,
                                         Unauthenticated, PermissionDenied, Unimplemented)}


# Not a fault of the request, and gone when retried: Redis (or a cluster slot's master) unreachable,
# a cluster mid-failover, a cluster client that cannot (re)load its slot map.
_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.ClusterError, rexc.TryAgainError, OSError)
_CLUSTER_BUGS = (rexc.CrossSlotTransactionError, rexc.InvalidPipelineStack)  # our bugs, never "retry"


def is_transient(e: BaseException) -> bool:
    """Whether ``e`` means "Redis is unreachable right now" (UNAVAILABLE: retry), on one Redis or a
    cluster. Covers redis-py's asyncio cluster client's resets during a topology refresh: it closes
    a node's connections while other commands still use them, which then fail with AttributeError
    or TypeError inside redis-py (redis/redis-py#3546, #3835) and succeed once retried."""
    if isinstance(e, _TRANSIENT):
        return True
    if isinstance(e, rexc.RedisClusterException):  # e.g. "Redis Cluster cannot be connected", slots not covered
        return not isinstance(e, _CLUSTER_BUGS) and "same key slot" not in str(e)
    if isinstance(e, (AttributeError, TypeError)):
        return _raised_in_redis_py(e)
    return False


def _raised_in_redis_py(e: BaseException) -> bool:
    """The error passed through redis-py's connection code (its innermost frames are redis-py's or
    the asyncio streams redis-py was writing to), not through the store's own code."""
    modules, tb = [], e.__traceback__
    while tb is not None:
        modules.append(tb.tb_frame.f_globals.get("__name__", "").split(".")[0])
        tb = tb.tb_next
    return bool(modules) and "redis" in modules and modules[-1] in ("redis", "asyncio")


def unavailable(e: BaseException) -> Unavailable:
    return Unavailable(f"Redis is unreachable ({type(e).__name__}); retry shortly")
