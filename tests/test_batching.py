"""Continuous batching: answers decoded together are token-for-token what each gives alone, whatever
mix of caches, lengths and presses; cancelled answers leave the batch; admission is bounded."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
from conftest import random_ids

from service.engine.batching import BatchLimits, DecodeLoop, Overloaded, Request
from service.engine.decode import Sampling
from service.engine.step_graph import StepGraph

STATIC = {"ragged": False, "static-steps": True, "static-kernel": "kernel"}


def decode_loop(engine, limits: BatchLimits, static: bool | str) -> DecodeLoop:
    """A loop whose steps are ragged (row by row), static, or static through the batched Triton kernel
    (``service.engine.ragged_attention``, interpreted here: the path CUDA takes)."""
    loop = engine.new_decode_loop(limits, static_steps=bool(static))
    if static == "kernel":
        loop._static = StepGraph(engine.loaded.model, capture=False, kernel=True)
    return loop

PRESSES = [{}, {"press": "kvcompose", "compression_ratio": 0.6},
           {"press": "adakv", "inner": {"press": "snapkv", "compression_ratio": 0.5, "window_size": 8}},
           {"press": "pyramidkv", "compression_ratio": 0.7, "window_size": 8},
           {"press": "kvcompose", "compression_ratio": 0.5, "structured": False}]


@pytest.fixture(scope="module")
def caches(tiny_engine):
    """Different documents (lengths 90..330) under different presses, head-wise ones included."""
    return [tiny_engine.compress(random_ids(90 + 60 * i, seed=100 + i), spec)[0] for i, spec in enumerate(PRESSES)]


def alone(engine, kv, question, sampling, stop=()):
    return [piece for _, piece in engine.stream_counted(kv, question, replace(sampling, stop=stop))]


async def collect(loop: DecodeLoop, kv, question, sampling, stop=()):
    return [piece async for _, piece in loop.stream(kv, question, replace(sampling, stop=stop))]


@pytest.mark.parametrize("static", STATIC.values(), ids=STATIC)
def test_batched_answers_equal_answers_alone(tiny_engine, caches, static):
    """Static steps are the CUDA-graph path (``service.engine.step_graph``), run eagerly here."""
    questions = ["What is it?", "Say more about the second part, please.", "Why?", "List three things.", "Hm"]
    settings = [Sampling(max_new_tokens=n) for n in (12, 5, 9, 16, 7)]
    settings[2] = Sampling(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=11)  # sampled, seeded
    stops = [(), (), (), ("e",), ()]
    expected = [alone(tiny_engine, kv, q, s, st) for kv, q, s, st in zip(caches, questions, settings, stops)]
    assert len({"".join(e) for e in expected}) > 1
    loop = decode_loop(tiny_engine, BatchLimits(max_batch=8), static)

    async def main():
        # Hold admission (the loop's lock is reentrant for this thread) until all five wait, so
        # their questions are prefilled together.
        with loop._cond:
            tasks = [asyncio.ensure_future(collect(loop, kv, q, s, st))
                     for kv, q, s, st in zip(caches, questions, settings, stops)]
            while len(loop._waiting) < len(tasks):
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    got = asyncio.run(main())
    assert ["".join(g) for g in got] == ["".join(e) for e in expected]
    assert loop.peak_joining == 5 and loop.peak_batch == 5  # questions of 2..9 tokens padded together
    deadline = time.monotonic() + 5  # a client hears "done" just before the loop retires its row
    while loop.load()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.load() == {"active": 0, "waiting": 0, "memory_bytes": 0}


@pytest.mark.parametrize("static", [False, True], ids=["ragged", "static-steps"])
def test_a_cancelled_answer_leaves_the_batch_and_the_others_go_on(tiny_engine, caches, static):
    loop = tiny_engine.new_decode_loop(BatchLimits(max_batch=4), static_steps=static)
    short, long = Sampling(max_new_tokens=20), Sampling(max_new_tokens=1000)
    expected = alone(tiny_engine, caches[1], "Go on.", short)

    async def main():
        stays = asyncio.create_task(collect(loop, caches[1], "Go on.", short))
        leaver = loop.stream(caches[0], "Go on.", long)
        await leaver.__anext__()  # one piece, then the client goes away
        await leaver.aclose()
        answer = await stays
        while loop.load()["active"]:
            await asyncio.sleep(0.01)
        return answer

    assert "".join(asyncio.run(main())) == "".join(expected)
    assert loop.steps < 100  # the 1000-token answer left the batch instead of running on


def test_a_failing_answer_ends_alone_not_its_batch(tiny_engine, caches):
    """One row whose token cannot be picked (a fault injected into the pick) fails; the rest goes on."""
    loop = tiny_engine.new_decode_loop(BatchLimits(max_batch=4))
    good = alone(tiny_engine, caches[1], "Go on.", Sampling(max_new_tokens=12))
    broken = Sampling(max_new_tokens=12, temperature=1.0, seed=4242)  # marked by its seed

    async def main():
        import service.engine.batching as batching

        original = batching.pick_token

        def pick(logits, sampling, generator):
            if sampling.seed == 4242:
                raise RuntimeError("probability tensor contains nan")
            return original(logits, sampling, generator)

        batching.pick_token = pick
        try:
            return await asyncio.gather(collect(loop, caches[1], "Go on.", Sampling(max_new_tokens=12)),
                                        collect(loop, caches[0], "Go on.", broken), return_exceptions=True)
        finally:
            batching.pick_token = original

    ok, failed = asyncio.run(main())
    assert "".join(ok) == "".join(good) and isinstance(failed, RuntimeError)


def held_loop(engine, limits: BatchLimits) -> tuple[DecodeLoop, threading.Event]:
    """A decode loop whose question prefill waits for the returned event: an answer held there
    cannot finish (and free a place) while a test checks admission, so the test is about
    admission, not about timing."""
    loop = engine.new_decode_loop(limits)
    gate, prefill = threading.Event(), loop._prefill
    loop._prefill = lambda rows: (gate.wait(), prefill(rows))[1]
    return loop, gate


async def until_load(loop: DecodeLoop, active: int, waiting: int, tasks: list[asyncio.Task]) -> None:
    """Wait (bounded) for the loop's (active, waiting); a request that failed instead raises here."""
    for _ in range(30_000):
        if (loop.load()["active"], loop.load()["waiting"]) == (active, waiting):
            return
        for task in tasks:
            if task.done():
                task.result()
        await asyncio.sleep(0.001)
    raise AssertionError(f"decode loop never reached {(active, waiting)}: {loop.load()}")


def test_admission_is_bounded_and_the_refusal_says_retry(tiny_engine, caches):
    loop, gate = held_loop(tiny_engine, BatchLimits(max_batch=1, max_waiting=2))
    sampling = Sampling(max_new_tokens=40)

    async def main():
        first: list[asyncio.Task] = []
        try:
            for waiting in (0, 1, 2):  # one answering (held), then two queued, one at a time
                first.append(asyncio.create_task(collect(loop, caches[0], "Go on.", sampling)))
                await until_load(loop, 1, waiting, first)
            with pytest.raises(Overloaded, match="retry"):
                await collect(loop, caches[0], "Go on.", sampling)
        finally:
            gate.set()
        return await asyncio.wait_for(asyncio.gather(*first), 120)

    answers = asyncio.run(main())
    assert len({"".join(a) for a in answers}) == 1  # the queued ones were answered, in order, alike


def test_a_burst_while_the_loop_is_busy_gets_the_free_rows_and_the_queue(tiny_engine, caches):
    """max_batch 3 + max_waiting 1: with one answer held mid-prefill (the loop cannot move anyone into
    the batch), three more are admitted (two free rows, one waiting place) and only the fifth is refused."""
    loop, gate = held_loop(tiny_engine, BatchLimits(max_batch=3, max_waiting=1))
    sampling = Sampling(max_new_tokens=8)

    async def main():
        tasks = [asyncio.create_task(collect(loop, caches[0], "Go on.", sampling))]
        try:
            await until_load(loop, 1, 0, tasks)
            tasks += [asyncio.create_task(collect(loop, caches[0], "Go on.", sampling)) for _ in range(3)]
            await until_load(loop, 1, 3, tasks)  # admitted while the loop was held
            with pytest.raises(Overloaded, match="retry"):
                await collect(loop, caches[0], "Go on.", sampling)
        finally:
            gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    answers = asyncio.run(main())
    assert len(answers) == 4 and len({"".join(a) for a in answers}) == 1


def test_a_finished_answer_frees_its_place_before_its_client_hears_the_end(tiny_engine, caches):
    """The loop retires finished rows after the step; a client told "done" that asks again at once
    (as Serve does with its next queued request) must not be refused for a row that is already free."""
    loop, gate = held_loop(tiny_engine, BatchLimits(max_batch=1, max_waiting=1))
    gate.set()  # question prefills run; what is held is the retiring of finished rows
    retire_gate, retire = threading.Event(), loop._retire
    loop._retire = lambda: (retire_gate.wait(), retire())[1]
    sampling = Sampling(max_new_tokens=1)  # each answer ends at its question's prefill

    async def main():
        try:
            first = await collect(loop, caches[0], "Go on.", sampling)
            waiting = [asyncio.create_task(collect(loop, caches[0], "Go on.", sampling))]
            await until_load(loop, 1, 1, waiting)  # the finished row is not retired; one answer waits
            loop.check_capacity()  # the first client's next request: its row is free
        finally:
            retire_gate.set()
        return [first, *await asyncio.wait_for(asyncio.gather(*waiting), 120)]

    answers = asyncio.run(main())
    assert len(answers) == 2 and answers[0] == answers[1]


def test_a_question_that_arrives_during_a_prefill_is_prefilled_before_the_next_step(tiny_engine, caches):
    """Prefill first: a request that comes while another's question is prefilled gets its first
    token before the batch takes a decode step (its time to first token does not include a step),
    and both answers are still what each gives alone."""
    loop = tiny_engine.new_decode_loop(BatchLimits(max_batch=4))
    sampling = Sampling(max_new_tokens=5)
    first, second = (Request(kv, *tiny_engine.prepare(kv, q, sampling))
                     for kv, q in ((caches[0], "Go on."), (caches[1], "And then?")))
    events, late, prefill, step = [], [], loop._prefill, loop._step

    def prefilling(rows):
        events.append(("prefill", len(rows)))
        if not late:  # the second request arrives while the first question is prefilled
            late.append(loop._answer(second, lambda item: None))
            with loop._cond:
                loop._waiting.append(late[0])
        prefill(rows)

    loop._prefill = prefilling
    loop._step = lambda rows: (events.append(("step", len(rows))), step(rows))[1]
    [tokens] = loop.answer([first])
    assert events[:3] == [("prefill", 1), ("prefill", 1), ("step", 2)], events
    assert late[0].done and tokens == loop.answer([first])[0] and late[0].text.tokens == loop.answer([second])[0]


def test_memory_budget_admits_what_fits(tiny_engine, caches):
    loop = tiny_engine.new_decode_loop(BatchLimits(max_batch=8, memory_bytes=loop_bytes(tiny_engine, caches[4])))

    async def main():
        return await asyncio.gather(*[collect(loop, caches[4], "Hi", Sampling(max_new_tokens=6)) for _ in range(3)])

    answers = asyncio.run(main())
    assert len({"".join(a) for a in answers}) == 1 and loop.peak_batch == 1  # one at a time, all answered
    with pytest.raises(ValueError, match="memory_bytes"):  # can never fit: a client error, not "retry"
        asyncio.run(collect(tiny_engine.new_decode_loop(BatchLimits(memory_bytes=1000)), caches[0], "Hi", Sampling()))


def loop_bytes(engine, kv) -> int:
    return engine.new_decode_loop()._row_bytes(kv, 64)


@pytest.mark.parametrize("static", [True, "kernel"], ids=["static-steps", "static-kernel"])
def test_static_steps_follow_answers_that_join_and_leave(tiny_engine, caches, static):
    """Answers of different lengths start at different times: the set of rows changes between steps,
    and every answer is still what it is alone; an idle loop keeps no answer's buffers."""
    loop = decode_loop(tiny_engine, BatchLimits(max_batch=8), static)
    lengths = [3, 11, 7, 15, 5]
    expected = [alone(tiny_engine, kv, "Tell me.", Sampling(max_new_tokens=n)) for kv, n in zip(caches, lengths)]

    async def main():
        tasks = []
        for kv, n in zip(caches, lengths):
            tasks.append(asyncio.ensure_future(collect(loop, kv, "Tell me.", Sampling(max_new_tokens=n))))
            await asyncio.sleep(0.005)  # joins while the others decode
        return await asyncio.gather(*tasks)

    assert ["".join(g) for g in asyncio.run(main())] == ["".join(e) for e in expected]
    deadline = time.monotonic() + 5
    while loop._static._rows is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    graphs = loop._static
    assert graphs._rows is None and graphs._batch is None
    assert all(not layer.rows and not layer.hidden for b in graphs._batches.values() for layer in b.cache.layers)
    if static == "kernel":  # one batch's buffers per size that ran, kept for its graph (tables rewritten on reuse)
        assert set(graphs._batches) <= set(range(1, len(lengths) + 1)) and len(graphs._batches) >= 2


def test_the_cli_answers_through_static_steps_and_graphs_on_cuda(tiny_engine, monkeypatch):
    """``Engine.answer`` (the CLI's single answer) drives the service's loop: on CUDA its steps are static
    and captured as graphs, never op by op."""
    import torch

    from service.config import EngineConfig
    from service.engine.attention import triton_runs_on
    from service.engine.engine import Engine

    model = tiny_engine.loaded.model
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    engine = Engine(EngineConfig(model="tiny-llama", codec="float32"), loaded=tiny_engine.loaded)
    loop = engine.decode_loop()
    triton_runs_on.cache_clear()  # its probe failed here (no CUDA): other tests must not inherit that
    assert isinstance(loop._static, StepGraph) and loop._static.capture and loop._static.state == "eager (warming up)"


def test_kernel_steps_keep_one_batch_per_size_for_new_answers(tiny_engine, caches):
    """With the batched kernel a step's buffers (and on CUDA its graph) belong to a batch size: answers
    that come later, to other caches, reuse them with their own table, and answer as they would alone."""
    loop = decode_loop(tiny_engine, BatchLimits(max_batch=4), "kernel")
    sampling = Sampling(max_new_tokens=6)

    async def pair(kvs):
        with loop._cond:  # both join in one round: a batch of two from the first step
            tasks = [asyncio.ensure_future(collect(loop, kv, "Tell me.", sampling)) for kv in kvs]
            while len(loop._waiting) < len(tasks):
                await asyncio.sleep(0.001)
        return await asyncio.gather(*tasks)

    first = asyncio.run(pair(caches[:2]))
    kept = loop._static._batches[2]
    second = asyncio.run(pair(caches[2:4]))
    assert loop._static._batches[2] is kept and set(loop._static._batches) == {2}
    assert ["".join(g) for g in first + second] == ["".join(alone(tiny_engine, kv, "Tell me.", sampling))
                                                     for kv in caches[:4]]


def test_stream_messages_coalesce_after_the_first_token():
    """The first token leaves alone; later ones that wait go together, up to ``max_tokens`` or
    ``hold_s``; an error comes after what preceded it; nothing is lost or reordered."""
    import asyncio

    from service.engine.batching import _DONE, _coalesced

    async def run(items: list, max_tokens: int, hold_s: float, trickle_s: float = 0.0) -> tuple[list, object]:
        queue: asyncio.Queue = asyncio.Queue()

        async def feed() -> None:
            for item in items:
                queue.put_nowait(item)
                if trickle_s:
                    await asyncio.sleep(trickle_s)

        feeder = asyncio.create_task(feed())
        out, error = [], None
        try:
            async for message in _coalesced(queue, max_tokens, hold_s):
                out.append(message)
        except ValueError as e:
            error = e
        await feeder
        return out, error

    pieces = [(i, f"t{i} ") for i in range(1, 8)]
    out, _ = asyncio.run(run([*pieces, _DONE], max_tokens=3, hold_s=0.5))
    assert out == [(1, "t1 "), (4, "t2 t3 t4 "), (7, "t5 t6 t7 ")]  # all waiting: joined by threes
    out, _ = asyncio.run(run([*pieces[:3], _DONE], max_tokens=8, hold_s=0.0, trickle_s=0.05))
    assert out == [(1, "t1 "), (2, "t2 "), (3, "t3 ")]  # nothing waits and no hold: one token a message
    boom = ValueError("step failed")
    out, error = asyncio.run(run([*pieces[:3], boom], max_tokens=8, hold_s=0.5))
    assert out == [(1, "t1 "), (3, "t2 t3 ")] and error is boom
