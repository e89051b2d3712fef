"""``kvcompose remote ask`` against the real service: --stop and --top-p reach the answer."""

from service import cli

from .conftest import MAX_NEW, QUESTION


def test_remote_ask_stops_at_the_stop_string(stack, reference, capsys, monkeypatch, tmp_path):
    import service.serve.launch as launch

    monkeypatch.setattr(launch, "local_api_token_file", lambda: tmp_path / "none")  # not a `make serve` token
    answer = reference["answer"]
    stop = answer.strip()[1:3]  # inside the answer (the tiny model's greedy answer is exact)
    assert stop and stop in answer
    code = cli.main(["remote", "ask", QUESTION, "--addr", stack.address, "--tenant", "default",
                     "--cache-id", reference["cache_id"], "--max-new-tokens", str(MAX_NEW),
                     "--top-p", "0.5", "--stop", stop])
    assert code == 0
    assert capsys.readouterr().out == answer[: answer.index(stop)] + "\n"
