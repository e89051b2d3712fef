"""The cache file format: bit-exact round trips, and every kind of damage refused."""

import dataclasses
import struct

import pytest
import torch
from conftest import meta, random_ids, tiny_llama

from service.cache import codec, format
from service.cache.codec import CorruptCacheError
from service.config import GROUPED_CODECS
from service.engine.prefill import prefill
from service.engine.presses import build


@pytest.fixture(scope="module")
def kv():
    spec = {"press": "kvcompose", "compression_ratio": 0.5, "structured": False}
    return prefill(tiny_llama(), random_ids(128), build(spec), meta(128, spec))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_round_trip_is_bit_exact(kv, name, tmp_path):
    path = tmp_path / "c.kvc"
    codec.save(kv, path, name)
    back = codec.load(path)
    assert back.meta == kv.meta
    dtype = getattr(torch, name)
    for a, b in zip(kv.to(dtype=dtype).keys + kv.to(dtype=dtype).values, back.keys + back.values):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    for a, b in zip(kv.evicted, back.evicted):
        assert (a is None and b is None) or torch.equal(a, b)
    assert codec.encode(back, name) == path.read_bytes()


def test_int8_halves_float16_and_stays_close(kv):
    fp16, int8 = codec.encode(kv, "float16"), codec.encode(kv, "int8")
    assert len(int8) < 0.6 * len(fp16)  # head_dim 16 here: scales weigh more than at 64
    back = codec.decode(int8)
    for a, b in zip(kv.keys + kv.values, back.keys + back.values):
        assert (a - b.float()).abs().max() <= a.abs().amax() / 100


def test_zeroed_key_channels_are_not_stored(kv):
    think = [k.clone() for k in kv.keys]
    for k in think:
        k[:, :, ::2] = 0  # what ThinK does to half the key channels
    pruned = type(kv)(think, kv.values, kv.evicted, kv.meta)
    assert len(codec.encode(pruned)) < 0.78 * len(codec.encode(kv))
    back = codec.decode(codec.encode(pruned, "float32"))
    assert all(torch.equal(a, b) for a, b in zip(think, back.keys))


def test_truncated_file_is_refused(kv):
    data = codec.encode(kv)
    for cut in (10, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptCacheError):
            codec.decode(data[:cut])


def test_any_flipped_byte_is_refused(kv):
    data = bytearray(codec.encode(kv))
    for at in (20, len(data) // 3, len(data) - 40):
        bad = bytearray(data)
        bad[at] ^= 0x01
        with pytest.raises(CorruptCacheError, match="checksum|magic|version"):
            codec.decode(bytes(bad))


def test_one_pass_digests_check_what_two_passes_would(kv):
    """A Put hashes its bytes once (``format.digests``): the body's digest checks the format's trailer,
    the whole digest is the manifest's; a flipped byte fails the check without hashing again."""
    import hashlib

    from service.cache import format

    data = codec.encode(kv)
    body, whole = format.digests(data)
    assert body == data[-32:] == hashlib.sha256(data[:-32]).digest() and whole == hashlib.sha256(data).digest()
    assert format.check(data, body_sha256=body)["layers"] == len(kv.keys)
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0x01
    with pytest.raises(CorruptCacheError, match="checksum"):
        format.check(bytes(bad), body_sha256=format.digests(bytes(bad))[0])


def test_unknown_version_and_foreign_files_are_refused(kv):
    data = bytearray(codec.encode(kv))
    struct.pack_into("<I", data, 8, 99)
    with pytest.raises(CorruptCacheError, match="version 99"):
        codec.decode(bytes(data))
    with pytest.raises(CorruptCacheError, match="magic"):
        codec.decode(b"\x80\x04\x95" + b"\x00" * 100)  # a pickle is not a cache


def test_header_records_what_decode_needs(kv):
    import json

    data = codec.encode(kv, "float16")
    hlen = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16 : 16 + hlen])
    assert header["meta"]["original_length"] == 128 and header["meta"]["press"]["press"] == "kvcompose"
    shapes = {t["name"]: t["shape"] for t in header["tensors"]}
    assert [shapes[f"v.{i}"][1] for i in range(4)] == kv.layer_lengths
    assert {t["dtype"] for t in header["tensors"] if t["name"][0] in "kv"} == {"float16"}


GROUPED = ["int4", "int4-g128", "int2", "int2-g64", "k4v2"]


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("shape", "dim", "group"), [((5, 77, 24), 1, 32), ((5, 77, 24), 2, 16), ((40, 9), 0, 128)])
def test_group_codes_stay_within_half_a_step(bits, shape, dim, group):
    """KIVI's scheme: every value decodes within half a step of its group (plus float16 rounding)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.2, 4, shape[-1])
    codes, scale, zero = codec.quantize_groups(x, bits, group, dim)
    assert codes.shape == x.shape and int(codes.max()) <= 2**bits - 1
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape[dim] == -(-shape[dim] // group)
    back = codec.dequantize_groups(codes, scale, zero, group, dim)
    step = scale.float().repeat_interleave(group, dim).narrow(dim, 0, shape[dim])
    assert ((x - back.float()).abs() <= step / 2 + 2e-3 * x.abs() + 1e-3).all()


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_packing_holds_8_over_bits_codes_per_byte_exactly(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8, generator=torch.Generator().manual_seed(count))
    packed = codec.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count * bits // 8)
    assert torch.equal(codec.unpack(packed, bits, [count]), codes)


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_codecs_shrink_the_cache_and_stay_close(kv, name):
    fp16, int8, data = (codec.encode(kv, c) for c in ("float16", "int8", name))
    assert len(data) < len(int8) < len(fp16)
    back = codec.decode(data)
    assert back.meta == kv.meta and all(b.dtype == torch.float16 for b in back.keys + back.values)
    grouped = GROUPED_CODECS[name]
    halves = [(kv.keys, back.keys, grouped.key_bits), (kv.values, back.values, grouped.value_bits)]
    for before, after, bits in halves:  # within a step of the tensor's range
        for a, b in zip(before, after):
            assert (a - b.float()).abs().max() <= (a.amax() - a.amin()) / (2**bits - 1)
    for a, b in zip(kv.evicted, back.evicted):
        assert (a is None and b is None) or torch.equal(a, b)


def test_int4_packs_two_codes_a_byte_and_keeps_thinks_zero_channels_unstored(kv):
    import json

    think = [k.clone() for k in kv.keys]
    for k in think:
        k[:, :, ::2] = 0
    pruned = type(kv)(think, kv.values, kv.evicted, kv.meta)
    data = codec.encode(pruned, "int4")
    hlen = struct.unpack_from("<I", data, 12)[0]
    tensors = {t["name"]: t for t in json.loads(data[16 : 16 + hlen])["tensors"]}
    heads, slots, dim = kv.values[0].shape
    assert tensors["k.0"]["dtype"] == "uint4" and tensors["k.0"]["shape"] == [slots, heads * dim // 2]
    assert tensors["k.0"]["nbytes"] == -(-slots * heads * dim // 2 // 2)
    assert tensors["ks.0"]["shape"] == tensors["kz.0"]["shape"] == [-(-slots // 32), heads * dim // 2]
    back = codec.decode(data)
    assert all(bool((k[:, :, ::2] == 0).all()) for k in back.keys)  # pruned channels come back as zeros


def test_grouped_caches_are_format_version_2_and_the_version_must_match_the_codec(kv):
    import hashlib

    from service.cache import format

    assert format.version_of(codec.encode(kv, "int8")) == 1 and format.version_of(codec.encode(kv, "int4")) == 2
    data = bytearray(codec.encode(kv, "int4"))
    struct.pack_into("<I", data, 8, 1)  # a version 1 reader's view: it must not read sub-byte tensors
    data[-32:] = hashlib.sha256(bytes(data[:-32])).digest()
    with pytest.raises(CorruptCacheError, match="format version 2, not 1"):
        codec.decode(bytes(data))


def test_k4v2_stores_int4_keys_and_int2_values_and_a_wrong_half_is_refused(kv):
    """Mixed precision: each half has its own packed dtype in the header, and ``check`` holds each
    half to its codec's (a k4v2 header over int2 keys is corrupt, not misread)."""
    import hashlib
    import json

    data = codec.encode(kv, "k4v2")
    assert len(data) < len(codec.encode(kv, "int4"))
    hlen = struct.unpack_from("<I", data, 12)[0]
    dtypes = {t["name"]: t["dtype"] for t in json.loads(data[16 : 16 + hlen])["tensors"]}
    assert dtypes["k.0"] == "uint4" and dtypes["v.0"] == "uint2"
    body = codec.encode(kv, "int2")[:-32].replace(b'"codec":"int2"', b'"codec":"k4v2"')  # re-signed
    with pytest.raises(CorruptCacheError, match="k.0 is uint2 .*; expected uint4"):
        codec.decode(body + hashlib.sha256(body).digest())


def on_a_grid(kv):
    """``kv`` with every value rounded to a multiple of 0.5: bytes with structure, as a real model's are."""
    return dataclasses.replace(kv, keys=[(k * 2).round() / 2 for k in kv.keys],
                               values=[(v * 2).round() / 2 for v in kv.values])


@pytest.mark.parametrize("name", ["float16", "int8", "int4", "k4v2"])
@pytest.mark.parametrize("structured", [False, True], ids=["random", "structured"])
def test_zstd_coding_is_lossless_and_never_larger(kv, name, structured):
    """``<codec>+zstd`` decodes to exactly what ``<codec>`` decodes to, as format version 3. A blob is
    coded only where that makes it smaller: a random model's cache barely shrinks (its bytes are
    noise), one with structure (values on a coarse grid, as a real model's codes are far from
    uniform) shrinks; the eviction masks stay as they are (the store reads them)."""
    import json

    if structured:
        kv = on_a_grid(kv)
    plain, coded = codec.encode(kv, name), codec.encode(kv, name + "+zstd")
    assert format.version_of(coded) == 3 and len(coded) < len(plain) * (0.9 if structured else 1.01)
    a, b = codec.decode(plain), codec.decode(coded)
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a.evicted, b.evicted))
    hlen = struct.unpack_from("<I", coded, 12)[0]
    codings = {t["name"].split(".")[0]: t.get("coding") for t in json.loads(coded[16 : 16 + hlen])["tensors"]}
    assert codings.get("e") is None and (not structured or codings["k"] == codings["v"] == "zstd")
    assert format.kept_tokens_per_layer(coded, format.check(coded)) == kv.kept_tokens_per_layer()


def reframed(data: bytes, tensor: str, blob: bytes | None = None, **entry) -> bytes:
    """``data`` rebuilt with a valid length and digest: ``tensor``'s bytes replaced by ``blob`` (the
    later offsets moved) and/or its header entry changed by ``entry`` (None removes a key), so only
    the structure and content checks can refuse it."""
    import hashlib
    import json

    hlen = struct.unpack_from("<I", data, 12)[0]
    header, payload = json.loads(data[16 : 16 + hlen]), bytearray(data[16 + hlen : -32])
    target = next(t for t in header["tensors"] if t["name"] == tensor)
    if blob is not None:
        start, end = target["offset"], target["offset"] + target["nbytes"]
        payload[start:end] = blob
        for t in header["tensors"]:
            t["offset"] += len(blob) - (end - start) if t["offset"] > start else 0
        target["nbytes"] = len(blob)
    target.update(entry)
    for key in [k for k, v in target.items() if v is None]:
        del target[key]
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = data[:8] + struct.pack("<II", struct.unpack_from("<I", data, 8)[0], len(text)) + text + bytes(payload)
    return body + hashlib.sha256(body).digest()


def test_a_zstd_frame_that_lies_about_its_size_or_a_missing_coding_mark_is_refused(kv):
    """A frame must decode to exactly its tensor's size (read from the frame's header before anything
    is allocated), and a "+zstd" header must mark exactly the coded tensors."""
    import zstandard

    data = codec.encode(on_a_grid(kv), "int4+zstd")
    assert codec.decode(reframed(data, "v.0")).meta == kv.meta  # the rebuild alone changes nothing
    small = zstandard.ZstdCompressor().compress(b"\0" * 7)
    with pytest.raises(CorruptCacheError, match="v.0: its zstd frame does not hold"):
        codec.decode(reframed(data, "v.0", small))
    with pytest.raises(CorruptCacheError, match="v.0: .*bytes do not fit .*coded"):  # no smaller than raw
        codec.decode(reframed(data, "v.0", bytes(10**6)))
    with pytest.raises(CorruptCacheError, match="v.0: .*bytes do not fit its dtype and shape$"):  # mark dropped
        codec.decode(reframed(data, "v.0", coding=None))
    with pytest.raises(CorruptCacheError, match="e.0: coding 'zstd' has no place in a int4\\+zstd cache"):
        codec.decode(reframed(data, "e.0", coding="zstd"))
