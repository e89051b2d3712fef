"""Attention of task tokens onto context keys, without materialising (heads, T, L) weights.

SDPA does not return attention weights, and eager attention materialises (heads, L, L) per layer.
KVCompose needs, per query head and context position, the max (or mean) over task tokens of the
softmax weight exp(l_ij - lse_i). Given each query's log-sum-exp ``lse_i`` (from the fused
attention kernel, see ``service.engine.attention``), a block of queries at a time is enough: for max,
max_i exp(l_ij - lse_i) = exp(max_i (l_ij - lse_i)), so only (heads, L) values are exponentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.engine.attention import attention_with_lse, cap_logits, causal_mask, triton_runs_on


@dataclass
class TaskAttention:
    """Running aggregate over task tokens of attention weights onto the first ``n_context`` keys.

    Holds (query_heads, n_context) float32: the running max of log-weights, or the running sum
    of weights and the count for mean.
    """

    how: str
    n_context: int
    softcap: float | None = None  # Gemma 2's logit soft-capping
    over_context: bool = False  # softmax over the context keys only, instead of every key the query sees
    fused: bool | None = None  # the Triton kernels (``fused_scoring``); None = where they run natively (CUDA)
    total: torch.Tensor | None = None
    count: int = 0

    def add(self, query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int,
            lse: torch.Tensor | None = None, causal: bool = True) -> None:
        """Fold in one pass of task queries.

        query: (heads, T, d), post-RoPE; keys: (kv_heads, K, d). Causal: the T task keys are last,
        so task token i sees keys j <= K - T + i; else every query sees every key. lse: (heads, T)
        log-sum-exp of each query's logits, or None to compute it here.
        """
        heads, t_len, dim = query.shape
        fused = triton_runs_on(query.device) if self.fused is None else self.fused
        if fused:
            from service.engine.presses import fused_scoring

            part = fused_scoring.task_attention(
                query, keys, self.n_context, scale, self.how, lse=None if self.over_context else lse,
                causal=causal and not self.over_context,
                lse_keys=self.n_context if self.over_context else keys.shape[1], softcap=self.softcap)
            return self._fold_part(part, t_len)
        kv_heads = keys.shape[0]
        groups = heads // kv_heads
        if self.over_context:
            lse = torch.zeros(heads, t_len, device=query.device)  # normalised per block below
        elif lse is None:
            lse = self._lse(query, keys.repeat_interleave(groups, dim=0), scale, self.softcap, causal)
        # A GQA group's query heads share one key matrix: (kv_heads, groups * chunk, d) @ (kv_heads, d, L).
        context_t = keys[:, : self.n_context].transpose(1, 2).float()
        for start in range(0, t_len, chunk):
            q = query[:, start : start + chunk].float()
            c = q.shape[1]
            q = q.reshape(kv_heads, groups * c, dim)
            bias = -lse[:, start : start + chunk].float().reshape(kv_heads, groups * c, 1)
            if self.softcap:
                logw = cap_logits(torch.bmm(q, context_t).mul_(scale), self.softcap).add_(bias)
            else:
                logw = torch.baddbmm(bias, q, context_t, alpha=scale)  # scale * q.k - lse, one kernel
            logw = logw.view(heads, c, self.n_context)
            if self.over_context:
                logw -= logw.logsumexp(dim=-1, keepdim=True)
            self._fold(logw)
            del logw

    @staticmethod
    def _lse(query: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float | None,
             causal: bool = True) -> torch.Tensor:
        """(heads, T) log-sum-exp of the queries' logits (causal: the T queries are the last T keys;
        else every query sees every key): the fused kernel on CPU, blockwise elsewhere."""
        if query.device.type == "cpu" and not softcap:
            if causal:
                return attention_with_lse(query[None], keys[None], keys[None], scale)[1][0]
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(query[None], keys[None], keys[None], 0.0, False, scale=scale)[1][0]
        t_len, k_len = query.shape[1], keys.shape[1]
        out = []
        for start in range(0, t_len, 256):
            q = query[:, start : start + 256].float()
            logits = cap_logits(torch.matmul(q, keys.transpose(1, 2).float()).mul_(scale), softcap)
            if causal:
                allowed = causal_mask(t_len, k_len, q.device)[start : start + q.shape[1]]
                logits = logits.masked_fill_(~allowed, float("-inf"))
            out.append(torch.logsumexp(logits, dim=-1))
        return torch.cat(out, dim=1)

    def add_after_context(self, query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int) -> None:
        """Fold in the context's own queries as if placed after it: every query sees every context key
        (the softmax over the context keys). query: (heads, L, d) rotated to positions L..2L-1."""
        self.add(query, keys, scale, chunk, causal=False)

    def _fold(self, logw: torch.Tensor) -> None:
        """logw: (heads, queries, n_context) log-weights of one block of queries."""
        self._fold_part(logw.amax(dim=1) if self.how == "max" else logw.exp_().sum(dim=1), logw.shape[1])

    def _fold_part(self, part: torch.Tensor, count: int) -> None:
        """part: (heads, n_context), the max of log-weights or the sum of weights over ``count`` queries."""
        if self.total is None:
            self.total = part
        elif self.how == "max":
            self.total = torch.maximum(self.total, part)
        else:
            self.total = self.total + part
        self.count += count

    def result(self) -> torch.Tensor:
        """(query_heads, n_context) aggregated attention weights."""
        if self.total is None:
            raise RuntimeError("no task tokens were scored")
        return self.total.exp() if self.how == "max" else self.total / self.count

