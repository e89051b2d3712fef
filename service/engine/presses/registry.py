"""Build kvpress presses from JSON specs.

    {"press": "snapkv", "compression_ratio": 0.5}
    {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                 {"press": "kvcompose", "compression_ratio": 0.5}]}
    {"press": "adakv", "inner": {"press": "snapkv", "compression_ratio": 0.5}}

Parameters are the press dataclass's own fields; a wrapper's inner press is ``inner`` (kvpress's
``press`` field) or the field's own name (``base_press``). ``canonical(spec)`` fills in every
default, so equal presses have equal specs (the prefix store addresses caches by it).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Any

import kvpress
from kvpress import BasePress

from service.engine.presses.compose import ComposedPress, order_problem
from service.engine.presses.kvcompose import KVComposePress
from service.protocol import PressSpecError

PRESSES: dict[str, type[BasePress]] = {
    "kvcompose": KVComposePress,
    "kvpress_kvcompose": kvpress.KVComposePress,  # kvpress's own, for comparison
    "adakv": kvpress.AdaKVPress,
    "block": kvpress.BlockPress,
    "chunk": kvpress.ChunkPress,
    "chunkkv": kvpress.ChunkKVPress,
    "compactor": kvpress.CompactorPress,
    "criticaladakv": kvpress.CriticalAdaKVPress,
    "criticalkv": kvpress.CriticalKVPress,
    "cur": kvpress.CURPress,
    "entropygatedchunkkv": kvpress.EntropyGatedChunkKVPress,
    "expectedattention": kvpress.ExpectedAttentionPress,
    "expectedattentionstats": kvpress.ExpectedAttentionStatsPress,
    "keydiff": kvpress.KeyDiffPress,
    "keyrerotation": kvpress.KeyRerotationPress,
    "knorm": kvpress.KnormPress,
    "kvgrad": kvpress.KVgradPress,
    "kvzip": kvpress.KVzipPress,
    "lagkv": kvpress.LagKVPress,
    "leveragescore": kvpress.LeverageScorePress,
    "merging": kvpress.MergingPress,
    "noncausalattn": kvpress.NonCausalAttnPress,
    "perlayercompression": kvpress.PerLayerCompressionPress,
    "pyramidkv": kvpress.PyramidKVPress,
    "random": kvpress.RandomPress,
    "simlayerkv": kvpress.SimLayerKVPress,
    "snapkv": kvpress.SnapKVPress,
    "streamingllm": kvpress.StreamingLLMPress,
    "think": kvpress.ThinKPress,
    "tova": kvpress.TOVAPress,
    "cap": kvpress.CapPress,
}

# Presses that fetch artifacts at run time; allowed only when the named field points at a local path.
NEEDS_DOWNLOAD: dict[str, tuple[str, str | None]] = {
    "duoattention": ("attention-head patterns from GitHub (mit-han-lab/duo-attention)", None),
    "qfilter": ("Q-Filter weights from the Hugging Face hub", None),
    "kvzap": ("KVzap scorer weights from the Hugging Face hub", None),
    "fastkvzip": ("Fast-KVzip gate weights from the Hugging Face hub", None),
    "restorekv": ("RestoreKV embeddings from the Hugging Face hub", None),
    "lukv": ("LU-KV budget curves from GitHub", None),
    "expectedattentionstats": ("query statistics from the Hugging Face hub", "stats_folder"),
}
NOT_FOR_STORED_CACHES = {
    "decoding": "compresses during generation",
    "prefilldecoding": "compresses during generation",
    "compressionratiodecoding": "compresses during generation",
    "cam": "merges during generation",
    "dms": "compresses during generation",
    "observedattention": "needs eager attention weights returned by every layer",
    "finch": "needs the question inside the prefilled context (after a delimiter token)",
}
WRAPPER_FIELDS = ("press", "base_press", "prefilling_press", "decoding_press")
SET_BY_ENGINE = {"task_ids"}  # KVCompose's task prompts arrive as text (task_prompts), tokenized by the engine


def _key(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


_BY_KEY = {_key(name): name for name in PRESSES}  # any spelling (kvpresskvcompose, KVPress-KVCompose) -> its name


def known_presses() -> str:
    """The press names as the docs write them, for error messages."""
    return ", ".join(sorted(PRESSES))


@dataclasses.dataclass(frozen=True)
class _Param:
    name: str
    default: Any  # REQUIRED when the constructor needs it
    annotation: Any = None

    @property
    def is_press(self) -> bool:
        return self.name in WRAPPER_FIELDS


REQUIRED = inspect.Parameter.empty


def _params(cls: type) -> dict[str, _Param]:
    """Constructor parameters (dataclass or hand-written __init__), defaults resolved."""
    out = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.name.startswith("_") or p.name in SET_BY_ENGINE or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = _Param(p.name, p.default, p.annotation)
    return out


def parse(spec: str | dict) -> dict:
    """JSON text or dict -> dict, with a clear error for bad JSON."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise PressSpecError(f"press spec is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise PressSpecError("press spec must be a JSON object like {\"press\": \"kvcompose\", ...}")
    return spec


class CanonicalSpec(dict):
    """A spec as ``canonical`` made it. ``canonical`` passes one through as it is, so a request's spec
    is made canonical once, however many layers (compressor, engine, ``build``) it passes."""


def canonical(spec: str | dict | None) -> CanonicalSpec:
    """The spec with names normalised and every default filled in; ``{}`` means no press."""
    if isinstance(spec, CanonicalSpec):
        return spec
    spec = parse(spec) if spec is not None else {}
    return CanonicalSpec(_canonical(spec, "") if spec else {})


def _canonical(spec: dict, where: str) -> dict:
    if "compose" in spec:
        extra = set(spec) - {"compose"}
        if extra:
            raise PressSpecError(f"{where or 'spec'}: 'compose' takes no other fields, got {sorted(extra)}")
        parts = spec["compose"]
        if not isinstance(parts, list) or not parts:
            raise PressSpecError(f"{where}compose must be a non-empty list of press specs")
        out = [_canonical(parse(p), f"{where}compose[{i}].") for i, p in enumerate(parts)]
        problem = order_problem(out)
        if problem:
            raise PressSpecError(f"{where}compose[{problem[0]}].press: {problem[1]}")
        return {"compose": out}
    if "press" not in spec:
        raise PressSpecError(f"{where}press: missing; name one of {known_presses()}, or use 'compose'")
    name = _key(str(spec["press"]))
    if name in NOT_FOR_STORED_CACHES:
        raise PressSpecError(f"{where}press: {name!r} {NOT_FOR_STORED_CACHES[name]}; stored caches are "
                             "compressed once, at prefill")
    if name in NEEDS_DOWNLOAD:
        what, local = NEEDS_DOWNLOAD[name]
        given = spec.get(local) if local else None
        if not (given and os.path.exists(str(given))):
            hint = f"; give {local!r} as a local path" if local else "; it cannot run offline"
            raise PressSpecError(f"{where}press: {name!r} needs {what}, which is not available here{hint}")
    if name not in _BY_KEY:
        raise PressSpecError(f"{where}press: unknown press {spec['press']!r}; known: {known_presses()}")
    name = _BY_KEY[name]
    cls = PRESSES[name]
    fields = _params(cls)
    out: dict[str, Any] = {"press": name}
    given = {("press" if k == "inner" else k): v for k, v in spec.items() if k != "press"}
    for key in given:
        if key not in fields:
            shown = sorted("inner" if f == "press" else f for f in fields)
            raise PressSpecError(f"{where}{key}: unknown parameter of {name!r}; valid: {shown}")
    for fname, f in fields.items():
        label = "inner" if fname == "press" else fname
        if fname in given:
            value = given[fname]
        elif f.default is not REQUIRED:
            value = f.default
        else:
            raise PressSpecError(f"{where}{label}: required by {name!r}")
        out[label] = _value(value, f, f"{where}{label}")
    return out


def _value(value: Any, f: _Param, where: str) -> Any:
    if f.is_press:
        if value is None:
            return None
        if isinstance(value, BasePress):  # a default instance (e.g. LUKV's inner press)
            key = _key(type(value).__name__.removesuffix("Press"))
            return {"press": _BY_KEY.get(key, key)}
        if not isinstance(value, dict):
            raise PressSpecError(f"{where}: must be a press spec object")
        return _canonical(value, where + ".")
    if isinstance(f.default, bool):
        if not isinstance(value, bool):
            raise PressSpecError(f"{where}: must be true or false, got {value!r}")
    elif isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PressSpecError(f"{where}: must be a number, got {value!r}")
        if f.annotation in (int, "int"):
            if value != int(value):
                raise PressSpecError(f"{where}: must be an integer, got {value!r}")
            value = int(value)
    if f.name.endswith("compression_ratio") and not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise PressSpecError(f"{where}: must be in [0, 1), got {value!r}")
    return value


def build(spec: str | dict | None, task_ids: list[list[int]] | None = None) -> BasePress | None:
    """A ready press from a spec (None or {} = no compression). Raises PressSpecError.

    task_ids: token ids of expected questions, given at construction to every press that scores by
    them (a ``task_ids`` field: KVCompose); refused when no press in the spec takes them.
    """
    spec = canonical(spec)
    press = _build(spec, "", task_ids) if spec else None
    if task_ids and not any(getattr(p, "task_ids", None) for p in presses_in(press)):
        raise PressSpecError("task prompts need a task-aware press (kvcompose)")
    return press


def _build(spec: dict, where: str, task_ids: list[list[int]] | None) -> BasePress:
    if "compose" in spec:
        return ComposedPress([_build(p, f"{where}compose[{i}].", task_ids) for i, p in enumerate(spec["compose"])])
    cls = PRESSES[spec["press"]]
    kwargs = {}
    for key, value in spec.items():
        if key == "press":
            continue
        name = "press" if key == "inner" else key
        kwargs[name] = _build(value, f"{where}{key}.", task_ids) if isinstance(value, dict) else value
    if task_ids and "task_ids" in getattr(cls, "__dataclass_fields__", {}):
        kwargs["task_ids"] = task_ids
    try:
        return cls(**kwargs)
    except (AssertionError, ValueError, TypeError) as e:
        raise PressSpecError(f"{where}{spec['press']}: {e or 'invalid parameters'}") from None


def presses_in(press: BasePress | None) -> list[BasePress]:
    """The press and every press nested in it (compositions and wrappers), outermost first."""
    if press is None:
        return []
    out = [press]
    for child in getattr(press, "presses", None) or []:
        out += presses_in(child)
    for name in WRAPPER_FIELDS:
        child = getattr(press, name, None)
        if isinstance(child, BasePress):
            out += presses_in(child)
    return out
