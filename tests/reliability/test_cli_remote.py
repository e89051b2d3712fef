"""``kvcompose remote`` against the real service: ask (--stop and --top-p reach the answer), and
compress, stat, delete, models and lookup, for people and as JSON with numbers as numbers."""

import json

import pytest

from service import cli
from service.serve import remote

from .conftest import DOCUMENT, MAX_NEW, QUESTION


@pytest.fixture(autouse=True)
def _no_local_token(monkeypatch):
    """The stack is in development mode: no `make serve` token or CA is looked up by port."""
    from service.serve import instance

    monkeypatch.setattr(instance, "for_address", lambda *_: None)


def test_remote_ask_stops_at_the_stop_string(stack, reference, capsys):
    answer = reference["answer"]
    stop = answer.strip()[1:3]  # inside the answer (the tiny model's greedy answer is exact)
    assert stop and stop in answer
    code = cli.main(["remote", "ask", QUESTION, "--addr", stack.address, "--tenant", "default",
                     "--cache-id", reference["cache_id"], "--max-new-tokens", str(MAX_NEW),
                     "--top-p", "0.5", "--stop", stop])
    assert code == 0
    assert capsys.readouterr().out == answer[: answer.index(stop)] + "\n"


def test_remote_ask_prints_the_answer_and_one_stats_line(stack, reference, capsys):
    """For people: the answer on stdout, one line on stderr (short cache id, where the cache came
    from, what it kept, speed); ``--json`` gives every statistic instead."""
    args = ["remote", "ask", QUESTION, "--addr", stack.address, "--tenant", "default",
            "--cache-id", reference["cache_id"], "--max-new-tokens", str(MAX_NEW)]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert out == reference["answer"] + "\n"
    line = err.strip()
    assert "\n" not in line, err
    assert line.startswith(f"cache {reference['cache_id'][:12]} · ") and " of " in line and "tok/s" in line
    assert "kept " in line and ("prefix store" in line or "decoder memory" in line), line
    assert cli.main([*args, "--json"]) == 0
    stats = json.loads(capsys.readouterr().err)
    assert stats["cacheId"] == reference["cache_id"] and stats["contextTokens"] > 0
    assert 0 < stats["keptFraction"] <= 1
    assert stats["timings"]["prefill_s"] > 0 and stats["newTokens"] > 0  # a map keeps its keys as sent


def test_the_stats_line_shows_a_cut_or_repetitive_answer():
    """Degenerate repetition is shown, not hidden by a penalty; an answer cut at the limit says so."""
    from kvcompose.v1 import api_pb2

    stats = api_pb2.GenerateStats(cache_id="ab" * 32, cache_hit=True, cache_source="store", context_tokens=2048,
                                  kept_fraction=0.25, time_to_first_token_s=0.2, new_tokens=128, seconds=2.2)
    loop = "the robot can carry the robot can carry " * 8
    line = remote.stats_line(stats, loop, 128)
    assert "kept 25% of 2,048 tokens" in line and "first token 200 ms" in line and "63.5 tok/s" in line
    assert "cut at --max-new-tokens" in line and "repetitive" in line
    fine = remote.stats_line(stats, "Up to 600 kilograms, spread over the deck.", 200)
    assert "cut" not in fine and "repetitive" not in fine
    assert remote.repetition("a b c d a b c d a b c d") > 0.5 and remote.repetition("one two three four five") == 0


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["remote", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_prints_the_cache_id_alone_and_json_has_numbers(stack, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT + " The keeper's dog was called Biscuit.")
    code, out, err = run(capsys, "compress", str(doc), "--addr", stack.address, "--press", "tova", "--ratio", "0.75")
    cache_id = out.strip()
    assert code == 0 and len(cache_id) == 64 and out == cache_id + "\n", out
    assert "stored" in err and "\n" not in err.strip(), err  # one line of figures for people, on stderr
    code, out, _ = run(capsys, "compress", str(doc), "--addr", stack.address, "--press", "tova", "--ratio", "0.75",
                       "--json")
    stats = json.loads(out)
    assert code == 0 and stats["reused"] is True and stats["cacheId"] == cache_id
    assert isinstance(stats["storedBytes"], int) and isinstance(stats["uncompressedBytes"], int)
    assert 0 < stats["storedBytes"] < stats["uncompressedBytes"]
    press = json.loads(stats["pressJson"])
    assert press["press"] == "tova" and press["compression_ratio"] == 0.75


def test_stat_lookup_and_delete_one_cache(stack, tmp_path, capsys):
    """lookup gives the id Compress gives, without compressing; stat shows it; delete removes it
    (exit 1 the second time), and lookup then says it is not stored (exit 1)."""
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT + " The lamp was lit for the last time in 1990.")
    common = ("--addr", stack.address, "--press", "think+kvcompose", "--ratio", "0.6")
    code, out, err = run(capsys, "lookup", str(doc), *common)
    assert code == 1 and "not stored" in err
    expected = out.strip()
    code, out, _ = run(capsys, "compress", str(doc), *common)
    assert code == 0 and out.strip() == expected
    code, out, err = run(capsys, "lookup", str(doc), *common, "--json")
    found = json.loads(out)
    assert code == 0 and found["stored"] and found["cacheId"] == expected
    assert isinstance(found["manifest"]["totalBytes"], int) and found["manifest"]["totalBytes"] > 0

    code, out, _ = run(capsys, "stat", expected, "--addr", stack.address)
    assert code == 0 and f"cache    {expected}" in out and "think" in out and "kept " in out
    code, out, _ = run(capsys, "stat", expected, "--addr", stack.address, "--json")
    manifest = json.loads(out)
    assert manifest["cacheId"] == expected and isinstance(manifest["totalBytes"], int)
    assert isinstance(manifest["uncompressedBytes"], int) and isinstance(manifest["createdUnixMs"], int)
    assert json.loads(manifest["key"]["pressJson"])["compose"][1]["compression_ratio"] == 0.6

    assert run(capsys, "delete", expected, "--addr", stack.address)[:2] == (0, f"deleted {expected}\n")
    code, _, err = run(capsys, "delete", expected, "--addr", stack.address)
    assert code == 1 and "no cache" in err
    code, _, err = run(capsys, "stat", expected, "--addr", stack.address)
    assert code == 1 and err.startswith("kvcompose: NOT_FOUND")
    assert run(capsys, "lookup", str(doc), *common)[0] == 1


def test_models_for_people_and_as_json(stack, capsys):
    code, out, _ = run(capsys, "models", "--addr", stack.address)
    assert code == 0 and "layers" in out and "default press" in out
    code, out, _ = run(capsys, "models", "--addr", stack.address, "--json")
    model = json.loads(out)["models"][0]
    assert code == 0 and isinstance(model["layers"], int) and isinstance(model["maxContextTokens"], int)


def test_a_bad_press_name_is_one_line_naming_the_known_presses(stack, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCUMENT)
    code, _, err = run(capsys, "compress", str(doc), "--addr", stack.address, "--press", "tovaa")
    assert code == 1 and err.count("\n") == 1 and "unknown press 'tovaa'" in err and "kvpress_kvcompose, " in err
