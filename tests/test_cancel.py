"""Cancelled model work stops between layers, leaves nothing on the model, and keeps its lock until
the thread has ended; the next request is exactly what a fresh one gives."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from conftest import random_ids

from service.engine.cancel import Cancelled, run_stoppable

PRESS = {"press": "kvcompose", "compression_ratio": 0.5}


def _model_state(model) -> tuple[int, set]:
    """What a press or a stop flag could leave behind: every forward hook on every module (the
    pre-hooks of ``stop_between_layers``, kvpress's forward hooks on the attention modules) and every
    module's public attributes (a mask left on an attention module would leak into the next request)."""
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    attributes = {(name, key) for name, m in model.named_modules() for key, value in vars(m).items()
                  if not key.startswith("_") and value is not None}
    return hooks, attributes


def test_the_state_probe_sees_hooks_and_attributes(tiny_engine):
    """The check below can fail: a forward hook or an attribute left on an attention module shows."""
    model = tiny_engine.loaded.model
    before = _model_state(model)
    attention = model.model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda *a: None)
    assert _model_state(model) != before
    handle.remove()
    attention.masked_key_indices = (torch.zeros(1),)
    try:
        assert _model_state(model) != before
    finally:
        del attention.masked_key_indices
    assert _model_state(model) == before


def test_a_stopped_compress_leaves_the_model_clean_and_the_next_one_exact(tiny_engine):
    ids, other = random_ids(600, seed=90), random_ids(300, seed=91)
    expected, _ = tiny_engine.compress(other, PRESS)
    before = _model_state(tiny_engine.loaded.model)
    stop = threading.Event()
    calls = {"n": 0}

    def trip(module, args):  # set the flag from inside the forward, after two layers
        calls["n"] += 1
        if calls["n"] == 2:
            stop.set()

    handle = tiny_engine.loaded.model.model.layers[1].register_forward_pre_hook(trip)
    try:
        with pytest.raises(Cancelled):
            tiny_engine.compress(ids, PRESS, stop=stop)
    finally:
        handle.remove()
    assert _model_state(tiny_engine.loaded.model) == before  # no hook, no mask left behind
    again, _ = tiny_engine.compress(other, PRESS)
    for a, b in zip(again.keys + again.values, expected.keys + expected.values):
        assert torch.equal(a, b)


def test_the_lock_is_held_until_the_cancelled_thread_has_ended():
    events: list[str] = []

    def work(stop: threading.Event) -> None:
        while not stop.is_set():
            time.sleep(0.01)
        time.sleep(0.3)  # a layer still finishing
        events.append("thread ended")

    async def main() -> None:
        lock = asyncio.Lock()

        async def holder() -> None:
            async with lock:
                await run_stoppable(work)

        task = asyncio.create_task(holder())
        await asyncio.sleep(0.1)
        task.cancel()
        async with lock:  # the next request gets the model only after the thread ended
            events.append("next request")
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert events == ["thread ended", "next request"]
