"""Every GPU-bound path is device-correct: it creates each tensor on the device of the data it meets.

On a GPU, a tensor made without ``device=`` lands on the CPU, and the first op that mixes it with
CUDA data fails (the H200 crash in ``selection.allocate``). The CPU sees the same class of bug when
the default device is ``meta`` while the model and its inputs are real CPU tensors: an implicit-
device tensor becomes a meta tensor, and the first op that mixes it with real data fails. Each path
runs that way here, and its result must equal the same path run normally.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import meta, random_ids, tiny_llama
from test_batching import STATIC, decode_loop
from test_compositions import PARTS, refusal
from test_registry import OFFLINE, spec_for

from service.cache import codec
from service.config import CODECS
from service.engine.batching import BatchLimits, Request, decode_tokens
from service.engine.decode import Sampling, question_logits
from service.engine.prefill import prefill
from service.engine.presses import build

KVCOMPOSE = {"press": "kvcompose", "compression_ratio": 0.5}
OWN = {  # our own presses beyond the registry's defaults
    "kvcompose-one-pass": {**KVCOMPOSE, "replay_context": False, "scorer": "attention"},
    "kvcompose-compactor": {**KVCOMPOSE, "scorer": "compactor"},
    "kvcompose-headwise": {**KVCOMPOSE, "structured": False},
    "kvcompose-task-aware": KVCOMPOSE,  # task_ids set below, as the engine does
    "kvcompose-mean-vnorm": {**KVCOMPOSE, "agg_task": "mean", "add_v_norm": True, "keep_token_lower_bound": 4},
}
# kvpress builds these presses' positions with torch.arange(...).to(device): right on a GPU (made on
# the CPU, then moved), but made on meta here. Strict: when kvpress changes, the test says so.
KVPRESS_MAKES_THEN_MOVES = {"cap", "expectedattention"}
COMPOSITIONS = sorted({(a, b) for a, b in {(p, "kvcompose") for p in PARTS} | {("kvcompose", p) for p in PARTS}
                       if refusal(a, b) is None})


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3, seed=4)


def on_meta(fn, *args, **kwargs):
    """``fn`` with meta as the default device; its tensors must come back real (on the CPU)."""
    with torch.device("meta"):
        return fn(*args, **kwargs)


def compress(model, spec: dict, name: str = "", default_meta: bool = False):
    press = build(spec)
    if name == "kvcompose-task-aware":
        press.task_ids = [random_ids(6, seed=8), random_ids(3, seed=9)]
    ids, m = random_ids(160, seed=2), meta(160)
    torch.manual_seed(0)  # random, compactor and leveragescore sample
    return on_meta(prefill, model, ids, press, m) if default_meta else prefill(model, ids, press, m)


def assert_same_cache(a, b):
    for x, y in zip(a.keys + a.values, b.keys + b.values):
        assert x.device.type == "cpu" and torch.equal(x, y)
    for x, y in zip(a.evicted, b.evicted):
        assert (x is None and y is None) or torch.equal(x, y)


def check_press(model, spec: dict, name: str = "") -> None:
    kv = compress(model, spec, name, default_meta=True)
    assert_same_cache(kv, compress(model, spec, name))
    question = random_ids(5, seed=4)
    logits = on_meta(question_logits, model, kv, question)
    torch.testing.assert_close(logits, question_logits(model, kv, question))


@pytest.mark.parametrize("name", OFFLINE + sorted(OWN))
def test_press(model, name):
    spec = OWN.get(name) or spec_for(name)
    if name in KVPRESS_MAKES_THEN_MOVES:
        with pytest.raises(NotImplementedError, match="meta tensor"):
            check_press(model, spec, name)
        return
    check_press(model, spec, name)


@pytest.mark.parametrize(("first", "second"), COMPOSITIONS, ids=[f"{a}+{b}" for a, b in COMPOSITIONS])
def test_composition_with_kvcompose_in_each_position(model, first, second):
    check_press(model, {"compose": [PARTS[first][0], PARTS[second][0]]})


@pytest.mark.parametrize("name", CODECS)
def test_codec_round_trip(model, name):
    think = {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                         {**KVCOMPOSE, "structured": False}]}  # zero key channels and head-wise evictions
    kv = compress(model, think)
    data = on_meta(codec.encode, kv, name)
    assert data == codec.encode(kv, name)
    assert_same_cache(on_meta(codec.decode, data), codec.decode(data))


@pytest.fixture(scope="module")
def headwise_kv(model):
    return compress(model, OWN["kvcompose-headwise"])


def test_decode_alone(model, headwise_kv):
    question = random_ids(4, seed=5)
    for sampling in (Sampling(max_new_tokens=6), Sampling(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=3)):
        one = [Request(headwise_kv, question, sampling)]
        assert on_meta(decode_tokens, model, one) == decode_tokens(model, one)


def test_decode_in_a_batch(model, headwise_kv):
    other = compress(model, KVCOMPOSE)
    q, six = random_ids(4, seed=5), Sampling(max_new_tokens=6)
    rows = [Request(headwise_kv, q, six), Request(other, q, six, until=lambda t: len(t) == 2),
            Request(headwise_kv, q, six)]
    assert on_meta(decode_tokens, model, rows) == decode_tokens(model, rows)


@pytest.mark.parametrize("static", STATIC.values(), ids=STATIC)
def test_decode_loop_thread(tiny_engine, static):
    """The loop runs in its own thread, which takes its starter's default device."""
    caches = [tiny_engine.compress(random_ids(120, seed=s), spec)[0]
              for s, spec in ((1, KVCOMPOSE), (2, OWN["kvcompose-headwise"]))]
    sampling = Sampling(max_new_tokens=5)

    async def answer_all(loop):
        async def one(kv):
            return "".join([piece async for _, piece in loop.stream(kv, "What is it?", sampling)])
        return await asyncio.gather(*(one(kv) for kv in caches))

    got = on_meta(asyncio.run, answer_all(decode_loop(tiny_engine, BatchLimits(max_batch=4), static)))
    assert got == asyncio.run(answer_all(tiny_engine.new_decode_loop(BatchLimits(max_batch=4))))


def test_engine_compress_with_its_codec(tiny_engine):
    ids = random_ids(150, seed=6)
    kv, _ = on_meta(tiny_engine.compress, ids, None, ["What is the code?"], "int8")
    assert_same_cache(kv, tiny_engine.compress(ids, None, ["What is the code?"], "int8")[0])
