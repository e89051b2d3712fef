"""Composite-token selection for KVCompose (arXiv 2509.05165), as pure tensor functions.

Input: one score tensor per layer, ``(kv_heads, len_i)``. Each KV head ranks its own tokens;
the i-th best tokens of all heads form the layer's i-th "composite token", scored by
aggregating the heads' sorted scores. A global allocator ranks all layers' composite scores
together, so informative layers keep more slots. Selection then gives, per layer, the
positions each head keeps, in increasing position order, packed into a dense tensor.
"""

from __future__ import annotations

import torch

# Bumped when a press keeps other tokens for the same spec, so that caches stored by the old
# selection are never served as the new one's (they expire unused): it is an input of the cache id
# (``cache/ids.py``). 2: KVCompose scores inside the model's window (contexts longer than half of it
# lost needles with revision 1). 3: contexts between half and about 2/3 of the window are replayed
# squeezed instead of scored in one pass (RULER's 4k NIAH contexts, 4,119 tokens, lost answers).
# 4: a document KVCompose does not replay (longer than about 2/3 of the window, or
# ``replay_context: false``) is scored by Compactor's one pass, not the prefill's attention.
SELECTION_REVISION = 4

BOOST = 1e9  # added to the first keep_token_lower_bound composite scores, as kvpress does


def n_kept(total: int, compression_ratio: float) -> int:
    """Slots to keep out of ``total`` (at least 1), as kvpress's ``compute_n_kept``."""
    return max(1, int(total * (1 - compression_ratio)))


def reduce(stacked: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce dim 0 by ``how`` in {"mean", "max"}; mean is sum then divide, as kvpress's aggregator."""
    if how == "max":
        return stacked.amax(dim=0)
    if how == "mean":
        return stacked.sum(dim=0) / stacked.shape[0]
    raise ValueError(f"aggregation must be 'mean' or 'max', got {how!r}")


def group_scores(head_scores: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """(query_heads, L) -> (kv_heads, L): aggregate the query heads that share a KV head."""
    groups = head_scores.shape[0] // num_kv_heads
    grouped = head_scores.view(num_kv_heads, groups, -1).transpose(0, 1)
    return reduce(grouped, how)


def enhance(scores: torch.Tensor, values: torch.Tensor | None, add_mean_across_heads: bool) -> torch.Tensor:
    """Optionally weight by value norms (values: (kv_heads, L, d)), then add the mean over KV heads."""
    if values is not None:
        scores = scores * values.float().norm(dim=-1)
    if add_mean_across_heads:
        scores = scores + scores.mean(dim=0, keepdim=True)
    return scores


def composite_scores(scores: list[torch.Tensor], agg_head: str, lower_bound: int) -> list[torch.Tensor]:
    """Per layer (len_i,): the heads' descending-sorted scores aggregated; layer 0 made the largest."""
    out = []
    for s in scores:
        c = reduce(s.sort(dim=-1, descending=True).values, agg_head)
        c[:lower_bound] += BOOST
        out.append(c)
    # Layer 0 is kept the largest (kvpress's rule): elementwise max over all layers.
    width = out[0].shape[0]
    padded = torch.stack([torch.nn.functional.pad(c[:width], (0, width - min(width, c.shape[0])), value=-torch.inf)
                          for c in out])
    out[0] = padded.amax(dim=0)
    return out


def allocate(composite: list[torch.Tensor], compression_ratio: float, floor: int) -> list[int]:
    """Global top-k over every layer's composite scores -> slots per layer (at least ``floor``)."""
    flat = torch.cat(composite)
    lengths = [c.shape[0] for c in composite]
    # k-th largest score = the threshold; a layer's count is how many of its scores reach it. Ties at
    # the threshold are broken by position in ``flat`` (lower layer first), as topk's order would.
    top = flat.topk(n_kept(flat.numel(), compression_ratio)).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top, True)
    counts = torch.stack([part.sum() for part in chosen.split(lengths)]).tolist()  # one host sync
    return [min(max(c, floor), n) for c, n in zip(counts, lengths)]


def allocate_per_head(scores: list[torch.Tensor], compression_ratio: float, lower_bound: int) -> list[torch.Tensor]:
    """Unstructured variant: global top-k over every (layer, head)'s sorted scores -> (kv_heads,) counts per layer.

    Every head keeps at least one slot (kvpress lets a head reach zero, which makes its attention undefined).
    """
    sorted_scores = []
    for s in scores:
        c = s.sort(dim=-1, descending=True).values.clone()
        c[:, :lower_bound] += BOOST
        sorted_scores.append(c)
    flat = torch.cat([c.reshape(-1) for c in sorted_scores])
    top = flat.topk(n_kept(flat.numel(), compression_ratio)).indices
    chosen = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top, True)
    # per (layer, head): how many of its slots were chosen
    counts = [part.view(c.shape).sum(dim=1).clamp(min=1)
              for part, c in zip(chosen.split([c.numel() for c in sorted_scores]), sorted_scores)]
    return counts


def select(scores: torch.Tensor, counts: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions each head keeps: (kv_heads, width) sorted ascending, plus the evicted mask for padding.

    counts: one int (structured: every head keeps the same number) or (kv_heads,) ints. With unequal
    counts, a head's unused slots repeat its last kept position and are marked evicted.
    """
    heads, length = scores.shape
    device = scores.device
    if not torch.is_tensor(counts) or counts.ndim == 0:
        counts = torch.full((heads,), int(counts), device=device)
    counts = counts.to(device)
    width = int(counts.max())
    order = torch.argsort(scores, dim=-1, descending=True)[:, :width]
    slot = torch.arange(width, device=device).unsqueeze(0)
    unused = slot >= counts.unsqueeze(1)
    order = torch.where(unused, torch.full_like(order, length), order)  # push unused to the end
    positions = order.sort(dim=-1).values
    last = positions.gather(1, (counts - 1).unsqueeze(1))
    positions = torch.where(unused, last, positions)
    return positions, (unused if bool(unused.any()) else None)
