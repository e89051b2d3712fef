"""The real embedded model: exactness against plain transformers, and the needle demo through the CLI."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import plain_transformers_logits

from service.bench.haystack import needle_document

pytestmark = pytest.mark.model


def test_no_press_logits_equal_plain_transformers(smollm2):
    prompt = smollm2.prompt
    context = prompt.context_ids("Paris is the capital of France. " * 20)
    question = prompt.question_ids("What is the capital of France?")
    kv, _ = smollm2.compress(context, {})
    ours = smollm2.question_logits(kv.to(dtype=torch.float32), question)
    plain = plain_transformers_logits(smollm2.loaded.model, context, question)
    assert kv.dtype == torch.float16  # the default storage dtype: small rounding only
    assert (ours - plain).abs().max() < 5e-2
    fp32 = type(smollm2)(smollm2.config.__class__(codec="float32"), loaded=smollm2.loaded)
    kv32, _ = fp32.compress(context, {})
    assert torch.allclose(fp32.question_logits(kv32, question), plain, atol=1e-4)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_compress_then_ask_finds_the_needle(smollm2, tmp_path):
    doc, question, needle = needle_document(smollm2.loaded.tokenizer, 2000)
    (tmp_path / "doc.txt").write_text(doc)
    out = tmp_path / "doc.kvc"
    made = run_cli("compress", str(tmp_path / "doc.txt"), "--press",
                   '{"press": "kvcompose", "compression_ratio": 0.5}', "--out", str(out))
    assert made.returncode == 0, made.stderr
    stats = json.loads(made.stdout)
    assert 1900 <= stats["original_tokens"] <= 2100
    assert abs(stats["kept_fraction"] - 0.5) < 0.02 and len(stats["kept_tokens_per_layer"]) == 30
    assert stats["compressed_bytes"] < 0.55 * stats["uncompressed_bytes"]
    asked = run_cli("ask", str(out), question)
    assert asked.returncode == 0, asked.stderr
    assert needle in json.loads(asked.stdout)["answer"]


def test_cli_refuses_a_damaged_cache_file(tmp_path):
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(b"KVCPRS\r\n" + b"\x01\x00\x00\x00" + b"\x00" * 64)
    result = run_cli("ask", str(bad), "anything?")
    assert result.returncode == 2
    assert "checksum" in result.stderr and "Traceback" not in result.stderr


def test_int8_codec_decodes_close_to_float16(smollm2, capsys):
    """The int8 codec's effect on answers: logits at every question position against float16."""
    from service.cache import codec

    doc, question, needle = needle_document(smollm2.loaded.tokenizer, 600)
    kv, _ = smollm2.compress(doc, {"press": "kvcompose", "compression_ratio": 0.5})
    q = smollm2.prompt.question_ids(question)
    fp16 = smollm2.question_logits(codec.decode(codec.encode(kv, "float16")), q)
    int8 = smollm2.question_logits(codec.decode(codec.encode(kv, "int8")), q)
    diff = (fp16 - int8).abs()
    agree = (fp16.argmax(-1) == int8.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\nint8 vs float16 logits over {len(q)} question positions: max |diff| {diff.max():.3f}, "
              f"mean |diff| {diff.mean():.4f}, top-1 agreement {agree:.0%}")
    assert agree == 1.0 and diff.max() < 1.0
    assert needle in smollm2.answer(codec.decode(codec.encode(kv, "int8")), question)


def test_bench_accuracy_reproduces_committed_rows(tmp_path):
    """`kvcompose bench accuracy` on a clean checkout gives the committed rows of the 2k results."""
    import csv
    from pathlib import Path

    committed = {(r["press"], r["ratio"]): r for r in csv.DictReader(Path("bench/smollm2-2k/results.csv").open())
                 if r["task"] == "niah_single_1" and r["sample"] == "0" and r["press"] in ("none", "kvcompose")}
    out = tmp_path / "results.csv"
    ran = run_cli("bench", "accuracy", "--length", "2048", "--tasks", "niah_single_1", "--samples", "1",
                  "--presses", '[{"press": "kvcompose"}]', "--ratios", "0.75", "--no-task-aware",
                  "--out", str(out), "--report-dir", str(tmp_path))
    assert ran.returncode == 0, ran.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2
    # Each cache's header records its canonical press spec, which has gained fields since these rows
    # were written (KVCompose's replay_fraction and scorer): those bytes, and only those, are new.
    grown = {"none": 0, "kvcompose": len('"replay_fraction":1.0,') + len('"scorer":"auto",')}
    for row in rows:
        want = committed[(row["press"], row["ratio"])]
        for field in ("score", "prediction", "kept_fraction"):
            assert row[field] == want[field], (row["press"], field)
        assert int(row["bytes_int8"]) - int(want["bytes_int8"]) == grown[row["press"]], row["press"]
