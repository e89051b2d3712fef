"""The engine facade: input validation, model compatibility, and loading models from a local path."""

import pytest
import torch
from conftest import random_ids, tiny_llama

from service.config import EngineConfig
from service.engine.engine import Engine
from service.engine.models import load_model


def test_bad_contexts_are_refused_with_the_reason(tiny_engine):
    with pytest.raises(ValueError, match="empty"):
        tiny_engine.compress([], {})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 49152\)"):
        tiny_engine.compress([5, 10**6], {})
    small = Engine(EngineConfig(model="tiny-llama", max_context_tokens=10), loaded=tiny_engine.loaded)
    with pytest.raises(ValueError, match="11 tokens; the limit is 10"):
        small.compress(random_ids(11), {})


def test_task_prompts_need_a_task_aware_press(tiny_engine):
    with pytest.raises(ValueError, match="task-aware press"):
        tiny_engine.compress(random_ids(50), {"press": "snapkv", "compression_ratio": 0.5}, ["a question?"])
    kv, stats = tiny_engine.compress(random_ids(50), None, ["a question?"])  # default press: kvcompose
    assert kv.meta.press["press"] == "kvcompose" and stats.kept_fraction <= 0.55


def test_a_cache_from_another_model_is_refused(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(40), {})
    other = type(kv.meta)("other-model", "r1", kv.meta.original_length, kv.meta.press)
    with pytest.raises(ValueError, match="made by other-model@r1"):
        tiny_engine.answer(type(kv)(kv.keys, kv.values, kv.evicted, other), "hi")


def test_any_local_model_directory_loads(tmp_path, tokenizer):
    tiny_llama(layers=2).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(EngineConfig(model=str(tmp_path)))
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.model.config._attn_implementation == "kvcompose_sdpa"
    assert loaded.revision.startswith("local-") and len(loaded.tokenizer_digest) == 64
    engine = Engine(EngineConfig(model=str(tmp_path)), loaded=loaded)
    document = "A short document about nothing much, long enough to halve. " * 4
    kv, stats = engine.compress(document, {"press": "knorm", "compression_ratio": 0.5})
    assert stats.original_tokens == len(engine.context_ids(document)) > 40
    assert kv.layer_lengths == [stats.original_tokens // 2] * 2  # knorm 0.5 keeps half of every layer
    # the directory is the model: loaded again, it gives the same logits for the same cache
    again = Engine(EngineConfig(model=str(tmp_path)))
    question = engine.prompt.question_ids("What?")
    assert torch.equal(engine.question_logits(kv, question), again.question_logits(kv, question))
