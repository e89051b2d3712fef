"""The cache byte format, versions 1 to 3, read without torch: framing, digest, structure and the facts the
store records (slots, kept tokens). ``codec.py`` writes and decodes the tensors.

Layout (all integers little-endian)::

    magic    8 bytes   b"KVCPRS\\r\\n"
    version  u32       FORMAT_VERSION
    hlen     u32       length of the header
    header   hlen      UTF-8 JSON: {"meta": {...}, "codec": "int8", "layers": 30, "tensors": [
                           {"name": "k.0", "dtype": "int8", "shape": [812, 96], "offset": 0, "nbytes": ...}, ...]}
    payload  ...       the tensors' raw bytes, C order, at the header's offsets
    digest   32 bytes  SHA-256 of everything before it

Version 2 adds sub-byte tensors (dtype ``uint4``: two values per byte, ``uint2``: four, low bits
first; ``shape`` is the logical shape, ``nbytes`` rounds up) for the group-wise codecs (int4, int2).
Caches of the other codecs are still written as version 1, so readers of version 1 keep reading them,
and refuse a version 2 cache by its version instead of misreading it.

Version 3 is any codec with ``+zstd``: the same tensors, each of the codec's blobs (not the eviction
masks or the kept-channel maps, which the store reads) one zstd frame where that is smaller, marked
``"coding": "zstd"``, its ``nbytes`` the frame's. Lossless: a frame must decode to exactly its
tensor's stored size.

See ``codec.py`` for the tensors of each layer and the codecs.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import zstandard

from service.config import CODECS, ENTROPY_CODING, GROUPED_CODECS, base_codec

MAGIC = b"KVCPRS\r\n"
FORMAT_VERSION = 1  # what byte-aligned codecs are written as, and what cache ids name (``ids.py``)
GROUPED_FORMAT_VERSION = 2  # sub-byte tensors: the group-wise codecs
ENTROPY_FORMAT_VERSION = 3  # "<codec>+zstd": each blob of the codec's tensors entropy-coded
READABLE_VERSIONS = (FORMAT_VERSION, GROUPED_FORMAT_VERSION, ENTROPY_FORMAT_VERSION)
ZSTD = "zstd"  # a tensor entry's "coding"
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32


@dataclass(frozen=True)
class CacheMeta:
    """What decode needs to know besides the tensors.

    original_length: context tokens before compression; question positions continue from it.
    press: canonical press spec (JSON object) that produced the cache, ``{}`` for none.
    """

    model_id: str
    model_revision: str
    original_length: int
    press: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model_id": self.model_id,
            "model_revision": self.model_revision,
            "original_length": self.original_length,
            "press": self.press,
        }

    @classmethod
    def from_json(cls, data: dict) -> CacheMeta:
        return cls(
            model_id=str(data["model_id"]),
            model_revision=str(data["model_revision"]),
            original_length=int(data["original_length"]),
            press=dict(data["press"]),
        )



class CorruptCacheError(ValueError):
    """The bytes are not a complete, intact cache of a known format version."""


Data = bytes | memoryview | Sequence[bytes]  # one buffer, or the chunks a fetch returns in order


class Pieces:
    """A cache's bytes as the pieces they arrived in (a fetch's chunks), read without joining them:
    a 512 MiB join is a copy into fresh pages that costs about a third of the fetch itself."""

    def __init__(self, data: Data):
        pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.starts = list(itertools.accumulate((len(p) for p in self.pieces), initial=0))

    @classmethod
    def of(cls, data: Data | Pieces) -> Pieces:
        """``data`` as pieces, made once per read however many steps look at it."""
        return data if isinstance(data, Pieces) else cls(data)

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int) -> memoryview:
        """Bytes [start, stop): a view when one piece holds them, else a copy."""
        i = bisect.bisect_right(self.starts, start) - 1
        if stop <= self.starts[i + 1]:
            return self.pieces[i][start - self.starts[i] : stop - self.starts[i]]
        out = np.empty(stop - start, dtype=np.uint8)
        self.copy_into(out, start)
        return memoryview(out)

    def copy_into(self, out: np.ndarray, start: int) -> None:
        """Fill ``out`` (uint8) with the bytes from ``start``."""
        done, i = 0, bisect.bisect_right(self.starts, start) - 1
        while done < len(out):
            offset = start + done - self.starts[i]
            piece = self.pieces[i][offset : offset + len(out) - done]
            out[done : done + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            done, i = done + len(piece), i + 1

    def sha256(self, stop: int) -> bytes:
        digest = hashlib.sha256()
        for piece, start in zip(self.pieces, self.starts):
            if start < stop:
                digest.update(piece[: stop - start])
        return digest.digest()


def digests(data: bytes) -> tuple[bytes, bytes]:
    """(SHA-256 of the body, as the format's trailer should hold it; SHA-256 of all the bytes, as a
    manifest records it), in one pass over the bytes: a Put hashes what it stores once."""
    view = memoryview(data)
    split = max(0, len(view) - _DIGEST)
    digest = hashlib.sha256(view[:split])
    body = digest.digest()
    digest.update(view[split:])
    return body, digest.digest()


def read_header(data: Data, verified: bool = False, body_sha256: bytes | None = None) -> dict:
    """Check framing and digest, then return the parsed header. Raises CorruptCacheError.

    verified: the bytes already passed the store's read checksum (``service/store/checksum.py``),
    and the store checked this digest when they were put: the SHA-256 is not computed again.
    body_sha256: the body's digest, computed by the caller (``digests``): compared, not recomputed.
    """
    data = Pieces.of(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise CorruptCacheError(f"cache is truncated: {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data.read(0, _PREFIX.size))
    if magic != MAGIC:
        raise CorruptCacheError("not a KVCompose cache (bad magic bytes)")
    if version not in READABLE_VERSIONS:
        raise CorruptCacheError(f"cache format version {version} is not supported (this build reads "
                                f"{', '.join(map(str, READABLE_VERSIONS))})")
    if body_sha256 is None and not verified:
        body_sha256 = data.sha256(len(data) - _DIGEST)
    if body_sha256 is not None and body_sha256 != bytes(data.read(len(data) - _DIGEST, len(data))):
        raise CorruptCacheError("cache checksum mismatch: the bytes were truncated or altered")
    if _PREFIX.size + hlen > len(data) - _DIGEST:
        raise CorruptCacheError(f"cache header length {hlen} runs past the end")
    try:
        return json.loads(bytes(data.read(_PREFIX.size, _PREFIX.size + hlen)))
    except ValueError as e:
        raise CorruptCacheError(f"cache header is not JSON: {e}") from None


PACKED_BITS = {"uint4": 4, "uint2": 2}  # sub-byte dtypes (version 2)
_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "uint8": 8, "int8": 8, **PACKED_BITS}


def version_for(codec: str) -> int:
    """The format version a cache of ``codec`` is written as."""
    if codec.endswith(ENTROPY_CODING):
        return ENTROPY_FORMAT_VERSION
    return GROUPED_FORMAT_VERSION if codec in GROUPED_CODECS else FORMAT_VERSION


def version_of(data: Data) -> int:
    """The format version of framed bytes (checked by ``read_header``)."""
    return _PREFIX.unpack_from(Pieces.of(data).read(0, _PREFIX.size))[1]


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Stored bytes of a tensor: sub-byte dtypes pack their values, the last byte padded."""
    return -(-int(np.prod(shape)) * _BITS[dtype] // 8)


def value_groups(codec: str, head_dim: int) -> int:
    """The group size of a grouped codec's values: its group, at most one head's channels."""
    return min(GROUPED_CODECS[base_codec(codec)].group, head_dim)


def codable(name: str, codec: str) -> bool:
    """Whether tensor ``name`` of a ``codec`` cache may be entropy-coded: every tensor of a "+zstd"
    codec but the eviction masks and kept-channel maps, which the store reads as they are."""
    return codec.endswith(ENTROPY_CODING) and name.split(".")[0] not in ("e", "kc")


def tensor_bytes(data: Pieces, payload_start: int, payload_bytes: int, entry: dict) -> np.ndarray:
    """One tensor's stored bytes (uint8, its own memory), its entropy coding undone."""
    start, n = int(entry["offset"]), int(entry["nbytes"])
    raw_n = tensor_nbytes(entry["dtype"], [int(s) for s in entry["shape"]])
    if start < 0 or start + n > payload_bytes or (n != raw_n and entry.get("coding") != ZSTD):
        raise ValueError(f"tensor {entry['name']} does not fit the payload")
    if entry.get("coding") != ZSTD:
        out = np.empty(n, dtype=np.uint8)
        data.copy_into(out, payload_start + start)
        return out
    frame = data.read(payload_start + start, payload_start + start + n)
    if zstandard.frame_content_size(frame) != raw_n:  # checked before anything is allocated
        raise ValueError(f"tensor {entry['name']}: its zstd frame does not hold {raw_n} bytes")
    try:
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=raw_n)
    except zstandard.ZstdError as e:
        raise ValueError(f"tensor {entry['name']}: {e}") from None
    if len(out) != raw_n:
        raise ValueError(f"tensor {entry['name']}: its zstd frame decodes to {len(out)} bytes, not {raw_n}")
    return np.frombuffer(bytearray(out), dtype=np.uint8)


def check(data: Data, verified: bool = False, body_sha256: bytes | None = None) -> dict:
    """``read_header`` plus the whole structure, before anything is stored or built: header fields,
    every tensor's name, dtype, shape and offset against the payload, and shapes consistent across
    layers. Returns the header; raises CorruptCacheError saying what is wrong."""
    data = Pieces.of(data)
    header = read_header(data, verified, body_sha256)
    try:
        _check_structure(header, payload_bytes(data))
        if version_of(data) != version_for(header["codec"]):
            raise ValueError(f"codec {header['codec']} is written as format version {version_for(header['codec'])}, "
                             f"not {version_of(data)}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCacheError(f"cache header is malformed: {e}") from None
    return header


def _check_structure(header: dict, payload_bytes: int) -> None:
    if not isinstance(header, dict) or not isinstance(header.get("meta"), dict):
        raise ValueError("no 'meta' object")
    meta = CacheMeta.from_json(header["meta"])
    if meta.original_length < 1:
        raise ValueError("meta.original_length must be >= 1")
    codec = header.get("codec")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {CODECS}")
    layers = header.get("layers")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError("'layers' must be a positive integer")
    tensors = header.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        raise ValueError("no tensors")
    by_name, end = {}, 0
    for t in sorted(tensors, key=lambda t: t["offset"]):
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if name in by_name:
            raise ValueError(f"tensor {name} appears twice")
        if dtype not in _BITS or not isinstance(shape, list) or not all(
                isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"tensor {name}: bad dtype or shape")
        size, coding, nbytes = tensor_nbytes(dtype, shape), t.get("coding"), t["nbytes"]
        if coding is not None and (coding != ZSTD or not codable(name, codec)):
            raise ValueError(f"tensor {name}: coding {coding!r} has no place in a {codec} cache")
        # a blob is coded only where that makes it smaller
        if not isinstance(nbytes, int) or not (0 < nbytes < size if coding else nbytes == size):
            raise ValueError(f"tensor {name}: {nbytes} bytes do not fit its dtype and shape"
                             + (" (coded)" if coding else ""))
        if t["offset"] != end:
            raise ValueError(f"tensor {name} does not sit where the payload says")
        end += t["nbytes"]
        by_name[name] = (dtype, shape)
    if end != payload_bytes:
        raise ValueError(f"tensors cover {end} bytes; the payload has {payload_bytes}")
    base = base_codec(codec)
    grouped = GROUPED_CODECS.get(base)
    k_stored, v_stored = (f"uint{grouped.key_bits}", f"uint{grouped.value_bits}") if grouped else (base, base)
    expected: dict[str, tuple[str, list[int] | None]] = {}
    if len(by_name.get("v.0", (None, []))[1]) != 3:
        raise ValueError("layer 0: values missing or not (heads, slots, head_dim)")
    heads, _, dim = by_name["v.0"][1]
    for i in range(layers):
        v_shape = by_name.get(f"v.{i}", (None, []))[1]
        if len(v_shape) != 3 or [v_shape[0], v_shape[2]] != [heads, dim]:
            raise ValueError(f"layer {i}: values missing or not (heads, slots, head_dim) like layer 0")
        n = v_shape[1]
        if not 1 <= n <= meta.original_length:
            raise ValueError(f"layer {i} has {n} slots for a {meta.original_length}-token context")
        cols = by_name.get(f"k.{i}", (None, [0, -1]))[1]
        kc = f"kc.{i}" in by_name
        if len(cols) != 2 or cols[0] != n or not (cols[1] <= heads * dim if kc else cols[1] == heads * dim):
            raise ValueError(f"layer {i}: keys missing or not (slots, kept channels)")
        expected |= {f"k.{i}": (k_stored, None), f"v.{i}": (v_stored, None)}
        if kc:
            expected[f"kc.{i}"] = ("uint8", [heads, dim])
        if base == "int8":
            expected |= {f"ks.{i}": ("float16", [cols[1]]), f"vs.{i}": ("float16", [heads, n])}
        if grouped:  # a scale and a zero point per group: keys' over tokens, values' over channels
            k_groups = [-(-n // grouped.group), cols[1]]
            v_groups = [heads, n, -(-dim // value_groups(codec, dim))]
            expected |= {f"ks.{i}": ("float16", k_groups), f"kz.{i}": ("float16", k_groups),
                         f"vs.{i}": ("float16", v_groups), f"vz.{i}": ("float16", v_groups)}
        if f"e.{i}" in by_name:
            expected[f"e.{i}"] = ("uint8", [heads, n])
    for name, (dtype, shape) in by_name.items():
        if name not in expected:
            raise ValueError(f"unexpected tensor {name}")
        want_dtype, want_shape = expected.pop(name)
        if dtype != want_dtype or (want_shape is not None and shape != want_shape):
            raise ValueError(f"tensor {name} is {dtype} {shape}; expected {want_dtype} {want_shape or ''}".strip())
    if expected:
        raise ValueError(f"missing tensors {sorted(expected)}")


def layer_shapes(header: dict) -> tuple[list[int], int]:
    """From a header: KV slots per layer, and float16 bytes per token of the uncompressed cache."""
    shapes = {t["name"]: t["shape"] for t in header["tensors"]}
    layers = range(int(header["layers"]))
    slots = [int(shapes[f"v.{i}"][1]) for i in layers]
    per_token = sum(2 * 2 * int(shapes[f"v.{i}"][0]) * int(shapes[f"v.{i}"][2]) for i in layers)
    return slots, per_token


def kept_tokens_per_layer(data: Data, header: dict) -> list[float]:
    """``CompressedKV.kept_tokens_per_layer`` from checked bytes, reading only the eviction masks."""
    data = Pieces.of(data)
    start, size = payload_start(data), payload_bytes(data)
    entries = {e["name"]: e for e in header["tensors"]}
    slots, _ = layer_shapes(header)
    return [_kept_tokens(n, _array(data, start, size, entries[f"e.{i}"])) if f"e.{i}" in entries else float(n)
            for i, n in enumerate(slots)]


def payload_start(data: Pieces) -> int:
    return _PREFIX.size + _PREFIX.unpack_from(data.read(0, _PREFIX.size))[2]


def payload_bytes(data: Pieces) -> int:
    return len(data) - payload_start(data) - _DIGEST


def _kept_tokens(slots: int, evicted: np.ndarray) -> float:
    """``kvcache.kept_tokens`` on a stored uint8 mask: slots kept per KV head, averaged (float32, as torch does)."""
    return float((evicted == 0).sum(axis=1).astype(np.float32).mean()) if slots else 0.0


def _array(data: Pieces, start: int, size: int, entry: dict) -> np.ndarray:
    """One stored tensor as a numpy array (dtypes numpy has; used for the uint8 masks)."""
    shape = [int(s) for s in entry["shape"]]
    out = tensor_bytes(data, start, size, entry)
    return out.view(entry["dtype"]).reshape(shape) if entry["dtype"] != "bfloat16" else out.reshape(-1)
