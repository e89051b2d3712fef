"""The GPU scorer (Triton kernels) equals the reference scorer, run on the CPU by Triton's interpreter."""

import pytest
import torch
from conftest import meta, random_ids, tiny_llama  # conftest sets TRITON_INTERPRET=1 before triton loads

from service.engine.prefill import prefill
from service.engine.presses.kvcompose import KVComposePress
from service.engine.presses.scoring import TaskAttention

fused_scoring = pytest.importorskip("service.engine.presses.fused_scoring")


def scored(fused: bool, how: str, query, keys, n_context, softcap=None, over_context=False, causal=True, lse=None,
           passes: int = 1) -> torch.Tensor:
    agg = TaskAttention(how, n_context, softcap, over_context=over_context, fused=fused)
    for _ in range(passes):  # several task prompts fold into one aggregate
        agg.add(query, keys, query.shape[-1] ** -0.5, 7, lse=lse, causal=causal)
    return agg.result()


CASES = {  # heads, kv heads, task queries, context keys, head dim, soft cap
    "gqa-2": (4, 2, 37, 100, 64, None),
    "gqa-3-odd-dim": (6, 2, 20, 70, 48, None),
    "mha": (4, 4, 5, 33, 16, None),
    "one-query": (8, 2, 1, 129, 32, None),
    "gemma2-softcap": (4, 2, 19, 65, 32, 50.0),
    "long-odd": (2, 1, 131, 259, 64, None),
}


@pytest.mark.parametrize("how", ["max", "mean"])
@pytest.mark.parametrize("case", CASES)
def test_task_queries_after_the_context(case, how):
    """Task prompts (and the context replay): T queries after the context, causal over their own keys."""
    heads, kv_heads, t_len, n_context, dim, softcap = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    query = torch.randn(heads, t_len, dim, generator=g) * 2
    keys = torch.randn(kv_heads, n_context + t_len, dim, generator=g) * 2
    ref = scored(False, how, query, keys, n_context, softcap, passes=2)
    got = scored(True, how, query, keys, n_context, softcap, passes=2)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_one_pass_queries_see_every_context_key(how):
    """One-pass scoring: every query attends to every context key (no causal mask, no task keys)."""
    query, keys = torch.randn(4, 90, 32), torch.randn(2, 90, 32)
    ref = scored(False, how, query, keys, 90, causal=False)
    torch.testing.assert_close(scored(True, how, query, keys, 90, causal=False), ref, rtol=1e-4, atol=1e-7)


def test_softmax_over_the_context_only():
    query, keys = torch.randn(4, 21, 32), torch.randn(2, 80 + 21, 32)
    ref = scored(False, "max", query, keys, 80, over_context=True)
    torch.testing.assert_close(scored(True, "max", query, keys, 80, over_context=True), ref, rtol=1e-4, atol=1e-7)


HALF = {"gqa-2": CASES["gqa-2"], "gemma2-softcap": CASES["gemma2-softcap"], "long-odd": CASES["long-odd"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("how", ["max", "mean"])
@pytest.mark.parametrize("case", HALF)
def test_half_precision_inputs_score_as_their_exact_values(case, how, dtype):
    """bf16 and fp16, what GPUs serve: products of half-precision values are exact in float32 and the
    kernels accumulate in float32, so the scores equal the float32 reference on the same (rounded)
    values up to summation order. Tolerance: rtol 1e-4 (mean) and 1e-4 absolute in log space (max)."""
    heads, kv_heads, t_len, n_context, dim, softcap = HALF[case]
    g = torch.Generator().manual_seed(len(case))
    query = (torch.randn(heads, t_len, dim, generator=g) * 2).to(dtype)
    keys = (torch.randn(kv_heads, n_context + t_len, dim, generator=g) * 2).to(dtype)
    ref = scored(False, how, query.float(), keys.float(), n_context, softcap)
    torch.testing.assert_close(scored(True, how, query, keys, n_context, softcap), ref, rtol=1e-4, atol=1e-4)


def test_given_lse_is_used_not_recomputed():
    """The model's attention may hand over each query's log-sum-exp; the kernel must use it as given."""
    query, keys = torch.randn(4, 10, 32), torch.randn(2, 50, 32)
    lse = torch.full((4, 10), 3.0)
    ref = scored(False, "max", query, keys, 40, lse=lse)
    torch.testing.assert_close(scored(True, "max", query, keys, 40, lse=lse), ref, rtol=1e-4, atol=1e-7)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        fused_scoring.task_attention(torch.randn(3, 4, 16), torch.randn(2, 10, 16), 5, 1.0, "max")


class FusedKVCompose(KVComposePress):
    def aggregator(self, n_context, softcap):
        return TaskAttention(self.agg_task, n_context, softcap, fused=True)


@pytest.mark.parametrize("variant", [{}, {"replay_context": False, "scorer": "attention"}, {"agg_task": "mean"},
                                     {"task_ids": [[5, 9, 77]]}], ids=["two-pass", "one-pass", "mean", "task-aware"])
def test_kvcompose_keeps_the_same_positions_with_the_fused_scorer(variant):
    model = tiny_llama(layers=2, seed=7)
    ids = random_ids(97, seed=3)
    ref, fused = KVComposePress(compression_ratio=0.6, **variant), FusedKVCompose(compression_ratio=0.6, **variant)
    prefill(model, ids, ref, meta(len(ids)))
    prefill(model, ids, fused, meta(len(ids)))
    assert fused.last_selection["counts"] == ref.last_selection["counts"]
    for a, b in zip(fused.last_selection["positions"], ref.last_selection["positions"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("heads", "kv_heads", "q_len", "cached"), [(4, 2, 37, 60), (4, 4, 20, 0), (6, 2, 1, 33)],
                         ids=["gqa-replay", "no-cache", "one-query"])
def test_replay_attention_on_gpus_equals_the_cpu_path(heads, kv_heads, q_len, cached):
    """The replay's attention with log-sum-exp on CUDA (two flash calls merged by the Triton lse) equals
    the CPU path's (torch's fused CPU kernel on repeated keys)."""
    from service.engine.attention import attention_with_lse, split_attention_with_lse

    query = torch.randn(1, heads, q_len, 32)
    key, value = torch.randn(1, kv_heads, cached + q_len, 32), torch.randn(1, kv_heads, cached + q_len, 32)
    groups = heads // kv_heads
    out, lse = attention_with_lse(query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1),
                                  None)
    got_out, got_lse = split_attention_with_lse(query, key, value, None)
    torch.testing.assert_close(got_lse, lse[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_out, out, rtol=1e-4, atol=1e-5)
