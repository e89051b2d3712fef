"""``kvcompose bench soak``: a long mixed workload through the running service, watching what leaks.

Requests (compress new documents with a short TTL, answer by cache id and by text, stat, delete,
and bad input of several kinds) are paced over the run by a few clients. Every ``sample_s`` it
records each process of the service (this launcher and everything under it: Redis, the store,
Ray's processes and replicas): resident memory, threads and open file descriptors; Redis's used
memory; and the temporary files of the stack. After warm-up (the first ``warmup`` fraction) every
process must stay flat, Redis must stay within ``maxmemory`` with entries expiring, and no
temporary files may pile up.
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import psutil

from service.client import KVComposeClient

# kind -> (weight, statuses that are right for it)
KINDS = {
    "compress": (15, {"OK"}),
    "ask-by-id": (35, {"OK", "NOT_FOUND"}),  # NOT_FOUND: expired or deleted meanwhile
    "ask-by-text": (15, {"OK"}),
    "stat": (10, {"OK", "NOT_FOUND"}),
    "delete": (5, {"OK"}),
    "bad-press": (5, {"INVALID_ARGUMENT"}),
    "bad-cache-id": (5, {"INVALID_ARGUMENT"}),
    "too-many-tokens": (5, {"INVALID_ARGUMENT"}),
    "oversized": (5, {"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT"}),
}
GROWTH = 0.10  # allowed growth after warm-up
SLACK = {"threads": 3, "fds": 5, "rss_mib": 16.0}  # absolute slack for small numbers


@dataclass
class Sample:
    t: float
    processes: dict[str, dict]  # "name pid" -> rss_mib, threads, fds
    redis_used_mib: float
    temp_files: int


@dataclass
class SoakReport:
    duration_s: float
    requests: int
    warmup: float
    maxmemory_mib: float
    outcomes: Counter = field(default_factory=Counter)  # "kind status" -> count
    unexpected: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def growth(self) -> list[dict]:
        """Per process alive from warm-up to the end: warm-up and end values, and whether flat."""
        warm = next(s for s in self.samples if s.t >= self.warmup * self.duration_s)
        end = self.samples[-1]
        rows = []
        for key, before in warm.processes.items():
            after = end.processes.get(key)
            if after is None:
                continue
            row = {"process": key}
            for metric in ("rss_mib", "threads", "fds"):
                row[metric] = (before[metric], after[metric])
                row[f"{metric}_flat"] = after[metric] <= before[metric] * (1 + GROWTH) + SLACK[metric]
            rows.append(row)
        return rows

    def leaks(self) -> list[str]:
        out = [f"{r['process']}: {m} {r[m][0]:.0f} -> {r[m][1]:.0f}" for r in self.growth()
               for m in ("rss_mib", "threads", "fds") if not r[f"{m}_flat"]]
        warm = next(s for s in self.samples if s.t >= self.warmup * self.duration_s)
        if self.samples[-1].temp_files > warm.temp_files + SLACK["fds"]:
            out.append(f"temporary files {warm.temp_files} -> {self.samples[-1].temp_files}")
        if max(s.redis_used_mib for s in self.samples) > self.maxmemory_mib:
            out.append("Redis used more than maxmemory")
        return out


def sample(root: psutil.Process, redis_client, temp_root: Path, t: float) -> Sample:
    processes = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            with p.oneshot():
                label = process_label((p.cmdline() or [p.name()])[0])
                processes[f"{label} {p.pid}"] = {"rss_mib": p.memory_info().rss / 2**20, "threads": p.num_threads(),
                                                 "fds": p.num_fds()}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    used = redis_client.info("memory")["used_memory"] / 2**20
    temp = sum(1 for _ in temp_root.glob("kvc-*"))
    return Sample(round(t, 1), processes, round(used, 1), temp)


def process_label(argv0: str) -> str:
    """A process's name that stays the same while it works: a Ray worker's title names the method it
    runs ("ray::ServeReplica:kvcompose:Decoder.handle_request..."), so that part is dropped."""
    name = argv0.rsplit("/", 1)[-1]
    return (name.split(".", 1)[0] if name.startswith("ray::") else name)[:60]


def one_request(client: KVComposeClient, kind: str, rng: random.Random, docs: list[str], ids: list[str],
                ttl_s: int) -> str:
    """Make one request of ``kind``; its status name."""
    known = ids or ["0" * 64]  # (deleted and expired ids are asked for too: NOT_FOUND is right then)
    try:
        if kind == "compress":
            text = f"Soak document {rng.random()}. " + rng.choice(docs)
            ids.append(client.compress(text, ttl_s=ttl_s).cache_id)
            del ids[:-64]
        elif kind == "ask-by-id":
            client.ask("What is the special magic number?", cache_id=rng.choice(known), max_new_tokens=8)
        elif kind == "ask-by-text":
            client.ask("What is the special magic number?", context=client.compress_request(
                rng.choice(docs), ttl_s=ttl_s), max_new_tokens=8)
        elif kind == "stat":
            client.stat(rng.choice(known))
        elif kind == "delete":
            if ids:
                client.delete(ids.pop(rng.randrange(len(ids))))
        elif kind == "bad-press":
            client.compress(rng.choice(docs), press={"press": "no-such-press"})
        elif kind == "bad-cache-id":
            client.ask("?", cache_id="not-a-cache-id")
        elif kind == "too-many-tokens":
            client.ask("?", cache_id=rng.choice(known), max_new_tokens=10**9)
        elif kind == "oversized":
            client.compress("x" * (5 << 20))
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def run(stack, docs: list[str], requests: int, duration_s: float, clients: int = 4, sample_s: float = 10.0,
        warmup: float = 0.25, ttl_s: int = 120, seed: int = 0) -> SoakReport:
    """``requests`` mixed requests by ``clients`` clients, paced over ``duration_s``."""
    import redis

    redis_client = redis.Redis.from_url(stack.redis_url)
    maxmemory = int(redis_client.config_get("maxmemory")["maxmemory"]) / 2**20
    report = SoakReport(duration_s, requests, warmup, maxmemory)
    root, temp_root = psutil.Process(), Path(tempfile.gettempdir())
    names, weights = list(KINDS), [w for w, _ in KINDS.values()]
    lock, t0 = threading.Lock(), time.monotonic()
    interval = duration_s / requests * clients  # each client's pace
    with KVComposeClient(stack.address, token=stack.api_token, timeout_s=120) as c:
        ids = [c.compress(doc, ttl_s=ttl_s).cache_id for doc in docs]

    def client(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        with KVComposeClient(stack.address, token=stack.api_token, timeout_s=120) as c:
            for n in range(i, requests, clients):
                time.sleep(max(0.0, n / clients * interval - (time.monotonic() - t0)))
                kind = rng.choices(names, weights)[0]
                status = one_request(c, kind, rng, docs, ids, ttl_s)
                with lock:
                    report.outcomes[f"{kind} {status}"] += 1
                    if status not in KINDS[kind][1]:
                        report.unexpected.append(f"{kind}: {status}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        report.samples.append(sample(root, redis_client, temp_root, time.monotonic() - t0))
        for t in threads:
            t.join(timeout=max(0.0, sample_s - 0.5) / len(threads))
    report.duration_s = time.monotonic() - t0
    report.samples.append(sample(root, redis_client, temp_root, report.duration_s))
    redis_client.close()
    return report


def table(report: SoakReport) -> str:
    total = sum(report.outcomes.values())
    lines = [f"{total} requests over {report.duration_s:.0f} s; unexpected statuses: **{len(report.unexpected)}**; "
             f"leaks after warm-up ({report.warmup:.0%} of the run): **{len(report.leaks())}**.", "",
             "| process | RSS MiB (warm -> end) | threads | open fds | flat |", "|---|---|---|---|---|"]
    for r in report.growth():
        flat = all(r[f"{m}_flat"] for m in ("rss_mib", "threads", "fds"))
        lines.append(f"| {r['process']} | {r['rss_mib'][0]:.0f} -> {r['rss_mib'][1]:.0f} | "
                     f"{r['threads'][0]} -> {r['threads'][1]} | {r['fds'][0]} -> {r['fds'][1]} | "
                     f"{'yes' if flat else '**no**'} |")
    used = [s.redis_used_mib for s in report.samples]
    lines += ["", f"Redis used memory: {used[0]:.1f} MiB at the start, at most {max(used):.1f} MiB, "
                  f"{used[-1]:.1f} MiB at the end (maxmemory {report.maxmemory_mib:.0f} MiB). Temporary "
                  f"kvc-* entries: {report.samples[0].temp_files} -> {report.samples[-1].temp_files}.", "",
              "| request | status | count |", "|---|---|---|"]
    lines += [f"| {k.split(' ')[0]} | {k.split(' ')[1]} | {v} |" for k, v in sorted(report.outcomes.items())]
    return "\n".join(lines) + "\n"


def write(report: SoakReport, out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(
        {"outcomes": dict(report.outcomes), "unexpected": report.unexpected[:20], "leaks": report.leaks(),
         "growth": report.growth(), "samples": [asdict(s) for s in report.samples]}, indent=1) + "\n")
    (out_dir / "soak.md").write_text(f"# {title}\n\n" + table(report))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    keys = sorted({k for s in report.samples for k in s.processes},
                  key=lambda k: -max(s.processes.get(k, {}).get("rss_mib", 0) for s in report.samples))[:8]
    for key in keys:
        points = [(s.t, s.processes[key]["rss_mib"]) for s in report.samples if key in s.processes]
        top.plot(*zip(*points), label=key)
    top.set_ylabel("RSS MiB")
    top.legend(fontsize=6, loc="upper left")
    top.set_title(title)
    bottom.plot([s.t for s in report.samples], [s.redis_used_mib for s in report.samples], color="tab:red")
    bottom.set_ylabel("Redis used MiB")
    bottom.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out_dir / "soak.png", dpi=120)
    plt.close(fig)
    return [out_dir / "results.json", out_dir / "soak.md", out_dir / "soak.png"]
