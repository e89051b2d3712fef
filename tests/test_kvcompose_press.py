"""The project's KVCompose press against kvpress's reference, and what the reference cannot do."""

import kvpress
import pytest
import torch
from conftest import meta, random_ids, tiny_llama
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache

from service.bench.runner import record
from service.cache.kvcache import CompressedKV
from service.engine.decode import question_logits
from service.engine.prefill import collect, prefill
from service.engine.presses import build
from service.engine.presses.kvcompose import KVComposePress
from service.engine.presses.scoring import TaskAttention


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4, seed=3)


def reference_selection(model, ids, ratio):
    ref = kvpress.KVComposePress(compression_ratio=ratio)
    ref._reset_state = lambda: None  # keep its masks for inspection
    prefill(model, ids, ref, meta(len(ids)))
    return ref


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_same_positions_as_kvpress_reference_except_ties(model, ratio):
    ids = random_ids(256, seed=11)
    ref = reference_selection(model, ids, ratio)
    ours = KVComposePress(compression_ratio=ratio)
    prefill(model, ids, ours, meta(len(ids)))
    sel = ours.last_selection
    assert sel["counts"] == [int(c) for c in ref.important_per_layer]
    mismatched = 0
    for layer, positions in enumerate(sel["positions"]):
        scores = sel["scores"][layer]
        for head in range(positions.shape[0]):
            mine = set(positions[head].tolist())
            theirs = set(ref.important_mask_per_kv_head[layer][head].nonzero().flatten().tolist())
            diff = mine ^ theirs
            if diff:
                # only where scores tie with the selection boundary
                boundary = scores[head].sort(descending=True).values[len(mine) - 1]
                assert all(abs(scores[head, p] - boundary) <= 1e-5 * boundary.abs() + 1e-8 for p in diff)
                mismatched += len(diff)
    assert mismatched <= 0.01 * sum(len(p.flatten()) for p in sel["positions"])


def test_task_prompts_are_used(model):
    ids = random_ids(256, seed=11)
    agnostic = KVComposePress(compression_ratio=0.5)
    aware = KVComposePress(compression_ratio=0.5, task_ids=[random_ids(8, seed=2)])
    prefill(model, ids, agnostic, meta(256))
    prefill(model, ids, aware, meta(256))
    a, b = agnostic.last_selection["scores"][1], aware.last_selection["scores"][1]
    assert not torch.allclose(a, b)


def test_one_pass_mode_scores_without_replay(model):
    press = KVComposePress(compression_ratio=0.5, replay_context=False, scorer="attention")
    kv = prefill(model, random_ids(200), press, meta(200))
    assert sum(kv.layer_lengths) <= 0.5 * 200 * 4 + 4


def kvcompose_of(press) -> KVComposePress:
    return next(p for p in getattr(press, "presses", [press]) if isinstance(p, KVComposePress))


KVC = {"press": "kvcompose", "compression_ratio": 0.5}
EVICTS_DEEPER_LAYERS = {"press": "perlayercompression", "inner": {"press": "knorm"}, "compression_ratios": [0, 0.5]}


@pytest.mark.parametrize("length, spec, replayed", [
    (24, {"press": "kvcompose"}, True),  # the replay fits: placed right after the context, as before
    (40, {"press": "kvcompose"}, True),  # squeezed to 23/39 of a position: still replayed
    (50, {"press": "kvcompose"}, False),  # squeezed to 13/49, tighter than MIN_REPLAY_SPACING: one pass
    (50, {"press": "kvcompose", "replay_context": False}, False),
    (50, {"press": "kvcompose", "task_ids": [random_ids(30, seed=4)]}, True),  # squeezed task
    (50, {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5}, KVC]}, False),
    (50, {"compose": [{"press": "knorm", "compression_ratio": 0.25}, KVC]}, True),
    (50, {"compose": [EVICTS_DEEPER_LAYERS, KVC]}, True),  # layer 0 whole, layer 1 not
])
def test_scoring_never_places_queries_past_the_window(length, spec, replayed):
    """SmolLM2 lost an 8k needle when the replay of a 7.7k context ran to position 15.4k."""
    model = tiny_llama(layers=2, seed=5, window=64)
    seen: list[torch.Tensor] = []
    hook = model.model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(args[1] if len(args) > 1 else kwargs["position_ids"]), with_kwargs=True)
    if "task_ids" in spec:  # not a spec field: the engine passes task prompts to the press itself
        press = KVComposePress(compression_ratio=0.5, task_ids=spec["task_ids"])
    else:
        press = build({**spec, "compression_ratio": 0.5} if "press" in spec else spec)
    kvcompose_of(press).scorer = "attention"  # the one pass whose queries have positions to check
    try:
        kv = prefill(model, random_ids(length, seed=6), press, meta(length))
    finally:
        hook.remove()
    assert kvcompose_of(press).last_selection["replayed"] == replayed
    assert max(p.max().item() for p in seen) <= 63
    tasks = seen[1:]  # after the prefill's own positions
    assert tasks and all((p.diff() > 0).all() for p in tasks), "task queries keep their order"
    if length == 24:
        assert torch.equal(tasks[0], torch.arange(24, 48).unsqueeze(0))
    if length == 40:  # squeezed: from right after the context to the window's last position
        assert tasks[0][0, 0] == 40 and tasks[0][0, -1] == 63 and tasks[0].shape[1] == 40
    assert sum(kv.layer_lengths) < 2 * length


def test_a_context_too_long_to_replay_is_scored_as_in_one_pass_mode():
    model = tiny_llama(layers=2, seed=5, window=64)
    ids = random_ids(50, seed=6)
    default, one_pass = KVComposePress(compression_ratio=0.5), KVComposePress(compression_ratio=0.5,
                                                                                replay_context=False)
    prefill(model, ids, default, meta(50))
    prefill(model, ids, one_pass, meta(50))
    for a, b in zip(default.last_selection["positions"], one_pass.last_selection["positions"]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cannot follow"):  # one pass asked for after an eviction
        prefill(model, ids, build({"compose": [EVICTS_DEEPER_LAYERS, {"press": "kvcompose", "replay_context": False}]}),
                meta(50))


def test_replay_leaves_nothing_behind_and_model_stateless(model):
    kv = prefill(model, random_ids(128), build({"press": "kvcompose", "compression_ratio": 0.25,
                                                 "structured": False}), meta(128))
    assert all(n <= 128 for n in kv.layer_lengths)  # kvpress's unstructured mode left 256 here
    assert all(getattr(layer.self_attn, "masked_key_indices", None) is None for layer in model.model.layers)
    assert not model.model._forward_pre_hooks  # the context-ids hook is gone


def test_composes_with_think(model):
    spec = {"compose": [{"press": "think", "key_channel_compression_ratio": 0.5},
                        {"press": "kvcompose", "compression_ratio": 0.5}]}
    kv = prefill(model, random_ids(200), build(spec), meta(200))
    assert len(set(kv.layer_lengths)) > 1
    zero_channels = (kv.keys[0].abs().sum(dim=1) == 0).sum().item()
    assert zero_channels == kv.keys[0].shape[0] * kv.keys[0].shape[2] // 2
    assert question_logits(model, kv, random_ids(4, seed=9)).isfinite().all()


def test_kvpress_composition_refuses_the_reference_but_accepts_ours():
    from service.engine.presses import PressSpecError

    build({"compose": [{"press": "snapkv", "compression_ratio": 0.3}, {"press": "kvcompose"}]})
    with pytest.raises(PressSpecError, match="compose\\[0\\].press"):
        build({"compose": [{"press": "kvpress_kvcompose"}]})


def our_decode(model, cache, press: KVComposePress, length: int, tokens: list[int], masked: bool = True):
    """Our decode path's logits for ``tokens`` after what ``press`` kept in ``cache`` (its first slots:
    a foreign decode loop may have appended more), the padding hidden unless ``masked`` is False."""
    kept = [p.shape[1] for p in press.last_selection["positions"]]
    kv = CompressedKV(keys=[layer.keys[0, :, :n] for layer, n in zip(cache.layers, kept)],
                      values=[layer.values[0, :, :n] for layer, n in zip(cache.layers, kept)],
                      evicted=[press.head_masks.get(i) if masked else None for i in range(len(kept))],
                      meta=meta(length))
    return question_logits(model, kv, tokens)


def logits_of_each_call(module) -> tuple[list[torch.Tensor], RemovableHandle]:
    """Last-position logits of every call of ``module`` (an LM head), and the hook to remove."""
    seen: list[torch.Tensor] = []
    return seen, module.register_forward_hook(lambda m, args, out: seen.append(out[0, -1].float()))


def test_kvpress_pipeline_decodes_an_unstructured_cache_as_we_do(model, tokenizer):
    """kvpress's pipeline decodes after the ``with press`` block, knowing head-wise masks only from the
    attention modules: the padding of our packed heads must be marked there (here on our attention,
    the only one on which a multi-token question over unequal layer lengths runs in transformers 5)."""
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)
    context, question = tokenizer.decode(random_ids(150, seed=12)), "What is the number?"
    inputs = pipe.preprocess(context, [question], "", 10**6)
    length, question_ids = inputs["context_ids"].shape[1], inputs["questions_ids"][0][0].tolist()
    press, cache = KVComposePress(compression_ratio=0.5, structured=False), DynamicCache()
    seen, hook = logits_of_each_call(model.lm_head)
    try:
        with torch.inference_mode():
            pipe(context, question=question, press=press, cache=cache, max_new_tokens=3)
    finally:
        hook.remove()
    assert press.head_masks, "no head left padding: the test would not test it"
    answer = [int(logits.argmax()) for logits in seen]
    ours = our_decode(model, cache, press, length, question_ids + answer[:-1])[len(question_ids) - 1:]
    unmasked = our_decode(model, cache, press, length, question_ids + answer[:-1], masked=False)
    assert (unmasked[len(question_ids) - 1:] - ours).abs().max() > 1e-3  # the padding moves them
    assert (torch.stack(seen) - ours).abs().max() < 1e-5


def test_generate_under_the_press_hides_the_padding_on_kvpress_attention(model):
    """``generate`` inside ``with press(model)``, on transformers' SDPA as kvpress patches it (single-
    token steps: longer questions over unequal layer lengths fail there, huggingface/transformers#35168)."""
    stock = tiny_llama(layers=4, seed=3)  # the same weights as ``model``
    stock.set_attn_implementation("sdpa")
    ids = random_ids(128, seed=11)
    press, cache = KVComposePress(compression_ratio=0.5, structured=False), DynamicCache()
    with torch.inference_mode(), press(stock):
        out = stock.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert press.head_masks
    steps = torch.cat(out.logits[1:]).float()  # after each generated token but the last
    fed = out.sequences[0, len(ids):-1].tolist()
    ours = our_decode(model, cache, press, len(ids), fed)
    assert (our_decode(model, cache, press, len(ids), fed, masked=False) - ours).abs().max() > 1e-3
    assert (steps - ours).abs().max() < 1e-5


def test_marks_left_for_kvpress_never_become_another_caches_evictions(model):
    """The bench scores once and selects per ratio from a copy of the uncompressed cache: the scoring
    run's marks are cleared by ``collect``, not taken (our presses hand theirs over as ``head_masks``)."""
    ids = torch.tensor([random_ids(128, seed=3)])
    plain, scored = DynamicCache(), DynamicCache()
    with torch.inference_mode():
        model.model(input_ids=ids, past_key_values=plain)
        with KVComposePress(compression_ratio=0.5, structured=False)(model):
            model.model(input_ids=ids, past_key_values=scored)
    assert any(layer.self_attn.masked_key_indices is not None for layer in model.model.layers)
    kv = collect(model, plain, meta(128))
    assert kv.evicted == [None] * len(kv.evicted) and kv.layer_lengths == [128] * len(kv.evicted)
    assert all(layer.self_attn.masked_key_indices is None for layer in model.model.layers)


def test_entering_kvpress_wrappers_leaves_no_hook_behind(model):
    """Wrappers such as kvpress's ComposedPress call ``post_init_from_model`` and never enter our block:
    nothing may stay registered. A context replay there has no ids, and says what to do instead."""
    hooks = dict(model.model._forward_pre_hooks)
    press = KVComposePress(compression_ratio=0.5)
    press.post_init_from_model(model)
    assert model.model._forward_pre_hooks == hooks
    ids = torch.tensor([random_ids(64, seed=4)])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="set_context"), \
            kvpress.ComposedPress([press])(model):
        model.model(input_ids=ids, past_key_values=DynamicCache())
    for given in (KVComposePress(compression_ratio=0.5), KVComposePress(compression_ratio=0.5, replay_context=False)):
        cache = DynamicCache()
        with torch.inference_mode(), kvpress.ComposedPress([given])(model):
            if given.replay_context:
                given.set_context(ids)
            model.model(input_ids=ids, past_key_values=cache)
        assert sum(layer.keys.shape[2] for layer in cache.layers) < 64 * len(cache.layers)
        assert model.model._forward_pre_hooks == hooks
    with press(model):  # our own block records the ids while it is open
        assert len(model.model._forward_pre_hooks) == len(hooks) + 1
    assert model.model._forward_pre_hooks == hooks


def test_attention_over_context_gives_each_layer_the_same_attention_mass(model):
    """Renormalised over the context, a task token's attention sums to 1 for every head, where the
    model's own softmax also spends some of it on the task's own tokens (the aggregator hook)."""

    class OverContext(KVComposePress):
        def aggregator(self, n_context, softcap):
            return TaskAttention(self.agg_task, n_context, softcap, over_context=True)

    ids, task = random_ids(256, seed=11), [random_ids(8, seed=2)]
    sums = {}
    for how, cls in (("all", KVComposePress), ("context", OverContext)):
        press = cls(compression_ratio=0.5, task_ids=task, agg_task="mean", agg_group="mean",
                    add_mean_across_heads=False)
        prefill(model, ids, press, meta(256))
        sums[how] = torch.stack([s.sum(dim=-1) for s in press.last_selection["scores"]])
    assert torch.allclose(sums["context"], torch.ones_like(sums["context"]), atol=1e-5)
    assert (sums["all"] < 1 - 1e-3).all()


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_a_sampled_replay_runs_a_stride_and_the_last_window_at_the_full_replays_positions(model, fraction):
    from service.engine.presses.kvcompose import REPLAY_WINDOW

    length = 600
    ids = random_ids(length, seed=21)
    seen = []  # (input ids, positions) of every forward of the decoder: the prefill, then the replay

    def spy(module, args, kwargs):
        seen.append((kwargs["input_ids"][0].tolist(), kwargs.get("position_ids")))

    hook = model.model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        press = KVComposePress(compression_ratio=0.5, replay_fraction=fraction)
        kv = prefill(model, ids, press, meta(length))
    finally:
        hook.remove()
    (prefilled, _), (replayed, positions) = seen
    assert prefilled == ids
    budget = -(-int(fraction * length * 1000) // 1000)
    window = min(budget // 2, REPLAY_WINDOW)
    assert len(replayed) == budget and replayed[-window:] == ids[-window:]
    picked = [p - length for p in positions[0].tolist()]  # each token where the full replay puts it
    assert picked == sorted(set(picked)) and [ids[i] for i in picked] == replayed
    strided = picked[: len(picked) - window]
    gaps = [b - a for a, b in zip(strided, strided[1:])]
    assert strided[0] == 0 and max(gaps) - min(gaps) <= 1  # an even stride over the rest of the document
    assert sum(kv.layer_lengths) <= 0.5 * length * 4 + 4  # the same global allocation of what is kept


def test_a_full_replay_fraction_is_the_replay_and_a_bad_one_is_refused(model):
    ids = random_ids(300, seed=22)
    full, default = KVComposePress(compression_ratio=0.6, replay_fraction=1.0), KVComposePress(compression_ratio=0.6)
    prefill(model, ids, full, meta(300)), prefill(model, ids, default, meta(300))
    assert all(torch.equal(a, b) for a, b in zip(full.last_selection["positions"], default.last_selection["positions"]))
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="replay_fraction"):
            KVComposePress(replay_fraction=bad)


@pytest.mark.parametrize("scorer", ["compactor", "keydiff"])
def test_a_kvpress_scorer_gives_kvcompose_its_scores_in_one_pass(model, scorer):
    ids = random_ids(200, seed=12)
    press = KVComposePress(compression_ratio=0.6, scorer=scorer)
    forwards = []
    hook = model.model.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        prefill(model, ids, press, meta(200))
    finally:
        hook.remove()
    assert len(forwards) == 1 and press.last_selection["replayed"] is False  # no second pass
    rec = record(model, ids)
    for layer in model.model.layers:
        i = layer.self_attn.layer_idx
        torch.manual_seed(0)  # the press seeds Compactor's sketch
        with torch.inference_mode():
            theirs = kvpress_scorer(scorer).score(layer.self_attn, rec.kwargs[i]["hidden_states"], rec.keys[i],
                                                  rec.values[i], None, rec.kwargs[i])[0].float()
        enhanced = theirs + theirs.mean(dim=0, keepdim=True)  # KVCompose's stabiliser, as for attention
        torch.testing.assert_close(press.last_selection["scores"][i], enhanced)


def kvpress_scorer(name):
    return {"compactor": kvpress.CompactorPress, "keydiff": kvpress.KeyDiffPress}[name](compression_ratio=0.6)


def test_a_kvpress_scorer_is_deterministic_and_leaves_the_random_state_alone(model):
    ids = random_ids(160, seed=13)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = prefill(model, ids, KVComposePress(compression_ratio=0.5, scorer="compactor"), meta(160))
    assert torch.equal(torch.rand(1), before)  # the caller's stream goes on as if nothing had drawn
    second = prefill(model, ids, KVComposePress(compression_ratio=0.5, scorer="compactor"), meta(160))
    assert all(torch.equal(a, b) for a, b in zip(first.keys, second.keys))


def test_a_kvpress_scorer_is_refused_where_it_cannot_score():
    with pytest.raises(ValueError, match="scorer must be 'auto', 'attention' or one of"):
        KVComposePress(scorer="snapkv")
    with pytest.raises(ValueError, match="query-agnostic"):
        KVComposePress(scorer="compactor", task_ids=[[1, 2]])
    model = tiny_llama(layers=2, seed=5, window=64)
    with pytest.raises(ValueError, match="cannot follow"):
        prefill(model, random_ids(50, seed=6),
                build({"compose": [EVICTS_DEEPER_LAYERS, {"press": "kvcompose", "scorer": "compactor"}]}), meta(50))


@pytest.mark.parametrize("length, spec, scored_by", [
    (40, {}, "replay"),  # the replay fits
    (50, {}, "compactor"),  # too long to replay: Compactor's one pass (the measured better one pass)
    (40, {"replay_context": False}, "compactor"),
    (50, {"scorer": "attention"}, "attention"),  # the prefill's queries placed after the context
    (40, {"scorer": "keydiff"}, "keydiff"),  # a named scorer even where the replay fits
])
def test_the_default_replays_where_it_fits_and_scores_as_compactor_beyond(length, spec, scored_by):
    model = tiny_llama(layers=2, seed=5, window=64)
    press = KVComposePress(compression_ratio=0.5, **spec)
    prefill(model, random_ids(length, seed=6), press, meta(length))
    assert press.last_selection["scored_by"] == scored_by


def test_the_one_pass_selection_is_pinned(model):
    """The kept positions of the default one pass (Compactor's scores, KVCompose's composite selection
    and global allocation) on a tiny model. If this changes, a stored cache would no longer be what
    its id says: bump ``selection.SELECTION_REVISION`` with the change, then update these."""
    press = KVComposePress(compression_ratio=0.75, replay_context=False)
    prefill(model, random_ids(96, seed=21), press, meta(96))
    sel = press.last_selection
    assert sel["scored_by"] == "compactor" and sel["counts"] == [25, 24, 24, 23]
    sinks_and_tail = [0, 1, 2, 3, 4, 5, 6, 7, 92, 93, 94, 95]  # Compactor keeps 8 sinks and the last 4
    assert all(set(sinks_and_tail) <= set(head.tolist()) for layer in sel["positions"] for head in layer)
    assert sel["positions"][1][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 14, 16, 17, 18, 33, 46, 47, 56, 63, 68, 69,
                                               70, 92, 93, 94, 95]
    assert sel["positions"][2][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 17, 32, 33, 36, 51, 52, 53, 63, 80, 81, 82,
                                               83, 92, 93, 94, 95]
    assert sel["positions"][3][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 33, 36, 37, 46, 53, 61, 71, 84, 86, 87, 92,
                                               93, 94, 95]
