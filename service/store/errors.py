"""Store errors; each maps to one gRPC status code (``status``), used by the server and the client."""

from __future__ import annotations

import grpc


class StoreError(Exception):
    status = grpc.StatusCode.INTERNAL


class NotFound(StoreError):
    status = grpc.StatusCode.NOT_FOUND


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


BY_STATUS = {cls.status: cls for cls in (NotFound, InvalidArgument, DataLoss, Unavailable, QuotaExceeded,
                                         Unauthenticated, PermissionDenied)}
