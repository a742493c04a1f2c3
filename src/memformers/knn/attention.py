"""kNN-augmented attention (Memorizing Transformers, arXiv 2203.08913) for one decoder layer of a pretrained model.

A `MemoryAttention` layer (see `memformers.memory_attention`: local attention with the layer's own weights, the
mix `out = local·(1 − g) + memory·g`, patching only for the duration of a pass) whose memory is a `KNNStore`:
- search: each query's top-k (key, value) pairs, no positions (pre-rotary queries and keys), retrieved before the
  segment's own keys and values are written (a new store, kept for the step's new state);
- gate, per head:
  - combine="gate" (the paper): `g = mix · sigmoid(gate_bias)`;
  - combine="joint" (one softmax over [memory ; local]): `g = mix · sigmoid(gate_bias + lse_memory − lse_local)`,
    which with mix = 1 and gate_bias = 0 is exactly a joint softmax.
  `mix` is zero-initialised, so g = 0 exactly and the pretrained model's outputs are unchanged until fine-tuning
  moves it (its gradient is not zero: `mix` learns first, then `gate_bias`, which starts at the paper's 0).
Queries with nothing in memory use g = 0.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone_layers import AttentionAdapter
from ..memory_attention import LocalAttention, MemoryAttention
from .store import Backend, KNNStore

Combine = Literal["gate", "joint"]
COMBINES = ("gate", "joint")


class KNNAttention(MemoryAttention):
    """The trainable part of one memory layer (gate, mix, temperature), its search and its write."""

    def __init__(
        self,
        adapter: AttentionAdapter,
        top_k: int = 32,
        combine: Combine = "gate",
        normalize_keys: bool = False,
        search: Backend = "torch",
    ) -> None:
        super().__init__(adapter)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.top_k = top_k
        self.combine = combine
        self.normalize_keys = normalize_keys
        self.search = search
        heads = adapter.num_heads
        self.gate_bias = nn.Parameter(torch.zeros(heads))  # the paper's init: sigmoid(0) = 0.5
        self.mix = nn.Parameter(torch.zeros(heads))  # zero: the pretrained model is unchanged at first
        # Normalised keys lose their scale; a learned per-head temperature gives it back (init: √head_dim).
        self.log_temperature = nn.Parameter(torch.full((heads,), 0.5 * math.log(adapter.head_dim)))
        if not normalize_keys:
            self.log_temperature.requires_grad_(False)
        self.store: KNNStore | None = None  # during a pass: the store read, then the one written
        self.write_mask: torch.Tensor | None = None  # [batch, length] tokens to remember; None = read only

    def read(self, query: torch.Tensor, local: LocalAttention) -> tuple[torch.Tensor, torch.Tensor]:
        local_lse = None
        if self.combine == "joint":  # [b, heads, n]
            local_lse = attention_lse(local.query, local.key, local.call.attention_mask, self.adapter.scaling)
        memory, memory_lse = self.memory_attention(query, self.store)
        return memory, self.gate(memory_lse, local_lse)

    def after_read(self, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.write_mask is not None:  # retrieve before write
            memory_key = F.normalize(key, dim=-1) if self.normalize_keys else key
            self.store = self.store.write(memory_key, value, self.write_mask)

    def memory_attention(
        self,
        query: torch.Tensor,  # [b, heads, n, d] pre-rotary
        store: KNNStore,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # out [b, heads, n, d]; log-sum-exp [b, heads, n] (-inf: no memory)
        """Attention over each query's top-k memories; the store's heads are the key-value heads (GQA groups)."""
        batch, heads, length, head_dim = query.shape
        kv_heads = self.adapter.num_kv_heads
        group = heads // kv_heads
        if self.normalize_keys:
            query = F.normalize(query, dim=-1)
            scale = self.log_temperature.exp().view(1, kv_heads, group, 1, 1)
        else:
            scale = self.adapter.scaling
        grouped = self.grouped(query)  # heads of one group share a store
        _, slots = store.search(grouped.detach(), self.top_k, self.search)  # [b, kv_heads, group * n, k]
        keys, values = store.gather(slots)  # [b, kv_heads, group * n, k, d], no graph
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        logits = torch.einsum("bhqd,bhqkd->bhqk", grouped, keys)  # gradients reach the queries only
        logits = logits.view(batch, kv_heads, group, length, -1) * scale
        logits = logits.float().masked_fill((slots < 0).view_as(logits), float("-inf"))
        lse = logits.logsumexp(dim=-1)  # [b, kv_heads, group, n]
        weights = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0).to(values.dtype)  # rows with no memory: 0
        out = torch.einsum("bhgqk,bhgqkd->bhgqd", weights, values.view(batch, kv_heads, group, length, -1, head_dim))
        return out.reshape(batch, heads, length, head_dim), lse.reshape(batch, heads, length)

    def gate(self, memory_lse: torch.Tensor, local_lse: torch.Tensor | None) -> torch.Tensor:  # [b, heads, n, 1]
        """The share g of memory in each head's output (0 where a query has no memory)."""
        bias = self.gate_bias.view(1, -1, 1)
        if local_lse is not None:
            bias = bias + (memory_lse - local_lse).nan_to_num(neginf=-torch.inf)
        g = self.mix.view(1, -1, 1) * torch.sigmoid(bias)
        g = torch.where(torch.isfinite(memory_lse), g, torch.zeros_like(g))
        return g.unsqueeze(-1)

    def extra_repr(self) -> str:
        return (
            f"layer={self.adapter.layer}, top_k={self.top_k}, combine={self.combine!r}, "
            f"normalize_keys={self.normalize_keys}, search={self.search!r}"
        )


def attention_lse(
    query: torch.Tensor,  # [b, heads, n, d] rotary applied
    key: torch.Tensor,  # [b, kv_heads, m, d]
    attention_mask: torch.Tensor | None,  # the backbone's: None (causal), bool [b, 1, n, m] or additive float
    scaling: float,
) -> torch.Tensor:  # [b, heads, n]
    """Each query's log-sum-exp over its local scores: how much a joint softmax gives to local keys."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling  # [b, heads, n, m]
    scores = scores + mask_bias(attention_mask, scores.shape[-2], scores.shape[-1], scores.device)
    return scores.logsumexp(dim=-1)


def mask_bias(
    attention_mask: torch.Tensor | None, queries: int, keys: int, device: torch.device
) -> torch.Tensor:  # [b or 1, 1, queries, keys] additive float
    """The backbone's attention mask, whatever its form, as an additive bias (0 = attend, -inf = not)."""
    if attention_mask is None:  # causal; queries are the last `queries` of the keys (generation cache)
        q = torch.arange(queries, device=device).view(-1, 1) + (keys - queries)
        allowed = torch.arange(keys, device=device).view(1, -1) <= q
        return torch.zeros((), device=device).masked_fill(~allowed, float("-inf")).view(1, 1, queries, keys)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask: the joint softmax needs the backbone's 4-D mask (eager or sdpa attention), got shape "
            f"{tuple(attention_mask.shape)}; use combine='gate', or attn_implementation='sdpa' or 'eager'"
        )
    attention_mask = attention_mask[..., :keys]
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=device).masked_fill(~attention_mask, float("-inf"))
    return attention_mask.float()
