"""Attention of task tokens onto context keys, without materialising (heads, T, L) weights.

SDPA does not return attention weights, and eager attention materialises (heads, L, L) per layer.
KVCompose needs, per query head and context position, the max (or mean) over task tokens of the
softmax weight exp(l_ij - lse_i). Given each query's log-sum-exp ``lse_i`` (from the fused
attention kernel, see ``service.attention``), a block of queries at a time is enough: for max,
max_i exp(l_ij - lse_i) = exp(max_i (l_ij - lse_i)), so only (heads, L) values are exponentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.attention import attention_with_lse, cap_logits, causal_mask


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
    total: torch.Tensor | None = None
    count: int = 0

    def add(self, query: torch.Tensor, keys: torch.Tensor, scale: float, chunk: int,
            lse: torch.Tensor | None = None) -> None:
        """Fold in one pass of task queries.

        query: (heads, T, d), post-RoPE; keys: (kv_heads, K, d) with the T task keys last, so task
        token i sees keys j <= K - T + i. lse: (heads, T) log-sum-exp of each query's logits, or
        None to compute it here.
        """
        heads, t_len, dim = query.shape
        kv_heads = keys.shape[0]
        groups = heads // kv_heads
        if self.over_context:
            lse = torch.zeros(heads, t_len, device=query.device)  # normalised per block below
        elif lse is None:
            lse = self._lse(query, keys.repeat_interleave(groups, dim=0), scale, self.softcap)
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
        groups = query.shape[0] // keys.shape[0]
        lse = self._lse(query, keys.repeat_interleave(groups, dim=0), scale, self.softcap, causal=False)
        self.add(query, keys, scale, chunk, lse)

    def _fold(self, logw: torch.Tensor) -> None:
        if self.how == "max":
            part = logw.amax(dim=1)
            self.total = part if self.total is None else torch.maximum(self.total, part)
        else:
            part = logw.exp_().sum(dim=1)
            self.total = part if self.total is None else self.total + part
        self.count += logw.shape[1]

    def result(self) -> torch.Tensor:
        """(query_heads, n_context) aggregated attention weights."""
        if self.total is None:
            raise RuntimeError("no task tokens were scored")
        return self.total.exp() if self.how == "max" else self.total / self.count
