"""``kvcompose bench gpu``: the one device check, against the targets of a GPU deployment.

It builds 8B-shaped models with random weights directly on the device (the Llama-3.1-8B and
Qwen3-8B configs; no download) and measures, each row against its reference in the same run:

Rows are named ``kind/.../<shape>/<tokens>``; ``vs_reference`` is each row's figure over its reference's.

- ``compress/<method>/<shape>/<tokens>``: prefill + compression wall time and peak extra device
  memory, against ``plain`` (a prefill that keeps everything). Methods: ``kvcompose`` (the default:
  two-pass up to about 2/3 of the window, one pass beyond), ``kvcompose-1pass`` and
  ``kvpress`` (kvpress 0.5.5's KVComposePress, 8k and 32k).
- ``decode/b<batch>/<cache>/<shape>/<tokens>``: tokens/s of answers decoded by one Decoder's loop
  (``service.batching.DecodeLoop``, the service's own path) from a full or a KVCompose-0.5 cache;
  batch 16 against batch 1 from the same cache; ``+eager``: the same steps without CUDA graphs.
- ``needle/<ratio>``: when the embedded SmolLM2 is installed, its needle document compressed with
  the default KVCompose and answered on the device.

Every row has a time guard (a compress is cancelled between layers, a decode stops between steps)
and a whole-run budget; a row that fails or runs out of time becomes a row with an ``error`` field,
never a crash. Output: a table on stdout, ``results.json`` (a list of row objects) and ``gpu.md``.
``--tiny`` runs the same rows on the CPU with tiny configs (CI runs it).
"""

from __future__ import annotations

import asyncio
import gc
import json
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DECODE_TOKENS = 64
BATCH = 16
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
TARGETS = {  # row prefix -> (figure, comparison, bound, what it means)
    "compress/kvcompose/": ("vs_reference", "<=", 1.5, "two-pass <= 1.5x a plain prefill"),
    "compress/kvcompose-1pass/": ("vs_reference", "<=", 1.2, "one pass <= 1.2x a plain prefill"),
    "compress/kvpress/": ("kvcompose_speedup", ">=", 10.0, "KVCompose >= 10x faster than kvpress's"),
    "decode/b1/full/": ("tokens_per_s", ">=", 150.0, "batch-1 decode from a 32k cache >= 150 tokens/s"),
    "decode/b1/kvcompose/": ("vs_full", ">", 1.0, "decode from the 0.5 cache faster than from the full"),
    "decode/b16/": ("vs_reference", ">=", 6.0, "16 answers >= 6x one answer's tokens/s"),
}


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
        log=print) -> list[dict]:
    """Every row, grouped by model shape (each built once); failures and time-outs become error rows."""
    start, results, state = time.monotonic(), [], {}
    for row in rows:
        left = budget_s - (time.monotonic() - start)
        if left < 1:
            results.append({"row": row.name, **asdict(row), "error": "not run: the run's time budget is spent"})
            continue
        try:
            if state.get("shape") != row.shape:
                state.clear()
                _free(device)
                state.update(shape=row.shape, **_build(row.shape, device, dtype, tiny))
            with Guard(min(row_limit_s, left)) as guard:
                figures = MEASURE[row.kind](row, state, guard)
        except Exception as e:  # noqa: BLE001 - a failed row is a result, the run goes on
            figures = {"error": f"{type(e).__name__}: {e}"[:500]}
            _free(device)
        result = {"row": row.name, **asdict(row), **figures}
        results.append(result)
        log(f"{row.name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in figures.items()), flush=True)
    state.clear()
    return compare(results)


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

    cls_name, fields = SHAPES[shape]
    config = getattr(transformers, cls_name)(**{**fields, **(TINY[shape] if tiny else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    use_per_layer_attention(model)
    return {"model": model}


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
            "kvcompose-1pass": lambda: KVComposePress(compression_ratio=ratio, replay_context=False),
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


@dataclass
class _RandomEngine:
    """What ``DecodeLoop`` needs of an engine, for a random model: fixed question ids, no stop tokens."""

    model: torch.nn.Module

    @property
    def loaded(self):
        return self

    @property
    def tokenizer(self) -> _Ids:
        return _Ids()

    def prepare(self, kv, question: str, sampling):
        return _ids(self.model, 16, seed=1), sampling


def _decode(row: Row, state: dict, guard: Guard) -> dict:
    from service.config import BatchLimits
    from service.engine.batching import DecodeLoop
    from service.engine.decode import Sampling

    model = state["model"]
    key = (row.method, row.tokens)
    if state.get("cache_key") != key:  # one cache per (method, length), shared by the batch's rows
        state.pop("cache", None)
        state.update(cache=_prefill(model, row.tokens, "plain" if row.method == "full" else row.method, guard),
                     cache_key=key)
    kv = state["cache"]  # made on the model's device
    loop = DecodeLoop(_RandomEngine(model), BatchLimits(max_batch=BATCH, memory_bytes=1 << 40,
                                                        cuda_graphs=row.cuda_graphs))
    sampling = Sampling(max_new_tokens=DECODE_TOKENS)

    async def answer() -> tuple[int, float]:
        first, tokens = None, 0
        async for tokens, _ in loop.stream(kv, "", sampling):  # noqa: B007 - the count after the loop is the answer's
            guard.check()
            first = first or time.perf_counter()
        return tokens, first

    async def batch() -> list[tuple[int, float]]:
        return await asyncio.gather(*(answer() for _ in range(row.batch)))

    asyncio.run(batch())  # warm-up: the loop's thread, first-use kernels
    start = time.perf_counter()
    answers = asyncio.run(batch())
    end = time.perf_counter()
    first = min(f for _, f in answers)
    tokens = sum(n - 1 for n, _ in answers)  # after each answer's first token (its question's prefill)
    return {"tokens_per_s": tokens / (end - first), "ttft_s": first - start, "new_tokens": tokens + len(answers),
            "steps": loop.steps}


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


def compare(results: list[dict]) -> list[dict]:
    """Ratios to each row's reference in the same run, and each target met or missed."""
    by_name = {r["row"]: r for r in results}

    def figure(name: str, key: str) -> float | None:
        r = by_name.get(name)
        return None if r is None or "error" in r else r.get(key)

    for r in results:
        if "error" in r:
            continue
        if r["kind"] == "compress" and r["method"] != "plain":
            plain = f"compress/plain/{r['shape']}/{r['tokens']}"
            if figure(plain, "seconds"):
                r["vs_reference"] = r["seconds"] / figure(plain, "seconds")
            if r.get("peak_extra_gib") is not None and figure(plain, "peak_extra_gib"):
                r["peak_vs_plain"] = r["peak_extra_gib"] / figure(plain, "peak_extra_gib")
            ours = figure(f"compress/kvcompose/{r['shape']}/{r['tokens']}", "seconds")
            if r["method"] == "kvpress" and ours:
                r["kvcompose_speedup"] = r["seconds"] / ours
        if r["kind"] == "decode":
            one = figure(f"decode/b1/{r['method']}/{r['shape']}/{r['tokens']}", "tokens_per_s")
            if r["batch"] > 1 and one:
                r["vs_reference"] = r["tokens_per_s"] / one
            full = figure(f"decode/b1/full/{r['shape']}/{r['tokens']}", "tokens_per_s")
            if r["method"] != "full" and full:
                r["vs_full"] = r["tokens_per_s"] / full
        for prefix, (key, op, bound, what) in TARGETS.items():
            if r["row"].startswith(prefix) and r.get(key) is not None and _is_target_row(r):
                met = r[key] <= bound if op == "<=" else r[key] >= bound if op == ">=" else r[key] > bound
                r["target"] = f"{what}: {'met' if met else 'missed'}"
        if r["kind"] == "compress" and r.get("peak_vs_plain") is not None and r["method"] != "kvpress":
            r["memory_target"] = f"peak <= 1.2x plain: {'met' if r['peak_vs_plain'] <= 1.2 else 'missed'}"
    return results


def _is_target_row(r: dict) -> bool:
    """Decode's bandwidth target is set at 32k (the middle length; the short one is batch 16's reference)."""
    if r["kind"] != "decode" or r["batch"] > 1:
        return True
    mid = LENGTHS[r["shape"]][1]
    return r["tokens"] in (mid, TINY_LENGTHS[mid])


COLUMNS = ("seconds", "vs_reference", "peak_extra_gib", "peak_vs_plain", "tokens_per_s", "vs_full", "kvcompose_speedup",
           "needle", "target", "memory_target", "error")


def table(results: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in results)]
    lines = ["| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        lines.append(f"| {r['row']} | " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return str(v).replace("|", "/")


def machine(device: str, dtype: str) -> str:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({platform.machine()})"
    return (f"{gpu}, {dtype}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def write(results: list[dict], out_dir: Path, about: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "gpu.md").write_text(f"# kvcompose bench gpu\n\n{about}\n\n{table(results)}\n")
    return [out_dir / "results.json", out_dir / "gpu.md"]
