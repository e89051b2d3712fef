"""The project's cache file format, version 1: pickle-free, self-describing, checksummed.

Layout (all integers little-endian)::

    magic    8 bytes   b"KVCPRS\\r\\n"
    version  u32       FORMAT_VERSION
    hlen     u32       length of the header
    header   hlen      UTF-8 JSON: {"meta": {...}, "dtype": "float16", "tensors": [
                           {"name": "k.0", "dtype": "float16", "shape": [3, 812, 64], "offset": 0, "nbytes": ...}, ...]}
    payload  ...       the tensors' raw bytes, C order, at the header's offsets
    digest   32 bytes  SHA-256 of everything before it

Every read checks magic, version, sizes and the digest before any tensor is built; a truncated or
altered file raises ``CorruptCacheError``. Tensors are named ``k.<layer>``, ``v.<layer>`` and,
for head-wise eviction, ``e.<layer>`` (uint8 mask, 1 = evicted).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from service.kvcache import CacheMeta, CompressedKV

MAGIC = b"KVCPRS\r\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8}


class CorruptCacheError(ValueError):
    """The bytes are not a complete, intact cache of a known format version."""


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def encode(kv: CompressedKV, dtype: torch.dtype | None = None) -> bytes:
    """Serialise ``kv`` (cast to ``dtype`` when given) to bytes in format version 1."""
    if dtype is not None:
        kv = kv.to(dtype=dtype)
    tensors: list[tuple[str, torch.Tensor]] = []
    for i, (k, v, e) in enumerate(zip(kv.keys, kv.values, kv.evicted)):
        tensors += [(f"k.{i}", k), (f"v.{i}", v)]
        if e is not None:
            tensors.append((f"e.{i}", e.to(torch.uint8)))
    entries, blobs, offset = [], [], 0
    for name, t in tensors:
        blob = _raw(t)
        dtype_name = str(t.dtype).removeprefix("torch.")
        entries.append(
            {"name": name, "dtype": dtype_name, "shape": list(t.shape), "offset": offset, "nbytes": len(blob)}
        )
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps({"meta": kv.meta.to_json(), "layers": kv.num_layers, "tensors": entries},
                        sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes | memoryview) -> CompressedKV:
    """Parse and verify bytes written by ``encode``. Raises CorruptCacheError."""
    data = memoryview(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise CorruptCacheError(f"cache is truncated: {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptCacheError("not a KVCompose cache (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise CorruptCacheError(f"cache format version {version} is not supported (this build reads {FORMAT_VERSION})")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != bytes(digest):
        raise CorruptCacheError("cache checksum mismatch: the bytes were truncated or altered")
    try:
        header = json.loads(bytes(body[_PREFIX.size : _PREFIX.size + hlen]))
        payload = body[_PREFIX.size + hlen :]
        tensors = {e["name"]: _tensor(payload, e) for e in header["tensors"]}
        layers = range(int(header["layers"]))
        return CompressedKV(
            keys=[tensors[f"k.{i}"] for i in layers],
            values=[tensors[f"v.{i}"] for i in layers],
            evicted=[tensors[f"e.{i}"].bool() if f"e.{i}" in tensors else None for i in layers],
            meta=CacheMeta.from_json(header["meta"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCacheError(f"cache header is inconsistent: {e}") from None


def _tensor(payload: memoryview, entry: dict) -> torch.Tensor:
    dtype = _DTYPES[entry["dtype"]]
    start, n = int(entry["offset"]), int(entry["nbytes"])
    shape = [int(s) for s in entry["shape"]]
    if start < 0 or start + n > len(payload) or n != int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"tensor {entry['name']} does not fit the payload")
    raw = np.frombuffer(payload[start : start + n], dtype=np.uint8).copy()
    t = torch.from_numpy(raw)
    return t.view(dtype).reshape(shape)


def save(kv: CompressedKV, path: str | Path, dtype: torch.dtype | None = None) -> int:
    """Write atomically (temp file + rename); returns the bytes written."""
    path = Path(path)
    data = encode(kv, dtype)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load(path: str | Path) -> CompressedKV:
    return decode(Path(path).read_bytes())
