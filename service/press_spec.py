"""Press specs as the command line takes them: a JSON object, or a shorthand, torch-free.

    --press '{"press": "snapkv", "compression_ratio": 0.5}'   the JSON form, as the API's press_json
    --press tova --ratio 0.75                                  {"press": "tova", "compression_ratio": 0.75}
    --press think+kvcompose                                    a composition: ``+`` joins presses, in order
    --press think:0.25+kvcompose --ratio 0.8                   ``name:ratio`` gives one press its own ratio

Every press of a shorthand gets a ratio: its own ``:ratio``, else ``--ratio`` for the last press, else
0.5 (the service's default press's). It is the press's ``compression_ratio``, or for ThinK, which
prunes key channels, its ``key_channel_compression_ratio`` (left at kvpress's default 0 it would prune
nothing). The JSON form sets anything else. Names are
checked where the spec is built (``service.engine.presses.registry``: the engine, or the service),
so an unknown one is refused in one line that lists the known presses.
"""

from __future__ import annotations

import argparse
import json
import re

DEFAULT_RATIO = 0.5
_NAME = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)(?::(0(?:\.\d+)?|\.\d+))?")  # name, or name:ratio
RATIO_FIELD = {"think": "key_channel_compression_ratio"}  # what a press's ratio means, if not compression_ratio
HELP = ("a press name, presses joined by '+' (think+kvcompose), a name:ratio (think:0.25+kvcompose), or a "
        "JSON spec, e.g. "
        '\'{"press": "kvcompose", "compression_ratio": 0.5}\' (default: the model\'s)')
RATIO_HELP = (f"compression ratio of a --press name (of the last press with '+', the others {DEFAULT_RATIO} "
              f"unless name:ratio); default {DEFAULT_RATIO}")


def press_arg(text: str) -> dict | str:
    """argparse type of ``--press``: a JSON object (parsed), or a shorthand (its syntax checked)."""
    if text.lstrip().startswith(("{", "[", '"')):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}); e.g. "
                                             '\'{"press": "kvcompose", "compression_ratio": 0.5}\'') from None
        if not isinstance(spec, dict):
            raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"press": "knorm"}\'')
        return spec
    parts = text.split("+")
    if not all(_NAME.fullmatch(p.strip()) for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a press name, names joined by '+' (think+kvcompose), "
                                         "a name:ratio with a ratio in [0, 1) (think:0.25), or a JSON object")
    return text


def press_list(text: str) -> list:
    """argparse type of ``--presses``: a JSON list of press specs."""
    try:
        specs = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
        raise argparse.ArgumentTypeError('must be a JSON list of press objects, e.g. \'[{"press": "tova"}]\'')
    return specs


def resolve(press: dict | str | None, ratio: float | None) -> dict | None:
    """The spec of ``--press`` (``press_arg``'s result) and ``--ratio``; None: the service's default.
    Raises ValueError (one line) for a ratio without a press name, or outside [0, 1)."""
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")
    if press is None or isinstance(press, dict):
        if ratio is not None:
            raise ValueError("--ratio goes with a press name (--press tova --ratio 0.75); in a JSON spec, "
                             "set compression_ratio")
        return press
    matches = [_NAME.fullmatch(p.strip()) for p in press.split("+")]
    parts: list[dict] = []
    for i, m in enumerate(matches):
        name, own = m.group(1), m.group(2)
        value = float(own) if own else ratio if ratio is not None and i == len(matches) - 1 else DEFAULT_RATIO
        parts.append({"press": name, RATIO_FIELD.get(name.lower(), "compression_ratio"): value})
    return parts[0] if len(parts) == 1 else {"compose": parts}
