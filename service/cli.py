"""``kvcompose`` command line: compress a document to a cache file, ask questions from it, run the demo,
serve, call a running service, benchmark.

This module only parses arguments; the commands are ``service.serve.cache_files`` (local),
``service.serve.remote`` (the API), ``service.local.run`` (serve) and ``service.bench.commands``.
Heavy modules (torch, transformers, grpc) are imported inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from service import press_spec
from service.bench import commands
from service.config import BASE_CODECS, CODECS, ENTROPY_CODING
from service.protocol import DEFAULT_MAX_NEW_TOKENS
from service.serve import cache_files, remote


def cmd_serve(args: argparse.Namespace) -> int:
    from service.local.run import run_local
    from service.serve.launch import CONFIG

    run_local(Path(args.config) if args.config else CONFIG, args.store_port, args.store_metrics_port,
              args.ray_metrics_port, tls=args.tls, state_dir=args.state_dir, host=args.host)
    return 0


def _press_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--press", type=press_spec.press_arg, help=press_spec.HELP)
    p.add_argument("--ratio", type=float, help=press_spec.RATIO_HELP)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer, in tokens (default {DEFAULT_MAX_NEW_TOKENS}); answers end at the "
                   "model's end token")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher samples more freely")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, help="sampling seed, for reproducible sampled answers")
    for flag, what in (("--repetition-penalty", "divides a repeated token's logit; > 0, 1 = off"),
                       ("--frequency-penalty", "subtracted per earlier occurrence of a token; in [-2, 2], 0 = off"),
                       ("--presence-penalty", "subtracted once from every token already used; in [-2, 2], 0 = off")):
        p.add_argument(flag, type=float, help=f"{what} (default: the model's generation_config)")


def _compress_flags(p: argparse.ArgumentParser, codec_default: str, stdin: bool = False) -> None:
    p.add_argument("document", help="text file ('-' for stdin)" if stdin else "text file")
    _press_flags(p)
    p.add_argument("--task-prompt", action="append", help="expected question (task-aware KVCompose); repeatable")
    p.add_argument("--codec", choices=list(CODECS), metavar="CODEC",
                   help=f"storage codec: {', '.join(BASE_CODECS)}; any of them with {ENTROPY_CODING} "
                        f"(lossless, fewer bytes; docs/store.md) (default: {codec_default})")


REMOTE = {
    "compress": ("store a document's compressed cache; prints its cache id (--json: its statistics)",
                 remote.compress),
    "ask": ("answer a question from a stored cache or a document (streamed)", remote.ask),
    "stat": ("a stored cache's manifest: model, press, codec, tokens, bytes, age and expiry", remote.stat),
    "delete": ("delete a stored cache (exit 1 if there was none)", remote.delete),
    "models": ("the served model: revision, layers, context limit, default press and codec", remote.models),
    "lookup": ("the cache id a document would have, and whether it is stored (exit 1 if not); compresses "
               "nothing (needs the served model's tokenizer here)", remote.lookup),
}


def _remote_parser(sub) -> None:
    commands = sub.add_parser("remote", help="call a running service over gRPC").add_subparsers(dest="remote",
                                                                                               required=True)
    for name, (help_text, func) in REMOTE.items():
        r = commands.add_parser(name, help=help_text, description=help_text)
        r.add_argument("--addr", default=remote.DEFAULT_ADDR,
                       help=f"the service's gRPC address (default {remote.DEFAULT_ADDR})")
        r.add_argument("--token", help="API bearer token (or KVCOMPOSE_TOKEN; for a local address, the one "
                       "'make serve' on that port wrote)")
        r.add_argument("--state-dir", type=Path, help="the token and CA of the 'kvcompose serve --state-dir' "
                       "instance to call (default: found by --addr's port for a local address)")
        r.add_argument("--tenant", help="tenant, for a service without API tokens (development mode)"
                       + ("; also the tenant the id is worked out for (default 'default', make serve's)"
                          if name == "lookup" else ""))
        r.add_argument("--tls-ca", help="dial TLS, verifying the service with this CA (PEM); for a local "
                       "address, 'make serve TLS=1''s CA is found by itself")
        r.add_argument("--tls-cert", default="", help="client certificate (PEM), for mutual TLS")
        r.add_argument("--tls-key", default="", help="the client certificate's key (PEM)")
        r.add_argument("--json", action="store_true", help="machine-readable JSON, numbers as numbers"
                       + (" (all of the answer's statistics, on stderr; default: one line)" if name == "ask" else ""))
        if name in ("compress", "lookup"):
            _compress_flags(r, "the service's")
        elif name in ("stat", "delete"):
            r.add_argument("cache_id", help="a cache id from 'remote compress' or 'remote lookup'")
        elif name == "ask":
            r.add_argument("question", help="the question")
            source = r.add_mutually_exclusive_group(required=True)
            source.add_argument("--cache-id", help="a cache id from 'remote compress'")
            source.add_argument("--document", help="text file: compressed first unless already stored")
            _press_flags(r)
            _sampling_flags(r)
            r.add_argument("--stop", action="append", help="stop the answer at this string (not included); repeatable")
        r.set_defaults(func=func)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompose", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="embedded default, a Hugging Face id or a local path")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="prefill + compress a document into a cache file")
    _compress_flags(p, "float16", stdin=True)
    p.add_argument("--out", required=True, type=Path, help="cache file to write")
    p.set_defaults(func=cache_files.compress)

    p = sub.add_parser("ask", help="answer questions from a cache file")
    p.add_argument("cache", type=Path, help="cache file written by 'kvcompose compress'")
    p.add_argument("question", nargs="+", help="one or more questions, each answered from the cache")
    _sampling_flags(p)
    p.set_defaults(func=cache_files.ask)

    p = sub.add_parser("demo", help="needle-in-a-haystack demo with the embedded model")
    p.add_argument("--tokens", type=int, default=2000, help="length of the generated document (default 2000)")
    p.add_argument("--ratio", type=float, default=0.5, help="KVCompose compression ratio (default 0.5)")
    p.set_defaults(func=cache_files.demo)

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

    _remote_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("accuracy", help="RULER-style accuracy of presses and ratios (resumable CSV)")
    b.add_argument("--length", type=int, default=4096, help="context length in the model's tokens")
    b.add_argument("--tasks", default="all", help="comma-separated RULER task names, or 'all'")
    b.add_argument("--samples", type=int, default=10, help="samples per task")
    b.add_argument("--presses", type=press_spec.press_list, default=commands.DEFAULT_BENCH_PRESSES,
                   help="JSON list of press specs (ratios set per run)")
    b.add_argument("--ratios", default="0.25,0.5,0.75,0.9", help="comma-separated compression ratios, each in (0, 1)")
    b.add_argument("--task-prompts", default="question",
                   help="rows of KVCompose scored by a task prompt: comma-separated question, paraphrase, unrelated")
    b.add_argument("--no-task-aware", action="store_true", help="no task-aware rows (same as --task-prompts '')")
    b.add_argument("--codecs", default="",
                   help="also answer from each cache stored with these codecs (rows '<press>@<codec>'), e.g. int8, "
                        "or read back as a layout of service.bench.codec_variants (k4v2-res, k4v2-top)")
    b.add_argument("--codec-presses", default="",
                   help="row labels (e.g. kvcompose,none) whose caches --codecs applies to (default: all)")
    b.add_argument("--out", type=Path, default=Path("bench/results.csv"), help="results CSV (resumed if it exists)")
    b.add_argument("--report-dir", type=Path, help="where results.md and plots go (default: beside --out)")
    b.set_defaults(func=commands.accuracy)
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
    b.set_defaults(func=commands.load)
    b = bench.add_parser("chaos", help="faults on a schedule (Redis, the store, a Decoder, a Compressor mid-prefill "
                         "killed; Redis full) while clients ask through the API; wrong answers, statuses, recovery")
    b.add_argument("--clients", type=int, default=16, help="concurrent clients, each with its own needle document")
    b.add_argument("--duration-s", type=float, default=300.0, help="length of the run; faults spread over it")
    b.add_argument("--deadline-s", type=float, default=60.0, help="each call's deadline")
    b.add_argument("--doc-tokens", type=int, default=300, help="length of each client's document in model tokens")
    b.add_argument("--long-tokens", type=int, default=2000, help="the document being prefilled when the "
                   "Compressor is killed")
    b.add_argument("--out-dir", type=Path, default=Path("bench/chaos-smollm2"), help="where results and the plot go")
    b.set_defaults(func=commands.chaos)
    b = bench.add_parser("soak", help="a long mixed workload (compress, answer, stat, delete, bad input) watching "
                         "every process's memory, threads and open files, Redis memory and temporary files")
    b.add_argument("--requests", type=int, default=2000, help="requests in all")
    b.add_argument("--duration-s", type=float, default=1200.0, help="the requests are paced over this long")
    b.add_argument("--clients", type=int, default=4, help="concurrent clients")
    b.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples of the processes")
    b.add_argument("--ttl-s", type=int, default=120, help="lifetime of the entries the soak stores")
    b.add_argument("--doc-tokens", type=int, default=300, help="length of the documents in model tokens")
    b.add_argument("--out-dir", type=Path, default=Path("bench/soak-smollm2"), help="where results and the plot go")
    b.set_defaults(func=commands.soak)
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
    b.set_defaults(func=commands.perf)
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
    b.set_defaults(func=commands.gpu)
    b = bench.add_parser("report", help="tables and plots from a results CSV")
    b.add_argument("csv", type=Path, help="results CSV of 'bench accuracy'")
    b.add_argument("--report-dir", type=Path, help="where results.md and plots go (default: beside the CSV)")
    b.set_defaults(func=commands.report)
    return parser


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 the service refused or failed (one line: what to do, where known) or the
    command's own failure (e.g. ``remote lookup``: not stored); 2 bad input; 141 the reader of
    stdout left (``| head``), as a shell reports a command that SIGPIPE ended."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader that left shows here, not as a traceback at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write to
        return 141


def _main(argv: list[str] | None) -> int:
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
        print(remote.error_line(e, args), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
