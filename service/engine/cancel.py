"""Cancellation of model work that runs in a thread.

A cancelled asyncio task cannot stop a thread, and a model lock released while the thread still
runs lets the next request share the model mid-forward. So a prefill gets a stop flag, checked
before every decoder layer (``stop_between_layers``), and the caller keeps waiting, lock held,
until the thread has really ended (``run_stoppable``). Decoding needs neither: an answer that is
cancelled leaves the decode loop's batch at the next step (``service.engine.batching``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

from service.protocol import Cancelled

T = TypeVar("T")


@contextlib.contextmanager
def stop_between_layers(model: nn.Module, stop: threading.Event | None) -> Iterator[None]:
    """While inside, every decoder layer first checks ``stop`` and raises ``Cancelled`` if it is set."""
    if stop is None:
        yield
        return

    def check(module: nn.Module, args: tuple) -> None:
        if stop.is_set():
            raise Cancelled("the request was cancelled")

    handles = [layer.register_forward_pre_hook(check) for layer in model.model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


async def run_stoppable(work: Callable[[threading.Event], T]) -> T:
    """``work(stop)`` in a thread. If the awaiting task is cancelled, set ``stop`` and wait for the
    thread to end before the cancellation propagates (so a lock held around this stays held)."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, stop)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await wait_until_done(future)
        raise


async def wait_until_done(future: asyncio.Future) -> None:
    """Wait for ``future`` however often this task is cancelled meanwhile; its outcome is dropped."""
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            continue
        except BaseException:  # noqa: BLE001 - the work's own error (e.g. Cancelled) ends it too
            break
    if future.done() and not future.cancelled():
        future.exception()  # mark retrieved
