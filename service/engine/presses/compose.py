"""Compositions: presses applied in order, each to what the previous one kept.

kvpress's ComposedPress calls every part's hook layer by layer. That is right for presses that
compress a layer as soon as it is computed, but KVCompose decides for all layers at once, at the
last layer (global allocation). A press after it must see what KVCompose kept, so here its hooks
for the earlier layers wait until KVCompose has compressed every layer, then run layer by layer.
The kept fraction is then the product of the parts' kept fractions, in any order.

``order_problem`` says, at spec time, why an order cannot be made correct.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from kvpress.presses.base_press import BasePress, is_prefilling
from torch import nn

NOT_COMPOSABLE = {
    "adakv": "it wraps a press and evicts per head across the whole cache; use it alone",
    "kvzip": "it reconstructs the context with its own forward passes; use it alone",
    "kvgrad": "it reconstructs the context with its own forward passes; use it alone",
    "kvpress_kvcompose": "it patches the model's forward; use 'kvcompose', which composes",
}
HEADWISE = {"criticaladakv"}  # evict per head by masking slots (kvcompose too, when structured=false)
KEEPS_EVERY_TOKEN = {"think"}  # prunes key channels, not tokens
WINDOWED = {"snapkv", "pyramidkv"}  # score from a window of the layer's own last keys


def _window(part: dict) -> int:
    """Keys a windowed scorer (possibly wrapped) needs in every layer it compresses (0 if none)."""
    inner = [v for v in part.values() if isinstance(v, dict)]
    own = part.get("window_size", 0) if part.get("press") in WINDOWED else 0
    return max([own] + [_window(p) for p in inner])


def order_problem(parts: list[dict]) -> tuple[int, str] | None:
    """(index, reason) of the first part that cannot be correct in this order, or None."""
    names = [p.get("press") for p in parts]
    for i, part in enumerate(parts):
        name = names[i]
        if name in NOT_COMPOSABLE:
            return i, f"{name!r} cannot be composed: {NOT_COMPOSABLE[name]}"
        if name == "kvcompose" and "kvcompose" in names[:i]:
            return i, "'kvcompose' allocates across all layers and can appear once in a composition"
        headwise = name in HEADWISE or (name == "kvcompose" and part.get("structured") is False)
        if headwise and i < len(parts) - 1:
            return i, (f"{name!r} (head-wise) masks evicted slots per head; a later press would move tokens "
                       "under those masks, so it must come last")
        if name == "kvcompose":  # layers after its global allocation may keep as little as the floor
            need = max([_window(p) for p in parts[i + 1 :]] + [0])
            if need and part.get("keep_token_lower_bound", 0) <= need:
                return i, (f"a later press scores from a window of {need} keys, and 'kvcompose' may leave a "
                           f"layer fewer; set its keep_token_lower_bound to at least {need + 1}")
        one_pass = part.get("replay_context") is False or part.get("scorer", "auto") not in ("auto", "attention")
        if name == "kvcompose" and one_pass:
            before = [n for n in names[:i] if n not in KEEPS_EVERY_TOKEN]
            if before:
                how = "replay_context=false" if part.get("replay_context") is False else f"scorer {part['scorer']!r}"
                return i, (f"'kvcompose' with {how} scores the prefill's own keys in one pass over the whole "
                           f"context, so it cannot follow {before[0]!r}; put it first or use its default "
                           "(replayed) scoring")
    return None


@dataclass
class ComposedPress(BasePress):
    """Presses applied in order; ``compression_ratio`` is 1 - the product of the parts' kept fractions."""

    presses: list[BasePress]
    _num_layers: int = field(default=0, init=False, repr=False, compare=False)
    _global_at: int | None = field(default=None, init=False, repr=False, compare=False)  # set on entry
    _deferred: list[tuple[nn.Module, Any, dict, Any]] = field(default_factory=list, init=False, repr=False,
                                                              compare=False)

    @property
    def compression_ratio(self) -> float:
        kept = 1.0
        for press in self.presses:
            kept *= 1 - press.compression_ratio
        return 1 - kept

    def post_init_from_model(self, model: nn.Module) -> None:
        self._num_layers = len(model.model.layers)
        self._deferred = []
        # the part that compresses every layer at the last one (KVCompose), if any
        self._global_at = next((i for i, p in enumerate(self.presses)
                                if getattr(p, "compresses_at_last_layer", False)), None)
        for press in self.presses:
            press.post_init_from_model(model)

    def forward_hook(self, module: nn.Module, input: list, kwargs: dict, output: list):
        g = self._global_at
        prefilling = is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1])
        if g is None or not prefilling:  # also KVCompose's replay: the other parts skip it themselves
            for press in self.presses:
                output = press.forward_hook(module, input, kwargs, output)
            return output
        for press in self.presses[: g + 1]:
            output = press.forward_hook(module, input, kwargs, output)
        later = self.presses[g + 1 :]
        if not later:
            return output
        self._deferred.append((module, input, kwargs, output))
        if module.layer_idx < self._num_layers - 1:
            return output
        deferred, self._deferred = self._deferred, []
        for m, i, k, o in deferred:  # every layer is compressed by the global press now
            for press in later:
                o = press.forward_hook(m, i, k, o)
        return o

    @contextmanager
    def __call__(self, model: nn.Module):
        try:
            with super().__call__(model), ExitStack() as parts:
                for press in self.presses:  # KVCompose records the context ids while the block is open
                    recording = getattr(press, "recording_context_ids", None)
                    if recording is not None:
                        parts.enter_context(recording(model))
                yield
        finally:  # a reused composition starts clean, also after a failure midway
            self._deferred = []
