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


def _hooks(model) -> int:
    layers = sum(len(layer._forward_pre_hooks) for layer in model.model.layers)
    return layers + len(model.model._forward_pre_hooks)


def test_a_stopped_compress_leaves_the_model_clean_and_the_next_one_exact(tiny_engine):
    ids, other = random_ids(600, seed=90), random_ids(300, seed=91)
    expected, _ = tiny_engine.compress(other, PRESS)
    before = _hooks(tiny_engine.loaded.model)
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
    assert _hooks(tiny_engine.loaded.model) == before  # no press or stop hook left behind
    assert getattr(tiny_engine.loaded.model.model, "_kvcompose_input_hook", None) is None
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
