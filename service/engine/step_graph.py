"""A decode step of a fixed set of answers, static enough to be replayed as one CUDA graph.

A batch-1 step of an 8B model reads its 16 GB of weights: about 3.3 ms on an H200. Launched op by op
from Python (hundreds of kernels per step, each with its host overhead) the step took 60 ms (16.5
tokens/s). A CUDA graph replays all of a step's kernels with one launch, but it fixes every tensor's
address and shape, so the step is written static:

- each answer's cache layer is a fixed buffer with room for its answer (``decode.ReservedLayer``);
  the new token's key and value are written at a slot held in a device tensor (``write_at``), which
  the step itself advances, instead of slicing by a host integer;
- attention reads each whole buffer (``attention.decode_attention``) under a per-layer
  (kv_heads, capacity) mask of hidden slots (not yet written, or evicted by a head-wise press); the
  step un-hides the slot it writes;
- the input ids and positions are copied into fixed buffers before each replay.

A graph holds while the same answers run (their buffers stay put). When one joins or leaves, the
steps run eagerly; once the same answers have run ``CAPTURE_AFTER`` steps (joins churn), the next
step runs eagerly on a side stream (the warm-up CUDA graphs need) and is captured for the ones after.
The first graph a loop captures is checked once against an eager run of the same step; a graph
that cannot be captured or does not match turns graphs off for that loop, with a log line, and the
static steps go on eagerly. Off CUDA, or with ``decode_batch.cuda_graphs: false``, steps are eager.
"""

from __future__ import annotations

import logging

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from service.engine.decode import ReservedLayer

log = logging.getLogger(__name__)


class StaticLayer(DynamicLayer):
    """One layer of a static step: the rows' whole buffers; ``update`` writes each row's new key and
    value at its ``write_at`` slot and un-hides it."""

    def __init__(self, rows: list[ReservedLayer], hidden: list[torch.Tensor], write_at: torch.Tensor):
        super().__init__()
        self.rows, self.hidden, self.write_at = rows, hidden, write_at
        self.is_initialized = True
        self.dtype, self.device = rows[0].dtype, rows[0].device

    def update(self, key_states, value_states, cache_kwargs=None):
        for r, row in enumerate(self.rows):
            at = self.write_at[r : r + 1]
            row._k[0].index_copy_(1, at, key_states[r])
            row._v[0].index_copy_(1, at, value_states[r])
            self.hidden[r].index_fill_(2, at, False)
        return [row._k for row in self.rows], [row._v for row in self.rows]

    def get_seq_length(self) -> int:
        return max(row.get_seq_length() for row in self.rows)


def hidden_slots(layer: ReservedLayer, evicted: torch.Tensor | None) -> torch.Tensor:
    """(1, kv_heads, capacity) bool: True where the row's layer may not be attended: slots past its
    filled length, and cached slots a head-wise press evicted ((kv_heads, cached) ``evicted``)."""
    _, heads, capacity, _ = layer._k.shape
    hidden = torch.ones(1, heads, capacity, dtype=torch.bool, device=layer._k.device)
    hidden[:, :, : layer._n] = False
    if evicted is not None:
        hidden[0, :, : evicted.shape[1]] = evicted.to(layer._k.device)
    return hidden


class StepGraph:
    """Static decode steps for one loop: ``step`` returns one step's (B, vocab) logits.

    caches: one ``ReservedLayer`` cache of batch 1 per answer, with room left; evicted: each answer's
    per-layer head-wise masks; tokens, positions: each answer's last token and its position.
    """

    CAPTURE_AFTER = 2  # eager steps of the same answers before a graph is captured (joins churn)

    def __init__(self, model: torch.nn.Module, capture: bool):
        self.model = model
        self.capture = capture
        self.checked = False  # the first captured graph is compared with an eager run once
        self._pool = None
        self.forget()

    def step(self, caches: list[Cache], evicted: list[list[torch.Tensor | None]], tokens: list[int],
             positions: list[int]) -> torch.Tensor:
        if not self._same_rows(caches):
            self._build(caches, evicted)
            self._eager_steps = 0
        self._inputs(tokens, positions)
        if self._graph is not None:
            if not self.checked:
                return self._check()
            self._graph.replay()
            self._advance_host()
            return self._out
        self._eager_steps += 1
        if self.capture and self._eager_steps >= self.CAPTURE_AFTER:
            return self._eager_then_capture()
        return self._run()

    def forget(self) -> None:
        """Drop every reference to the answers' buffers (the loop is idle, or its answers changed)."""
        self._graph, self._out = None, None
        self._cache, self._hidden, self._rows = None, None, None

    def _same_rows(self, caches: list[Cache]) -> bool:
        # by identity of the layers this object holds (so they are alive): a finished answer's id() may be reused
        return self._rows is not None and len(caches) == len(self._rows[0]) and \
            all(c.layers[0] is row for c, row in zip(caches, self._rows[0]))

    # -- the static step ----------------------------------------------------------------------

    def _build(self, caches: list[Cache], evicted: list[list[torch.Tensor | None]]) -> None:
        self.forget()  # the old graph's buffers belong to the old answers
        device = self.model.device
        layers = range(len(caches[0].layers))
        self._ids = torch.zeros(len(caches), 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(len(caches), 1, dtype=torch.long, device=device)
        self._rows = [[c.layers[i] for c in caches] for i in layers]
        self._hidden = [[hidden_slots(c.layers[i], e[i]) for c, e in zip(caches, evicted)] for i in layers]
        self._write_at = torch.tensor([[row._n for row in rows] for rows in self._rows], device=device)
        self._cache = Cache(layers=[StaticLayer(self._rows[i], self._hidden[i], self._write_at[i]) for i in layers])

    def _inputs(self, tokens: list[int], positions: list[int]) -> None:
        # staged on the host, then copied into the buffers the graph reads
        self._ids.copy_(torch.tensor(tokens, dtype=torch.long, device="cpu").unsqueeze(1))
        self._positions.copy_(torch.tensor(positions, dtype=torch.long, device="cpu").unsqueeze(1))

    def _forward(self) -> torch.Tensor:
        """The step's device work: one forward over the static cache, then every write slot advances."""
        out = self.model(input_ids=self._ids, position_ids=self._positions, past_key_values=self._cache,
                         kvc_evicted=self._hidden, kvc_static=True, logits_to_keep=1)
        self._write_at.add_(1)
        return out.logits[:, -1]

    def _run(self) -> torch.Tensor:
        logits = self._forward()
        self._advance_host()
        return logits

    def _advance_host(self) -> None:
        """The host's view of each buffer's filled length follows the device's write slots."""
        for rows in self._rows:
            for row in rows:
                row._n += 1
                row._views()

    # -- graphs ---------------------------------------------------------------------------------

    def _eager_then_capture(self) -> torch.Tensor:
        """This step eagerly (on a side stream, as a warm-up must be), then capture it for the next."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._run().clone()
        torch.cuda.current_stream().wait_stream(stream)
        try:
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the replica's other threads (fetched caches moving to the GPU) go on meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):  # recorded, not run
                self._out = self._forward()
            self._graph = graph
        except Exception:  # noqa: BLE001 - a step that cannot be captured still runs eagerly
            log.exception("a decode step could not be captured as a CUDA graph: eager steps from now on")
            self.capture = False
        return logits

    def _check(self) -> torch.Tensor:
        """Replay, then run the same step eagerly (it rewrites the same slots with the same values)."""
        self._graph.replay()
        replayed = self._out.float()
        self._write_at.sub_(1)
        eager = self._run()
        self.checked = True
        if not torch.allclose(replayed, eager.float(), rtol=2e-2, atol=2e-2):
            log.error("a replayed decode step differs from its eager run (max diff %.3g): eager steps from now on",
                      float((replayed - eager.float()).abs().max()))
            self.capture, self._graph = False, None
        return eager
