"""A document's cache id, worked out on the client as the Compressor works it out
(``CacheCompressor.cache_key`` and ``service.cache.ids``), so ``kvcompose remote lookup`` can ask
the store (Stat) whether it is there without compressing anything.

It needs the served model's tokenizer on this machine (the embedded model's is installed with the
package; another model's is loaded as ListModels names it, from its local path or the Hugging Face
cache) and the caller's tenant: the id of the same document differs per tenant. A tokenizer or
tenant other than the service's gives an id nobody stored: ``lookup`` then says "not stored",
never a wrong cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def cache_id_for(model, text: str, press: dict | None, codec: str, task_prompts: Sequence[str],
                 tenant: str) -> str:
    """The id Compress would give ``text`` for ``tenant`` (``model``: ListModels' ``ModelInfo``;
    press None and codec "": the model's defaults, as the service applies them)."""
    from service.cache.ids import CacheKey
    from service.engine.models import tokenizer_digest
    from service.engine.presses import canonical
    from service.engine.prompt import PromptFormat
    from service.engine.selection import SELECTION_REVISION

    if not text.strip():
        raise ValueError("document is empty (or only whitespace)")
    spec = dict(canonical(json.loads(model.default_press_json) if press is None else press))
    if task_prompts:
        spec["task_prompts"] = list(task_prompts)
    tokenizer = served_tokenizer(model)
    key = CacheKey(model.id, model.revision, tokenizer_digest(tokenizer), spec, codec or model.default_codec,
                   tenant, selection_revision=SELECTION_REVISION)
    return key.cache_id(PromptFormat(tokenizer).context_ids(text))


def served_tokenizer(model):
    """The tokenizer of ListModels' model: the embedded one, a local directory, or a hub id at its revision."""
    from transformers import AutoTokenizer

    from service.config import EMBEDDED_MODEL, EngineConfig
    from service.engine.models import embedded_model_dir

    if model.id == EMBEDDED_MODEL:
        return AutoTokenizer.from_pretrained(embedded_model_dir(EngineConfig().cache_dir))
    if Path(model.id).exists():
        return AutoTokenizer.from_pretrained(model.id)
    return AutoTokenizer.from_pretrained(model.id, revision=model.revision or None)
