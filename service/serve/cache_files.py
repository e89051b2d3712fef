"""The local commands, no service needed: compress a document into a cache file, answer questions
from one, and the needle-in-a-haystack demo (``kvcompose compress``, ``ask``, ``demo``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from service import press_spec


def _engine(model: str | None):
    from service.config import EngineConfig
    from service.engine.engine import Engine

    return Engine(EngineConfig.from_env(model=model))


def compress(args: argparse.Namespace) -> int:
    from service.cache import codec

    text = Path(args.document).read_text() if args.document != "-" else sys.stdin.read()
    press = press_spec.resolve(args.press, args.ratio)
    engine = _engine(args.model)
    kv, stats = engine.compress(text, press, args.task_prompt or None, args.codec)
    written = codec.save(kv, args.out, args.codec or engine.config.codec)
    print(json.dumps({**stats.to_json(), "file": str(args.out), "file_bytes": written, "press": kv.meta.press,
                      "codec": args.codec or engine.config.codec, "model": kv.meta.model_id}, indent=2))
    return 0


def ask(args: argparse.Namespace) -> int:
    from service.cache import codec
    from service.engine.decode import Sampling
    from service.serve.remote import penalties

    kv = codec.load(args.cache)
    engine = _engine(args.model or kv.meta.model_id)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, stop_token_ids=engine.stop_token_ids(), **penalties(args))
    results = []
    for question in args.question:
        start = time.perf_counter()
        answer = engine.answer(kv, question, sampling)
        results.append({"question": question, "answer": answer, "seconds": round(time.perf_counter() - start, 3)})
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def demo(args: argparse.Namespace) -> int:
    """Compress a generated needle-in-a-haystack document and ask for the needle."""
    from service.bench.haystack import needle_document

    engine = _engine(args.model)
    doc, question, needle = needle_document(engine.loaded.tokenizer, args.tokens)
    kv, stats = engine.compress(doc, {"press": "kvcompose", "compression_ratio": args.ratio})
    answer = engine.answer(kv, question)
    print(json.dumps({**stats.to_json(), "question": question, "answer": answer, "expected": needle,
                      "correct": needle in answer}, indent=2))
    return 0
