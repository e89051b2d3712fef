"""Model families beyond Llama, as tiny random models built from transformers' config classes.

Per family: an uncompressed cache decodes exactly like transformers' eager attention (Gemma 2's
soft-capping included), KVCompose's scores are the model's own attention (q/k norms, partial
rotary, soft-capping) and one-pass scoring places queries where the replay does, a compressed
cache stays causal per layer, and it survives the codec.
"""

import pytest
import torch
import transformers as tf
from conftest import TINY_VOCAB, meta, random_ids

from service.cache import codec
from service.engine.attention import use_per_layer_attention
from service.engine.batching import Request, decode_tokens
from service.engine.decode import question_logits
from service.engine.engine import Engine
from service.engine.models import LoadedModel, UnsupportedModelError, check_family, tokenizer_digest
from service.engine.prefill import prefill
from service.engine.presses import build
from service.engine.presses.kvcompose import KVComposePress
from service.engine.presses.scoring import TaskAttention
from service.protocol import Sampling

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096)
SNAP = {"press": "snapkv", "compression_ratio": 0.5, "window_size": 16}
FAMILIES = {  # name -> (config class, model class, config fields, a press besides KVCompose)
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}, SNAP),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16},  # q/k norm
              {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                           {"press": "kvcompose", "compression_ratio": 0.5}]}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 1024},
                {"press": "pyramidkv", "compression_ratio": 0.6, "window_size": 16}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,  # a cap low enough to change every logit
               {"head_dim": 16, "sliding_window": 1024, "attn_logit_softcapping": 0.05},
               {"press": "knorm", "compression_ratio": 0.5}),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16, "sliding_window": 1024},
               {"press": "tova", "compression_ratio": 0.5}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM,  # fused qkv_proj, rotary on half of each head
             {"pad_token_id": 0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}},
             {"press": "adakv", "inner": {"press": "knorm", "compression_ratio": 0.5}}),
}
CONTEXT = 200


def tiny(name: str, vocab: int = 2048) -> torch.nn.Module:
    config_cls, model_cls, fields, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=vocab, **SHAPE, **fields)).eval()
    check_family(model)
    use_per_layer_attention(model)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, tiny(request.param)


def eager(model, ids: list[int], **kwargs):
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids]), **kwargs)
    finally:
        use_per_layer_attention(model)


def test_uncompressed_cache_decodes_like_eager_transformers(family):
    _, model = family
    context, question = random_ids(CONTEXT), random_ids(9, seed=3)
    ours = question_logits(model, prefill(model, context, None, meta(CONTEXT)), question)
    reference = eager(model, context + question).logits[0, -len(question):].float()
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()


def test_kvcompose_scores_are_the_models_own_attention(family):
    """Two-pass scores: the replayed context's attention onto the context, as eager transformers
    computes it for the context given twice."""
    _, model = family
    press = build({"press": "kvcompose", "compression_ratio": 0.5, "agg_task": "mean", "add_mean_across_heads": False})
    context = random_ids(CONTEXT)
    prefill(model, context, press, meta(CONTEXT))
    attentions = eager(model, context + context, output_attentions=True).attentions
    kv_heads = model.config.num_key_value_heads
    for layer, weights in enumerate(attentions):
        expected = weights[0, :, CONTEXT:, :CONTEXT].float().mean(dim=1)  # (heads, L): replayed queries
        expected = expected.view(kv_heads, -1, CONTEXT).mean(dim=1)
        assert torch.allclose(press.last_selection["scores"][layer], expected, atol=1e-6), layer


class OverContext(KVComposePress):
    def aggregator(self, n_context, softcap):
        return TaskAttention(self.agg_task, n_context, softcap, over_context=True)


def test_one_pass_queries_are_placed_where_the_replay_puts_them(family):
    """Layer 0's queries depend on the token alone, so one pass (prefill queries rotated to the
    replay's positions, softmax over the context) equals the replay's layer 0 exactly."""
    _, model = family
    options = dict(compression_ratio=0.5, agg_task="mean", add_mean_across_heads=False)
    one_pass = KVComposePress(replay_context=False, scorer="attention", **options)
    replay = OverContext(**options)
    context = random_ids(CONTEXT)
    for press in (one_pass, replay):
        prefill(model, context, press, meta(CONTEXT))
    a, b = one_pass.last_selection["scores"], replay.last_selection["scores"]
    assert torch.allclose(a[0], b[0], atol=1e-6)
    assert not torch.allclose(a[-1], b[-1], atol=1e-7, rtol=0)  # deeper layers: the causal prefill's states


def test_one_pass_scores_with_compactor_where_kvpress_can_rotate_its_queries(family):
    """kvpress's Compactor rotates queries over the whole head: a family that rotates part of each head
    (Phi-3) gets the attention one pass by default, and a clear error if it names Compactor."""
    name, model = family
    press = KVComposePress(compression_ratio=0.5, replay_context=False)
    kv = prefill(model, random_ids(CONTEXT), press, meta(CONTEXT))
    assert press.last_selection["scored_by"] == ("attention" if name == "phi3" else "compactor")
    assert torch.isfinite(question_logits(model, kv, random_ids(4, seed=2))).all()
    if name == "phi3":
        with pytest.raises(ValueError, match="rotates queries over the whole head"):
            prefill(model, random_ids(CONTEXT), KVComposePress(compression_ratio=0.5, scorer="compactor"),
                    meta(CONTEXT))


@pytest.mark.parametrize("which", ["kvcompose", "other"])
def test_compressed_cache_is_causal_per_layer_and_survives_the_codec(family, which):
    name, model = family
    spec = {"press": "kvcompose", "compression_ratio": 0.6} if which == "kvcompose" else FAMILIES[name][3]
    kv = prefill(model, random_ids(CONTEXT), build(spec), meta(CONTEXT, spec))
    assert sum(kv.kept_tokens_per_layer()) < 0.75 * CONTEXT * kv.num_layers
    question = random_ids(12, seed=5)
    changed = question[:-1] + [(question[-1] + 1) % 1000 + 10]
    a, b = question_logits(model, kv, question), question_logits(model, kv, changed)
    assert torch.allclose(a[:-1], b[:-1], atol=1e-5) and not torch.allclose(a[-1], b[-1], atol=1e-5)
    stored = kv.to(dtype=torch.float16)
    back = codec.decode(codec.encode(stored, "float16"))
    greedy = Sampling(max_new_tokens=6)
    assert decode_tokens(model, [Request(back, question, greedy)]) == \
        decode_tokens(model, [Request(stored, question, greedy)])


def test_sliding_window_bounds_every_position(tokenizer):
    config = tf.MistralConfig(vocab_size=TINY_VOCAB, **{**SHAPE, "max_position_embeddings": 2048}, sliding_window=256)
    model = tf.MistralForCausalLM(config).eval()
    use_per_layer_attention(model)
    engine = Engine(loaded=LoadedModel(model, tokenizer, "tiny-mistral", "seed", tokenizer_digest(tokenizer)))
    assert engine.max_context_tokens == 256
    with pytest.raises(ValueError, match="256 sliding-window positions"):
        engine.context_ids(random_ids(300))


def test_a_family_the_presses_cannot_read_is_refused():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedModelError, match="'gpt2' models are not supported: .*rotary"):
        check_family(model)
