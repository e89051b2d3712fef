"""Python client of the PrefixStore (used by decode workers): deadlines, and retries that are safe.

Every call is idempotent (entries are content-addressed), so UNAVAILABLE is retried up to
``retries`` times with the store's one retry policy (``retry.py``: exponential backoff with
jitter), each attempt under ``deadline_s``. ``from_config`` takes both from ``StoreConfig``.
Errors arrive as the store's exceptions (``service.store.errors``), mapped from status codes.
With ``tls`` (``StoreConfig.tls``) it verifies the store's certificate and presents its own.

With a ``direct`` reader (``StoreConfig.redis_read_url``), ``fetch`` asks the store for a read grant
and reads the chunks from Redis itself (``direct.py``), falling back to the store's Fetch when that
fails; ``read_counts()`` counts the ways: ``direct`` reads, ``fetch`` streams (after a fallback too)
and ``fallback``s (direct reads that failed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
from kvcompose.v1 import store_pb2 as pb
from kvcompose.v1 import store_pb2_grpc as pb_grpc

from service.cache.ids import CacheKey
from service.config import StoreConfig
from service.store.checksum import read_check
from service.store.direct import DirectReader, DirectReadFailed
from service.store.errors import BY_STATUS, DataLoss, StoreError, Unavailable, Unimplemented
from service.store.manifest import Manifest, key_to_proto
from service.store.retry import retry_policy
from service.tls import TLSFiles, channel
from service.wire import chunk_frame, store_options

T = TypeVar("T")
log = logging.getLogger(__name__)
UPLOAD_CHUNK_BYTES = 1 << 20


class PrefixStoreClient:
    """The PrefixStore over gRPC, blocking, with the wire's own types (``pb.Manifest``). Calls take the
    cache id, and ``tenant=`` (keyword only) where the client's token serves several tenants.
    Errors are the store's exceptions (``errors.py``), after the retry policy (``retry.py``).
    ``AsyncPrefixStoreClient`` is the same client as an ``interface.PrefixStore``."""

    def __init__(self, target: str, token: str | None = None, tenant: str | None = None,
                 deadline_s: float = StoreConfig.client_deadline_s,
                 retries: int = StoreConfig.client_retries, tls: TLSFiles | None = None,
                 direct: DirectReader | None = None):
        self.target = target
        self.direct = direct
        self._reads = {"direct": 0, "fetch": 0, "fallback": 0}
        self._reads_lock = threading.Lock()  # fetches run on several threads (asyncio.to_thread)
        self.channel = channel(target, tls, store_options())
        self.stub = pb_grpc.PrefixStoreStub(self.channel)
        # Put with requests serialized here: chunks are framed by hand (``wire.chunk_frame``)
        self._put = self.channel.stream_unary("/kvcompose.v1.PrefixStore/Put", request_serializer=None,
                                              response_deserializer=pb.PutResponse.FromString)
        self.token = token
        self.tenant = tenant
        self.deadline_s = deadline_s
        self.retry = retry_policy(retries, (Unavailable,))

    def close(self) -> None:
        self.channel.close()
        if self.direct is not None:
            self.direct.close()

    def __enter__(self) -> PrefixStoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_config(cls, target: str, config: StoreConfig, tenant: str | None = None) -> PrefixStoreClient:
        """A client with ``config``'s service token, deadline, retries, TLS and read grants."""
        direct = DirectReader(config.redis_read_url, config.redis_cluster, config.redis_timeout_s) \
            if config.redis_read_url else None
        return cls(target, token=config.service_token or None, tenant=tenant, deadline_s=config.client_deadline_s,
                   retries=config.client_retries, tls=config.tls, direct=direct)

    def _call(self, attempt: Callable[[], T]) -> T:
        def once() -> T:
            try:
                return attempt()
            except grpc.RpcError as e:
                raise _store_error(e) from None

        return self.retry.call_with_retry(once, lambda _: None)

    def _kw(self, tenant: str | None) -> dict:
        """Deadline and credentials; ``tenant`` (per call) overrides the client's (service tokens)."""
        tenant = tenant or self.tenant
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        if tenant:
            metadata.append(("x-tenant", tenant))
        return {"timeout": self.deadline_s, "metadata": tuple(metadata)}

    def put(self, key: CacheKey, context_ids: Sequence[int], data: bytes, ttl_s: int = 0, *,
            tenant: str | None = None) -> tuple[pb.Manifest, bool]:
        """Upload cache bytes; returns (manifest, existed)."""
        header = pb.PutHeader(key=key_to_proto(key, pb), context_ids=list(context_ids), total_bytes=len(data),
                              sha256=hashlib.sha256(data).digest(), ttl_s=ttl_s)

        def requests() -> Iterator[bytes]:
            yield pb.PutRequest(header=header).SerializeToString()
            view = memoryview(data)
            for start in range(0, len(data), UPLOAD_CHUNK_BYTES):
                yield chunk_frame(view[start : start + UPLOAD_CHUNK_BYTES])

        reply = self._call(lambda: self._put(requests(), **self._kw(tenant)))
        return reply.manifest, reply.existed

    def fetch(self, cache_id: str, *, tenant: str | None = None) -> tuple[pb.Manifest, bytes]:
        """The cache bytes, verified, or an exception; never partial bytes."""
        manifest, chunks = self.fetch_chunks(cache_id, tenant=tenant)
        return manifest, b"".join(chunks)

    def fetch_chunks(self, cache_id: str, *, tenant: str | None = None) -> tuple[pb.Manifest, list[bytes]]:
        """The cache bytes as the chunks they are stored in (no copy into one buffer), verified
        against the manifest's read checksum (``checksum.py``): read directly after a grant when
        this client has a reader, else (or when that fails) streamed by the store's Fetch."""
        if self.direct is not None and self.direct.usable():
            try:
                m, names = self.grant(cache_id, tenant=tenant)
                chunks = self.direct.read(names, m.total_bytes, m.xxh3_128, m.sha256)
                self._count("direct")
                return m, chunks
            except (DirectReadFailed, Unimplemented) as e:
                log.warning("reading cache %s directly failed (%s); fetching it through the store", cache_id, e)
                self._count("fallback")
        result = self._call(lambda: self._fetch_stream(cache_id, tenant))
        self._count("fetch")
        return result

    def _count(self, path: str) -> None:
        with self._reads_lock:
            self._reads[path] += 1

    def read_counts(self) -> dict[str, int]:
        """How many caches this client read each way so far (a copy): direct, fetch, fallback."""
        with self._reads_lock:
            return dict(self._reads)

    def grant(self, cache_id: str, *, tenant: str | None = None) -> tuple[pb.Manifest, list[str]]:
        """A read grant: (manifest, chunk key names) of the tenant's live entry (raises NotFound)."""
        reply = self._call(lambda: self.stub.Grant(pb.GrantRequest(cache_id=cache_id), **self._kw(tenant)))
        return reply.manifest, list(reply.chunk_keys)

    def _fetch_stream(self, cache_id: str, tenant: str | None) -> tuple[pb.Manifest, list[bytes]]:
        stream = self.stub.Fetch(pb.FetchRequest(cache_id=cache_id), **self._kw(tenant))
        manifest, parts, digest, expected, size = None, [], None, b"", 0
        for msg in stream:
            if msg.HasField("manifest"):
                manifest = msg.manifest
                digest, expected = read_check(manifest.xxh3_128, manifest.sha256)
            elif digest is not None:
                parts.append(msg.chunk)
                digest.update(msg.chunk)
                size += len(msg.chunk)
        if manifest is None or size != manifest.total_bytes or digest.digest() != expected:
            raise DataLoss(f"cache {cache_id} arrived damaged")
        return manifest, parts

    def stat(self, cache_id: str, *, tenant: str | None = None, touch: bool = False) -> pb.Manifest:
        """The live entry's manifest (raises NotFound); ``touch`` refreshes its TTL as a hit does."""
        request = pb.StatRequest(cache_id=cache_id, touch=touch)
        return self._call(lambda: self.stub.Stat(request, **self._kw(tenant))).manifest

    def lookup(self, key: CacheKey, token_ids: Sequence[int], longest_prefix: bool = False,
               *, tenant: str | None = None) -> tuple[pb.Manifest, int]:
        """(manifest, matched tokens); raises NotFound."""
        reply = self._call(lambda: self.stub.Lookup(
            pb.LookupRequest(key=key_to_proto(key, pb), token_ids=list(token_ids), longest_prefix=longest_prefix),
            **self._kw(tenant)))
        return reply.manifest, reply.matched_tokens

    def delete(self, cache_id: str, *, tenant: str | None = None) -> bool:
        return self._call(lambda: self.stub.Delete(pb.DeleteRequest(cache_id=cache_id), **self._kw(tenant))).deleted


class AsyncPrefixStoreClient:
    """``interface.PrefixStore`` over gRPC: a ``PrefixStoreClient``'s calls on worker threads (they
    block on the network and on hashing, which frees the GIL), with the store's own ``Manifest``."""

    def __init__(self, client: PrefixStoreClient):
        self.client = client

    def close(self) -> None:
        self.client.close()

    def read_counts(self) -> dict[str, int]:
        """``PrefixStoreClient.read_counts``."""
        return self.client.read_counts()

    async def put(self, key: CacheKey, context_ids: Sequence[int], data: bytes,
                  ttl_s: int | None = None) -> tuple[Manifest, bool]:
        m, existed = await asyncio.to_thread(self.client.put, key, context_ids, data, ttl_s or 0, tenant=key.tenant)
        return Manifest.from_proto(m, key.tenant), existed

    async def fetch(self, cache_id: str, *, tenant: str) -> tuple[Manifest, list[bytes]]:
        m, chunks = await asyncio.to_thread(self.client.fetch_chunks, cache_id, tenant=tenant)
        return Manifest.from_proto(m, tenant), chunks

    async def stat(self, cache_id: str, *, tenant: str, touch: bool = False) -> Manifest:
        m = await asyncio.to_thread(self.client.stat, cache_id, tenant=tenant, touch=touch)
        return Manifest.from_proto(m, tenant)

    async def lookup(self, key: CacheKey, token_ids: Sequence[int],
                     longest_prefix: bool = False) -> tuple[Manifest, int]:
        m, matched = await asyncio.to_thread(self.client.lookup, key, token_ids, longest_prefix, tenant=key.tenant)
        return Manifest.from_proto(m, key.tenant), matched

    async def delete(self, cache_id: str, *, tenant: str) -> bool:
        return await asyncio.to_thread(self.client.delete, cache_id, tenant=tenant)


def _store_error(e: grpc.RpcError) -> StoreError:
    """The store's exception for a failed call's status."""
    return BY_STATUS.get(e.code(), StoreError)(e.details() or str(e.code()))
