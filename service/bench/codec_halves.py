"""Which half of a quantised cache costs the answers: keys or values?

    python -m service.bench.codec_halves > bench/smollm2-2k-codecs/halves.txt
    python -m service.bench.codec_halves --length 4096 \
        --contexts niah_single_1:0:0,niah_single_3:1:0,niah_multikey_1:1:0 > bench/smollm2-4k-codecs/halves.txt

On the contexts where int4 answered worse than int8 (by default the 2k ones of
``bench/smollm2-2k-codecs``; ``--contexts task:seed:ratio,...``, ratio 0 = uncompressed), each cache
is answered with its keys and values read back through different codecs (``k4v8``: int4 keys,
int8 values; ``k4v2`` is the stored codec), and with its first 4 slots (attention sinks) kept in float16.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from service.bench import metrics, ruler
from service.bench.runner import AccuracyRun, _through_codec, record, with_ratio
from service.cache.kvcache import CompressedKV
from service.engine.engine import Engine

CONTEXTS = [("niah_single_3", 2, 0.9), ("niah_multivalue", 1, 0.75), ("niah_multivalue", 0, 0.5)]
SINKS = 4


def halves(kv: CompressedKV, key_codec: str, value_codec: str) -> CompressedKV:
    keys, values = _through_codec(kv, key_codec), _through_codec(kv, value_codec)
    return CompressedKV(keys=keys.keys, values=values.values, evicted=keys.evicted, meta=keys.meta)


def sinks_kept(kv: CompressedKV, name: str) -> CompressedKV:
    coded, exact = _through_codec(kv, name), kv.to(dtype=torch.float16)
    keys = [torch.cat([e[:, :SINKS], c[:, SINKS:]], 1) for e, c in zip(exact.keys, coded.keys)]
    values = [torch.cat([e[:, :SINKS], c[:, SINKS:]], 1) for e, c in zip(exact.values, coded.values)]
    return CompressedKV(keys=keys, values=values, evicted=coded.evicted, meta=coded.meta)


def contexts(text: str) -> list[tuple[str, int, float]]:
    """"task:seed:ratio,..." -> [(task, seed, ratio)]."""
    return [(task, int(seed), float(ratio)) for task, seed, ratio in (c.split(":") for c in text.split(","))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="context tokens (default 2048)")
    parser.add_argument("--contexts", type=contexts, default=CONTEXTS,
                        help="task:seed:ratio,... (ratio 0: uncompressed; default: the 2k ones)")
    args = parser.parse_args()
    engine = Engine()
    run = AccuracyRun(engine, Path(tempfile.mkdtemp()) / "unused.csv", args.length)  # its compress and answer only
    for task, seed, ratio in args.contexts:
        sample = ruler.generate(task, engine.loaded.tokenizer, args.length, seed)
        rec = record(engine.loaded.model, engine.context_ids(sample.context))
        spec = with_ratio({"press": "kvcompose"}, ratio) if ratio else {}
        kv = run._compress(rec, "kvcompose" if ratio else "none", spec, sample, {})
        variants = {"float16": kv.to(dtype=torch.float16), "int8": _through_codec(kv, "int8"),
                    "int4": _through_codec(kv, "int4"), "k4v8": halves(kv, "int4", "int8"),
                    "k8v4": halves(kv, "int8", "int4"), "k4v16": halves(kv, "int4", "float16"),
                    "k4v2": _through_codec(kv, "k4v2"), f"int4, first {SINKS} slots float16": sinks_kept(kv, "int4")}
        question = engine.prompt.question_ids(sample.question, sample.answer_prefix)
        answers = run._answer(list(variants.values()), question, sample)
        scores = {name: metrics.metric_for(task)([a], [sample.answers]) for name, a in zip(variants, answers)}
        print(f"{task} context {seed} at {ratio}: " + ", ".join(f"{n} {s:.0f}" for n, s in scores.items()), flush=True)


if __name__ == "__main__":
    main()
