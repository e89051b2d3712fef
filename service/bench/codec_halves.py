"""Which half of a quantised cache costs the answers: keys or values?

    python -m service.bench.codec_halves > bench/smollm2-2k-codecs/halves.txt

On the 2k contexts where int4 answered worse than int8 (``bench/smollm2-2k-codecs``), each cache
is answered with its keys and values read back through different codecs (``k4v8``: int4 keys,
int8 values), and with its first 4 slots (attention sinks) kept in float16.
"""

from __future__ import annotations

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


def main() -> None:
    engine = Engine()
    run = AccuracyRun(engine, "/dev/null", 2048)
    for task, seed, ratio in CONTEXTS:
        sample = ruler.generate(task, engine.loaded.tokenizer, 2048, seed)
        rec = record(engine.loaded.model, engine.context_ids(sample.context))
        kv = run._compress(rec, "kvcompose", with_ratio({"press": "kvcompose"}, ratio), sample, {})
        variants = {"float16": kv.to(dtype=torch.float16), "int8": _through_codec(kv, "int8"),
                    "int4": _through_codec(kv, "int4"), "k4v8": halves(kv, "int4", "int8"),
                    "k8v4": halves(kv, "int8", "int4"), "k4v16": halves(kv, "int4", "float16"),
                    f"int4, first {SINKS} slots float16": sinks_kept(kv, "int4")}
        question = engine.prompt.question_ids(sample.question, sample.answer_prefix)
        answers = run._answer(list(variants.values()), question, sample)
        scores = {name: metrics.metric_for(task)([a], [sample.answers]) for name, a in zip(variants, answers)}
        print(f"{task} context {seed} at {ratio}: " + ", ".join(f"{n} {s:.0f}" for n, s in scores.items()), flush=True)


if __name__ == "__main__":
    main()
