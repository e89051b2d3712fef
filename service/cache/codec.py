"""Tensors <-> the cache byte format (versions 1 to 3): pickle-free, self-describing, checksummed.

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
- codecs ``int4`` / ``int2`` (``-g64``, ``-g128``; format version 2): KIVI's group-wise asymmetric
  scheme. Keys per channel over groups of G tokens (``ks.i``, ``kz.i``: float16 scale and zero point,
  (ceil(n/G), columns)), values per token over groups of min(G, d) channels of a head (``vs.i``,
  ``vz.i``: (H, n, groups)); k and v are ``uint4`` / ``uint2``, two or four values per byte.
  ``k4v2``: int4 keys and int2 values, groups of 32 (keys are the sensitive half).
  Other codecs store k and v in float16 / bfloat16 / float32.
- ``<codec>+zstd`` (format version 3): the same tensors, each blob but ``e.i`` and ``kc.i`` one zstd
  frame where that is smaller: lossless, 11-18% fewer bytes for SmolLM2's quantised caches (docs/store.md).

Every read checks magic, version, sizes and the digest before any tensor is built; a truncated or
altered buffer raises ``CorruptCacheError``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import zstandard

from service.cache.format import (
    _PREFIX,
    MAGIC,
    PACKED_BITS,
    ZSTD,
    CorruptCacheError,
    Data,
    Pieces,
    check,
    codable,
    payload_bytes,
    payload_start,
    tensor_bytes,
    value_groups,
    version_for,
)
from service.cache.kvcache import CacheMeta, CompressedKV
from service.config import CODECS, ENTROPY_CODING, GROUPED_CODECS, base_codec

ZSTD_LEVEL = 3  # zstd's default: ~400 MB/s to code and >1 GB/s to decode on one core; level 19 saves ~3% more

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


def quantize_groups(x: torch.Tensor, bits: int, group: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric ``bits``-bit codes, one float16 scale and zero point per ``group`` values along ``dim``.

    Returns (codes uint8 in [0, 2**bits - 1], shaped like ``x``; scale; zero), the last two with
    ``dim`` shrunk to the group count. The zero and scale are rounded to float16 before coding, so
    decoding with the stored ones reproduces what was coded. A short last group repeats its last value.
    """
    x = x.float().movedim(dim, -1)
    length, levels = x.shape[-1], 2**bits - 1
    pad = -length % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    groups = x.unflatten(-1, (-1, group))
    zero = groups.amin(-1).half()
    scale = ((groups.amax(-1) - zero.float()) / levels).clamp(min=1e-5).half()
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, levels)
    codes = codes.to(torch.uint8).flatten(-2)[..., :length]
    return codes.movedim(-1, dim), scale.movedim(-1, dim), zero.movedim(-1, dim)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                      dim: int) -> torch.Tensor:
    """``quantize_groups`` undone, as float16, on the codes' device."""
    codes = codes.float().movedim(dim, -1)
    length = codes.shape[-1]
    pad = -length % group
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    groups = codes.unflatten(-1, (-1, group))
    x = groups * scale.float().movedim(dim, -1)[..., None] + zero.float().movedim(dim, -1)[..., None]
    return x.flatten(-2)[..., :length].movedim(-1, dim).to(torch.float16)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes below 2**bits -> bytes holding 8 // bits of them each, low bits first."""
    per = 8 // bits
    flat = codes.reshape(-1)
    if flat.numel() % per:
        flat = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (flat.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: list[int]) -> torch.Tensor:
    """``pack`` undone: the codes of a tensor of ``shape``, on the bytes' device."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.reshape(-1, 1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _layer_tensors(i: int, k: torch.Tensor, v: torch.Tensor, e: torch.Tensor | None, codec: str):
    """(name, tensor, stored dtype) of layer ``i``; the stored dtype is the tensor's unless packed."""
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
    elif codec in GROUPED_CODECS:
        grouped = GROUPED_CODECS[codec]
        kq, ks, kz = quantize_groups(cols, grouped.key_bits, grouped.group, dim=0)
        vq, vs, vz = quantize_groups(v, grouped.value_bits, value_groups(codec, d), dim=2)
        out += [(f"k.{i}", kq, f"uint{grouped.key_bits}"), (f"ks.{i}", ks), (f"kz.{i}", kz),
                (f"v.{i}", vq, f"uint{grouped.value_bits}"), (f"vs.{i}", vs), (f"vz.{i}", vz)]
    else:
        dtype = _DTYPES[codec]
        out += [(f"k.{i}", cols.to(dtype)), (f"v.{i}", v.to(dtype))]
    if e is not None:
        out.append((f"e.{i}", e.to(torch.uint8)))
    return [(name, t, *rest) if rest else (name, t, str(t.dtype).removeprefix("torch."))
            for name, t, *rest in out]


def encode(kv: CompressedKV, codec: str = "float16") -> bytes:
    """Serialise ``kv`` with ``codec`` (one of ``CODECS``) to bytes."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    entries, blobs, offset = [], [], 0
    # one per call (a compressor is not thread-safe), and only for a "+zstd" codec
    zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if codec.endswith(ENTROPY_CODING) else None
    for i, (k, v, e) in enumerate(zip(kv.keys, kv.values, kv.evicted)):
        for name, t, dtype in _layer_tensors(i, k, v, e, base_codec(codec)):
            blob = _raw(pack(t, PACKED_BITS[dtype]) if dtype in PACKED_BITS else t)
            entry = {"name": name, "dtype": dtype, "shape": list(t.shape), "offset": offset}
            if codable(name, codec) and len(frame := zstd.compress(blob)) < len(blob):
                blob, entry["coding"] = frame, ZSTD
            entries.append(entry | {"nbytes": len(blob)})
            blobs.append(blob)
            offset += len(blob)
    header = json.dumps({"meta": kv.meta.to_json(), "codec": codec, "layers": kv.num_layers, "tensors": entries},
                        sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, version_for(codec), len(header)) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def decode(data: Data, device: torch.device | str = "cpu", verified: bool = False) -> CompressedKV:
    """Parse and verify bytes written by ``encode`` (one buffer, or a fetch's chunks in order);
    quantised caches come back as float16.

    device: where the cache will be used; the stored tensors are moved there once, as stored (int8
    is half the bytes of float16 to move, int4 a quarter), and unpacked and dequantised there.
    verified: the bytes passed the store's read checksum (see ``read_header``).
    """
    data = Pieces.of(data)
    header = check(data, verified)
    try:
        start, size = payload_start(data), payload_bytes(data)
        t = {e["name"]: _tensor(data, start, size, e, device) for e in header["tensors"]}
        keys, values, evicted = [], [], []
        for i in range(int(header["layers"])):
            k, v = _restore_layer(t, i, base_codec(header["codec"]))
            keys.append(k), values.append(v)
            evicted.append(t[f"e.{i}"].bool() if f"e.{i}" in t else None)
        return CompressedKV(keys=keys, values=values, evicted=evicted, meta=CacheMeta.from_json(header["meta"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptCacheError(f"cache header is inconsistent: {e}") from None


def _restore_layer(t: dict[str, torch.Tensor], i: int, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    cols, v = t[f"k.{i}"], t[f"v.{i}"]
    if codec in GROUPED_CODECS:
        cols = dequantize_groups(cols, t[f"ks.{i}"], t[f"kz.{i}"], GROUPED_CODECS[codec].group, dim=0)
        v = dequantize_groups(v, t[f"vs.{i}"], t[f"vz.{i}"], value_groups(codec, v.shape[-1]), dim=2)
    elif f"ks.{i}" in t:
        cols = (cols.float() * t[f"ks.{i}"].float()).to(torch.float16)
        v = (v.float() * t[f"vs.{i}"].float().unsqueeze(-1)).to(torch.float16)
    heads, n, d = v.shape
    if f"kc.{i}" in t:
        full = torch.zeros(n, heads * d, dtype=cols.dtype, device=cols.device)
        full[:, t[f"kc.{i}"].bool().reshape(-1)] = cols
        cols = full
    return cols.reshape(n, heads, d).transpose(0, 1).contiguous(), v


def _tensor(data: Pieces, payload_start: int, payload_bytes: int, entry: dict,
            device: torch.device | str) -> torch.Tensor:
    """One stored tensor on ``device``: moved as stored (entropy coding undone), then unpacked there if packed."""
    shape = [int(s) for s in entry["shape"]]
    raw = tensor_bytes(data, payload_start, payload_bytes, entry)  # the one copy: the chunks can go
    stored = torch.from_numpy(raw).to(device)
    bits = PACKED_BITS.get(entry["dtype"])
    return unpack(stored, bits, shape) if bits else stored.view(_DTYPES[entry["dtype"]]).reshape(shape)


def memory_dtype(codec: str) -> torch.dtype:
    """The dtype a cache stored with ``codec`` has in memory (quantised codecs dequantise to float16)."""
    codec = base_codec(codec)
    return _DTYPES[codec] if codec in ("float16", "bfloat16", "float32") else torch.float16


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
