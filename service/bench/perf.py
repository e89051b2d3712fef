"""``kvcompose bench perf``: every speed and memory figure of the project in one run, each against
its physical reference measured in the same run.

Rows (``Case``), each run in a fresh process (``python -m service.bench.perf --child``; the fetch
rows of one size share one, see ``_fetch``), all rows once per repeat, repeats interleaved, so a
busy spell of a shared machine hits every row alike:

- ``compress/<method>/<tokens>``: wall time of prefill + compression of a needle document, against
  ``plain`` (a prefill that keeps everything: the limit); methods ``kvcompose`` (the default:
  two-pass up to about 2/3 of the model's window, one pass beyond), ``kvcompose-1pass``
  (``replay_context: false``), ``kvcompose-compactor`` (``scorer: compactor``: one pass, Compactor's
  scores), ``kvcompose-replay<f>`` (``replay_fraction: f``, with
  ``--replay-fractions``) and ``kvpress`` (kvpress 0.5.5's KVComposePress). Peak extra memory
  comes from one more process per row with a fixed glibc mmap threshold (so the kernel's peak
  follows live tensors, which slows allocation: hence apart from the timed runs), against the
  context's uncompressed float16 KV size. ``--ratios`` adds rows at
  other compression ratios (named ``<method>@<ratio>``; the default 0.5 is unnamed). Stored bytes per context
  token per codec, and whether the needle is still answered, come with each row.
- ``ttft/<prefill|reuse>/<tokens>``: time to first token of a question about the document. prefill:
  the whole context, then the question; reuse: the stored KVCompose cache fetched as a Decoder
  fetches it (a read grant, the chunks read from Redis) + codec load + question prefill, each part
  reported. Both then decode 64 tokens
  (``decode_tok_s``: one cache, one answer).
- ``fetch/<redis|grpc|grant>/<MiB>``: a synthetic SmolLM2-shaped cache of that size read back,
  verified, against ``redis``: the physical limit, the best of redis-py (with hiredis) reading the
  same bytes from the same Redis as one GET or as pipelined MGETs of the 1 MiB chunks in batches of
  8, 16 or 64 (each way's median; ``get_mib_s`` and ``mget<n>_mib_s`` are reported). ``grpc``: the
  store's Fetch stream; ``grant``: a read grant, then the decoder's own pipelined MGETs as the
  read-only user (``service/store/direct.py``). Each ends with the chunks verified in memory. All
  ways of one size run in one process, interleaved run by run.
- ``reuse/llama-3.1-8b/<tokens>``: reuse time to first token's store part for an 8B-shaped cache
  (Llama-3.1-8B: 32 layers, 8 KV heads, head dim 128) compressed to 0.75 (a quarter of the tokens
  kept) and stored as int8: the read grant's fetch, the decode of the bytes and the move to the
  model's device (CUDA when there is one), against the prefill of the same context it replaces.
  That prefill is the H200's measured figure (``H200_PREFILL_32K_S``, from docs/performance.md#on-a-gpu), not this
  machine's: the row's ``ratio`` is reuse / that prefill.

Every row prints and writes median and spread (min..max over repeats); ``results.csv`` keeps each
process's figures, ``perf.md`` the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from service.bench.table import cell

SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K, V) x KV heads x head dim x fp16
_FETCH_ITERATIONS = {1: 36, 16: 18, 64: 12, 256: 6}  # multiples of the 6 ways: each order as often
_MGET_BATCHES = (8, 16, 64)
# Llama-3.1-8B's shape, and a plain bfloat16 prefill of 32,768 tokens on one H200 (1.39 s), measured
# by the project's first GPU run (docs/performance.md, "On a GPU"): the reuse row's reference
LLAMA_8B = {"layers": 32, "kv_heads": 8, "head_dim": 128}
H200_PREFILL_32K_S = 1.39
_LLAMA_8B_META = {"model_id": "bench-llama-3.1-8b", "press": {"press": "kvcompose", "compression_ratio": 0.75}}
_DECODE_TOKENS = 64
_RATIO = 0.5


@dataclass(frozen=True)
class Case:
    kind: str  # compress | ttft | fetch | reuse
    method: str
    size: int  # tokens, or MiB for fetch
    memory: bool = False  # the peak-memory run of a compress row
    ratio: float = _RATIO  # compression ratio of a compress row (named when not the default)

    @property
    def name(self) -> str:
        ratio = f"@{self.ratio:g}" if self.ratio != _RATIO else ""
        return f"{self.kind}/{self.method}{ratio}/{self.size}" + ("/memory" if self.memory else "")

    @property
    def reference(self) -> Case | None:
        """The row this one is divided by."""
        ref = {"compress": "plain", "ttft": "prefill", "fetch": "redis", "reuse": None}[self.kind]
        return None if self.method == ref or ref is None else Case(self.kind, ref, self.size)


def plan(lengths: list[int], fetch_mib: list[int], kvpress_max_tokens: int, parts: set[str],
         ratios: tuple[float, ...] = (_RATIO,), reuse_tokens: int = 32768,
         replay_fractions: tuple[float, ...] = ()) -> list[Case]:
    cases = []
    for n in lengths if "compress" in parts else []:
        methods = ["kvcompose", "kvcompose-1pass", "kvcompose-compactor"]
        methods += [f"kvcompose-replay{f:g}" for f in replay_fractions]
        methods += ["kvpress"] if n <= kvpress_max_tokens else []
        cases += [Case("compress", "plain", n)] + [Case("compress", m, n, ratio=r) for r in ratios for m in methods]
    for n in lengths if "ttft" in parts else []:
        cases += [Case("ttft", "prefill", n), Case("ttft", "reuse", n)]
    for mib in fetch_mib if "fetch" in parts else []:
        cases += [Case("fetch", m, mib) for m in ("redis", "grpc", "grant")]
    if "reuse" in parts:
        cases.append(Case("reuse", "llama-3.1-8b", reuse_tokens))
    return cases


# -- the parent: plan, run, summarize ---------------------------------------------------------


def run(cases: list[Case], repeats: int, model: str, workdir: Path, log=print) -> list[dict]:
    """Every case in a fresh process, ``repeats`` times interleaved, then each compress row's memory run."""
    workdir.mkdir(parents=True, exist_ok=True)
    memory_runs = [replace(c, memory=True) for c in cases if c.kind == "compress"]
    measured = [c for c in cases if c.kind != "fetch" or c.method == "redis"]  # its process measures every way
    schedule = [(r, c) for r in range(repeats) for c in measured] + [(0, c) for c in memory_runs]
    results = []
    for i, (repeat, case) in enumerate(schedule, 1):
        env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if case.memory else {}
        out = subprocess.run([sys.executable, "-m", "service.bench.perf", "--child", json.dumps(asdict(case)),
                              "--model", model, "--workdir", str(workdir)],
                             capture_output=True, text=True, env={**os.environ, **env})
        if out.returncode != 0:
            raise RuntimeError(f"{case.name} failed:\n{out.stderr[-3000:]}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        for name, row in figures.pop("rows", {case.name: figures}).items():
            results.append({"case": name, "repeat": repeat, **row})
            log(f"[{i}/{len(schedule)}] {name} (repeat {repeat + 1}): {_brief(row)}", flush=True)
    return results


def _brief(figures: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())


HEADLINE = {"compress": "seconds", "ttft": "ttft_s", "fetch": "mib_s", "reuse": "reuse_s"}


def summarize(cases: list[Case], results: list[dict]) -> list[dict]:
    """One row per case: median and spread of its headline figure, the ratio to its reference's
    median, and the medians of its other figures."""
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]
                      if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool) and k != "repeat"}
               for name, runs in by_case.items()}
    rows = []
    for case in cases:
        runs, figure = by_case[case.name], HEADLINE[case.kind]
        values = [r[figure] for r in runs]
        row = {"case": case.name, "runs": len(runs), figure: statistics.median(values),
               "spread": f"{min(values):.3g}..{max(values):.3g}", "ratio": None, **medians[case.name]}
        if case.reference is not None and case.reference.name in medians:
            row["ratio"] = row[figure] / medians[case.reference.name][figure]
        elif case.kind == "reuse" and case.size == 32768:  # the one length the H200 prefill was measured at
            row["ratio"] = row[figure] / H200_PREFILL_32K_S
        memory = medians.get(replace(case, memory=True).name)
        if memory:
            row["peak_extra_mib"] = memory["peak_extra_mib"]
            row["peak_extra_vs_fp16_kv"] = memory["peak_extra_mib"] * 2**20 / (case.size * memory["kv_bytes_per_token"])
        row["needle"] = all(r.get("needle", True) for r in runs)
        if "device" in runs[0]:
            row["device"] = runs[0]["device"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for kind, what, ratio_of in (("compress", "seconds", "/ plain prefill"), ("ttft", "ttft_s", "/ full prefill"),
                                 ("fetch", "mib_s", "/ redis limit"),
                                 ("reuse", "reuse_s", "/ H200 prefill")):
        chosen = [r for r in rows if r["case"].startswith(kind + "/")]
        if not chosen:
            continue
        extra = {"compress": ["peak_extra_vs_fp16_kv", "bytes_per_token_float16", "bytes_per_token_int8", "needle"],
                 "ttft": ["prefill_s", "fetch_s", "load_s", "question_s", "decode_tok_s", "needle"],
                 "fetch": ["get_mib_s", *(f"mget{n}_mib_s" for n in _MGET_BATCHES)],
                 "reuse": ["mib", "fetch_s", "fetch_grpc_s", "decode_s", "device"]}[kind]
        header = ["row", "runs", f"{what} (median)", "spread", ratio_of, *extra]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for r in chosen:
            cells = [r["case"], str(r["runs"]), f"{r[what]:.3g}", r["spread"], cell(r["ratio"]),
                     *(cell(r.get(k)) for k in extra)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write(results: list[dict], rows: list[dict], out_dir: Path, machine: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in results for k in r} - {"case", "repeat"})
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["case", "repeat", *keys])
        w.writeheader()
        w.writerows(results)
    (out_dir / "perf.md").write_text(f"# kvcompose bench perf\n\n{machine}\n\n{table(rows)}")
    return [out_dir / "results.csv", out_dir / "perf.md"]


def machine() -> str:
    import platform

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d')}")


# -- the child: one measurement ---------------------------------------------------------------


def measure(case: Case, model: str, workdir: Path) -> dict:
    if case.kind in ("fetch", "reuse"):
        from service.malloc import keep_freed_memory

        keep_freed_memory()  # as a decode process runs (the reference reads in this process too)
    if case.kind == "fetch":
        return _fetch(case)
    if case.kind == "reuse":
        return _reuse(case, workdir)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from service.bench.haystack import needle_document
    from service.config import EngineConfig
    from service.engine.engine import Engine

    engine = Engine(EngineConfig(model=model, max_context_tokens=1 << 20))
    doc, question, needle = needle_document(engine.loaded.tokenizer, case.size)
    return (_compress if case.kind == "compress" else _ttft)(case, engine, doc, question, needle, workdir)


def _compress(case: Case, engine, doc: str, question: str, needle: str, workdir: Path) -> dict:
    import kvpress
    import torch

    from service.cache import codec
    from service.cache.kvcache import CacheMeta
    from service.engine.prefill import prefill
    from service.engine.presses.kvcompose import SCORERS, KVComposePress

    ids = engine.context_ids(doc)
    r = case.ratio
    if case.method.startswith("kvcompose-replay"):
        press = KVComposePress(compression_ratio=r, replay_fraction=float(case.method.removeprefix("kvcompose-replay")))
    elif case.method.removeprefix("kvcompose-") in SCORERS:
        press = KVComposePress(compression_ratio=r, scorer=case.method.removeprefix("kvcompose-"))
    else:
        press = {"plain": lambda: None, "kvcompose": lambda: KVComposePress(compression_ratio=r),
                 "kvcompose-1pass": lambda: KVComposePress(compression_ratio=r, replay_context=False,
                                                           scorer="attention"),
                 "kvpress": lambda: kvpress.KVComposePress(compression_ratio=r)}[case.method]()
    meta = CacheMeta(engine.model_id, engine.loaded.revision, len(ids), {})
    prefill(engine.loaded.model, ids[:64], None, meta)  # warm-up: kernels' first-use allocations
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the kernel's peak (VmHWM) restarts from the current resident set
    start = time.perf_counter()
    kv = prefill(engine.loaded.model, ids, press, meta)
    seconds = time.perf_counter() - start
    figures = {"seconds": seconds, "tokens": len(ids),
               "kv_bytes_per_token": kv.uncompressed_nbytes(torch.float16) / len(ids)}
    if case.memory:
        return {**figures, "peak_extra_mib": (_proc_status("VmHWM") - base) / 2**20}
    for name in ("float16", "int8"):
        figures[f"bytes_per_token_{name}"] = len(codec.encode(kv, name)) / len(ids)
    figures["needle"] = needle in engine.answer(kv.to(dtype=torch.float16), question)
    return figures


def _ttft(case: Case, engine, doc: str, question: str, needle: str, workdir: Path) -> dict:
    from service.cache import codec
    from service.cache.kvcache import CacheMeta
    from service.engine.batching import Request
    from service.engine.prefill import prefill
    from service.protocol import Sampling

    sampling = Sampling(max_new_tokens=_DECODE_TOKENS)  # no stop tokens: every answer is as long
    question_ids = engine.prompt.question_ids(question)
    figures: dict = {}
    if case.method == "prefill":
        ids = engine.context_ids(doc)
        for part in (ids[:64], ids):  # a warm-up, then the measured prefill
            start = time.perf_counter()
            kv = prefill(engine.loaded.model, part, None, CacheMeta(engine.model_id, engine.loaded.revision,
                                                                    len(part), {}))
        figures["prefill_s"] = time.perf_counter() - start
    else:
        data, ids, key = _stored_cache(engine, doc, workdir)
        with StoreStack() as stack:  # as a Decoder fetches: a read grant, the chunks decoded as they came
            manifest, _ = stack.client.put(key, ids, data)
            read = _reader(stack, "grant", manifest.cache_id)
            start = time.perf_counter()
            fetched = read()
            figures["fetch_s"] = time.perf_counter() - start
        start = time.perf_counter()
        kv = codec.decode(fetched, verified=True)
        figures["load_s"] = time.perf_counter() - start
    start = time.perf_counter()
    pieces = engine.decode_loop().stream_here(Request(kv, question_ids, sampling))
    first_count, answer = next(pieces)
    figures["question_s"] = time.perf_counter() - start
    first, count = time.perf_counter(), first_count
    for count, piece in pieces:  # noqa: B007 - the last count is the answer's length
        answer += piece
    figures["decode_tok_s"] = (count - first_count) / (time.perf_counter() - first)
    figures["ttft_s"] = figures.get("prefill_s", 0) + figures.get("fetch_s", 0) + figures.get("load_s", 0) \
        + figures["question_s"]
    figures["needle"] = needle in answer
    return figures


def _stored_cache(engine, doc: str, workdir: Path):
    """The document's default-press cache bytes, compressed once per run (kept in ``workdir``)."""
    from service.cache import codec
    from service.cache.ids import CacheKey
    from service.engine.selection import SELECTION_REVISION

    ids = engine.context_ids(doc)
    path = workdir / f"{engine.model_id.replace('/', '_')}-{len(ids)}.kvc"
    if not path.exists():
        kv, _ = engine.compress(doc)
        path.write_bytes(codec.encode(kv, engine.config.codec))
    data = path.read_bytes()
    meta = codec.decode(data).meta  # the codec checks the file (format, digest) before anything is used
    loaded = engine.loaded
    return data, ids, CacheKey(loaded.model_id, loaded.revision, loaded.tokenizer_digest, meta.press,
                               engine.config.codec, "default", selection_revision=SELECTION_REVISION)


def _fetch(case: Case) -> dict:
    """Every way of reading one stored cache, in one process against one Redis, interleaved run by
    run (a process's heap state moves large reads by 2x: separate processes are not comparable).
    Returns each fetch row's figures under ``rows``."""
    import redis

    from service.cache.ids import CacheKey
    from service.store.direct import READ_BYTES

    ids, data = synthetic_cache(case.size)
    n = _FETCH_ITERATIONS.get(case.size, 3)
    with StoreStack(maxmemory="2gb") as stack:
        manifest, _ = stack.client.put(CacheKey("bench", "r", "t", {}, "float16", "default", selection_revision=1),
                                       ids, data)
        _, names = stack.client.grant(manifest.cache_id)  # the entry's own chunks: the same bytes
        raw = redis.Redis.from_url(stack.redis_url, socket_read_size=READ_BYTES)  # as the reader reads
        raw.set("bench:raw", data)
        del data

        def mget(batch: int):
            def read() -> list[bytes]:
                pipe = raw.pipeline(transaction=False)
                for start in range(0, len(names), batch):
                    pipe.mget(names[start : start + batch])
                return [c for replies in pipe.execute() for c in replies]
            return read

        ways = {"get": lambda: [raw.get("bench:raw")], **{f"mget{b}": mget(b) for b in _MGET_BATCHES},
                "grpc": _reader(stack, "grpc", manifest.cache_id), "grant": _reader(stack, "grant", manifest.cache_id)}
        expected = ways["get"]()[0]
        for read in ways.values():
            assert b"".join(read()) == expected  # and warm: channels and connections, as a running decoder has them
        del expected
        runs: dict[str, list[float]] = {name: [] for name in ways}
        order = list(ways)
        for i in range(n):
            for name in order[i % len(order):] + order[: i % len(order)]:  # each way follows each other in turn
                runs[name] += _timed(ways[name], 1)
    mib = manifest.total_bytes / 2**20
    speed = {name: mib / statistics.median(times) for name, times in runs.items()}
    limit = {f"{name}_mib_s": speed[name] for name in ("get", *(f"mget{b}" for b in _MGET_BATCHES))}
    common = {"bytes": manifest.total_bytes, "iterations": n}
    return {"rows": {Case("fetch", "redis", case.size).name: {"mib_s": max(limit.values()), **limit, **common},
                     **{Case("fetch", m, case.size).name: {"mib_s": speed[m], **common} for m in ("grpc", "grant")}}}


def _reader(stack: StoreStack, method: str, cache_id: str):
    """Reads the stored entry's chunks, verified: by the store's Fetch, or by a read grant."""
    client = stack.granted if method == "grant" else stack.client

    def read() -> list[bytes]:
        chunks = client.fetch_chunks(cache_id)[1]
        if client.read_counts()["fallback"]:  # a broken reader would time the store's Fetch as the grant's
            raise RuntimeError(f"the read grant fell back to Fetch: {client.read_counts()}")
        return chunks

    read()  # warm: channel and connections, as a running decoder has them
    return read


def _timed(read, n: int) -> list[float]:
    runs = []
    for _ in range(n):
        start = time.perf_counter()
        read()
        runs.append(time.perf_counter() - start)
    return runs


def _reuse(case: Case, workdir: Path) -> dict:
    """Fetch (read grant and, for comparison, the store's Fetch), decode and move an 8B-shaped
    0.75 + int8 cache of ``case.size`` context tokens."""
    import torch

    from service.cache import codec
    from service.cache.ids import CacheKey
    from service.engine.selection import SELECTION_REVISION

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = workdir / f"llama-8b-{case.size}.kvc"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_bytes(synthetic_8b_cache(case.size))
    data = path.read_bytes()
    ids = list(range(case.size))
    with StoreStack(maxmemory="3gb") as stack:
        key = CacheKey(_LLAMA_8B_META["model_id"], "r", "t", _LLAMA_8B_META["press"], "int8", "default",
                       selection_revision=SELECTION_REVISION)
        manifest, _ = stack.client.put(key, ids, data)
        figures = {}
        for method in ("grpc", "grant"):
            read = _reader(stack, method, manifest.cache_id)
            start = time.perf_counter()
            chunks = read()
            figures["fetch_s" if method == "grant" else "fetch_grpc_s"] = time.perf_counter() - start
    start = time.perf_counter()
    kv = codec.decode(chunks, device, verified=True)
    if device == "cuda":
        torch.cuda.synchronize()
    figures["decode_s"] = time.perf_counter() - start
    assert kv.keys[0].device.type == device and len(kv.keys) == LLAMA_8B["layers"]
    return {"reuse_s": figures["fetch_s"] + figures["decode_s"], **figures, "mib": len(data) / 2**20,
            "device": device}


def synthetic_8b_cache(tokens: int, kept: float = 0.25) -> bytes:
    """Codec bytes (int8) of a random Llama-3.1-8B-shaped cache of ``tokens`` context tokens with
    ``kept`` of them kept (compression 0.75)."""
    import torch

    from service.cache import codec
    from service.cache.kvcache import CacheMeta, CompressedKV

    n, g = max(1, int(tokens * kept)), torch.Generator().manual_seed(tokens)
    shape = (LLAMA_8B["kv_heads"], n, LLAMA_8B["head_dim"])
    # on the CPU on purpose: these are stored bytes (codec.encode moves tensors to the CPU anyway)
    layers = [torch.randn(shape, generator=g, dtype=torch.float16, device="cpu") for _ in range(2 * LLAMA_8B["layers"])]
    kv = CompressedKV(layers[::2], layers[1::2], [None] * LLAMA_8B["layers"],
                      CacheMeta(_LLAMA_8B_META["model_id"], "r", tokens, _LLAMA_8B_META["press"]))
    return codec.encode(kv, "int8")


def _tokens_of(mib: int) -> int:
    return max(1, mib * 2**20 // SMOLLM2_KV_BYTES_PER_TOKEN)


def synthetic_cache(mib: int) -> tuple[list[int], bytes]:
    """(context ids, codec bytes) of a random SmolLM2-shaped float16 cache of about ``mib`` MiB."""
    import torch

    from service.cache import codec
    from service.cache.kvcache import CacheMeta, CompressedKV

    tokens, g = _tokens_of(mib), torch.Generator().manual_seed(mib)
    layers = [torch.randn(3, tokens, 64, generator=g).half() for _ in range(60)]
    kv = CompressedKV(layers[:30], layers[30:], [None] * 30, CacheMeta("bench", "r", tokens, {}))
    return list(range(tokens)), codec.encode(kv, "float16")


class StoreStack:
    """A throwaway redis-server (with the read grants' reader user) and prefix store process:
    ``client`` fetches through the store, ``granted`` reads directly after a grant (as Decoders do
    in ``make serve``), ``redis_url`` is the server's."""

    def __init__(self, maxmemory: str = "1gb"):
        self.maxmemory = maxmemory

    def __enter__(self) -> StoreStack:
        import secrets

        from service.local.processes import free_port
        from service.local.store_process import StoreProcess
        from service.store.client import PrefixStoreClient
        from service.store.direct import DirectReader
        from service.store.embedded import EmbeddedRedis

        token = secrets.token_urlsafe(24)
        self.redis = EmbeddedRedis(maxmemory=self.maxmemory, reader_password=secrets.token_urlsafe(16)).start()
        self.redis_url = self.redis.url
        self.store = StoreProcess(self.redis.url, free_port(), {"KVCOMPOSE_STORE_SERVICE_TOKEN": token}).start()
        # each names the tenant, as a Decoder does on every call
        self.client = PrefixStoreClient(self.store.address, token=token, tenant="default")
        self.granted = PrefixStoreClient(self.store.address, token=token, tenant="default",
                                         direct=DirectReader(self.redis.reader_url))
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.granted.close()
        self.store.stop()
        self.redis.stop()


def _proc_status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one measurement of kvcompose bench perf (a child process)")
    parser.add_argument("--child", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(measure(Case(**json.loads(args.child)), args.model, args.workdir)))


if __name__ == "__main__":
    main()
