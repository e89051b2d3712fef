"""Tensors <-> the cache byte format (version 1): pickle-free, self-describing, checksummed.

Framing (magic, version, JSON header, payload, SHA-256 digest) and every check that needs no
tensor live in ``format.py``, which the store reads without torch.

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
from pathlib import Path

import numpy as np
import torch

from service.cache.format import (
    _PREFIX,
    FORMAT_VERSION,
    MAGIC,
    CorruptCacheError,
    Data,
    Pieces,
    check,
    payload_bytes,
    payload_start,
)
from service.cache.kvcache import CacheMeta, CompressedKV
from service.config import CODECS

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "uint8": torch.uint8, "int8": torch.int8}


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


def decode(data: Data, device: torch.device | str = "cpu", verified: bool = False) -> CompressedKV:
    """Parse and verify bytes written by ``encode`` (one buffer, or a fetch's chunks in order);
    int8 caches come back as float16.

    device: where the cache will be used; the stored tensors are moved there once, as stored (int8
    is half the bytes of float16 to move), and dequantised there.
    verified: the bytes passed the store's read checksum (see ``read_header``).
    """
    data = Pieces.of(data)
    header = check(data, verified)
    try:
        start, size = payload_start(data), payload_bytes(data)
        t = {e["name"]: _tensor(data, start, size, e).to(device) for e in header["tensors"]}
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


def _tensor(data: Pieces, payload_start: int, payload_bytes: int, entry: dict) -> torch.Tensor:
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
