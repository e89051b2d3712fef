import subprocess
import sys

import pytest

from service.cache.ids import CacheKey

KEY = CacheKey("smollm2-135m-instruct", "gguf-b179c9523d0e6a0f", "ab" * 32,
               {"press": "kvcompose", "compression_ratio": 0.5}, "float16", "tenant-a", selection_revision=2)
TOKENS = list(range(1000, 1300))


def test_same_inputs_give_the_same_id_in_another_process():
    import dataclasses

    fields = dataclasses.asdict(KEY)
    code = f"from service.cache.ids import CacheKey; print(CacheKey(**{fields!r}).cache_id({TOKENS!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert other == KEY.cache_id(TOKENS)


@pytest.mark.parametrize("field, value", [("model_revision", "other"), ("codec", "int8"), ("tenant", "tenant-b"),
                                          ("selection_revision", 3),
                                          ("press", {"press": "kvcompose", "compression_ratio": 0.6})])
def test_every_field_changes_the_id(field, value):
    import dataclasses

    assert dataclasses.replace(KEY, **{field: value}).cache_id(TOKENS) != KEY.cache_id(TOKENS)


def test_the_engine_selection_revision_is_an_input_the_store_requires():
    """Caches a press selected differently before (same spec) are not served as today's: the engine's
    revision is in every id, and a key without one is refused (the store cannot know it)."""
    import dataclasses

    from service.engine.selection import SELECTION_REVISION

    now = dataclasses.replace(KEY, selection_revision=SELECTION_REVISION)
    assert dataclasses.replace(now, selection_revision=SELECTION_REVISION + 1).cache_id(TOKENS) != now.cache_id(TOKENS)
    with pytest.raises(ValueError, match="selection_revision"):
        CacheKey("m", "r", "t", {}, "float16")


def test_tokens_change_the_id_and_press_key_order_does_not():
    assert KEY.cache_id(TOKENS) != KEY.cache_id(TOKENS[:-1])
    reordered = CacheKey(KEY.model_id, KEY.model_revision, KEY.tokenizer_digest,
                         {"compression_ratio": 0.5, "press": "kvcompose"}, KEY.codec, KEY.tenant,
                         selection_revision=KEY.selection_revision)
    assert reordered.cache_id(TOKENS) == KEY.cache_id(TOKENS)
    with pytest.raises(ValueError, match="uint32"):
        KEY.cache_id([-1])
