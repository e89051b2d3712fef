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

import bisect
import hashlib
import itertools
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.cache.kvcache import CacheMeta, CompressedKV, kept_tokens
from service.config import CODECS

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


Data = bytes | memoryview | Sequence[bytes]  # one buffer, or the chunks a fetch returns in order


class _Pieces:
    """A cache's bytes as the pieces they arrived in (a fetch's chunks), read without joining them:
    a 512 MiB join is a copy into fresh pages that costs about a third of the fetch itself."""

    def __init__(self, data: Data):
        pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        self.pieces = [memoryview(p).cast("B") for p in pieces]
        self.starts = list(itertools.accumulate((len(p) for p in self.pieces), initial=0))

    @classmethod
    def of(cls, data: Data | _Pieces) -> _Pieces:
        """``data`` as pieces, made once per read however many steps look at it."""
        return data if isinstance(data, _Pieces) else cls(data)

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


def read_header(data: Data, verified: bool = False) -> dict:
    """Check framing and digest, then return the parsed header. Raises CorruptCacheError.

    verified: the bytes already passed the store's read checksum (``service/store/checksum.py``),
    and the store checked this digest when they were put: the SHA-256 is not computed again.
    """
    data = _Pieces.of(data)
    if len(data) < _PREFIX.size + _DIGEST:
        raise CorruptCacheError(f"cache is truncated: {len(data)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(data.read(0, _PREFIX.size))
    if magic != MAGIC:
        raise CorruptCacheError("not a KVCompose cache (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise CorruptCacheError(f"cache format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if not verified and data.sha256(len(data) - _DIGEST) != bytes(data.read(len(data) - _DIGEST, len(data))):
        raise CorruptCacheError("cache checksum mismatch: the bytes were truncated or altered")
    if _PREFIX.size + hlen > len(data) - _DIGEST:
        raise CorruptCacheError(f"cache header length {hlen} runs past the end")
    try:
        return json.loads(bytes(data.read(_PREFIX.size, _PREFIX.size + hlen)))
    except ValueError as e:
        raise CorruptCacheError(f"cache header is not JSON: {e}") from None


_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1}


def check(data: Data, verified: bool = False) -> dict:
    """``read_header`` plus the whole structure, before anything is stored or built: header fields,
    every tensor's name, dtype, shape and offset against the payload, and shapes consistent across
    layers. Returns the header; raises CorruptCacheError saying what is wrong."""
    data = _Pieces.of(data)
    header = read_header(data, verified)
    try:
        _check_structure(header, _payload_bytes(data))
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


def kept_tokens_per_layer(data: Data, header: dict) -> list[float]:
    """``CompressedKV.kept_tokens_per_layer`` from checked bytes, reading only the eviction masks."""
    data = _Pieces.of(data)
    start, payload_bytes = _payload_start(data), _payload_bytes(data)
    entries = {e["name"]: e for e in header["tensors"]}
    slots, _ = layer_shapes(header)
    return [kept_tokens(n, _tensor(data, start, payload_bytes, entries[f"e.{i}"]) if f"e.{i}" in entries else None)
            for i, n in enumerate(slots)]


def _payload_start(data: _Pieces) -> int:
    return _PREFIX.size + _PREFIX.unpack_from(data.read(0, _PREFIX.size))[2]


def _payload_bytes(data: _Pieces) -> int:
    return len(data) - _payload_start(data) - _DIGEST


def decode(data: Data, device: torch.device | str = "cpu", verified: bool = False) -> CompressedKV:
    """Parse and verify bytes written by ``encode`` (one buffer, or a fetch's chunks in order);
    int8 caches come back as float16.

    device: where the cache will be used; the stored tensors are moved there once, as stored (int8
    is half the bytes of float16 to move), and dequantised there.
    verified: the bytes passed the store's read checksum (see ``read_header``).
    """
    data = _Pieces.of(data)
    header = check(data, verified)
    try:
        start, payload_bytes = _payload_start(data), _payload_bytes(data)
        t = {e["name"]: _tensor(data, start, payload_bytes, e).to(device) for e in header["tensors"]}
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


def _tensor(data: _Pieces, payload_start: int, payload_bytes: int, entry: dict) -> torch.Tensor:
    dtype = _DTYPES[entry["dtype"]]
    start, n = int(entry["offset"]), int(entry["nbytes"])
    shape = [int(s) for s in entry["shape"]]
    if start < 0 or start + n > payload_bytes or n != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"tensor {entry['name']} does not fit the payload")
    raw = np.empty(n, dtype=np.uint8)  # the one copy: the tensor owns its memory, the chunks can go
    data.copy_into(raw, payload_start + start)
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
