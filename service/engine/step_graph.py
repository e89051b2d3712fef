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

Where Triton runs (``attention.triton_runs_on``), a layer's rows are attended by one batched kernel
(``service.engine.ragged_attention``) that reads each row's buffer addresses and length from a table
in device memory. A graph then belongs to a batch size, not to its answers: when answers join or
leave, the new rows' table is written into that size's buffers and its graph replays as it is (one
graph per batch size, kept while the loop lives). Without the kernel (the per-row attention, on CPU
or where Triton fails), a graph holds only while the same answers run.

Once the same batch has run ``CAPTURE_AFTER`` eager steps (joins churn), the next step runs eagerly
on a side stream (the warm-up CUDA graphs need) and is captured for the ones after. Each graph's
first replay is checked against an eager run of the same step; a graph that cannot be captured or
does not match turns graphs off for that loop, with a log line, and the static steps go on eagerly.
``state`` says which: ``captured`` or ``eager (<reason>)``. Off CUDA, or with
``decode_batch.cuda_graphs: false``, steps are eager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import DynamicLayer

from service.engine.attention import triton_runs_on
from service.engine.decode import ReservedLayer

log = logging.getLogger(__name__)


class StaticLayer(DynamicLayer):
    """One layer of a static step. ``update`` writes each row's new key and value at its ``write_at``
    slot and un-hides it: with the batched kernel through the layer's row ``table`` (and returns the
    ``RaggedRows`` the attention function hands the kernel), else row by row (and returns the buffers)."""

    def __init__(self, write_at: torch.Tensor, table: torch.Tensor | None, kv_heads: int, n_splits: int):
        super().__init__()
        self.write_at, self.table, self.kv_heads, self.n_splits = write_at, table, kv_heads, n_splits
        self.rows: list[ReservedLayer] = []
        self.hidden: list[torch.Tensor] = []
        self.is_initialized = True

    def bind(self, rows: list[ReservedLayer], hidden: list[torch.Tensor]) -> None:
        self.rows, self.hidden = rows, hidden
        self.dtype, self.device = rows[0].dtype, rows[0].device

    def update(self, key_states, value_states, cache_kwargs=None):
        if self.table is not None:
            from service.engine import ragged_attention

            rows = ragged_attention.RaggedRows(self.table, self.write_at, self.kv_heads, self.n_splits)
            ragged_attention.append(rows, key_states, value_states)
            return rows, None
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


@dataclass
class _Batch:
    """One batch size's fixed buffers, cache and graph: what a captured step reads and writes."""

    ids: torch.Tensor  # (B, 1) input ids
    positions: torch.Tensor  # (B, 1)
    write_at: torch.Tensor  # (layers, B): each row's next slot per layer
    tables: torch.Tensor | None  # (layers, B, 4) row buffer addresses for the kernel, None: row by row
    cache: Cache
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None
    checked: bool = False  # its first replay was compared with an eager run
    eager_steps: int = 0


class StepGraph:
    """Static decode steps for one loop: ``step`` returns one step's (B, vocab) logits.

    caches: one ``ReservedLayer`` cache of batch 1 per answer, with room left; evicted: each answer's
    per-layer head-wise masks; tokens, positions: each answer's last token and its position.
    kernel: the batched ragged kernel (default: where Triton runs on the model's device).
    """

    CAPTURE_AFTER = 2  # eager steps of the same answers before a graph is captured (joins churn)

    def __init__(self, model: torch.nn.Module, capture: bool, kernel: bool | None = None):
        self.model = model
        self.capture = capture
        self.kernel = triton_runs_on(model.device) if kernel is None else kernel
        self._why = "not CUDA" if model.device.type != "cuda" else "cuda_graphs off" if not capture else "warming up"
        self._batches: dict[int, _Batch] = {}
        self._batch: _Batch | None = None
        self._rows: list[list[ReservedLayer]] | None = None

    @property
    def state(self) -> str:
        """``captured`` when the current batch's steps replay a checked graph, else ``eager (<reason>)``."""
        b = self._batch
        return "captured" if b is not None and b.graph is not None and b.checked else f"eager ({self._why})"

    def step(self, caches: list[Cache], evicted: list[list[torch.Tensor | None]], tokens: list[int],
             positions: list[int]) -> torch.Tensor:
        if not self._same_rows(caches):
            self._bind(caches, evicted)
        b = self._batch
        self._inputs(tokens, positions)
        if b.graph is not None:
            if not b.checked:
                return self._check()
            b.graph.replay()
            self._advance_host()
            return b.out
        b.eager_steps += 1
        if self.capture and b.eager_steps >= self.CAPTURE_AFTER:
            return self._eager_then_capture()
        return self._run()

    def forget(self) -> None:
        """Drop every reference to the answers' buffers (the loop is idle, or its answers changed).
        Kernel graphs stay: they read the rows through tables, rewritten before their next replay."""
        if not self.kernel:
            self._batches.clear()
        for b in self._batches.values():
            for layer in b.cache.layers:
                layer.rows, layer.hidden = [], []
        self._batch, self._rows = None, None

    def _same_rows(self, caches: list[Cache]) -> bool:
        # by identity of the layers this object holds (so they are alive): a finished answer's id() may be reused
        return self._rows is not None and len(caches) == len(self._rows[0]) and \
            all(c.layers[0] is row for c, row in zip(caches, self._rows[0]))

    # -- the static step ----------------------------------------------------------------------

    def _bind(self, caches: list[Cache], evicted: list[list[torch.Tensor | None]]) -> None:
        """Point a batch of this size at these answers: its buffers are rewritten in place."""
        if not self.kernel:
            self.forget()  # a row-by-row graph holds the old answers' buffers
        layers = range(len(caches[0].layers))
        self._rows = [[c.layers[i] for c in caches] for i in layers]
        hidden = [[hidden_slots(c.layers[i], e[i]) for c, e in zip(caches, evicted)] for i in layers]
        b = self._batches.get(len(caches)) or self._new_batch(len(caches), len(layers))
        b.write_at.copy_(torch.tensor([[row._n for row in rows] for rows in self._rows], device="cpu"))
        if b.tables is not None:
            from service.engine.ragged_attention import table

            b.tables.copy_(torch.stack([table([r._k for r in rows], [r._v for r in rows], h)
                                        for rows, h in zip(self._rows, hidden)]))
        for layer, rows, h in zip(b.cache.layers, self._rows, hidden):
            layer.bind(rows, h)  # the layer keeps the masks alive while its table points at them
        b.eager_steps = 0
        self._batch = self._batches[len(caches)] = b

    def _new_batch(self, size: int, layers: int) -> _Batch:
        from service.engine.ragged_attention import TABLE_COLUMNS, splits_for

        device = self.model.device
        write_at = torch.zeros(layers, size, dtype=torch.long, device=device)
        tables = torch.zeros(layers, size, TABLE_COLUMNS, dtype=torch.long, device=device) if self.kernel else None
        kv_heads = self.model.config.num_key_value_heads
        splits = splits_for(device, size, kv_heads)
        cache = Cache(layers=[StaticLayer(write_at[i], tables[i] if tables is not None else None, kv_heads, splits)
                              for i in range(layers)])
        return _Batch(torch.zeros(size, 1, dtype=torch.long, device=device),
                      torch.zeros(size, 1, dtype=torch.long, device=device), write_at, tables, cache)

    def _inputs(self, tokens: list[int], positions: list[int]) -> None:
        # staged on the host, then copied into the buffers the graph reads
        self._batch.ids.copy_(torch.tensor(tokens, dtype=torch.long, device="cpu").unsqueeze(1))
        self._batch.positions.copy_(torch.tensor(positions, dtype=torch.long, device="cpu").unsqueeze(1))

    def _forward(self) -> torch.Tensor:
        """The step's device work: one forward over the static cache, then every write slot advances."""
        b = self._batch
        hidden = None if b.tables is not None else [layer.hidden for layer in b.cache.layers]
        out = self.model(input_ids=b.ids, position_ids=b.positions, past_key_values=b.cache,
                         kvc_evicted=hidden, kvc_static=True, logits_to_keep=1)
        b.write_at.add_(1)
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
        b = self._batch
        try:
            graph = torch.cuda.CUDAGraph()  # its own memory pool: graphs of several batch sizes are kept
            # thread_local: the replica's other threads (fetched caches moving to the GPU) go on meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # recorded, not run
                b.out = self._forward()
            b.graph = graph
        except Exception as e:  # noqa: BLE001 - a step that cannot be captured still runs eagerly
            log.exception("a decode step could not be captured as a CUDA graph: eager steps from now on")
            self._graphs_off(f"capture failed: {type(e).__name__}")
        return logits

    def _check(self) -> torch.Tensor:
        """Replay, then run the same step eagerly (it rewrites the same slots with the same values)."""
        b = self._batch
        b.graph.replay()
        replayed = b.out.float()
        b.write_at.sub_(1)
        eager = self._run()
        b.checked = True
        if not torch.allclose(replayed, eager.float(), rtol=2e-2, atol=2e-2):
            log.error("a replayed decode step differs from its eager run (max diff %.3g): eager steps from now on",
                      float((replayed - eager.float()).abs().max()))
            self._graphs_off("replay mismatch")
        return eager

    def _graphs_off(self, why: str) -> None:
        self.capture, self._why = False, why
        for b in self._batches.values():
            b.graph, b.out = None, None
