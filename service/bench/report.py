"""Reports from the runner's CSV: accuracy per task and on average (with 95% intervals), maximum
compression within a relative loss tolerance, and plots.

Maximum compression at tolerance eps: the largest ratio r with accuracy(r) >= (1 - eps) * accuracy(0),
accuracy linearly interpolated between measured ratios (the KVCompose paper's reading of its curves);
accuracy(0) is the uncompressed baseline on the same samples.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from service.bench.ruler import AGGREGATION, TASKS


def load(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return [{**r, "ratio": float(r["ratio"]), "score": float(r["score"]), "sample": int(r["sample"]),
                 "bytes_int8": int(r["bytes_int8"]), "bytes_float16": int(r["bytes_float16"]),
                 "bytes_stored": int(r.get("bytes_stored") or 0),  # absent in rows written before it
                 "length": int(r["length"])} for r in csv.DictReader(f)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal 95% interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, 1.96 * sd / math.sqrt(n)


def accuracy(rows: list[dict], tasks: set[str] | None = None) -> dict[tuple[str, float], tuple[float, float, int]]:
    """(press, ratio) -> (mean, 95% half-width, samples), macro-averaged over tasks per sample index."""
    by_key: dict[tuple[str, float], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if tasks is None or r["task"] in tasks:
            by_key[(r["press"], r["ratio"])][r["sample"]].append(r["score"])
    out = {}
    for key, per_sample in by_key.items():
        averages = [sum(v) / len(v) for v in per_sample.values()]
        m, ci = mean_ci(averages)
        out[key] = (m, ci, len(averages))
    return out


def curves(rows: list[dict], tasks: set[str] | None = None) -> dict[str, list[tuple[float, float]]]:
    """press -> [(ratio, accuracy)] sorted by ratio, each starting at the baseline (ratio 0)."""
    acc = accuracy(rows, tasks)
    base = acc.get(("none", 0.0), (float("nan"),))[0]
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (press, ratio), (m, _, _) in acc.items():
        if ratio > 0:  # every curve starts at the uncompressed, uncoded baseline
            out[press].append((ratio, m))
    return {p: [(0.0, base)] + sorted(pts) for p, pts in out.items()}


def max_compression(points: list[tuple[float, float]], eps: float) -> float:
    """Largest ratio whose interpolated accuracy stays >= (1 - eps) * accuracy at ratio 0."""
    points = sorted(points)
    threshold = (1 - eps) * points[0][1]
    best = 0.0
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if a0 >= threshold:
            best = max(best, r0)
        if a1 >= threshold:
            best = max(best, r1)
        elif a0 >= threshold:  # crosses inside this segment
            best = max(best, r0 + (threshold - a0) * (r1 - r0) / (a1 - a0))
    return best


def stored_bytes_per_token(rows: list[dict]) -> dict[tuple[str, float], float]:
    """(press, ratio) -> mean stored bytes per context token, in the row's codec ("<press>@int4"),
    else float16 (the default codec)."""
    per: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in rows:
        codec = r["press"].partition("@")[2]
        stored = r.get("bytes_stored") or (
            r["bytes_int8"] if codec == "int8" else r["bytes_float16"] * (2 if codec == "float32" else 1))
        per[(r["press"], r["ratio"])].append(stored / r["length"])
    return {k: sum(v) / len(v) for k, v in per.items()}


def bytes_at(press: str, ratio: float, per_token: dict[tuple[str, float], float]) -> float:
    """Stored bytes per token of ``press`` at ``ratio``, linearly interpolated between measured ratios."""
    base = "none@" + press.partition("@")[2] if "@" in press else "none"
    pts = sorted([(0.0, per_token.get((base, 0.0), per_token[("none", 0.0)]))] +
                 [(r, b) for (p, r), b in per_token.items() if p == press and r > 0])
    for (r0, b0), (r1, b1) in zip(pts, pts[1:]):
        if r0 <= ratio <= r1:
            return b0 + (b1 - b0) * (ratio - r0) / (r1 - r0)
    return pts[-1][1]


def table(rows: list[dict]) -> str:
    """Markdown: accuracy per task and average for every press and ratio, plus max compression."""
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    keys = sorted({(r["press"], r["ratio"]) for r in rows}, key=lambda k: (k[0] != "none", k[0], k[1]))
    per_task = {t: accuracy(rows, {t}) for t in tasks}
    overall = accuracy(rows)
    # Tasks the uncompressed model never solves carry no signal about compression; say so in a column.
    solved = {t for t in tasks if per_task[t].get(("none", 0.0), (0.0,))[0] > 0}
    on_solved = accuracy(rows, solved) if solved and solved != set(tasks) else None
    extra = f" average over the {len(solved)} tasks the baseline solves |" if on_solved else ""
    lines = ["| press | ratio | " + " | ".join(tasks) + " | average (95% CI) |" + extra,
             "|---|---|" + "---|" * len(tasks) + "---|" + ("---|" if on_solved else "")]
    for key in keys:
        cells = [f"{per_task[t][key][0]:.1f}" if key in per_task[t] else "" for t in tasks]
        m, ci, n = overall[key]
        line = f"| {key[0]} | {key[1]:.2f} | " + " | ".join(cells) + f" | {m:.1f} ± {ci:.1f} (n={n}) |"
        if on_solved:
            m, ci, _ = on_solved[key]
            line += f" {m:.1f} ± {ci:.1f} |"
        lines.append(line)
    per_token = stored_bytes_per_token(rows)
    lines += ["", "| press | max compression, 10% loss | stored bytes/token there | max compression, 20% loss "
                  "| stored bytes/token there |", "|---|---|---|---|---|"]
    for press, pts in sorted(curves(rows).items()):
        at10, at20 = max_compression(pts, 0.10), max_compression(pts, 0.20)
        lines.append(f"| {press} | {at10:.2f} | {bytes_at(press, at10, per_token):,.0f} | {at20:.2f} | "
                     f"{bytes_at(press, at20, per_token):,.0f} |")
    return "\n".join(lines) + "\n"


# Distinct colours and markers, one per curve in a plot: matplotlib's default cycle repeats after 10
# colours, and the 2k plot has 11 presses (TOVA and ExpectedAttention were both blue). The default
# presses keep their colour in every plot; the baseline is black.
PALETTE = ("#2ca02c", "#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#e7ba52", "#843c39", "#5254a3", "#637939", "#d6616b")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
KNOWN = ("kvcompose", "tova", "streamingllm", "snapkv", "knorm", "pyramidkv", "expectedattention",
         "think+kvcompose", "think+snapkv", "kvcompose-1pass", "kvcompose-aware")


def styles(names: list[str]) -> dict[str, dict]:
    """name -> plot keywords (colour, marker), a different pair for each name: the default presses
    (``KNOWN``) by their place there, other names (``kvcompose@int4``) in sorted order in the places
    that no name of this plot holds."""
    slots = {name: KNOWN.index(name) for name in names if name in KNOWN}
    free = (i for i in range(len(KNOWN) + len(names)) if i not in slots.values())
    slots |= {name: next(free) for name in sorted(set(names) - set(KNOWN))}
    return {name: {"color": PALETTE[slots[name] % len(PALETTE)], "marker": MARKERS[slots[name] % len(MARKERS)]}
            for name in names}


def _baseline_label(name: str) -> str:
    codec = name.partition("@")[2]
    return "uncompressed" + (f" @{codec}" if codec else " (float16)")


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """accuracy_vs_compression.png (all, retrieval, aggregation) and bytes_vs_accuracy.png (stored
    bytes, log scale), each with the uncompressed baseline in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = {"all tasks": None, "retrieval": set(TASKS) - AGGREGATION, "aggregation": AGGREGATION}
    style = styles(sorted(curves(rows)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for ax, (title, tasks) in zip(axes, families.items()):
        family = curves(rows, tasks)
        for press, pts in sorted(family.items()):
            ax.plot([r for r, _ in pts], [a for _, a in pts], label=press, **style[press])
        if family:
            base = next(iter(family.values()))[0][1]
            ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"uncompressed ({base:.1f})")
        ax.set_title(title)
        ax.set_xlabel("compression ratio")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()  # "all tasks" has every curve; a family may have none
    axes[-1].legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    first = out_dir / "accuracy_vs_compression.png"
    fig.savefig(first, dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.8))
    per_token = stored_bytes_per_token(rows)
    acc = accuracy(rows)
    names = sorted({k[0] for k in acc})
    style = styles([n for n in names if n.partition("@")[0] != "none"])
    baselines = [n for n in names if n.partition("@")[0] == "none"]
    for press in [n for n in names if n not in baselines] + baselines:  # the baseline's entries last
        pts = sorted((per_token[k], acc[k][0]) for k in acc if k[0] == press)
        if press in baselines:
            marker = "*" if press == "none" else MARKERS[1 + baselines.index(press) % (len(MARKERS) - 1)]
            ax.plot([b for b, _ in pts], [a for _, a in pts], linestyle="none", color="black", marker=marker,
                    markersize=11 if press == "none" else 7, label=_baseline_label(press), zorder=3)
        else:
            ax.plot([b for b, _ in pts], [a for _, a in pts], label=press, **style[press])
    if ("none", 0.0) in acc:
        base = acc[("none", 0.0)][0]
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"uncompressed accuracy ({base:.1f})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if f"{x:.0e}"[0] in "25" else ""))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("stored bytes per context token (float16, or the row's @codec; log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    second = out_dir / "bytes_vs_accuracy.png"
    fig.savefig(second, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [first, second]
