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
    (["compress", "doc.txt", "--out", "x.kvc", "--press", "tova 0.5"], "--press"),
    (["remote", "compress", "doc.txt", "--press", "think+"], "--press"),
    (["remote", "compress", "doc.txt", "--press", "think:1.5+kvcompose"], "--press"),
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


@pytest.mark.parametrize("press, ratio, spec", [
    ("tova", "0.75", {"press": "tova", "compression_ratio": 0.75}),
    ("kvcompose", None, {"press": "kvcompose", "compression_ratio": 0.5}),  # the service's default ratio
    ("think+kvcompose", "0.6", {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                                            {"press": "kvcompose", "compression_ratio": 0.6}]}),
    ("think:0.25+snapkv:0.3+kvcompose", None, {"compose": [{"press": "think", "key_channel_compression_ratio": 0.25},
                                                           {"press": "snapkv", "compression_ratio": 0.3},
                                                           {"press": "kvcompose", "compression_ratio": 0.5}]}),
    ('{"press": "knorm", "compression_ratio": 0.3}', None, {"press": "knorm", "compression_ratio": 0.3}),
    (None, None, None),  # the model's default press
])
def test_press_shorthands_beside_the_json_form(press, ratio, spec):
    from service import press_spec

    for command in (["compress", "d.txt", "--out", "x.kvc"], ["remote", "compress", "d.txt"],
                    ["remote", "lookup", "d.txt"], ["remote", "ask", "q", "--document", "d.txt"]):
        argv = command + (["--press", press] if press else []) + (["--ratio", ratio] if ratio else [])
        args = cli.parser().parse_args(argv)
        assert press_spec.resolve(args.press, args.ratio) == spec, argv


def test_shorthands_build_and_a_bad_one_names_the_known_presses():
    """The shorthand's specs are valid presses; an unknown name is refused in one line listing the
    known ones (by the registry: the engine's or the service's)."""
    from service import press_spec
    from service.engine.presses import PressSpecError, canonical

    think = canonical(press_spec.resolve("think+kvcompose", 0.5))["compose"][0]
    assert think["press"] == "think" and think["key_channel_compression_ratio"] == 0.5  # it prunes
    with pytest.raises(PressSpecError, match=r"unknown press 'tovaa'; known: .*kvpress_kvcompose, "):
        canonical(press_spec.resolve("tovaa", None))


@pytest.mark.parametrize("press, ratio, message", [
    ('{"press": "tova"}', 0.5, "--ratio goes with a press name"),
    (None, 0.5, "--ratio goes with a press name"),
    ("tova", 1.0, "--ratio must be in [0, 1)"),
])
def test_a_ratio_without_a_press_name_is_refused(press, ratio, message, tmp_path, capsys):
    doc = tmp_path / "d.txt"
    doc.write_text("text")
    argv = ["remote", "compress", str(doc), "--addr", "127.0.0.1:1", "--ratio", str(ratio)]
    assert cli.main(argv + (["--press", press] if press else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcompose: error: ") and message in err and err.count("\n") == 1


def test_the_sampling_penalties_are_flags_of_both_asks():
    for argv in (["ask", "c.kvc", "q"], ["remote", "ask", "q", "--cache-id", "c"]):
        args = cli.parser().parse_args(argv + ["--repetition-penalty", "1.3", "--presence-penalty", "-0.5"])
        assert (args.repetition_penalty, args.frequency_penalty, args.presence_penalty) == (1.3, None, -0.5)
        from service.serve.remote import penalties

        assert penalties(args) == {"repetition_penalty": 1.3, "frequency_penalty": None, "presence_penalty": -0.5}


def test_a_refused_connection_names_the_address_and_make_serve(capsys):
    """Nobody listens on a free port: one line, the address, `make serve`; exit code 1."""
    from service.local.processes import free_port

    address = f"127.0.0.1:{free_port()}"
    assert cli.main(["remote", "models", "--addr", address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nothing answers at {address}" in err and "make serve" in err, err


def test_sizes_for_people():
    from service.serve.remote import size

    assert [size(5), size(2048), size(3 * 1024**2 + 5), size(5 << 30)] == ["5 B", "2.0 KiB", "3.0 MiB", "5.0 GiB"]


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``kvcompose ... | head``: output to a pipe its reader closed ends quietly (exit 141, as SIGPIPE)."""
    import subprocess
    import sys

    script = ("import sys; from service import cli\n"
              "cli._main = lambda argv: print('{\"x\": 1}\\n' * 100_000) or 0\n"
              "sys.exit(cli.main([]))")
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # before the interpreter has started: every write meets a closed pipe (a command's
    # output longer than a pipe holds, as `remote compress --json | head -1`)
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141 and err == ""
