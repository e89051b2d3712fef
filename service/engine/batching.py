"""Continuous batching: one decode loop per Decoder replica advances every active answer by one
token per step, in one batched forward.

A decode step is bound by reading the weights (CPU) or by memory bandwidth (GPU), so one step for
many answers costs little more than one for a single answer. Between steps the loop admits new
requests and retires finished, stopped and cancelled ones (continuous batching, as vLLM, SGLang
and TGI do).

- **Any caches together.** Rows may answer from different documents, with different original
  lengths, per-layer lengths and head-wise evictions: each row keeps its own cache and the
  attention function attends row by row (``service.engine.attention``), while the projections and MLPs,
  where the weights are read, run once for the whole batch. Nothing is padded or copied when a
  row joins or leaves.
- **Question prefill as its own step, before the decode step.** The questions of the requests
  admitted together (tens of tokens each) are prefilled in one forward per group of similar lengths
  (``_by_length``), padded at the end to the group's longest (each row's padding is dropped from its
  cache afterwards; causal attention keeps it from touching the real tokens), then the requests join
  the decode batch. A burst of new requests thus costs one forward, not one per request, and every
  answer stays token-for-token what it would be alone (tested). Those who arrive during a prefill
  are admitted and prefilled before the next decode step (prefill first, as vLLM's scheduler orders
  them): under load a first token waits a step less. Mixing question tokens into the decode step
  itself (chunked prefill) would save little more at these question lengths.
- **One loop for every caller.** The service streams through ``stream`` (the loop runs in its own
  thread); the CLI and the benchmarks call ``answer`` / ``stream_here``, which drive the same rounds
  in the caller's thread. An answer is the same alone and inside any batch (tested).
- **Bounded.** At most ``max_batch`` rows run; at most ``max_waiting`` more wait (admitted in
  arrival order as rows retire or memory frees); beyond that a request is refused at once with
  ``Overloaded`` (RESOURCE_EXHAUSTED: retry). A row's memory (its cache copy with room for the
  answer) must fit in ``memory_bytes`` with the others'.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch

from service.cache.kvcache import CompressedKV
from service.config import BatchLimits
from service.engine.decode import Sampling, padded_cache, penalise, pick_token, ragged_cache
from service.engine.step_graph import StepGraph
from service.engine.text_stream import TextStream, Tokenizer
from service.protocol import Overloaded

log = logging.getLogger(__name__)
_DONE = object()

# (cache, question, sampling) -> (question ids, sampling as decoded), or ValueError: ``Engine.prepare``
Prepare = Callable[[CompressedKV, str, Sampling], tuple[list[int], Sampling]]


@dataclass(frozen=True)
class Request:
    """One answer to decode. ``question_ids`` and ``sampling`` as ``Engine.prepare`` returns them;
    ``until``: ends the answer once true of its tokens (the accuracy bench stops at a right answer)."""

    kv: CompressedKV
    question_ids: list[int]
    sampling: Sampling
    until: Callable[[list[int]], bool] | None = None


@dataclass(eq=False)
class _Answer:
    """One request's state in the loop (touched only by the loop thread, except ``cancelled``)."""

    kv: CompressedKV
    question_ids: list[int]
    sampling: Sampling
    text: TextStream
    emit: Callable[[object], None]
    nbytes: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    cache: object = None
    evicted: list | None = None
    position: int = 0
    last: int = -1
    generator: torch.Generator | None = None
    until: Callable[[list[int]], bool] | None = None
    done: bool = False
    # where its first token's time went (seconds): batch_wait_s (queued until admitted to the batch),
    # prefill_s (admitted until its first token: the question prefills of that round); ``stream`` adds
    timings: dict[str, float] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.perf_counter)
    admitted_at: float = 0.0

    def take(self, token: int) -> None:
        """A generated token: stream its text, or end the answer."""
        if not self.text.tokens:
            self.timings["prefill_s"] = time.perf_counter() - self.admitted_at
        if token in self.sampling.stop_token_ids:
            return self.finish()
        piece = self.text.add(token)
        if piece:
            self.emit((len(self.text.tokens), piece))
        if self.text.stopped or len(self.text.tokens) >= self.sampling.max_new_tokens or (
                self.until is not None and self.until(self.text.tokens)):
            return self.finish()
        self.last = token

    def finish(self, error: BaseException | None = None) -> None:
        if self.done:
            return
        self.done = True  # before the end is emitted: a client told "done" may send the next request at once
        piece = "" if error else self.text.finish()
        if piece:
            self.emit((len(self.text.tokens), piece))
        self.emit(error or _DONE)
        self.cache = None  # free the copy now


class DecodeLoop:
    """The replica's decode loop; ``stream`` is its only entry. ``steps``, ``peak_batch`` and
    ``peak_joining`` (most questions prefilled in one forward) are for metrics and tests."""

    # Admission and prefill passes before a step: bounded, so a stream of arrivals that each end at
    # their first token cannot hold the running answers back for long.
    PREFILL_PASSES = 4

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer | None, prepare: Prepare | None = None,
                 limits: BatchLimits | None = None, static_steps: bool | None = None):
        """tokenizer: None = token ids only, no text. prepare: turns ``stream``'s question into ids
        (``Engine.prepare``); None = ``stream`` is refused, ``answer`` and ``stream_here`` take ids.
        static_steps: decode steps over fixed buffers (``service.engine.step_graph``), replayed as CUDA
        graphs on CUDA (unless ``decode_batch.cuda_graphs`` is false); None = on CUDA only."""
        self.model, self.tokenizer, self.prepare = model, tokenizer, prepare
        self.limits = limits or BatchLimits()
        device = model.device
        self._static = None
        if static_steps if static_steps is not None else device.type == "cuda":
            self._static = StepGraph(model, capture=device.type == "cuda" and self.limits.cuda_graphs)
        self.steps = 0
        self.peak_batch = 0
        self.peak_joining = 0
        self._waiting: collections.deque[_Answer] = collections.deque()
        self._active: list[_Answer] = []
        self._memory = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._here = threading.Lock()  # one caller at a time drives the loop in its own thread

    def load(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "memory_bytes": self._memory}

    def check_capacity(self) -> None:
        """Refuse early (before fetching a cache) when the queue is already full."""
        with self._cond:
            self._check_locked()

    def _check_locked(self) -> None:
        # Free batch rows count as places too: while a step runs, the loop has not yet moved the
        # waiting answers into them, and a burst arriving then must not be refused for that.
        # A finished answer's row is free although the loop retires it only after the step: its
        # client may already have been told, and sent the next request.
        answering = sum(not a.done for a in self._active)
        free_rows = max(0, self.limits.max_batch - answering)
        if len(self._waiting) >= self.limits.max_waiting + free_rows:
            raise Overloaded(f"the decoder is at capacity ({answering} answering, {len(self._waiting)} "
                             f"waiting; decode_batch.max_waiting={self.limits.max_waiting}): retry shortly")

    async def stream(self, kv: CompressedKV, question: str, sampling: Sampling,
                     timings: dict[str, float] | None = None) -> AsyncIterator[tuple[int, str]]:
        """(tokens so far, text) as this answer is decoded in the batch: the first token alone, then
        tokens coalesced as ``BatchLimits`` says (``stream_max_tokens``, ``stream_hold_s``). Leaving
        early (a cancelled or disconnected client) takes the answer out of the batch at the next step.
        ``timings`` gets prepare_s (tokenizing the question), batch_wait_s and prefill_s by the first token."""
        if self.prepare is None:
            raise TypeError("this decode loop has no prepare: give it question ids through answer()")
        started = time.perf_counter()
        question_ids, sampling = await asyncio.to_thread(self.prepare, kv, question, sampling)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        answer = self._answer(Request(kv, question_ids, sampling), _emitter(loop, queue))
        if timings is not None:
            timings["prepare_s"] = answer.queued_at - started
            answer.timings = timings
        with self._cond:
            self._check_locked()
            self._waiting.append(answer)
            self._start_thread()
            self._cond.notify()
        try:
            async for item in _coalesced(queue, self.limits.stream_max_tokens, self.limits.stream_hold_s):
                yield item
        finally:
            answer.cancelled.set()
            with self._cond:
                if answer in self._waiting:  # not admitted yet: free its place now
                    self._waiting.remove(answer)

    def answer(self, requests: list[Request]) -> list[list[int]]:
        """Decode ``requests`` to their ends in the caller's thread, batched as the service batches
        them; each answer's token ids (stop tokens not included)."""
        errors: list[BaseException] = []
        answers = [self._answer(r, lambda item: errors.append(item) if isinstance(item, BaseException) else None)
                   for r in requests]
        for _ in self._drive(answers):
            pass
        if errors:
            raise errors[0]
        return [a.text.tokens for a in answers]

    def stream_here(self, request: Request) -> Iterator[tuple[int, str]]:
        """(tokens so far, text piece) of one answer, decoded in the caller's thread."""
        out: collections.deque = collections.deque()
        answer = self._answer(request, out.append)
        for _ in self._drive([answer]):
            while out:
                item = out.popleft()
                if isinstance(item, BaseException):
                    raise item
                if item is not _DONE:
                    yield item

    def _drive(self, answers: list[_Answer]) -> Iterator[None]:
        """Run rounds here until ``answers`` are done; yields after each round."""
        if self._thread is not None:
            raise RuntimeError("this decode loop runs in its own thread (the service's): use stream()")
        with self._here:
            with self._cond:
                self._waiting.extend(answers)
            try:
                while not all(a.done for a in answers):
                    self._round()
                    yield
            finally:  # a caller that stops reading leaves no answer behind
                for a in answers:
                    a.cancelled.set()
                self._retire()
                with self._cond:
                    self._waiting.clear()

    def _answer(self, r: Request, emit: Callable[[object], None]) -> _Answer:
        s = r.sampling
        answer = _Answer(r.kv, r.question_ids, s, TextStream(self.tokenizer, s.stop, s.include_stop_str_in_output),
                         emit, self._row_bytes(r.kv, _padded_width(len(r.question_ids)) + r.sampling.max_new_tokens),
                         until=r.until)
        if answer.nbytes > self.limits.memory_bytes:  # retrying cannot help: a client error
            raise ValueError(f"this answer needs {answer.nbytes} bytes of cache; the decoder's budget is "
                             f"{self.limits.memory_bytes} (decode_batch.memory_bytes): ask for fewer "
                             "max_new_tokens or a shorter question")
        return answer

    def _row_bytes(self, kv: CompressedKV, room: int) -> int:
        size = self.model.dtype.itemsize
        return sum(2 * k.shape[0] * (k.shape[1] + room) * k.shape[2] * size for k in kv.keys)

    def _start_thread(self) -> None:
        if self._thread is None:
            # A thread does not inherit torch's default device: the loop takes its starter's, so a
            # tensor it makes without device= fails in tests run under the meta device, as on a GPU.
            self._thread = threading.Thread(target=self._run, args=(torch.get_default_device(),),
                                            name="decode-loop", daemon=True)
            self._thread.start()

    # -- the loop thread ------------------------------------------------------------------------

    def _run(self, default_device: torch.device) -> None:
        if default_device.type != "cpu":  # a default device is a function mode: every op pays for it
            torch.set_default_device(default_device)
        while True:
            with self._cond:
                while not self._waiting and not self._active:
                    self._cond.wait()
            self._round()

    def _round(self) -> None:
        """Admit what fits and prefill the newcomers' questions, then one token for every answer.

        Prefill first: those who arrive while questions are prefilled are admitted and prefilled too
        before the step (up to ``PREFILL_PASSES`` times), so a first token never waits behind a decode
        step it could precede; running answers lose one step's time, a newcomer saves a step's."""
        for _ in range(self.PREFILL_PASSES):
            with self._cond:
                joining = self._admit_locked()
            if not joining:
                break
            for group in _by_length(joining):
                self._guarded(group, self._prefill)
            self._retire()
        if self._active:
            self._guarded(list(self._active), self._step)
            self._retire()

    def _admit_locked(self) -> list[_Answer]:
        joining = []
        while self._waiting and len(self._active) < self.limits.max_batch:
            answer = self._waiting[0]
            if answer.cancelled.is_set():
                self._waiting.popleft()
                answer.finish()
                continue
            if self._active and self._memory + answer.nbytes > self.limits.memory_bytes:
                break  # waits, in order, until memory frees
            self._waiting.popleft()
            self._active.append(answer)
            self._memory += answer.nbytes
            joining.append(answer)
            answer.admitted_at = time.perf_counter()
            answer.timings["batch_wait_s"] = answer.admitted_at - answer.queued_at
        self.peak_batch = max(self.peak_batch, len(self._active))
        self.peak_joining = max(self.peak_joining, len(joining))
        return joining

    def _retire(self) -> None:
        with self._cond:
            for answer in self._active:
                if answer.cancelled.is_set():
                    answer.finish()
            kept = [a for a in self._active if not a.done]
            self._memory -= sum(a.nbytes for a in self._active if a.done)
            self._active = kept
            if not kept and self._static is not None:
                self._static.forget()  # nothing may keep a finished answer's buffers alive

    def _guarded(self, answers: list[_Answer], work: Callable[[list[_Answer]], None]) -> None:
        try:
            work(answers)
        except Exception as e:  # noqa: BLE001 - the requests in this step fail, the loop goes on
            log.exception("decode step failed for %d answers", len(answers))
            for answer in answers:
                answer.finish(e)

    def _prefill(self, answers: list[_Answer]) -> None:
        """The questions of newly admitted answers, in one forward, each row padded at its end."""
        model = self.model
        device = model.device
        width = max(len(a.question_ids) for a in answers)
        for a in answers:
            a.cache = padded_cache([a.kv], model, room=width + a.sampling.max_new_tokens)
            a.evicted = a.kv.evicted_for(device) or [None] * a.kv.num_layers
            if a.sampling.seed is not None:
                a.generator = torch.Generator(device=device).manual_seed(a.sampling.seed)
            a.position = a.kv.meta.original_length
        ids = [a.question_ids + a.question_ids[-1:] * (width - len(a.question_ids)) for a in answers]
        last = sorted({len(a.question_ids) - 1 for a in answers})  # where each row's logits are
        with torch.inference_mode():
            out = model(input_ids=torch.tensor(ids, device=device),
                        position_ids=torch.stack([torch.arange(a.position, a.position + width, device=device)
                                                  for a in answers]),
                        past_key_values=ragged_cache([a.cache for a in answers]),
                        kvc_evicted=[[a.evicted[i] for a in answers] for i in range(len(answers[0].evicted))],
                        kvc_kernel=self._static is not None and self._static.kernel,
                        logits_to_keep=torch.tensor(last, device=device))
        logits = torch.stack([out.logits[row, last.index(len(a.question_ids) - 1)] for row, a in enumerate(answers)])
        for a in answers:
            padding = width - len(a.question_ids)
            for layer in a.cache.layers:
                layer.truncate(padding)
            a.position += len(a.question_ids)
        _take_all(answers, logits)

    def _step(self, answers: list[_Answer]) -> None:
        """One token for every active answer, in one forward (a static one, or a CUDA graph's replay)."""
        with torch.inference_mode():
            if self._static is not None:
                logits = self._static.step([a.cache for a in answers], [a.evicted for a in answers],
                                          [a.last for a in answers], [a.position for a in answers])
            else:
                logits = self._ragged_step(answers)
        self.steps += 1
        for a in answers:
            a.position += 1
        _take_all(answers, logits)

    def _ragged_step(self, answers: list[_Answer]) -> torch.Tensor:
        model = self.model
        device = model.device
        layers = len(answers[0].evicted)
        out = model(input_ids=torch.tensor([[a.last] for a in answers], device=device),
                    position_ids=torch.tensor([[a.position] for a in answers], device=device),
                    past_key_values=ragged_cache([a.cache for a in answers]),
                    kvc_evicted=[[a.evicted[i] for a in answers] for i in range(layers)], logits_to_keep=1)
        return out.logits[:, -1]


def decode_tokens(model: torch.nn.Module, requests: list[Request],
                  limits: BatchLimits | None = None) -> list[list[int]]:
    """The loop over a bare model, token ids in and out (benchmarks and tests on random models):
    ``DecodeLoop.answer`` without a tokenizer."""
    return DecodeLoop(model, None, limits=limits or BatchLimits(memory_bytes=1 << 50)).answer(requests)


def _padded_width(question_tokens: int) -> int:
    """The most a question is padded to when prefilled with others (see ``_by_length``)."""
    return 2 * question_tokens + 16


def _by_length(answers: list[_Answer]) -> list[list[_Answer]]:
    """Groups to prefill together: each no wider than ``_padded_width`` of its shortest question, so
    padding stays within what admission counted."""
    groups: list[list[_Answer]] = []
    for a in sorted(answers, key=lambda a: len(a.question_ids)):
        if groups and len(a.question_ids) <= _padded_width(len(groups[-1][0].question_ids)):
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


def _take_all(answers: list[_Answer], logits: torch.Tensor) -> None:
    """Pick and take each answer's token from its row of (B, vocab) logits: greedy rows with one host
    sync for all; a failure ends that answer only."""
    greedy = logits.argmax(dim=-1).tolist()
    for row, answer in enumerate(answers):
        try:
            s = answer.sampling
            if s.temperature != 0 or s.penalised:
                token = pick_token(penalise(logits[row].float(), answer.text.tokens, s), s, answer.generator)
            else:
                token = greedy[row]
            answer.take(token)
        except Exception as e:  # noqa: BLE001
            log.exception("picking a token failed")
            answer.finish(e)


async def _coalesced(queue: asyncio.Queue, max_tokens: int, hold_s: float) -> AsyncIterator[tuple[int, str]]:
    """The (tokens so far, piece) items of ``queue`` until ``_DONE``: the first alone, the rest joined
    until ``max_tokens`` pieces or ``hold_s`` since the first of them (what already waits goes at once
    with them); an exception item is raised after what came before it is sent."""
    first, ending = True, None
    while ending is None:
        item = await queue.get()
        if not isinstance(item, tuple):
            ending = item
            break
        count, text, pieces = *item, 1
        deadline = time.perf_counter() + hold_s
        while not first and pieces < max_tokens:
            if queue.empty():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
            else:
                item = queue.get_nowait()
            if not isinstance(item, tuple):
                ending = item
                break
            count, text, pieces = item[0], text + item[1], pieces + 1
        first = False
        yield count, text
    if isinstance(ending, BaseException):
        raise ending


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[object], None]:
    def emit(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone; nobody listens
            pass
    return emit
