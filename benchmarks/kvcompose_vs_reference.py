"""Wall time and peak extra memory of the project's KVCompose vs kvpress 0.5.5's KVComposePress.

Each measurement runs in a fresh process: load SmolLM2, build the same needle document, warm up,
note the resident set, reset the kernel's peak counter (/proc/self/clear_refs), compress, read
the peak (VmHWM). "Peak extra" = peak - resident before compressing.

Time and memory come from separate runs. glibc keeps freed blocks below its adaptive mmap
threshold in the heap, so RSS after a burst of large temporaries reports the allocator's cache,
not live tensors; the memory run fixes the threshold (MALLOC_MMAP_THRESHOLD_) so that the peak
follows live allocations, which slows allocation and is why time is measured without it.
A "no press" row gives the floor: plain prefill and its cache. Targets (issue #2): at most 1/3 of
the reference's time and 1/4 of its peak extra memory; (issue #14) one-pass KVCompose at most 1.5x
a plain prefill.

    python benchmarks/kvcompose_vs_reference.py [--lengths 2048,4096] [--ratio 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(which: str, tokens: int, ratio: float) -> dict:
    import time

    import kvpress
    import torch

    from service.engine import Engine
    from service.haystack import needle_document
    from service.kvcache import CacheMeta
    from service.prefill import prefill
    from service.presses.kvcompose import KVComposePress

    engine = Engine()
    doc, question, needle = needle_document(engine.loaded.tokenizer, tokens)
    ids = engine.context_ids(doc)
    presses = {"ours": lambda: KVComposePress(compression_ratio=ratio),
               "ours-one-pass": lambda: KVComposePress(compression_ratio=ratio, replay_context=False),
               "reference": lambda: kvpress.KVComposePress(compression_ratio=ratio)}
    press = presses[which]() if which in presses else None
    meta = CacheMeta(engine.model_id, engine.loaded.revision, len(ids), {})
    prefill(engine.loaded.model, ids[:64], None, meta)  # warm-up: kernels' first-use allocations
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    kv = prefill(engine.loaded.model, ids, press, meta)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    answer = engine.answer(kv.to(dtype=torch.float16), question)
    return {"which": which, "tokens": len(ids), "seconds": seconds, "peak_extra_mib": (peak - base) / 2**20,
            "needle_found": needle in answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.ratio)))
        return
    print(f"{'tokens':>6}  {'press':<26} {'time s':>8} {'peak extra MiB':>15} {'needle':>7}")
    names = {"none": "no press (floor)", "ours": "service KVComposePress", "ours-one-pass": "service, one pass",
             "reference": "kvpress KVComposePress"}
    for tokens in [int(x) for x in args.lengths.split(",")]:
        rows = {}
        for which in names:
            r = _child(which, tokens, args.ratio, {})
            r["peak_extra_mib"] = _child(which, tokens, args.ratio, {"MALLOC_MMAP_THRESHOLD_": "131072"})[
                "peak_extra_mib"]
            rows[which] = r
            name = names[which]
            print(f"{r['tokens']:>6}  {name:<26} {r['seconds']:>8.1f} {r['peak_extra_mib']:>15.0f} "
                  f"{str(r['needle_found']):>7}", flush=True)
        t = rows["ours"]["seconds"] / rows["reference"]["seconds"]
        m = rows["ours"]["peak_extra_mib"] / max(rows["reference"]["peak_extra_mib"], 1e-9)
        print(f"{'':>6}  ratio ours/reference: time {t:.2f} (target <= 0.33), peak extra memory {m:.2f} "
              f"(target <= 0.25)", flush=True)
        for which in ("ours", "ours-one-pass"):
            ratio_to_plain = rows[which]["seconds"] / rows["none"]["seconds"]
            print(f"{'':>6}  {names[which]} / plain prefill: time {ratio_to_plain:.2f} (issue #14 target <= 1.5)",
                  flush=True)


def _child(which: str, tokens: int, ratio: float, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--ratio", str(ratio), "--child", which, str(tokens)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
