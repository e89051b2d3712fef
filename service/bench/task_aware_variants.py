"""Why task-aware KVCompose loses to task-agnostic: scoring variants on the 2k needle tasks.

Each sample is prefilled once; every variant scores the same recorded prefill, then compresses at
each ratio and answers greedily. Prints mean scores per variant and ratio and writes a CSV.

    python -m service.bench.task_aware_variants --samples 2 --out bench/task-aware-2k/results.csv
"""

from __future__ import annotations

import argparse
import collections
import csv
from pathlib import Path

from service.bench import metrics, ruler
from service.bench.runner import AccuracyRun, record, run_press
from service.cache.kvcache import CacheMeta
from service.config import EngineConfig
from service.engine.engine import Engine
from service.engine.prefill import collect
from service.engine.presses import build
from service.engine.presses.kvcompose import KVComposePress
from service.engine.presses.scoring import TaskAttention


class ContextSoftmaxKVCompose(KVComposePress):
    """A task token's attention renormalised over the context keys only (its softmax no longer
    covers the task's own tokens): measured here, not a served option (it did not help)."""

    def aggregator(self, n_context: int, softcap: float | None) -> TaskAttention:
        return TaskAttention(self.agg_task, n_context, softcap, over_context=True)


TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue"]
RATIOS = [0.5, 0.75, 0.9]


def variants(question: list[int], question_with_prefix: list[int]) -> dict[str, KVComposePress]:
    """name -> scoring press (task ids None: the context itself)."""
    return {
        "agnostic": KVComposePress(),
        "onepass": KVComposePress(replay_context=False, scorer="attention"),
        "aware": KVComposePress(task_ids=[question]),
        "aware-mean": KVComposePress(task_ids=[question], agg_task="mean"),  # mean-pooled over task tokens
        "aware-ctx": ContextSoftmaxKVCompose(task_ids=[question]),
        "aware-prefix": KVComposePress(task_ids=[question_with_prefix]),
        "aware-prefix-ctx": ContextSoftmaxKVCompose(task_ids=[question_with_prefix]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/task-aware-2k/results.csv"))
    parser.add_argument("--only", help="comma-separated variant names to run (default: all)")
    args = parser.parse_args()
    engine = Engine(EngineConfig())
    model, tokenizer = engine.loaded.model, engine.loaded.tokenizer
    answerer = AccuracyRun(engine, args.out.with_suffix(".unused"), 2048)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    means = collections.defaultdict(list)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "sample", "variant", "ratio", "score"])
        for seed in range(args.samples):
            for task in TASKS:
                sample = ruler.generate(task, tokenizer, 2048, seed)
                ids = engine.context_ids(sample.context)
                asked = engine.prompt.question_ids(sample.question, sample.answer_prefix)
                rec = record(model, ids)
                scores = {}
                chosen = variants(engine.prompt.question_ids(sample.question), asked)
                if args.only:
                    chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
                for name, scorer in chosen.items():
                    run_press(model, scorer, rec, rec.cache())
                    scores[name] = scorer.last_selection["scores"]
                for aware in ("aware-ctx", "aware-prefix"):  # each layer's scores as shares, summed
                    if "agnostic" not in scores or aware not in scores:
                        continue
                    scores[f"mix-{aware}"] = [a / a.sum() + b / b.sum()
                                              for a, b in zip(scores["agnostic"], scores[aware])]
                kvs, rows = [], []
                for name, per_layer in scores.items():
                    for ratio in RATIOS:
                        cache = rec.cache()
                        selector = build({"press": "kvcompose", "compression_ratio": ratio})
                        selector.compress_with_scores(per_layer, cache)
                        kvs.append(collect(model, cache, CacheMeta(engine.model_id, "", len(ids), {}), selector))
                        rows.append((name, ratio))
                for (name, ratio), prediction in zip(rows, answerer._answer(kvs, asked, sample)):
                    score = metrics.metric_for(task)([prediction], [sample.answers])
                    writer.writerow([task, seed, name, ratio, score])
                    means[(name, ratio)].append(score)
                f.flush()
    for (name, ratio), scores_ in sorted(means.items()):
        print(f"{name:22s} {ratio:.2f} {sum(scores_) / len(scores_):6.1f}  (n={len(scores_)})")


if __name__ == "__main__":
    main()
