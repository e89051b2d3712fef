"""``kvcompose bench load``: the real service under N concurrent clients.

Each client asks questions in a row (``requests`` per level in all, at least two per client), each
about one of M stored documents (by cache id), with ``max_new_tokens`` drawn from 16 to 64 per
request (seeded; an answer may end earlier at the end-of-turn token, and tokens are counted as
produced). Clients start spread over ``ramp_s`` seconds. Every document is asked about once before
the first level, so all levels measure warm decoders. For every N it reports aggregate tokens/s,
p50/p99 time to first token and latency, and errors by status code, with ratios against N = 1
measured in the same run; rows go to a CSV and a plot shows throughput and p99 TTFT against clients.

It also says where the first token waited (``GenerateStats.timings``: p50 and p99 of each stage, and
the stages of the slowest request), what the stream itself costs per message (a message's arrival
at the client minus when the Decoder sent it: one host's clock), and Ray messages per token (each
text message is one Decoder -> Ingress message). Answers end at the end token or ``max_new_tokens``
only: a stop string that never occurs replaces the embedded model's first-sentence stop.
"""

from __future__ import annotations

import csv
import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from service.client import KVComposeClient

NO_STOP = "\x00"  # never generated: answers run to their end token or max_new_tokens, as before stops existed
STAGES = ("admission_s", "to_decoder_s", "cache_s", "prepare_s", "batch_wait_s", "prefill_s", "first_hop_s")
QUESTIONS = ["What is the special magic number mentioned in the text?", "Summarise the text in one sentence.",
             "Which city is mentioned first?", "List three topics the text covers.",
             "What does the text say about the weather?", "Who is the main character?"]


@dataclass
class LevelResult:
    clients: int
    requests: int
    ok: int
    tokens: int
    seconds: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    errors: dict
    stages: dict = field(default_factory=dict)  # stage -> (p50, p99) seconds
    slowest: dict = field(default_factory=dict)  # the slowest first token's stages, and its client-side TTFT
    overhead_p50_ms: float = float("nan")  # per stream message: client arrival - Decoder send
    overhead_p99_ms: float = float("nan")
    messages_per_token: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(address: str, cache_ids: list[str], clients: int, requests: int, seed: int,
              token: str | None = None, ramp_s: float = 0.0) -> LevelResult:
    """N clients, each with its own channel, asking in a loop; bounded in count. Client i starts
    after ``i * ramp_s / N`` seconds (users do not all arrive in the same millisecond)."""
    requests_per_client = max(2, -(-requests // clients))
    ttfts, latencies, errors = [], [], Counter()
    tokens = Counter()
    answers: list[tuple[float, dict]] = []  # (client-side TTFT, the stats' timings)
    overheads: list[float] = []
    lock = threading.Lock()

    def ask(c: KVComposeClient, rng: random.Random) -> None:
        started, first, delays, messages, stats = time.perf_counter(), None, [], 0, None
        for msg in c.generate(rng.choice(QUESTIONS), cache_id=rng.choice(cache_ids),
                              max_new_tokens=rng.randint(16, 64), stop=[NO_STOP]):
            if msg.HasField("stats"):
                stats = msg.stats
                continue
            delays.append(time.time() - msg.sent_unix_s)
            messages += 1
            first = first if first is not None else time.perf_counter() - started
        with lock:
            ttfts.append(stats.time_to_first_token_s)
            latencies.append(time.perf_counter() - started)
            tokens["n"] += stats.new_tokens
            tokens["messages"] += messages
            overheads.extend(delays)
            answers.append((first if first is not None else float("nan"), dict(stats.timings)))

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        time.sleep(i * ramp_s / clients)
        with KVComposeClient(address, token=token, timeout_s=600) as c:
            for _ in range(requests_per_client):
                try:
                    ask(c, rng)
                except grpc.RpcError as e:
                    with lock:
                        errors[e.code().name] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    stages = {s: (percentile([t.get(s, 0.0) for _, t in answers], 0.5),
                  percentile([t.get(s, 0.0) for _, t in answers], 0.99)) for s in STAGES}
    client_ttft, slowest = max(answers, key=lambda a: sum(a[1].get(s, 0.0) for s in STAGES), default=(0.0, {}))
    return LevelResult(clients, clients * requests_per_client, len(latencies), tokens["n"], seconds,
                       percentile(ttfts, 0.5), percentile(ttfts, 0.99), percentile(latencies, 0.5),
                       percentile(latencies, 0.99), dict(errors), stages,
                       {**{s: slowest.get(s, 0.0) for s in STAGES}, "client_ttft_s": client_ttft},
                       1000 * percentile(overheads, 0.5), 1000 * percentile(overheads, 0.99),
                       tokens["messages"] / max(1, tokens["n"]))


def table(results: list[LevelResult]) -> str:
    base = results[0]
    lines = ["| clients | requests | ok | tokens/s | × N=1 | TTFT p50 s | TTFT p99 s | p99 TTFT × N=1 | "
             "latency p50 s | latency p99 s | errors |", "|" + "---|" * 11]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
        lines.append(f"| {r.clients} | {r.requests} | {r.ok} | {r.tokens_per_s:.1f} | "
                     f"{r.tokens_per_s / base.tokens_per_s:.2f} | {r.ttft_p50_s:.2f} | {r.ttft_p99_s:.2f} | "
                     f"{r.ttft_p99_s / base.ttft_p99_s:.2f} | {r.latency_p50_s:.2f} | {r.latency_p99_s:.2f} | "
                     f"{errors} |")
    return "\n".join(lines) + "\n"


def cost_table(results: list[LevelResult]) -> str:
    """Where the first token waited (p50 / p99 of each stage, and the slowest request's stages), and
    the stream's own cost per message."""
    names = [s.removesuffix("_s").replace("_", " ") for s in STAGES]
    lines = ["| clients | " + " | ".join(f"{n} p50 / p99 s" for n in names) + " | slowest: " +
             ", ".join(names) + " s | stream delay p50 / p99 ms | messages per token |",
             "|" + "---|" * (len(STAGES) + 4)]
    for r in results:
        stages = " | ".join(f"{p50:.3f} / {p99:.3f}" for p50, p99 in (r.stages[s] for s in STAGES))
        slowest = ", ".join(f"{r.slowest[s]:.3f}" for s in STAGES)
        lines.append(f"| {r.clients} | {stages} | {slowest} | {r.overhead_p50_ms:.2f} / {r.overhead_p99_ms:.2f} | "
                     f"{r.messages_per_token:.2f} |")
    return "\n".join(lines) + "\n"


def write(results: list[LevelResult], out_dir: Path) -> list[Path]:
    """results.csv, results.md and load.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clients", "requests", "ok", "tokens", "seconds", "tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                    "latency_p50_s", "latency_p99_s", "errors", "stream_delay_p50_ms", "stream_delay_p99_ms",
                    "messages_per_token", *(f"{s}_{q}" for s in STAGES for q in ("p50", "p99"))])
        for r in results:
            w.writerow([r.clients, r.requests, r.ok, r.tokens, f"{r.seconds:.3f}", f"{r.tokens_per_s:.2f}",
                        f"{r.ttft_p50_s:.3f}", f"{r.ttft_p99_s:.3f}", f"{r.latency_p50_s:.3f}",
                        f"{r.latency_p99_s:.3f}", ";".join(f"{k}={v}" for k, v in sorted(r.errors.items())),
                        f"{r.overhead_p50_ms:.3f}", f"{r.overhead_p99_ms:.3f}", f"{r.messages_per_token:.3f}",
                        *(f"{v:.4f}" for s in STAGES for v in r.stages[s])])
    (out_dir / "results.md").write_text(table(results) + "\n" + cost_table(results))
    clients = [r.clients for r in results]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(clients, [r.tokens_per_s for r in results], "o-", color="tab:blue", label="tokens/s")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("aggregate tokens/s", color="tab:blue")
    right = left.twinx()
    right.plot(clients, [r.ttft_p99_s for r in results], "s--", color="tab:red", label="p99 TTFT")
    right.set_ylabel("p99 time to first token (s)", color="tab:red")
    left.set_title("KVCompose Serve under load (one Decoder replica)")
    fig.tight_layout()
    fig.savefig(out_dir / "load.png", dpi=120)
    plt.close(fig)
    return [out_dir / "results.csv", out_dir / "results.md", out_dir / "load.png"]


def stored_documents(address: str, documents: list[str], token: str | None = None) -> list[str]:
    """Compress (or find) each document and ask about it once (so every level measures warm decoders);
    their cache ids."""
    with KVComposeClient(address, token=token, timeout_s=900) as c:
        ids = [c.compress(doc).cache_id for doc in documents]
        for cache_id in ids:
            c.ask(QUESTIONS[0], cache_id=cache_id, max_new_tokens=2)
        return ids


def summary(results: list[LevelResult]) -> str:
    base = results[0]
    parts = [f"N={r.clients}: {r.tokens_per_s:.1f} tok/s ({r.tokens_per_s / base.tokens_per_s:.2f}x), "
             f"p99 TTFT {r.ttft_p99_s:.2f} s ({r.ttft_p99_s / base.ttft_p99_s:.2f}x)" for r in results]
    return "\n".join(parts) + f"\nmedian latency overall: {statistics.median(r.latency_p50_s for r in results):.2f} s"
