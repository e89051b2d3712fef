"""The command line's surface: help is instant (no heavy imports), every flag says what it does,
and a bad flag value is refused naming the flag."""

import argparse
import subprocess
import sys

import pytest

from service import cli


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_imports_no_model_or_rpc_stack():
    code = ("import sys; from service.cli import parser; parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'kvpress', 'grpc', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_flag_and_argument_has_help():
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p in _parsers(cli.parser()) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, missing


@pytest.mark.parametrize("argv, flag", [
    (["compress", "doc.txt", "--out", "x.kvc", "--press", "kvcompose"], "--press"),
    (["remote", "ask", "q", "--cache-id", "x", "--press", "[1]"], "--press"),
    (["bench", "accuracy", "--presses", '{"press": "tova"}'], "--presses"),
    (["remote", "ask", "q", "--cache-id", "x", "--top-p", "high"], "--top-p"),
])
def test_a_bad_value_is_refused_naming_its_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_remote_ask_takes_top_p_and_repeated_stop_strings():
    args = cli.parser().parse_args(["remote", "ask", "Who?", "--cache-id", "c", "--top-p", "0.9",
                                    "--stop", "\n", "--stop", "END"])
    assert args.top_p == 0.9 and args.stop == ["\n", "END"]


def test_remote_token_comes_from_the_flag_else_the_environment(monkeypatch):
    from service.config import ClientConfig

    monkeypatch.setenv("KVCOMPOSE_TOKEN", "from-env")
    assert ClientConfig.from_env().token == "from-env"
    assert ClientConfig.from_env(token="from-flag").token == "from-flag"
    monkeypatch.delenv("KVCOMPOSE_TOKEN")
    assert ClientConfig.from_env().token is None
