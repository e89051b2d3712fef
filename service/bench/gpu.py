"""``kvcompose bench gpu``: the one device check, against the targets of a GPU deployment.

It builds 8B-shaped models with random weights directly on the device (the Llama-3.1-8B and
Qwen3-8B configs; no download) and measures, each row against its reference in the same run.
Rows are named ``kind/.../<shape>/<tokens>``; ``vs_reference`` is each row's figure over its reference's.

- ``compress/<method>/<shape>/<tokens>``: prefill + compression wall time and peak extra device
  memory, against ``plain`` (a prefill that keeps everything). Methods: ``kvcompose`` (the default:
  two-pass up to about 2/3 of the window, one pass beyond), ``kvcompose-1pass`` and
  ``kvpress`` (kvpress 0.5.5's KVComposePress, 8k and 32k).
- ``decode/b<batch>/<cache>/<shape>/<tokens>``: tokens/s of answers decoded by one Decoder's loop
  (``service.engine.batching.DecodeLoop``, the service's own path) from a full or a KVCompose-0.5 cache;
  batch 16 against batch 1 from the same cache; ``+eager``: the same steps without CUDA graphs.
  Each answer runs ``DECODE_TOKENS`` tokens after a warm-up batch of the same size (which leaves
  the step graph captured); tokens/s counts the timed batch from its first token, and ``graph``
  says how its steps ran (``captured``, or ``eager (<why>)``).
- ``needle/<ratio>``: when the embedded SmolLM2 is installed, its needle document compressed with
  the default KVCompose and answered on the device.

Each row carries its planned peak device memory (``plan_peak_gib``, ``memory_plan``: weights, KV
cache, scorer, replay, activations, from the model config); a row whose plan does not fit the
device is ``skipped`` with the reason instead of run out of memory. ``--plan`` prints the plan
for a device size (80 GiB, an H100; 141 GiB, an H200) with no GPU. ``TARGETS`` are marked met or
missed in each row's ``target``. Every row has a time guard (a compress is cancelled between
layers, a decode stops between steps) and a whole-run budget; a row that fails or runs out of
time becomes a row with an ``error`` field, never a crash. Output: a table on stdout,
``results.json`` (a list of row objects) and ``gpu.md``, both rewritten after every row (a run
killed midway leaves the rows it finished). ``--tiny`` runs the same rows on the CPU with tiny
configs (CI runs it, and ``--plan``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from service.bench.table import cell

if TYPE_CHECKING:  # the model stack loads only for the rows that run it
    from service.config import BatchLimits
    from service.engine.batching import DecodeLoop

DECODE_TOKENS = 256  # steady decoding: a capture and two eager steps are noise against it
BATCH = 16
QUESTION_TOKENS = 16  # a decode row's question (random ids)
RATIO = 0.5
# name -> the model's config (transformers class, fields); tiny: the same families, small
SHAPES = {
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "qwen3-8b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0)),
}
TINY = {"llama-3.1-8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512),
        "qwen3-8b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=512)}
LENGTHS = {"llama-3.1-8b": (8192, 32768, 65536), "qwen3-8b": (8192, 32768)}
TINY_LENGTHS = {8192: 128, 32768: 256, 65536: 512}
NEEDLE_TOKENS, TINY_NEEDLE_TOKENS = 4000, 400


@dataclass(frozen=True)
class Target:
    """A figure of the rows named ``prefix...`` against a bound; ``at``: only at that length (or its
    tiny stand-in), None: every length. figure "ran": the row ran (no error, not skipped)."""

    prefix: str
    figure: str
    op: str  # <= | >= | >
    bound: float
    what: str
    at: int | None = None


TARGETS = {
    "two-pass": Target("compress/kvcompose/", "vs_reference", "<=", 2.2, "two-pass <= 2.2x a plain prefill at 32k",
                       32768),
    "one-pass": Target("compress/kvcompose-1pass/", "vs_reference", "<=", 1.3, "one pass <= 1.3x a plain prefill",
                       32768),
    "memory": Target("compress/kvcompose", "peak_vs_plain", "<=", 1.3, "peak extra <= 1.3x the plain prefill's"),
    "kvpress": Target("compress/kvpress/", "kvcompose_speedup", ">=", 10.0, "KVCompose >= 10x faster than kvpress's"),
    "decode": Target("decode/b1/full/", "tokens_per_s", ">=", 150.0,
                     "batch-1 decode from a 32k cache >= 150 tokens/s (H200; 110 on an H100)", 32768),
    "decode-compressed": Target("decode/b1/kvcompose/", "vs_full", ">", 1.0,
                                "decode from the 0.5 cache faster than from the full"),
    "batch": Target("decode/b16/", "vs_reference", ">=", 6.0, "16 answers >= 6x one answer's tokens/s"),
    "64k": Target("compress/kvcompose/", "ran", ">=", 1.0, "64k two-pass with no out-of-memory error", 65536),
}
H100_DECODE = 110.0  # the batch-1 decode bound on an H100 (its bandwidth bound is about 165 tokens/s, the H200's 236)


@dataclass(frozen=True)
class Row:
    kind: str  # compress | decode | needle
    shape: str
    method: str  # compress: plain | kvcompose | kvcompose-1pass | kvpress; decode: full | kvcompose
    tokens: int
    batch: int = 1
    compression_ratio: float = RATIO
    cuda_graphs: bool = True  # decode: each step replayed as a CUDA graph (false: launched op by op)

    @property
    def name(self) -> str:
        if self.kind == "compress":
            return f"compress/{self.method}/{self.shape}/{self.tokens}"
        if self.kind == "decode":
            eager = "" if self.cuda_graphs else "+eager"
            return f"decode/b{self.batch}/{self.method}{eager}/{self.shape}/{self.tokens}"
        return f"needle/{self.compression_ratio:g}/{self.shape}/{self.tokens}"


def plan(tiny: bool, needle: bool = True, shapes: tuple[str, ...] = tuple(SHAPES)) -> list[Row]:
    rows = []
    for shape in shapes:
        lengths = [TINY_LENGTHS[n] if tiny else n for n in LENGTHS[shape]]
        short, mid = lengths[0], lengths[1]
        for n in lengths:
            # kvpress's eager attention at 32k would need ~64 GiB per layer: its row says so (an error row)
            methods = ["plain", "kvcompose"] + (["kvcompose-1pass", "kvpress"] if n <= mid else [])
            rows += [Row("compress", shape, m, n) for m in methods]
        rows += [Row("decode", shape, "full", mid), Row("decode", shape, "full", mid, cuda_graphs=False),
                 Row("decode", shape, "kvcompose", mid),
                 Row("decode", shape, "full", short), Row("decode", shape, "full", short, batch=BATCH)]
    if needle:
        rows += [Row("needle", "smollm2-135m", "kvcompose", TINY_NEEDLE_TOKENS if tiny else NEEDLE_TOKENS,
                     compression_ratio=r)
                 for r in (0.5, 0.75, 0.9)]
    return rows


# -- planning memory -------------------------------------------------------------------------
#
# A row's peak device memory, predicted from its model config (``memory_plan``; b = the dtype's
# bytes, n = tokens, L layers, h hidden, I MLP intermediate, H query heads, kv KV heads, d head_dim):
#   weights      param_count(config) x b
#   kv_cache     L x kv x d x 2 x n x b (the cache a prefill builds)
#   activations  what one layer holds in its MLP: the stream, n x b x (4h + 2d) (the embeddings, the
#                layer's input, its residual and normed copies, the rotary cos and sin), and the gated
#                MLP's act(gate), up and their product, 3 x n x I x b
#   scorer       KVCompose's float32 per-layer scores, L x H x n x 4, kept until the last layer
#   replay       two-pass KVCompose replays the context against the cache: each layer's attention
#                concatenates that layer's cached keys and values with the replayed ones (the
#                read-only view, ``presses/kvcompose.py``), 2 x kv x d x 2n x b, freed before its MLP;
#                kvpress's replay is stored in the cache, a second kv_cache held to the end
#   scoring      what a layer holds while it is scored: the stream, the attention output, the query
#                (pre- and post-rotation, the rotation returning a pair), the replay, and the
#                scorer's working set (CUDA: 2 x H x n x 4 of log-sum-exps and scores; the CPU's
#                reference scorer: a block of float32 logits up to SCORE_BLOCK_BYTES and a float32
#                copy of the keys)
#   peak         weights + kv_cache + scorer + max(activations, scoring)
# kvpress's scoring holds eager attention's (H, n, 2n) weights, 8 bytes each (the logits, the float32
# softmax and its cast back), and the (n, 2n) mask. A decode row's peak is the larger of its cache's
# prefill and weights + the cache + the answers' buffers (batch x the cache with room for the
# answer). Not counted: the logits (the bench prefills ``model.model``), allocator fragmentation
# (``HEADROOM_BYTES`` is kept free), CUDA graph pools, kernels' workspaces.

GIB = 2**30
HEADROOM_BYTES = GIB  # the CUDA context and allocator slack a row must leave free
GPU_GIB = {80.0: "H100", 141.0: "H200"}
EAGER_BYTES = 8  # per eager attention weight held at once: the logits and the float32 softmax (and its cast)
PLAN_SHAPES = {**SHAPES, "smollm2-135m": ("LlamaConfig", dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True))}


def _dims(config) -> tuple[int, int, int, int, int, int]:
    """(L, h, I, H, kv, d) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
            config.num_key_value_heads, head_dim)


def param_count(config) -> int:
    """Parameters of a Llama-family decoder (no biases): embeddings, (tied) head, attention, gated MLP, norms."""
    layers, h, inter, heads, kv, d = _dims(config)
    qk_norms = 2 * d if config.model_type == "qwen3" else 0
    layer = h * d * (2 * heads + 2 * kv) + qk_norms + 3 * h * inter + 2 * h
    return layers * layer + config.vocab_size * h * (1 if config.tie_word_embeddings else 2) + h


def kv_bytes(config, tokens: int, dtype_bytes: int) -> int:
    layers, _, _, _, kv, d = _dims(config)
    return layers * kv * d * 2 * tokens * dtype_bytes


def memory_plan(row: Row, dtype: str, device: str = "cuda", tiny: bool = False) -> dict[str, int]:
    """Row ``row``'s predicted peak device memory and its parts, in bytes (the formulas above)."""
    config = model_config(row.shape, tiny)
    b = getattr(torch, dtype).itemsize
    weights = param_count(config) * b
    # the prefill the row runs: a decode row's prefills its cache, a needle row's is KVCompose's
    prefilled = {"decode": "plain" if row.method == "full" else row.method, "needle": "kvcompose"}
    method = prefilled.get(row.kind, row.method)
    parts = _prefill_plan(config, method, row.tokens, b, device.startswith("cuda"), row.compression_ratio)
    if row.kind != "decode":
        return {"weights": weights, **parts, "peak": weights + parts["extra"]}
    kept = row.tokens if row.method == "full" else round(row.tokens * (1 - row.compression_ratio))
    answers = row.batch * kv_bytes(config, kept + _answer_room(), b)
    decoding = kv_bytes(config, kept, b) + answers  # the cache and the answers' buffers
    return {"weights": weights, **parts, "answers": answers, "peak": weights + max(parts["extra"], decoding)}


def fits(peak: int, capacity: int) -> bool:
    return peak <= capacity - HEADROOM_BYTES


def plan_table(rows: list[Row], dtype: str, device: str, tiny: bool, gib: float) -> str:
    """Each row's planned peak and its parts (GiB), and whether it fits a device of ``gib`` GiB."""
    parts = ("weights", "kv_cache", "scorer", "replay", "activations", "scoring", "answers", "peak")
    gpu = f"{gib:g} GiB" + (f" ({GPU_GIB[gib]})" if gib in GPU_GIB else "")
    lines = [f"| row | {' | '.join(parts)} | fits {gpu} |", "|---" * (len(parts) + 2) + "|"]
    for row in rows:
        planned = memory_plan(row, dtype, device, tiny)
        cells = [f"{planned[k] / GIB:.2f}" if k in planned else "" for k in parts]
        verdict = "fits" if fits(planned["peak"], int(gib * GIB)) else "does not fit"
        lines.append(f"| {row.name} | {' | '.join(cells)} | {verdict} |")
    return "\n".join(lines)


def _prefill_plan(config, method: str, n: int, b: int, fused: bool, ratio: float) -> dict[str, int]:
    """The parts of a prefill's peak above the weights, and their sum as that peak ("extra")."""
    from service.engine.presses.kvcompose import SCORE_BLOCK_BYTES

    layers, h, inter, heads, kv, d = _dims(config)
    cache = kv_bytes(config, n, b)
    stream = n * b * (4 * h + 2 * d)
    activations = stream + 3 * n * inter * b
    if method == "plain":
        return {"kv_cache": cache, "activations": activations, "extra": cache + activations}
    if method == "kvpress":
        scoring = stream + heads * n * 2 * n * EAGER_BYTES + n * 2 * n * b
        return {"kv_cache": cache, "replay": cache, "activations": activations, "scoring": scoring,
                "extra": 2 * cache + max(activations, scoring)}
    scorer = layers * heads * n * 4
    two_pass = _replays(config, n, method, ratio)
    replay = 2 * kv * d * 2 * n * b if two_pass else 0
    # the CPU's block: as many queries as fit SCORE_BLOCK_BYTES against every key the query sees
    block_rows = min(n, max(1, SCORE_BLOCK_BYTES // (4 * heads * n * (2 if two_pass else 1))))
    working = 2 * heads * n * 4 if fused else heads * block_rows * n * 4 + kv * n * d * 4 * (b != 4)
    scoring = stream + 4 * n * heads * d * b + replay + working
    return {"kv_cache": cache, "scorer": scorer, "replay": replay, "activations": activations, "scoring": scoring,
            "extra": cache + scorer + max(activations, scoring)}


def _replays(config, n: int, method: str, ratio: float) -> bool:
    """Whether KVCompose scores this context by a second pass (its own decision, ``KVComposePress._replays``)."""
    press = _press(method, ratio)
    press._state = {"model": SimpleNamespace(config=config)}  # all that the decision reads of the model
    return press._replays(n)


def _answer_room() -> int:
    """Slots a decode row's answer buffer holds beyond the cache: the padded question and the answer."""
    from service.engine.batching import _padded_width

    return _padded_width(QUESTION_TOKENS) + DECODE_TOKENS


# -- running -------------------------------------------------------------------------------


class Guard:
    """A row's time limit: ``stop`` is set when it passes (prefill checks it between layers)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.stop = threading.Event()
        self._timer = threading.Timer(seconds, self.stop.set)

    def __enter__(self) -> Guard:
        if self.seconds <= 0:
            self.stop.set()
        else:
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def check(self) -> None:
        if self.stop.is_set():
            raise TimeoutError(f"ran past its {self.seconds:.0f} s guard")


def run(rows: list[Row], device: str, dtype: str, row_limit_s: float, budget_s: float, tiny: bool = False,
        log=print, capacity_bytes: int | None = None,
        on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every row, grouped by model shape (each built once); failures and time-outs become error rows.

    capacity_bytes: the device's memory; a row whose planned peak (``memory_plan``) does not fit is
    skipped with the reason instead of run out of memory. on_row: called with the results so far
    after every row (``write`` them, so that a run killed midway leaves its rows)."""
    start, results, state = time.monotonic(), [], {}
    for row in rows:
        figures = _measured(row, state, device, dtype, tiny, capacity_bytes, budget_s - (time.monotonic() - start),
                            row_limit_s)
        results.append({"row": row.name, **asdict(row), **figures})
        log(f"{row.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in figures.items()), flush=True)
        if on_row is not None:
            on_row(compare(results, device_name(device)))
    state.clear()
    return compare(results, device_name(device))


def _measured(row: Row, state: dict, device: str, dtype: str, tiny: bool, capacity: int | None, left_s: float,
              row_limit_s: float) -> dict:
    """One row's figures, with its planned peak; or why it has none (``skipped``, ``error``)."""
    try:
        planned = {"plan_peak_gib": memory_plan(row, dtype, device, tiny)["peak"] / GIB}
        if capacity is not None and not fits(planned["plan_peak_gib"] * GIB, capacity):
            return {**planned, "skipped": f"planned peak {planned['plan_peak_gib']:.1f} GiB does not fit "
                                          f"{capacity / GIB:.1f} GiB less {HEADROOM_BYTES / GIB:g} GiB kept free"}
        if left_s < 1:
            return {**planned, "error": "not run: the run's time budget is spent"}
        if state.get("shape") != row.shape:
            state.clear()
            _free(device)
            state.update(shape=row.shape, **_build(row.shape, device, dtype, tiny))
        with Guard(min(row_limit_s, left_s)) as guard:
            return {**planned, **MEASURE[row.kind](row, state, guard)}
    except Exception as e:  # noqa: BLE001 - a failed row is a result, the run goes on
        _free(device)
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _build(shape: str, device: str, dtype: str, tiny: bool) -> dict:
    """A random-weight model of ``shape`` built on ``device`` (the embedded SmolLM2 for needle rows)."""
    from service.engine.attention import use_per_layer_attention

    if shape == "smollm2-135m":
        from service.config import EngineConfig
        from service.engine.engine import Engine

        return {"engine": Engine(EngineConfig(device=device, compute_dtype=dtype, max_context_tokens=1 << 20))}
    import transformers

    config = model_config(shape, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    use_per_layer_attention(model)
    return {"model": model}


def model_config(shape: str, tiny: bool = False):
    """The transformers config of ``shape`` (tiny: the same family, small)."""
    import transformers

    cls_name, fields = PLAN_SHAPES[shape]
    return getattr(transformers, cls_name)(**{**fields, **(TINY.get(shape, {}) if tiny else {})})


def _timed(device: str, fn):
    """(result, seconds, peak extra device bytes or None) of ``fn()``."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return out, seconds, (torch.cuda.max_memory_allocated() - before) if cuda else None


def _press(method: str, ratio: float):
    import kvpress

    from service.engine.presses.kvcompose import KVComposePress

    return {"plain": lambda: None, "kvcompose": lambda: KVComposePress(compression_ratio=ratio),
            "kvcompose-1pass": lambda: KVComposePress(compression_ratio=ratio, replay_context=False,
                                                      scorer="attention"),
            "kvpress": lambda: kvpress.KVComposePress(compression_ratio=ratio)}[method]()


def _ids(model, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, model.config.vocab_size, (n,), generator=g).tolist()


def _prefill(model, n: int, method: str, guard: Guard | None = None, ratio: float = RATIO):
    from service.cache.kvcache import CacheMeta
    from service.engine.prefill import prefill

    return prefill(model, _ids(model, n), _press(method, ratio), CacheMeta("bench", "random", n, {}),
                   guard.stop if guard else None)


def _compress(row: Row, state: dict, guard: Guard) -> dict:
    model = state["model"]
    device = str(model.device)
    warm = state.setdefault("warm", set())
    if row.method not in warm:  # first use compiles kernels and fills allocator pools: not timed
        _prefill(model, 256, row.method, guard)
        warm.add(row.method)
    kv, seconds, peak = _timed(device, lambda: _prefill(model, row.tokens, row.method, guard))
    kv_bytes = kv.uncompressed_nbytes(torch.float16)
    del kv
    figures = {"seconds": seconds, "tokens_per_s": row.tokens / seconds}
    if peak is not None:
        figures.update(peak_extra_gib=peak / 2**30, peak_vs_fp16_kv=peak / kv_bytes)
    return figures


class _Ids:
    """A tokenizer for random models: answers are counted, not read."""

    eos_token_id = None

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(tokens)


def _decode(row: Row, state: dict, guard: Guard) -> dict:
    from service.config import BatchLimits
    from service.engine.decode import Sampling

    model = state["model"]
    key = (row.method, row.tokens)
    if state.get("cache_key") != key:  # one cache per (method, length), shared by the batch's rows
        state.pop("cache", None)
        state.update(cache=_prefill(model, row.tokens, "plain" if row.method == "full" else row.method, guard),
                     cache_key=key)
    kv = state["cache"]  # made on the model's device
    loop = random_loop(model, BatchLimits(max_batch=BATCH, memory_bytes=1 << 40, cuda_graphs=row.cuda_graphs))
    sampling = Sampling(max_new_tokens=DECODE_TOKENS)

    async def answer() -> tuple[int, float]:
        first, tokens = None, 0
        async for tokens, _ in loop.stream(kv, "", sampling):  # noqa: B007 - the count after the loop is the answer's
            guard.check()
            first = first or time.perf_counter()
        return tokens, first

    async def batch() -> list[tuple[int, float]]:
        return await asyncio.gather(*(answer() for _ in range(row.batch)))

    # warm-up: the loop's thread, first-use kernels, and (on CUDA) the step graph, which stays
    # captured for the timed batch of the same size
    asyncio.run(batch())
    start = time.perf_counter()
    answers = asyncio.run(batch())
    end = time.perf_counter()
    first = min(f for _, f in answers)
    tokens = sum(n - 1 for n, _ in answers)  # after each answer's first token (its question's prefill)
    return {"tokens_per_s": tokens / (end - first), "ttft_s": first - start, "new_tokens": tokens + len(answers),
            "steps": loop.steps, "graph": graph_state(loop)}


def random_loop(model: torch.nn.Module, limits: BatchLimits, static_steps: bool | None = None) -> DecodeLoop:
    """The service's decode loop over a random model: every question is the same fixed ids, and
    answers are counted, not read (no stop tokens)."""
    from service.engine.batching import DecodeLoop

    question = _ids(model, QUESTION_TOKENS, seed=1)
    return DecodeLoop(model, _Ids(), lambda kv, text, sampling: (question, sampling), limits, static_steps)


def graph_state(loop) -> str:
    """How the loop's steps ran: "captured" (a CUDA graph) or "eager (<why>)"."""
    if loop._static is None:
        return "eager (static steps off)"
    return getattr(loop._static, "state", "unknown")


def _needle(row: Row, state: dict, guard: Guard) -> dict:
    from service.bench.haystack import needle_document

    engine = state["engine"]
    doc, question, needle = needle_document(engine.loaded.tokenizer, row.tokens)
    spec = {"press": "kvcompose", "compression_ratio": row.compression_ratio}
    (kv, stats), seconds, _ = _timed(str(engine.device), lambda: engine.compress(doc, spec, stop=guard.stop))
    answer = engine.answer(kv, question)
    return {"seconds": seconds, "kept_fraction": stats.kept_fraction, "needle": needle in answer,
            "answer": answer[:80]}


MEASURE = {"compress": _compress, "decode": _decode, "needle": _needle}


# -- comparing and reporting ----------------------------------------------------------------


def compare(results: list[dict], gpu_name: str = "") -> list[dict]:
    """Ratios to each row's reference in the same run, and each target met or missed (``target``).
    Idempotent: ``run`` compares the rows so far after every row. gpu_name picks the decode bound."""
    by_name = {r["row"]: r for r in results}

    def figure(name: str, key: str) -> float | None:
        r = by_name.get(name)
        return None if r is None or not _ran(r) else r.get(key)

    for r in results:
        if _ran(r):
            r.update(_ratios(r, figure))
        marks = [_mark(t, r, H100_DECODE if key == "decode" and "H100" in gpu_name else t.bound)
                 for key, t in TARGETS.items() if _applies(t, r)]
        if any(marks):
            r["target"] = "; ".join(m for m in marks if m)
    return results


def _ran(r: dict) -> bool:
    return "error" not in r and "skipped" not in r


def _ratios(r: dict, figure: Callable[[str, str], float | None]) -> dict:
    """Row ``r``'s figures over its references' (``figure(row name, key)``; None where missing)."""
    out, shape, n = {}, r["shape"], r["tokens"]
    if r["kind"] == "compress" and r["method"] != "plain":
        plain_s, plain_peak = figure(f"compress/plain/{shape}/{n}", "seconds"), figure(
            f"compress/plain/{shape}/{n}", "peak_extra_gib")
        if plain_s:
            out["vs_reference"] = r["seconds"] / plain_s
        if r.get("peak_extra_gib") is not None and plain_peak:
            out["peak_vs_plain"] = r["peak_extra_gib"] / plain_peak
        ours = figure(f"compress/kvcompose/{shape}/{n}", "seconds")
        if r["method"] == "kvpress" and ours:
            out["kvcompose_speedup"] = r["seconds"] / ours
    if r["kind"] == "decode":
        one = figure(f"decode/b1/{r['method']}/{shape}/{n}", "tokens_per_s")
        if r["batch"] > 1 and one:
            out["vs_reference"] = r["tokens_per_s"] / one
        full = figure(f"decode/b1/full/{shape}/{n}", "tokens_per_s")
        if r["method"] != "full" and full:
            out["vs_full"] = r["tokens_per_s"] / full
    return out


def _applies(t: Target, r: dict) -> bool:
    return r["row"].startswith(t.prefix) and (t.at is None or r["tokens"] in (t.at, TINY_LENGTHS[t.at]))


def _mark(t: Target, r: dict, bound: float) -> str:
    """"<what>: met|missed", or "" where the row has no figure for it (yet)."""
    value = float(_ran(r)) if t.figure == "ran" else r.get(t.figure)
    if value is None:
        return ""
    met = value <= bound if t.op == "<=" else value >= bound if t.op == ">=" else value > bound
    return f"{t.what}: {'met' if met else 'missed'}"


COLUMNS = ("seconds", "vs_reference", "peak_extra_gib", "plan_peak_gib", "peak_vs_plain", "tokens_per_s", "vs_full",
           "kvcompose_speedup", "graph", "needle", "target", "skipped", "error")


def table(results: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in results)]
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['row']} | " + " | ".join(cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.machine()})"


def machine(device: str, dtype: str) -> str:
    import transformers

    return (f"{device_name(device)}, {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def write(results: list[dict], out_dir: Path, about: str) -> list[Path]:
    """``results.json`` and ``gpu.md``, each replaced whole (a kill leaves the old file or the new)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "gpu.md"]
    texts = [json.dumps(results, indent=1) + "\n", f"# kvcompose bench gpu\n\n{about}\n\n{table(results)}\n"]
    for path, text in zip(paths, texts):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
