"""KVCompose (arXiv 2509.05165) as a kvpress press that decodes correctly and composes.

Differences from kvpress 0.5.5's KVComposePress (same positions on the same scores otherwise):
- prefill stays on the model's attention (SDPA); task attention is computed a block of queries at
  a time (``scoring.TaskAttention``), O(L x T) memory instead of eager (heads, L, 2L) weights;
- task-aware scoring works: ``task_ids`` are replayed (each prompt on its own, against the context
  only); with none, the context itself is replayed (task-agnostic), or, with
  ``replay_context=False``, scored in one pass: by default with Compactor's scores (kvpress's
  ``CompactorPress``; Chari & Van Durme 2025), or (``scorer="attention"``) by the prefill's own
  queries, rotated to the positions the replay would give them, attending to every context key;
  task queries never get positions past the window: a replay that would run past it is squeezed
  into it, and a context longer than about 2/3 of the window (squeezed tighter than
  ``MIN_REPLAY_SPACING``) is scored in one pass (after a press that evicted, it is replayed squeezed
  all the same);
- the replay reads the cache through a view that never stores the replayed tokens, so the cache
  is not doubled and nothing of the replay is left behind;
- it is a plain forward hook (no patched ``model.forward``), so it composes (``presses.compose``):
  at the last layer it scores what is cached, allocates globally and compresses every layer;
- its state is declared and cleaned up: the context-ids hook exists only while the
  ``with press(model)`` block is open (``post_init_from_model`` registers nothing), per-document
  state goes when the block ends, stale head masks are cleared when it starts;
- unstructured mode packs each head's picks densely (the layer is as wide as its busiest head)
  and marks the padding evicted, instead of keeping every position and masking; the padding is
  also marked as kvpress's ``masked_key_indices``, so kvpress's pipeline and ``generate`` hide it.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import kvpress
import torch
from kvpress.presses.base_press import BasePress, is_prefilling
from kvpress.utils import get_prerope_query_states
from torch import nn
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from service.engine import selection
from service.engine.models import position_limit
from service.engine.presses.scoring import TaskAttention

MIN_REPLAY_SPACING = 0.5  # a context replayed squeezed tighter than this is scored in one pass (_replays)
SCORE_BLOCK_BYTES = 8 * 2**20  # memory for one block of attention weights while scoring
REPLAY_WINDOW = 128  # the last context tokens a sampled replay always runs
SCORER_SEED = 0  # the random state a kvpress scorer starts from (``_score_with_scorer``)
AUTO_ONE_PASS = "compactor"  # what scorer "auto" scores a document with when it is not replayed
# kvpress's query-agnostic one-pass scorers KVCompose can select with (``scorer``): each scores every
# key of a layer from the prefill alone, without attention weights.
SCORERS: dict[str, type[kvpress.ScorerPress]] = {
    "compactor": kvpress.CompactorPress,  # Chari & Van Durme 2025: leverage + non-causal chunked attention
    "noncausalattn": kvpress.NonCausalAttnPress,  # Compactor's attention half alone
    "leveragescore": kvpress.LeverageScorePress,  # Compactor's key-geometry half alone
    "keydiff": kvpress.KeyDiffPress,
    "knorm": kvpress.KnormPress,
}
# kvpress rotates these scorers' queries with Llama's rotary over the whole head: wrong shapes where a
# family rotates part of each head (Phi-3's partial_rotary_factor).
WHOLE_HEAD_ROTARY = {"compactor", "noncausalattn"}


class _ReadOnlyLayer(DynamicLayer):
    """Returns cached + new states without storing the new ones; remembers the last keys for scoring."""

    def __init__(self, base: DynamicLayer):
        super().__init__()
        self.base = base
        self.is_initialized = True
        self.last_keys: torch.Tensor | None = None

    def update(self, key_states, value_states, cache_kwargs=None):
        keys = torch.cat([self.base.keys, key_states], dim=-2)
        values = torch.cat([self.base.values, value_states], dim=-2)
        self.last_keys = keys
        return keys, values

    def get_seq_length(self) -> int:
        return self.base.get_seq_length()


def _read_only(cache: Cache) -> Cache:
    return Cache(layers=[_ReadOnlyLayer(layer) for layer in cache.layers])


@dataclass
class _Scored:
    """Scores computed whole (a kvpress scorer's), in the place of a ``TaskAttention`` aggregate."""

    scores: torch.Tensor

    def result(self) -> torch.Tensor:
        return self.scores


class PaddingIndices(tuple):
    """kvpress's ``masked_key_indices`` triple (batch, head, position) for the padding slots of an
    unstructured layer. A type of its own because the press also returns them as ``head_masks``:
    ``prefill.collect`` takes those, and must not take a mark left by another run of the press."""

    @classmethod
    def of(cls, padding: torch.Tensor) -> PaddingIndices:
        """From a (kv_heads, slots) bool mask, True = padding (batch 1, as the press)."""
        head, position = padding.nonzero(as_tuple=True)
        return cls((torch.zeros_like(head), head, position))


@dataclass
class KVComposePress(BasePress):
    """Structured KV-cache compression with composite tokens and global layer allocation.

    compression_ratio: fraction of all layers' slots removed, globally.
    agg_task / agg_group / agg_head: "max" or "mean" over task tokens / query heads of a GQA group /
        KV heads (for composite scores).
    add_v_norm: weight scores by value norms. add_mean_across_heads: add the KV-head mean (stabiliser).
    keep_token_lower_bound: composite slots every layer keeps at least (at least 1 always).
    structured: aligned composite tokens (dense, default) or per-head counts (unstructured).
    replay_context: task-agnostic scoring replays the context as the task (as kvpress does) while
        its squeezed copy keeps ``MIN_REPLAY_SPACING`` (contexts up to about 2/3 of the window);
        False, or a longer context (unless a press before this one evicted), scores in one pass,
        as ``scorer`` says.
    replay_fraction: the share of the context a task-agnostic replay runs as queries (1 = all): a
        stride over the document plus its last ``REPLAY_WINDOW`` tokens (where a question follows),
        each at the position the full replay gives it. The replay is a second forward pass, MLPs
        included, so its cost falls with the share; which share keeps the answers is measured
        (docs/accuracy.md).
    task_ids: token ids of task prompts (e.g. expected questions) for task-aware scoring.
    scorer: how a document that is not replayed is scored (the composite selection and the global
        allocation are the same for all). "auto" (the default): Compactor's scores, as "compactor".
        "attention": each prefill query, placed after the context as the replay would place it
        (squeezed into the window), attends to every context key (the queries keep their causal
        hidden states; the softmax covers the context keys only). A name in ``SCORERS``: that
        kvpress scorer (one pass, no attention weights, given this press's compression_ratio),
        also where the context would fit a replay.
    """

    compression_ratio: float = 0.0
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0
    structured: bool = True
    replay_context: bool = True
    replay_fraction: float = 1.0
    task_ids: list[list[int]] | None = None
    scorer: str = "auto"
    last_selection: dict[str, list] | None = field(default=None, init=False, repr=False, compare=False)
    # (kv_heads, slots) bool masks of the slots each head left empty, by layer (structured=False):
    # a result of the compression, read by ``prefill.collect`` (the modules' copies are for kvpress).
    head_masks: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _state: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _input_hook: Any = field(default=None, init=False, repr=False, compare=False)

    compresses_at_last_layer: ClassVar[bool] = True  # compositions defer later presses until it has

    def __post_init__(self) -> None:
        if not 0 <= self.compression_ratio < 1:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        for name in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, name) not in ("max", "mean"):
                raise ValueError(f"{name} must be 'max' or 'mean', got {getattr(self, name)!r}")
        if self.keep_token_lower_bound < 0:
            raise ValueError("keep_token_lower_bound must be >= 0")
        if not 0 < self.replay_fraction <= 1:
            raise ValueError(f"replay_fraction must be in (0, 1], got {self.replay_fraction}")
        if self.task_ids is not None and not all(len(ids) > 0 for ids in self.task_ids):
            raise ValueError("task_ids must be non-empty token id lists")
        if self.scorer not in ("auto", "attention", *SCORERS):
            raise ValueError(f"scorer must be 'auto', 'attention' or one of {sorted(SCORERS)}, got {self.scorer!r}")
        if self.scorer not in ("auto", "attention") and self.task_ids:
            raise ValueError(f"scorer {self.scorer!r} is query-agnostic: task_ids need scorer 'auto' or 'attention'")

    # kvpress calls this when the press (or a composition holding it) is entered; wrappers may call it
    # without ever entering this press's ``with`` block, so it registers nothing on the model.
    def post_init_from_model(self, model: nn.Module) -> None:
        self.head_masks = {}  # an earlier document's masks must not apply to this one
        self._state = {"model": model, "num_layers": len(model.model.layers)}

    @contextmanager
    def recording_context_ids(self, model: nn.Module) -> Iterator[None]:
        """While open, the decoder's input ids are recorded: the context replay needs them, and an
        attention hook only sees hidden states. On exit the hook and per-document state go."""
        self._input_hook = model.model.register_forward_pre_hook(self._remember_input, with_kwargs=True)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Remove the context-ids hook and drop per-document state (the head masks stay, for ``collect``)."""
        if self._input_hook is not None:
            self._input_hook.remove()
            self._input_hook = None
        self._state = {}

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        with super().__call__(model), self.recording_context_ids(model):
            yield

    def _remember_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._state.get("replaying"):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._state["context_ids"] = ids

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        state = self._state
        layer = module.layer_idx
        cache = kwargs["past_key_values"]
        if state.get("replaying"):
            lse = state["lse"].pop(layer, None)
            self._score(module, kwargs, cache.layers[layer].last_keys, state["n_cached"][layer], lse)
            cache.layers[layer].last_keys = None
            return output
        q_len = kwargs["hidden_states"].shape[1]
        if not is_prefilling(kwargs["cache_position"], q_len):
            return output
        if layer == 0:
            state.update(scores={}, n_cached={}, context_length=q_len, replay=self._replays(q_len),
                         one_pass=self._one_pass_scorer(kwargs["position_embeddings"][0].shape[-1] / module.head_dim))
        keys = cache.layers[layer].keys
        if not self._needs_replay() and keys.shape[2] != q_len:  # a press before us evicted here
            if self._one_pass_asked():
                how = "replay_context=false" if not self.replay_context else f"scorer {self.scorer!r}"
                raise ValueError(f"kvcompose with {how} scores in one pass over every key: it must come first "
                                 "in a composition (or after think only)")
            state.update(replay=True, scores={}, n_cached={})  # no query for every key: replay, squeezed
        if not self._needs_replay():
            if state["one_pass"] == "attention":
                state["n_cached"][layer] = q_len
                self._score(module, kwargs, keys, q_len, after_context=True)
            else:
                self._score_with_scorer(module, kwargs, cache.layers[layer])
        if layer == state["num_layers"] - 1:
            try:
                if self._needs_replay():
                    self._replay(cache)
                self._compress(cache)
            finally:  # the next document in the same ``with`` block starts clean
                self._state = {"model": state["model"], "num_layers": state["num_layers"]}
        return output

    def _needs_replay(self) -> bool:
        return self._state["replay"]

    def _one_pass_scorer(self, rotary_share: float) -> str:
        """What scores a document that is not replayed: "attention" (the prefill's queries placed after
        the context) or a kvpress scorer's name. "auto" takes Compactor: at 2k it kept 0.82 / 0.90
        (10% / 20% loss) where the attention one pass kept 0.40 / 0.71, and at 8k (where no replay
        fits) at least 0.95 / 0.95 where it kept 0.77 / 0.81, in 1.2-1.3x a plain prefill against
        1.9-3.2x (docs/accuracy.md, docs/performance.md); "attention" where kvpress cannot rotate
        Compactor's queries (``rotary_share``: the share of each head the model rotates, below 1)."""
        whole = rotary_share == 1
        if self.scorer == "auto":
            return AUTO_ONE_PASS if whole or AUTO_ONE_PASS not in WHOLE_HEAD_ROTARY else "attention"
        if self.scorer in WHOLE_HEAD_ROTARY and not whole:
            raise ValueError(f"scorer {self.scorer!r} (kvpress) rotates queries over the whole head, and this model "
                             f"rotates {rotary_share:g} of each: use scorer 'auto' or 'attention'")
        return self.scorer

    def _one_pass_asked(self) -> bool:
        """Whether the spec itself asks for one pass (not only a context too long to replay)."""
        return not self.replay_context or self.scorer not in ("auto", "attention")

    def _score_with_scorer(self, module: nn.Module, kwargs: dict, layer: DynamicLayer) -> None:
        """One layer's (kv_heads, L) scores from the kvpress scorer chosen for this document."""
        scorer = SCORERS[self._state["one_pass"]](compression_ratio=self.compression_ratio)
        device = layer.keys.device
        # Compactor's leverage half draws a Gaussian sketch: seeded, so that a document gets the same
        # cache on every replica, without moving the caller's random state.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(SCORER_SEED)
            scores = scorer.score(module, kwargs["hidden_states"], layer.keys, layer.values, None, kwargs)
        self._state["scores"][module.layer_idx] = _Scored(scores[0].float())

    def _replays(self, context_length: int) -> bool:
        """Whether this document is scored by a second forward pass. Task prompts always are. The
        context is replayed as the task while its squeezed copy keeps at least MIN_REPLAY_SPACING
        of a position between queries (contexts up to about 2/3 of the window). Squeezed to 0.02
        (an 8k document, SmolLM2) the replay lost the needle at 0.75, where the prefill's own queries
        (one pass) kept it at 0.5-0.9; at 0.99 (RULER's 4k NIAH contexts, 4,119 tokens) one pass
        lost what the replay keeps (maxima 0.56/0.65 against 0.82/0.90, docs/accuracy.md). (If a
        press before us turns out to have evicted, the hook replays after all: one pass needs every key.)"""
        if self.task_ids:
            return True
        if self.scorer not in ("auto", "attention"):
            return False
        return self.replay_context and self._placement(context_length, context_length)[1] >= MIN_REPLAY_SPACING

    def _replay(self, cache: Cache) -> None:
        """Run each task prompt (or the context) after the cached context; hooks collect scores."""
        state = self._state
        model = state["model"]
        device = cache.layers[0].keys.device
        if self.task_ids:
            tasks = [torch.tensor([t], device=device) for t in self.task_ids]
            prompts = [(ids, self._task_positions(ids.shape[1], device)) for ids in tasks]
        else:
            ids = state.get("context_ids")
            if ids is None:
                raise RuntimeError(
                    "KVComposePress replays the context, whose ids it records only inside its own "
                    "`with press(model)` block or a service.engine.presses composition; under a wrapper that "
                    "only calls post_init_from_model (such as kvpress's ComposedPress), call set_context(ids) "
                    "inside the block before the forward, give task_ids, or set replay_context=False")
            positions = self._task_positions(ids.shape[1], device)
            picked = self._sampled(ids.shape[1], device)
            prompts = [(ids, positions) if picked is None else (ids[:, picked], positions[:, picked])]
        state["n_cached"] = {i: layer.keys.shape[2] for i, layer in enumerate(cache.layers)}
        state["replaying"] = True
        try:
            for ids, positions in prompts:
                # kvc_lse: the per-layer attention fills in each query's softmax normaliser
                state["lse"] = {}
                model.model(input_ids=ids, past_key_values=_read_only(cache), position_ids=positions,
                            use_cache=True, kvc_lse=state["lse"])
        finally:
            state["replaying"] = False

    def _score(self, module: nn.Module, kwargs: dict, keys: torch.Tensor, n_context: int,
               lse: torch.Tensor | None = None, after_context: bool = False) -> None:
        hidden = kwargs["hidden_states"]
        query = get_prerope_query_states(module, hidden)
        cos, sin = self._rotary_after_context(module, hidden) if after_context else kwargs["position_embeddings"]
        rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb  # the family's own (Phi-3: partial)
        query, _ = rotate(query, query, cos, sin)
        scores = self._state["scores"]
        if module.layer_idx not in scores:
            softcap = getattr(module.config, "attn_logit_softcapping", None)
            scores[module.layer_idx] = self.aggregator(n_context, softcap)
        agg = scores[module.layer_idx]
        heads, k_len = query.shape[1], keys.shape[2]
        chunk = max(1, SCORE_BLOCK_BYTES // (4 * heads * k_len))
        if after_context:
            agg.add_after_context(query[0], keys[0], module.scaling, chunk)
        else:
            agg.add(query[0], keys[0], module.scaling, chunk, lse)

    def _sampled(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the context tokens a sampled replay runs (None: all): evenly strided, then the
        last window."""
        if self.replay_fraction >= 1:
            return None
        budget = max(1, math.ceil(self.replay_fraction * n))
        window = min(budget // 2, REPLAY_WINDOW)
        head = n - window
        strided = torch.linspace(0, head - 1, budget - window, device=device).round().long().unique()
        return torch.cat([strided, torch.arange(head, n, device=device)])

    def _task_positions(self, n: int, device: torch.device) -> torch.Tensor:
        """(1, n) positions of task queries: right after the context, as a prompt would be placed,
        but squeezed (fractional steps, order kept) so that the last is the window's last position.
        Past the window, query-key distances are ones the model never saw and its attention (hence
        the scores) is noise. Where the tasks fit, they are placed exactly as before."""
        start, step = self._placement(self._state["context_length"], n)
        if step == 1:
            return torch.arange(start, start + n, device=device).unsqueeze(0)
        # order kept while the steps are > 0 and representable
        return (start + step * torch.arange(n, dtype=torch.float64, device=device)).float().unsqueeze(0)

    def _placement(self, context_length: int, n: int) -> tuple[int, float]:
        """(first position, positions between consecutive queries) of n task queries: right after
        the context with steps of 1 where they fit in the window, else squeezed so that the last is
        the window's last position (a context that fills the window: all at its end)."""
        last = self._window() - 1
        start = min(context_length, last)
        return start, 1.0 if start + n - 1 <= last else (last - start) / max(n - 1, 1)

    def _window(self) -> int:
        return position_limit(self._state["model"].config)[0]

    def _rotary_after_context(self, module: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the positions the replay would give the context's queries (``_task_positions``)."""
        positions = self._task_positions(hidden.shape[1], hidden.device)
        rotary = self._state["model"].model.rotary_emb
        if "layer_type" in inspect.signature(rotary.forward).parameters:  # Gemma 3: local and global RoPE
            return rotary(hidden, positions, module.config.layer_types[module.layer_idx])
        return rotary(hidden, positions)

    def aggregator(self, n_context: int, softcap: float | None) -> TaskAttention:
        """How one layer's task attention is aggregated (override to score differently)."""
        return TaskAttention(self.agg_task, n_context, softcap)

    def set_context(self, input_ids: torch.Tensor) -> None:
        """Give the context ids directly (when hooks are driven without a model forward)."""
        self._state["context_ids"] = input_ids

    def _compress(self, cache: Cache) -> None:
        state = self._state
        kv_heads = cache.layers[0].keys.shape[1]
        scores = []
        for i, layer in enumerate(cache.layers):
            s = selection.group_scores(state["scores"][i].result(), kv_heads, self.agg_group)
            values = layer.values[0, :, : s.shape[1]] if self.add_v_norm else None
            scores.append(selection.enhance(s, values, self.add_mean_across_heads))
        self.compress_with_scores(scores, cache)
        self.last_selection["replayed"] = state["replay"]
        self.last_selection["scored_by"] = "replay" if state["replay"] else state["one_pass"]
        if not self.structured:
            self._mark_padding(state["model"])

    def _mark_padding(self, model: nn.Module) -> None:
        """Mark every layer's padding on its attention module as kvpress's head-wise presses mark
        their evictions: kvpress's pipeline and ``generate`` decode after the ``with`` block, with
        nothing but the modules to carry masks (its attention patch, or ours called without
        ``kvc_evicted``, hides the marked keys). Left as kvpress leaves them: a prefill over an
        empty cache drops them, and so does ``prefill.collect``."""
        for i, layer in enumerate(model.model.layers):
            padding = self.head_masks.get(i)
            layer.self_attn.masked_key_indices = None if padding is None else PaddingIndices.of(padding)

    def compress_with_scores(self, scores: list[torch.Tensor], cache: Cache) -> None:
        """Select and gather with given per-layer (kv_heads, len) scores: one scoring, many ratios."""
        if self.structured:
            composite = selection.composite_scores(scores, self.agg_head, self.keep_token_lower_bound)
            counts = selection.allocate(composite, self.compression_ratio, max(1, self.keep_token_lower_bound))
        else:
            counts = selection.allocate_per_head(scores, self.compression_ratio, self.keep_token_lower_bound)
        self.last_selection = {"scores": scores, "counts": counts, "positions": []}  # for inspection
        self.head_masks = {}  # this document's, also where the ``with`` block holds several
        for i, layer in enumerate(cache.layers):
            positions, padding = selection.select(scores[i], counts[i])
            self.last_selection["positions"].append(positions)
            index = positions.to(layer.keys.device)[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)
            if padding is not None:
                self.head_masks[i] = padding.to(layer.keys.device)
