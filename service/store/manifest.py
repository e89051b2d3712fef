"""The manifest of a stored entry (the commit marker, written last) and its proto/JSON forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from service.cache.ids import CacheKey
from service.store.checksum import Hasher, read_check


@dataclass(frozen=True)
class Manifest:
    cache_id: str
    format_version: int
    total_bytes: int
    chunk_count: int
    chunk_bytes: int
    sha256: bytes
    context_tokens: int
    key: CacheKey
    created_unix_ms: int
    ttl_s: int
    write_id: str  # names this write's chunks, so two writers never mix chunks
    layer_slots: list[int]
    uncompressed_bytes: int
    prefix_id: str = ""  # id of the context's block-aligned prefix: the longest-prefix index set it is in
    # Net of head-wise evictions (``protocol.kept_fraction``); recorded only when it differs from the
    # slots, so manifests of other presses stay as stores before this field wrote them.
    kept_tokens_per_layer: tuple[float, ...] = ()
    xxh3_128: bytes = b""  # what reads verify (``checksum.py``); empty in entries stored before it

    def kept_tokens(self) -> list[float]:
        return list(self.kept_tokens_per_layer) or [float(n) for n in self.layer_slots]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["sha256"] = self.sha256.hex()
        data["xxh3_128"] = self.xxh3_128.hex()
        if not self.kept_tokens_per_layer:
            del data["kept_tokens_per_layer"]
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # a newer store's fields are skipped
        data["sha256"] = bytes.fromhex(data["sha256"])
        data["xxh3_128"] = bytes.fromhex(data.get("xxh3_128", ""))
        # manifests written before the revision was part of the key were written at revision 2
        data["key"] = CacheKey(**{"selection_revision": 2, **data["key"]})
        data["kept_tokens_per_layer"] = tuple(data.get("kept_tokens_per_layer", ()))
        return cls(**data)

    def to_proto(self, pb):
        """As a ``kvcompose.v1.Manifest`` (``pb`` is the generated module)."""
        return pb.Manifest(
            cache_id=self.cache_id, format_version=self.format_version, total_bytes=self.total_bytes,
            chunk_count=self.chunk_count, chunk_bytes=self.chunk_bytes, sha256=self.sha256,
            context_tokens=self.context_tokens, key=key_to_proto(self.key, pb),
            created_unix_ms=self.created_unix_ms, ttl_s=self.ttl_s, layer_slots=self.layer_slots,
            uncompressed_bytes=self.uncompressed_bytes, kept_tokens_per_layer=self.kept_tokens(),
            xxh3_128=self.xxh3_128,
        )

    @classmethod
    def from_proto(cls, msg, tenant: str) -> Manifest:
        """From a ``kvcompose.v1.Manifest`` (what a client is sent; the store's own write and prefix
        ids stay inside the store)."""
        slots, kept = list(msg.layer_slots), tuple(msg.kept_tokens_per_layer)
        return cls(msg.cache_id, msg.format_version, msg.total_bytes, msg.chunk_count, msg.chunk_bytes, msg.sha256,
                   msg.context_tokens, key_from_proto(msg.key, tenant), msg.created_unix_ms, msg.ttl_s, "", slots,
                   msg.uncompressed_bytes, kept_tokens_per_layer=kept if list(kept) != slots else (),
                   xxh3_128=msg.xxh3_128)

    def read_check(self) -> tuple[Hasher, bytes]:
        return read_check(self.xxh3_128, self.sha256)


def key_to_proto(key: CacheKey, pb):
    return pb.CacheKey(model_id=key.model_id, model_revision=key.model_revision,
                       tokenizer_digest=key.tokenizer_digest,
                       press_json=json.dumps(key.press, sort_keys=True, separators=(",", ":")), codec=key.codec,
                       selection_revision=key.selection_revision)


def key_from_proto(msg, tenant: str) -> CacheKey:
    try:
        press = json.loads(msg.press_json or "{}")
    except ValueError:
        raise ValueError("key.press_json is not valid JSON") from None
    if not msg.selection_revision:
        raise ValueError("key.selection_revision is not set: send the engine's SELECTION_REVISION")
    return CacheKey(msg.model_id, msg.model_revision, msg.tokenizer_digest, press, msg.codec, tenant,
                    selection_revision=msg.selection_revision)
