"""Press specs as the command line takes them: a JSON object, or a shorthand, torch-free.

    --press '{"press": "snapkv", "compression_ratio": 0.5}'   the JSON form, as the API's press_json
    --press tova --ratio 0.75                                  {"press": "tova", "compression_ratio": 0.75}
    --press think+kvcompose                                    a composition: ``+`` joins presses, in order

A shorthand's ``--ratio`` (default 0.5, as the service's default press) is the ``compression_ratio`` of
its last press; the others keep their own defaults (the JSON form sets anything else). Names are
checked where the spec is built (``service.engine.presses.registry``: the engine, or the service),
so an unknown one is refused in one line that lists the known presses.
"""

from __future__ import annotations

import argparse
import json
import re

DEFAULT_RATIO = 0.5
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
HELP = ("a press name, presses joined by '+' (think+kvcompose), or a JSON spec, e.g. "
        '\'{"press": "kvcompose", "compression_ratio": 0.5}\' (default: the model\'s)')
RATIO_HELP = f"compression ratio of a --press name (of the last press with '+'); default {DEFAULT_RATIO}"


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
                                         "or a JSON object")
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
    names = [p.strip() for p in press.split("+")]
    parts: list[dict] = [{"press": name} for name in names]
    parts[-1]["compression_ratio"] = DEFAULT_RATIO if ratio is None else ratio
    return parts[0] if len(parts) == 1 else {"compose": parts}
