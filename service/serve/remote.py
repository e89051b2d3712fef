"""``kvcompose remote``: each API call from the command line, through ``service.client.KVComposeClient``.

Output is for people by default (a cache id alone on stdout where a script wants one, a line of
figures on stderr); ``--json`` prints the reply with every number as a JSON number (protobuf's JSON
mapping writes 64-bit integers as strings). Errors are one line that says what to do
(``error_line``): a refused token names ``--token``, ``KVCOMPOSE_TOKEN`` and where the local
instance keeps its token; a refused connection names the address and ``make serve``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from service import press_spec
from service.serve import instance

DEFAULT_ADDR = "127.0.0.1:9000"


def connect(args: argparse.Namespace):
    """A ``KVComposeClient`` for ``args`` (--addr, --token, --state-dir, --tenant, --tls-*): the token
    from --token, else ``KVCOMPOSE_TOKEN``, else the one `make serve` wrote for that port on this
    machine; for a local ``make serve TLS=1``, its CA."""
    from service.client import KVComposeClient
    from service.config import ClientConfig
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


def error_line(e, args: argparse.Namespace) -> str:
    """One line for a failed call (``grpc.RpcError``), with what to do where we know it."""
    code, details = e.code().name, e.details() or ""
    addr = getattr(args, "addr", None) or DEFAULT_ADDR
    if code == "UNAUTHENTICATED":
        state = instance.for_address(addr, getattr(args, "state_dir", None))
        where = instance.api_token_file(state if state is not None else instance.state_dir(0).parent / "api-<port>")
        return (f"kvcompose: UNAUTHENTICATED: {details}; give the API token with --token or KVCOMPOSE_TOKEN "
                f"(`kvcompose serve` on this machine writes its token to {where})")
    if code == "UNAVAILABLE" and "connection refused" in details.lower():
        return (f"kvcompose: nothing answers at {addr} (connection refused): is the service running? "
                "Start it with `make serve` (or `kvcompose serve`), or give --addr")
    return f"kvcompose: {code}: {details}"


def as_json(message) -> dict:
    """The message as JSON (camelCase names, unset fields included), 64-bit integers as numbers and
    bytes as hex rather than strings."""
    from google.protobuf.json_format import MessageToDict

    return _typed(message, MessageToDict(message, always_print_fields_with_no_presence=True))


def _typed(message, out: dict) -> dict:
    from google.protobuf.descriptor import FieldDescriptor as F

    for field in message.DESCRIPTOR.fields:
        if field.json_name not in out:
            continue
        value = getattr(message, field.name)
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == F.LABEL_REPEATED
        if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            continue  # a map (GenerateStats.timings: string -> double): MessageToDict's is right
        if field.type == F.TYPE_MESSAGE:
            if repeated:
                out[field.json_name] = [_typed(m, d) for m, d in zip(value, out[field.json_name])]
            else:
                _typed(value, out[field.json_name])
        elif field.cpp_type in (F.CPPTYPE_INT64, F.CPPTYPE_UINT64):
            out[field.json_name] = list(value) if repeated else value
        elif field.type == F.TYPE_BYTES:
            out[field.json_name] = [v.hex() for v in value] if repeated else value.hex()
    return out


def _print_json(data: dict) -> None:
    print(json.dumps(data, indent=2))


def size(n: int) -> str:
    """Bytes for people: 1.5 MiB."""
    value, unit = float(n), 0
    while value >= 1024 and unit < 3:
        value, unit = value / 1024, unit + 1
    return f"{n:,} B" if unit == 0 else f"{value:.1f} {('KiB', 'MiB', 'GiB')[unit - 1]}"


def compress(args: argparse.Namespace) -> int:
    """Store a document's compressed cache: its id alone on stdout, one line of figures on stderr."""
    text = Path(args.document).read_text()
    press = press_spec.resolve(args.press, args.ratio)
    with connect(args) as client, _progress("compressing (prefill + KVCompose)..."):
        reply = client.compress(text, press, args.codec or "", args.task_prompt or ())
    if args.json:
        _print_json(as_json(reply))
        return 0
    print(reply.cache_id)
    how = "found stored, nothing prefilled" if reply.reused else f"compressed in {reply.seconds:.1f} s"
    print(f"{how} · kept {reply.kept_fraction:.0%} of {reply.original_tokens:,} tokens · "
          f"{size(reply.stored_bytes)} stored ({reply.codec}; {size(reply.uncompressed_bytes)} uncompressed "
          f"float16) · {reply.press_json}", file=sys.stderr)
    return 0


def stat(args: argparse.Namespace) -> int:
    with connect(args) as client:
        manifest = client.stat(args.cache_id).manifest
    if args.json:
        _print_json(as_json(manifest))
    else:
        print(manifest_text(manifest))
    return 0


def manifest_text(m) -> str:
    """A stored cache for people, a few lines."""
    from service.protocol import kept_fraction

    kept = kept_fraction(list(m.kept_tokens_per_layer), m.context_tokens) if m.kept_tokens_per_layer else 0.0
    ttl = f"expires {m.ttl_s:,} s after its last use" if m.ttl_s > 0 else "no expiry"
    return "\n".join([
        f"cache    {m.cache_id}",
        f"model    {m.key.model_id} ({m.key.model_revision})",
        f"press    {m.key.press_json}",
        f"codec    {m.key.codec} · format v{m.format_version}",
        f"tokens   {m.context_tokens:,}, kept {kept:.0%}",
        f"bytes    {size(m.total_bytes)} stored ({m.total_bytes:,} B), {size(m.uncompressed_bytes)} uncompressed",
        f"stored   {_when(m.created_unix_ms)} · {ttl}",
    ])


def _when(unix_ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def delete(args: argparse.Namespace) -> int:
    """Exit 0: deleted; 1: there was no such cache (for this tenant)."""
    with connect(args) as client:
        deleted = client.delete(args.cache_id)
    if args.json:
        _print_json({"cacheId": args.cache_id, "deleted": deleted})
    else:
        print(f"deleted {args.cache_id}" if deleted else f"no cache {args.cache_id} here (already gone, "
              "expired, or never stored for this tenant)", file=sys.stdout if deleted else sys.stderr)
    return 0 if deleted else 1


def models(args: argparse.Namespace) -> int:
    with connect(args) as client:
        reply = client.list_models()
    if args.json:
        _print_json(as_json(reply))
        return 0
    for m in reply.models:
        print(f"{m.id} ({m.revision}): {m.layers} layers, up to {m.max_context_tokens:,} context tokens; "
              f"default press {m.default_press_json}, codec {m.default_codec}")
    return 0


def lookup(args: argparse.Namespace) -> int:
    """The cache id a document would have, and whether it is stored (exit 0) or not (1); nothing is
    compressed. The id is worked out here, from the served model's tokenizer (``service.serve.lookup``)."""
    from service.serve.lookup import cache_id_for

    text = Path(args.document).read_text()
    press = press_spec.resolve(args.press, args.ratio)
    tenant = args.tenant or "default"
    with connect(args) as client:
        model = client.list_models().models[0]
        cache_id = cache_id_for(model, text, press, args.codec or "", args.task_prompt or (), tenant)
        manifest = _stat_or_none(client, cache_id)
    if args.json:
        _print_json({"cacheId": cache_id, "stored": manifest is not None, "tenant": tenant,
                     "manifest": as_json(manifest) if manifest is not None else None})
    else:
        print(cache_id)
        print(f"stored: {manifest.context_tokens:,} tokens, {size(manifest.total_bytes)}" if manifest is not None
              else f"not stored (for tenant {tenant!r}): 'remote compress' stores it", file=sys.stderr)
    return 0 if manifest is not None else 1


def _stat_or_none(client, cache_id: str):
    import grpc

    try:
        return client.stat(cache_id).manifest
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise


def ask(args: argparse.Namespace) -> int:
    """The answer streamed to stdout; its statistics on stderr (one line, or JSON with --json)."""
    with connect(args) as client:
        context = None
        if args.document:
            context = client.compress_request(Path(args.document).read_text(),
                                              press_spec.resolve(args.press, args.ratio))
        stats = None
        with _progress("waiting for the first token..."):
            stream = client.generate(args.question, cache_id=args.cache_id, context=context,
                                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed, stop=args.stop or (),
                                     **penalties(args))
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
        print(json.dumps(as_json(stats), indent=2) if args.json else line, file=sys.stderr)
    return 0


def penalties(args: argparse.Namespace) -> dict[str, float | None]:
    """The sampling penalties of the shared flags (None: the model's generation_config)."""
    return {name: getattr(args, name) for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")}


def _progress(label: str):
    from rich.console import Console

    return Console(stderr=True).status(label)


def stats_line(stats, answer: str, max_new_tokens: int) -> str:
    """One line for people: which cache, where it came from, what it kept, how fast, and whether the
    answer ran to the length limit or repeats itself."""
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
