"""``kvcompose remote ask`` against the real service: --stop and --top-p reach the answer."""

from service import cli

from .conftest import MAX_NEW, QUESTION


def test_remote_ask_stops_at_the_stop_string(stack, reference, capsys, monkeypatch):
    from service.serve import instance

    monkeypatch.setattr(instance, "for_address", lambda *_: None)  # not a `make serve` token
    answer = reference["answer"]
    stop = answer.strip()[1:3]  # inside the answer (the tiny model's greedy answer is exact)
    assert stop and stop in answer
    code = cli.main(["remote", "ask", QUESTION, "--addr", stack.address, "--tenant", "default",
                     "--cache-id", reference["cache_id"], "--max-new-tokens", str(MAX_NEW),
                     "--top-p", "0.5", "--stop", stop])
    assert code == 0
    assert capsys.readouterr().out == answer[: answer.index(stop)] + "\n"


def test_remote_ask_prints_the_answer_and_one_stats_line(stack, reference, capsys, monkeypatch):
    """For people: the answer on stdout, one line on stderr (short cache id, where the cache came
    from, what it kept, speed); ``--json`` gives every statistic instead."""
    import json

    from service.serve import instance

    monkeypatch.setattr(instance, "for_address", lambda *_: None)
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


def test_the_stats_line_shows_a_cut_or_repetitive_answer():
    """Degenerate repetition is shown, not hidden by a penalty; an answer cut at the limit says so."""
    from kvcompose.v1 import api_pb2

    stats = api_pb2.GenerateStats(cache_id="ab" * 32, cache_hit=True, cache_source="store", context_tokens=2048,
                                  kept_fraction=0.25, time_to_first_token_s=0.2, new_tokens=128, seconds=2.2)
    loop = "the robot can carry the robot can carry " * 8
    line = cli.stats_line(stats, loop, 128)
    assert "kept 25% of 2,048 tokens" in line and "first token 200 ms" in line and "63.5 tok/s" in line
    assert "cut at --max-new-tokens" in line and "repetitive" in line
    fine = cli.stats_line(stats, "Up to 600 kilograms, spread over the deck.", 200)
    assert "cut" not in fine and "repetitive" not in fine
    assert cli.repetition("a b c d a b c d a b c d") > 0.5 and cli.repetition("one two three four five") == 0
