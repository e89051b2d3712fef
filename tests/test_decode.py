"""Decoding from a compressed cache: positions, no mutation, sampling, stops, and one loop for
every caller (an answer alone and inside a batch are the same tokens)."""

import torch
from conftest import random_ids

from service.engine.batching import Request, decode_tokens
from service.engine.decode import Sampling


def generate(model, kv, question, sampling) -> list[int]:
    return decode_tokens(model, [Request(kv, question, sampling)])[0]


def test_questions_do_not_mutate_the_cache(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(200), {"press": "kvcompose", "compression_ratio": 0.5})
    before = [k.clone() for k in kv.keys]
    first = tiny_engine.answer(kv, "What is it?", Sampling(max_new_tokens=8))
    tiny_engine.answer(kv, "Something else entirely", Sampling(max_new_tokens=8))
    assert all(torch.equal(a, b) for a, b in zip(before, kv.keys))
    assert tiny_engine.answer(kv, "What is it?", Sampling(max_new_tokens=8)) == first


def test_sampling_is_repeatable_with_a_seed_and_varies_without(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(100), {})
    model = tiny_engine.loaded.model
    q = random_ids(4, seed=2)
    s = Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a, b = list(generate(model, kv, q, s)), list(generate(model, kv, q, s))
    c = list(generate(model, kv, q, Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=8)))
    assert a == b and a != c


def test_stop_token_ends_generation(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(100), {})
    model = tiny_engine.loaded.model
    q = random_ids(4, seed=2)
    greedy = list(generate(model, kv, q, Sampling(max_new_tokens=6)))
    stopped = list(generate(model, kv, q, Sampling(max_new_tokens=6, stop_token_ids=(greedy[2],))))
    assert stopped == greedy[: greedy.index(greedy[2])]


def test_positions_continue_from_the_original_length(tiny_engine):
    """A compressed cache answers as if the question sat after all original tokens (RoPE positions)."""
    from service.engine.decode import question_logits

    ids = random_ids(120)
    model = tiny_engine.loaded.model
    kv, _ = tiny_engine.compress(ids, {"press": "streamingllm", "compression_ratio": 0.0})
    shifted = type(kv.meta)(kv.meta.model_id, kv.meta.model_revision, 60, kv.meta.press)
    q = random_ids(5, seed=6)
    a = question_logits(model, kv, q)
    b = question_logits(model, type(kv)(kv.keys, kv.values, kv.evicted, shifted), q)
    assert not torch.allclose(a, b, atol=1e-4)


def test_stop_strings_cut_the_answer(tiny_engine):
    kv, _ = tiny_engine.compress(random_ids(80), {})
    full = tiny_engine.answer(kv, "hi", Sampling(max_new_tokens=10))
    assert len(full) > 3
    cut = tiny_engine.answer(kv, "hi", Sampling(max_new_tokens=10, stop=(full[2:4],)))
    assert cut == full[: full.index(full[2:4])]


def test_batched_answers_equal_one_cache_at_a_time(tiny_engine):
    """Caches of different per-layer lengths and head-wise evictions, and of another context, in one
    batch of the decode loop: each answers as it does alone."""
    context = random_ids(240, seed=5)
    specs = [{}, {"press": "kvcompose", "compression_ratio": 0.6},
             {"press": "adakv", "inner": {"press": "snapkv", "compression_ratio": 0.5, "window_size": 8}},
             {"press": "pyramidkv", "compression_ratio": 0.7, "window_size": 8}]
    kvs = [tiny_engine.compress(context, spec)[0] for spec in specs]
    kvs.append(tiny_engine.compress(random_ids(130, seed=9), {"press": "knorm", "compression_ratio": 0.5})[0])
    assert len({tuple(kv.layer_lengths) for kv in kvs}) == len(kvs)
    model, q = tiny_engine.loaded.model, random_ids(6, seed=3)
    alone = [list(generate(model, kv, q, Sampling(max_new_tokens=10))) for kv in kvs]
    assert len({tuple(a) for a in alone}) > 1  # the caches really answer differently
    ten = Sampling(max_new_tokens=10)
    assert decode_tokens(model, [Request(kv, q, ten) for kv in kvs]) == alone
    # a row that is finished leaves the batch; the others go on unchanged, also when rows wait their turn
    requests = [Request(kv, q, ten, until=(lambda tokens: len(tokens) == 3) if i == 1 else None)
                for i, kv in enumerate(kvs)]
    from service.config import BatchLimits

    for limits in (None, BatchLimits(max_batch=2, memory_bytes=1 << 40)):
        assert decode_tokens(model, requests, limits) == [alone[0], alone[1][:3], *alone[2:]]


def test_the_engine_answers_through_the_loop_with_text_as_the_tokens_say(tiny_engine):
    """``Engine.answer`` (the CLI's path) is the loop's answer decoded: the same tokens as a batch row."""
    kv, _ = tiny_engine.compress(random_ids(90), {"press": "kvcompose", "compression_ratio": 0.5})
    question_ids, sampling = tiny_engine.prepare(kv, "What is it?", Sampling(max_new_tokens=9))
    tokens = decode_tokens(tiny_engine.loaded.model, [Request(kv, question_ids, sampling)])[0]
    assert tiny_engine.answer(kv, "What is it?", Sampling(max_new_tokens=9)) == \
        tiny_engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def test_static_attention_over_a_reserved_buffer_equals_attention_over_its_filled_part():
    """Static decode steps attend over a whole buffer with unwritten and evicted slots masked. A masked
    slot's weight (0) times uninitialised memory would be nan, so the room must start as zeros."""
    from service.engine.attention import decode_attention
    from service.engine.decode import ReservedLayer
    from service.engine.step_graph import hidden_slots

    keys, values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    layer = ReservedLayer(keys, values, room=7)
    assert torch.equal(layer._k[:, :, :5], keys) and not layer._k[:, :, 5:].any() and not layer._v[:, :, 5:].any()
    query = torch.randn(1, 4, 1, 8)
    evicted = torch.tensor([[False, True, False, False, True], [False] * 5])
    out = decode_attention(query, layer._k, layer._v, hidden_slots(layer, evicted), None)
    keep = ~evicted.repeat_interleave(2, dim=0)[None, :, None, :]  # kv heads -> query heads
    expected = torch.nn.functional.scaled_dot_product_attention(query, keys.repeat_interleave(2, dim=1),
                                                                values.repeat_interleave(2, dim=1), attn_mask=keep)
    torch.testing.assert_close(out, expected)
