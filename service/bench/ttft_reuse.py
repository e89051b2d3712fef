"""Time to first token when the same document is asked about twice, by text (not by cache id).

Starts the local stack (embedded Redis, prefix store, Ray Serve with the embedded SmolLM2), then
sends Generate(context=document text) twice. The first call prefills and compresses; the second
finds the stored cache and only decodes. Prints both TTFTs and their ratio (target: >= 5x).

    python -m service.bench.ttft_reuse [--tokens 2000]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    from service.bench.haystack import needle_document
    from service.client import KVComposeClient
    from service.engine.engine import Engine
    from service.local.processes import free_port
    from service.local.stack import LocalStack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    doc, question, needle = needle_document(Engine().loaded.tokenizer, args.tokens)
    top = {"grpc_options": {"port": free_port()}, "http_options": {"port": free_port()}}
    with LocalStack(top=top) as stack, KVComposeClient(stack.address, token=stack.api_token) as client:
        context = client.compress_request(doc, {"press": "kvcompose", "compression_ratio": 0.5})
        runs = [client.ask(question, context=context, max_new_tokens=32) for _ in range(2)]
    for i, (text, stats) in enumerate(runs, 1):
        print(f"call {i}: reused={stats.compressed.reused} cache_source={stats.cache_source} "
              f"ttft={stats.time_to_first_token_s:.2f} s  needle={'yes' if needle in text else 'no'}")
    ratio = runs[0][1].time_to_first_token_s / runs[1][1].time_to_first_token_s
    print(f"TTFT first / second: {ratio:.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
