"""The project's cache byte format, version 1: pickle-free, self-describing, checksummed.

Layout (all integers little-endian)::

    magic    8 bytes   b"KVCPRS\\r\\n"
    version  u32       FORMAT_VERSION
    hlen     u32       length of the header
    header   hlen      UTF-8 JSON: {"meta": {...}, "codec": "int8", "layers": 30, "tensors": [
                           {"name": "k.0", "dtype": "int8", "shape": [812, 96], "offset": 0, "nbytes": ...}, ...]}
    payload  ...       the tensors' raw bytes, C order, at the header's offsets
    digest   32 bytes  SHA-256 of everything before it

Tensors of layer i (H KV heads, n slots, head dim d):

- ``k.i``: keys as (n, columns), columns = the kept channels of every head, head-major. Channels
  that are zero for every token (ThinK's pruned key channels) are not stored: ``kc.i`` (uint8,
  (H, d), 1 = stored) says which; without ``kc.i`` all H*d channels are stored.
- ``v.i``: values (H, n, d).
- ``e.i``: evicted mask (H, n) uint8, for head-wise eviction.
- codec ``int8``: symmetric absmax quantisation, keys per channel (``ks.i``: float16 per column),
  values per token (``vs.i``: float16 (H, n)), the split KIVI (arXiv 2402.02750) found suits
  keys' outlier channels and values' per-token spread.
  Other codecs store k and v in float16 / bfloat16 / float32.

Every read checks magic, version, sizes and the digest before any tensor is built; a truncated or
altered buffer raises ``CorruptCacheError``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from service.config import CODECS
from service.kvcache import CacheMeta, CompressedKV, kept_tokens

MAGIC = b"KVCPRS\r\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "uint8": torch.uint8, "int8": torch.int8}


class CorruptCacheError(ValueError):
    """The bytes are not a complete, intact cache of a known format version."""


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float16 scale per slice along ``dim`` reduced away.

    The scale is rounded to float16 before quantising, so dequantising with the stored scale is exact.
    """
    x = x.float()
    scale = (x.abs().amax(dim=dim, keepdim=True) / 127).clamp(min=1e-6).half()
    return torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8), scale.squeeze(dim)


def _layer_tensors(i: int, k: torch.Tensor, v: torch.Tensor, e: torch.Tensor | None, codec: str):
    heads, n, d = k.shape
    cols = k.transpose(0, 1).reshape(n, heads * d)  # (n, H*d), head-major columns
    kept = (k != 0).any(dim=1)  # (H, d): channels with any non-zero value
    out = []
    if not bool(kept.all()):
        cols = cols[:, kept.reshape(-1)]
        out.append((f"kc.{i}", kept.to(torch.uint8)))
    if codec == "int8":
        kq, ks = quantize(cols, dim=0)
        vq, vs = quantize(v, dim=2)
        out += [(f"k.{i}", kq), (f"ks.{i}", ks), (f"v.{i}", vq), (f"vs.{i}", vs)]
    else:
        dtype = _DTYPES[codec]
        out += [(f"k.{i}", cols.to(dtype)), (f"v.{i}", v.to(dtype))]
    if e is not None:
        out.append((f"e.{i}", e.to(torch.uint8)))
    return out


def encode(kv: CompressedKV, codec: str = "float16") -> bytes:
    """Serialise ``kv`` with ``codec`` (float16 | bfloat16 | float32 | int8) to bytes."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    entries, blobs, offset = [], [], 0
    for i, (k, v, e) in enumerate(zip(kv.keys, kv.values, kv.evicted)):
        for name, t in _layer_tensors(i, k, v, e, codec):
            blob = _raw(t)
            dtype = str(t.dtype).removeprefix("torch.")
            entries.append({"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset,
                            "nbytes": len(blob)})
            blobs.append(blob)
            offset += len(blob)
    header = json.dumps({"meta": kv.meta.to_json(), "codec": codec, "layers": kv.num_layers, "tensors": entries},
                        sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def read_header(data: bytes | memoryview) -> dict:
    """Check framing and digest, then return the parsed header. Raises CorruptCacheError."""
    data = memoryview(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise CorruptCacheError(f"cache is truncated: {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptCacheError("not a KVCompose cache (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise CorruptCacheError(f"cache format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if hashlib.sha256(data[:-_DIGEST]).digest() != bytes(data[-_DIGEST:]):
        raise CorruptCacheError("cache checksum mismatch: the bytes were truncated or altered")
    try:
        return json.loads(bytes(data[_PREFIX.size : _PREFIX.size + hlen]))
    except ValueError as e:
        raise CorruptCacheError(f"cache header is not JSON: {e}") from None


_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1}


def check(data: bytes | memoryview) -> dict:
    """``read_header`` plus the whole structure, before anything is stored or built: header fields,
    every tensor's name, dtype, shape and offset against the payload, and shapes consistent across
    layers. Returns the header; raises CorruptCacheError saying what is wrong."""
    data = memoryview(data)
    header = read_header(data)
    try:
        _check_structure(header, len(data) - _PREFIX.size - _PREFIX.unpack_from(data)[2] - _DIGEST)
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
        if dtype not in _ITEM_BYTES or not isinstance(shape, list) or not all(
                isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"tensor {name}: bad dtype or shape")
        if t["offset"] != end or t["nbytes"] != int(np.prod(shape)) * _ITEM_BYTES[dtype]:
            raise ValueError(f"tensor {name} does not sit where the payload says")
        end += t["nbytes"]
        by_name[name] = (dtype, shape)
    if end != payload_bytes:
        raise ValueError(f"tensors cover {end} bytes; the payload has {payload_bytes}")
    stored = "int8" if codec == "int8" else codec
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
        expected |= {f"k.{i}": (stored, None), f"v.{i}": (stored, None)}
        if kc:
            expected[f"kc.{i}"] = ("uint8", [heads, dim])
        if codec == "int8":
            expected |= {f"ks.{i}": ("float16", [cols[1]]), f"vs.{i}": ("float16", [heads, n])}
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


def kept_tokens_per_layer(data: bytes | memoryview, header: dict) -> list[float]:
    """``CompressedKV.kept_tokens_per_layer`` from checked bytes, reading only the eviction masks."""
    data = memoryview(data)
    payload = data[_PREFIX.size + _PREFIX.unpack_from(data)[2] : -_DIGEST]
    entries = {e["name"]: e for e in header["tensors"]}
    slots, _ = layer_shapes(header)
    return [kept_tokens(n, _tensor(payload, entries[f"e.{i}"]) if f"e.{i}" in entries else None)
            for i, n in enumerate(slots)]


def decode(data: bytes | memoryview, device: torch.device | str = "cpu") -> CompressedKV:
    """Parse and verify bytes written by ``encode``; int8 caches come back as float16.

    device: where the cache will be used; the stored tensors are moved there once, as stored (int8
    is half the bytes of float16 to move), and dequantised there.
    """
    data = memoryview(data)
    header = check(data)
    try:
        hlen = _PREFIX.unpack_from(data)[2]
        payload = data[_PREFIX.size + hlen : -_DIGEST]
        t = {e["name"]: _tensor(payload, e).to(device) for e in header["tensors"]}
        keys, values, evicted = [], [], []
        for i in range(int(header["layers"])):
            k, v = _restore_layer(t, i)
            keys.append(k), values.append(v)
            evicted.append(t[f"e.{i}"].bool() if f"e.{i}" in t else None)
        return CompressedKV(keys=keys, values=values, evicted=evicted, meta=CacheMeta.from_json(header["meta"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptCacheError(f"cache header is inconsistent: {e}") from None


def _restore_layer(t: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, torch.Tensor]:
    cols, v = t[f"k.{i}"], t[f"v.{i}"]
    if f"ks.{i}" in t:
        cols = (cols.float() * t[f"ks.{i}"].float()).to(torch.float16)
        v = (v.float() * t[f"vs.{i}"].float().unsqueeze(-1)).to(torch.float16)
    heads, n, d = v.shape
    if f"kc.{i}" in t:
        full = torch.zeros(n, heads * d, dtype=cols.dtype, device=cols.device)
        full[:, t[f"kc.{i}"].bool().reshape(-1)] = cols
        cols = full
    return cols.reshape(n, heads, d).transpose(0, 1).contiguous(), v


def _tensor(payload: memoryview, entry: dict) -> torch.Tensor:
    dtype = _DTYPES[entry["dtype"]]
    start, n = int(entry["offset"]), int(entry["nbytes"])
    shape = [int(s) for s in entry["shape"]]
    if start < 0 or start + n > len(payload) or n != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"tensor {entry['name']} does not fit the payload")
    raw = np.frombuffer(payload[start : start + n], dtype=np.uint8).copy()
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def memory_dtype(codec: str) -> torch.dtype:
    """The dtype a cache stored with ``codec`` has in memory (int8 dequantises to float16)."""
    return torch.float16 if codec == "int8" else _DTYPES[codec]


def save(kv: CompressedKV, path: str | Path, codec: str = "float16") -> int:
    """Write atomically (temp file + rename); returns the bytes written."""
    path = Path(path)
    data = encode(kv, codec)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def load(path: str | Path) -> CompressedKV:
    return decode(Path(path).read_bytes())
