"""``kvcompose bench chaos``: faults on a schedule while clients ask through the public API.

Every client asks about its own document, by text (so a lost cache is compressed again), in a
loop, each call under a deadline. Faults, spread over the run:

- ``redis-kill``: Redis SIGKILLed; its supervisor starts it again, empty.
- ``store-kill``: the prefix store process SIGKILLed; its supervisor starts it again.
- ``decoder-kill``: a Decoder replica killed; Serve replaces it.
- ``compressor-kill``: every Compressor replica killed while one prefills a long document.
- ``redis-full``: Redis filled past ``maxmemory`` with keys it may not evict, then freed.

Reported: wrong answers (an answer that is not the fault-free one, or a status a client should
not retry), every failure's status, calls that outlived their deadline, and for each fault the
time until throughput, averaged over two typical calls, is back to 80 % of the pre-fault rate.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from service.client import KVComposeClient

RETRYABLE = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED"}
FAULTS = ("redis-kill", "store-kill", "decoder-kill", "compressor-kill", "redis-full")
BIN_S = 1.0


@dataclass
class Document:
    text: str
    question: str
    needle: str = ""  # when set, a right answer contains it (else: the fault-free answer, exactly)
    answer: str = ""  # the fault-free answer (set by ``warm``)


@dataclass
class Call:
    client: int
    start: float
    end: float
    status: str
    right: bool
    detail: str = ""


@dataclass
class Fault:
    name: str
    at_s: float
    note: str = ""
    recovered_s: float | None = None


@dataclass
class ChaosReport:
    duration_s: float
    clients: int
    deadline_s: float
    calls: list[Call] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)

    @property
    def wrong(self) -> list[Call]:
        return [c for c in self.calls if not c.right]

    @property
    def late(self) -> list[Call]:
        return [c for c in self.calls if c.end - c.start > self.deadline_s + 2]

    def statuses(self) -> Counter:
        return Counter(c.status for c in self.calls)

    def bins(self) -> tuple[list[int], list[int]]:
        """(answers, failures) per second."""
        n = int(self.duration_s / BIN_S) + 1
        ok, failed = [0] * n, [0] * n
        for c in self.calls:
            i = min(n - 1, int(c.end / BIN_S))
            (ok if c.status == "OK" else failed)[i] += 1
        return ok, failed


def schedule(duration_s: float, faults: tuple[str, ...] = FAULTS) -> list[tuple[float, str]]:
    """The faults spread evenly over the run, the first after a fault-free stretch (the baseline)."""
    step = duration_s / (len(faults) + 1)
    return [(step * (i + 1), name) for i, name in enumerate(faults)]


class Injector:
    """The faults, on a running ``LocalStack`` (embedded, supervised Redis and store)."""

    def __init__(self, stack, long_document: str, fill_hold_s: float = 5.0):
        self.stack, self.long_document, self.fill_hold_s = stack, long_document, fill_hold_s

    def inject(self, name: str) -> str:
        return getattr(self, name.replace("-", "_"))()

    def redis_kill(self) -> str:
        self.stack.redis.process.kill()
        return "SIGKILL; the supervisor restarts it empty"

    def store_kill(self) -> str:
        self.stack.store.kill()
        return "SIGKILL; the supervisor restarts it"

    def decoder_kill(self) -> str:
        return _kill_replicas("Decoder", every=False)

    def compressor_kill(self) -> str:
        """Kill every Compressor replica while one prefills a long document no one has asked for
        yet (every one: the autoscaler may have started several, and the prefill must be hit)."""
        outcome: dict = {}

        def victim():
            with KVComposeClient(self.stack.address, token=self.stack.api_token, timeout_s=60, retries=False) as c:
                try:
                    c.compress(f"{time.time_ns()} " + self.long_document)
                    outcome["status"] = "OK"
                except grpc.RpcError as e:
                    outcome["status"] = e.code().name
        thread = threading.Thread(target=victim)
        thread.start()
        time.sleep(0.3)  # the prefill has begun
        killed = _kill_replicas("Compressor", every=True)
        thread.join(90)
        return f"{killed}; the prefill in flight ended {outcome.get('status', 'unfinished')}"

    def redis_full(self) -> str:
        """Lower ``maxmemory`` to just above what Redis holds and fill it with keys that have no TTL
        (volatile-lru may not evict them) until it refuses writes; hold; free them."""
        import redis

        client = redis.Redis.from_url(self.stack.redis_url)
        limit = client.config_get("maxmemory")["maxmemory"]
        client.config_set("maxmemory", client.info("memory")["used_memory"] + (64 << 20))
        value, names = b"x" * (1 << 20), []
        try:
            while len(names) < 4096:
                names.append(f"chaos-fill:{len(names)}")
                client.set(names[-1], value)
        except redis.exceptions.OutOfMemoryError:
            pass
        threading.Timer(self.fill_hold_s, _free, args=(client, names, limit)).start()
        return f"full ({len(names)} MiB of keys it may not evict), freed after {self.fill_hold_s:.0f} s"


def _free(client, names: list[str], limit: str) -> None:
    try:
        for start in range(0, len(names), 500):
            client.delete(*names[start : start + 500])
        client.config_set("maxmemory", limit)
    finally:
        client.close()


def _kill_replicas(deployment: str, every: bool) -> str:
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]
    if not actors:
        raise RuntimeError(f"no {deployment} replica found")
    for actor in actors if every else actors[:1]:
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    return f"killed {len(actors) if every else 1} of {len(actors)} replicas"


MAX_NEW = 24  # the needle answer ("The special magic number ... is 1234567.") fits


def warm(address: str, documents: list[Document], token: str | None, deadline_s: float,
         wanted: int | None = None) -> list[Document]:
    """Each document's fault-free answer (greedy: the same every time); the first ``wanted`` whose
    answer holds its needle (a small model misses some needles even without faults)."""
    chosen = []
    with KVComposeClient(address, token=token, timeout_s=deadline_s) as c:
        for doc in documents:
            doc.answer, _ = c.ask(doc.question, context=c.compress_request(doc.text), max_new_tokens=MAX_NEW)
            if not doc.needle or doc.needle in doc.answer:
                chosen.append(doc)
            if len(chosen) == (wanted or len(documents)):
                return chosen
    raise RuntimeError(f"only {len(chosen)} of {len(documents)} documents are answered right without faults; "
                       f"{wanted or len(documents)} were wanted")


def run(stack, documents: list[Document], duration_s: float, deadline_s: float = 30.0,
        plan: list[tuple[float, str]] | None = None, long_document: str = "", clients: int | None = None
        ) -> ChaosReport:
    """One client per document (the first ``clients`` answered right) asks in a loop for
    ``duration_s`` while ``plan``'s faults strike."""
    address, token = stack.address, stack.api_token
    documents = warm(address, documents, token, deadline_s, clients)
    report = ChaosReport(duration_s, len(documents), deadline_s)
    injector = Injector(stack, long_document or documents[0].text * 8)
    lock, stop, t0 = threading.Lock(), threading.Event(), time.monotonic()

    def client(i: int) -> None:
        doc = documents[i]
        with KVComposeClient(address, token=token, timeout_s=deadline_s, retries=False) as c:  # failures seen
            context = c.compress_request(doc.text)
            while not stop.is_set():
                start = time.monotonic() - t0
                try:
                    text, _ = c.ask(doc.question, context=context, max_new_tokens=MAX_NEW)
                    status, right, detail = "OK", (doc.needle in text) if doc.needle else text == doc.answer, text
                except grpc.RpcError as e:
                    status, detail = e.code().name, e.details() or ""
                    right = status in RETRYABLE
                    time.sleep(0.2)  # a client backs off after a failure
                with lock:
                    report.calls.append(Call(i, start, time.monotonic() - t0, status, right, detail[:200]))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(documents))]
    for t in threads:
        t.start()
    try:
        for at_s, name in plan if plan is not None else schedule(duration_s):
            time.sleep(max(0.0, at_s - (time.monotonic() - t0)))
            note = injector.inject(name)
            report.faults.append(Fault(name, round(time.monotonic() - t0, 2), note))
        time.sleep(max(0.0, duration_s - (time.monotonic() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join(deadline_s + 10)
    recovery(report)
    return report


def window_s(report: ChaosReport) -> int:
    """Seconds to average throughput over: two typical calls (16 clients answered in one batch
    arrive together, so one-second counts come in bursts)."""
    latencies = [c.end - c.start for c in report.calls if c.status == "OK"]
    return max(3, round(2 * statistics.median(latencies))) if latencies else 3


def rolling(values: list[int], window: int) -> list[float]:
    """The mean of each ``window`` bins from each one on (shorter at the end): throughput as the
    recovery reads it and the plot draws it."""
    return [statistics.mean(values[t : t + window]) for t in range(len(values))]


def baseline(report: ChaosReport) -> float:
    """Answers per second before the first fault, after two seconds of warm-up (the whole run's
    mean when the first fault comes too early for that)."""
    ok, _ = report.bins()
    first = int(report.faults[0].at_s) if report.faults else len(ok)
    return statistics.mean(ok[2:first]) if first > 3 else statistics.mean(ok or [0])


def recovery(report: ChaosReport) -> None:
    """Per fault: seconds until throughput (averaged over ``window_s``) is back to 80 % of the
    pre-fault baseline (None: not before the next fault or the end)."""
    ok, _ = report.bins()
    window = window_s(report)
    base = baseline(report)
    smooth = rolling(ok, window)
    ends = [int(f.at_s) for f in report.faults[1:]] + [len(ok)]
    for fault, end in zip(report.faults, ends):
        begin = int(fault.at_s)
        for t in range(begin, max(begin, end - window + 1)):
            if smooth[t] >= 0.8 * base:
                fault.recovered_s = round(max(0.0, t - fault.at_s), 1)
                break


def summary(report: ChaosReport) -> dict:
    return {"duration_s": report.duration_s, "clients": report.clients, "deadline_s": report.deadline_s,
            "calls": len(report.calls), "statuses": dict(report.statuses()), "wrong": len(report.wrong),
            "late": len(report.late), "baseline_answers_per_s": round(baseline(report), 2),
            "window_s": window_s(report), "faults": [asdict(f) for f in report.faults],
            "wrong_examples": [asdict(c) for c in report.wrong[:5]]}


def table(report: ChaosReport) -> str:
    s = summary(report)
    lines = [f"{s['calls']} calls by {s['clients']} clients over {s['duration_s']:.0f} s "
             f"(deadline {s['deadline_s']:.0f} s); baseline {s['baseline_answers_per_s']} answers/s "
             f"(throughput averaged over {s['window_s']} s: two typical calls).",
             f"Wrong answers (or non-retryable statuses): **{s['wrong']}**. Calls past their deadline: "
             f"**{s['late']}**. Statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(s["statuses"].items())) + ".",
             "", "| fault | at s | what happened | back to 80 % throughput after |", "|---|---|---|---|"]
    for f in report.faults:
        back = f"{f.recovered_s:.1f} s" if f.recovered_s is not None else "not before the next fault"
        lines.append(f"| {f.name} | {f.at_s:.1f} | {f.note} | {back} |")
    return "\n".join(lines) + "\n"


def write(report: ChaosReport, out_dir: Path, title: str) -> list[Path]:
    """results.json, calls.csv (every call), chaos.md and chaos.png (answers and failures per second,
    faults marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(summary(report), indent=2) + "\n")
    with open(out_dir / "calls.csv", "w") as f:
        f.write("start_s,end_s,status,right\n")
        f.writelines(f"{c.start:.2f},{c.end:.2f},{c.status},{int(c.right)}\n" for c in report.calls)
    (out_dir / "chaos.md").write_text(f"# {title}\n\n" + table(report))
    ok, failed = report.bins()
    seconds = [i * BIN_S for i in range(len(ok))]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.plot(seconds, ok, color="tab:blue", alpha=0.3, linewidth=0.8, label="answers per second")
    window = window_s(report)
    ax.plot(seconds, rolling(ok, window), color="tab:blue", label=f"mean over the next {window} s")
    ax.bar(seconds, failed, width=BIN_S * 0.9, color="tab:red", alpha=0.5, label="failures/s (retryable)")
    for f in report.faults:
        ax.axvline(f.at_s, color="black", linestyle="--", linewidth=0.8)
        ax.text(f.at_s, ax.get_ylim()[1] * 0.95, f" {f.name}", rotation=90, va="top", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("per second")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "chaos.png", dpi=120)
    plt.close(fig)
    return [out_dir / "results.json", out_dir / "calls.csv", out_dir / "chaos.md", out_dir / "chaos.png"]
