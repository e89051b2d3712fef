"""Stored bytes per context token for SmolLM2-135M-Instruct, by press and codec.

Compresses the same ~2k-token needle document with each configuration, encodes it with the
project's codec (what the prefix store holds), and prints bytes per original context token, the
ratio to uncompressed float16 (23,040 bytes/token for SmolLM2), and whether the needle is still
answered.

    python -m service.bench.bytes_per_token [--tokens 2000]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from service.bench.haystack import needle_document  # noqa: E402
from service.cache import codec  # noqa: E402
from service.engine.engine import Engine  # noqa: E402

KVCOMPOSE = {"press": "kvcompose", "compression_ratio": 0.5}
CONFIGS = [
    ("no compression", {}, "float16"),
    ("KVCompose 0.5", KVCOMPOSE, "float16"),
    ("KVCompose 0.5", KVCOMPOSE, "int8"),
    ("ThinK 0.5 + KVCompose 0.5", {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                                               KVCOMPOSE]}, "int8"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    engine = Engine()
    doc, question, needle = needle_document(engine.loaded.tokenizer, args.tokens)
    baseline = None
    print(f"{'press':<28} {'codec':<8} {'bytes/token':>12} {'vs fp16':>8}  needle")
    for name, press, codec_name in CONFIGS:
        kv, stats = engine.compress(doc, press, codec=codec_name)
        data = codec.encode(kv, codec_name)
        per_token = len(data) / stats.original_tokens
        baseline = baseline or per_token
        answer = engine.answer(codec.decode(data), question)
        print(f"{name:<28} {codec_name:<8} {per_token:>12.0f} {per_token / baseline:>8.3f}  {needle in answer}",
              flush=True)


if __name__ == "__main__":
    main()
