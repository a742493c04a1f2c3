"""The SideNet's fusion layer: local attention and memory attention over retrieved chunks, gated per head."""

from __future__ import annotations

import torch
from torch import nn

from .. import backbones
from ..knn.store import Backend
from .bank import MemoryBank


class JointAttention(nn.Module):
    """The fusion layer's attention: local attention and memory attention over retrieved chunks, gated per head.

    Replaces the `forward` of the SideNet's own copy of an attention module (never the backbone's); the copy's
    projections compute queries, keys and values, its own attention function the local part.
    """

    def __init__(
        self,
        adapter: backbones.AttentionAdapter,
        top_k_chunks: int,
        search: Backend = "torch",
        query_block: int | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter  # a plain dataclass: the attention module is registered by its SideNet layer
        self.top_k_chunks = top_k_chunks
        self.search = search
        self.query_block = query_block  # queries per key-value head retrieved at once; None: all
        # sigmoid(0) = 0.5: memory and local attention weighted equally at first, as in Memorizing Transformers.
        self.gate_bias = nn.Parameter(torch.zeros(adapter.num_heads))
        self.bank: MemoryBank | None = None
        module = adapter.module
        original = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            if self.bank is None:
                return original(*args, **kwargs)
            return self.attend(*args, **kwargs)

        module.forward = forward

    def attend(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        adapter = self.adapter
        call = adapter.split_call(args, kwargs)
        query, key, value = adapter.project(call.hidden)  # pre-rotary: what memory sees
        local_query, local_key = adapter.rotate(query, key, call)
        local_key, local_value = adapter.update_cache(local_key, value, call)  # generation: past + new tokens
        local = adapter.attend(local_query, local_key, local_value, call)  # [b, heads, n, d]
        memory, found = self.memory_attention(query, self.bank)
        g = torch.sigmoid(self.gate_bias).view(1, -1, 1, 1) * found.unsqueeze(-1)  # [b, heads, n, 1]
        out = local + g.to(local.dtype) * (memory - local)  # local·(1 − g) + memory·g
        out = out.transpose(1, 2).reshape(*call.hidden.shape[:-1], -1)  # [b, n, heads · d]
        return adapter.output(out), None

    def memory_attention(
        self,
        query: torch.Tensor,  # [b, heads, n, d] pre-rotary
        bank: MemoryBank,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # out [b, heads, n, d]; found [b, heads, n] float 0/1
        """Softmax attention over the tokens of each query's retrieved chunks; heads of a GQA group share a bank.

        Queries are taken `query_block` at a time (per key-value head, counting every query head of its group), so
        that the retrieved keys and values, [b, kv, block, top_k_chunks · chunk_size, d], never exist for all
        queries at once: without a graph, the peak memory of retrieval is bounded by the block. (With a graph,
        autograd keeps every block's keys and values for the backward, as the unblocked attention would.)
        """
        batch, heads, length, d = query.shape
        kv_heads = self.adapter.num_kv_heads
        grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * length, d)
        block = self.query_block or grouped.shape[2]
        parts = [self._attend_block(part, bank) for part in grouped.split(block, dim=2)]
        out = torch.cat([part for part, _ in parts], dim=2) if len(parts) > 1 else parts[0][0]
        found = torch.cat([part for _, part in parts], dim=2) if len(parts) > 1 else parts[0][1]
        return out.reshape(batch, heads, length, d), found.reshape(batch, heads, length)

    def _attend_block(
        self,
        grouped: torch.Tensor,  # [b, kv, q, d] pre-rotary queries grouped by key-value head
        bank: MemoryBank,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # out [b, kv, q, d]; found [b, kv, q]
        keys, values, valid = bank.retrieve(grouped.detach(), self.top_k_chunks, self.search)
        keys, values = keys.to(grouped.dtype), values.to(grouped.dtype)
        logits = torch.einsum("bhqd,bhqmd->bhqm", grouped, keys) * self.adapter.scaling  # [b, kv, q, k·c]
        logits = logits.float().masked_fill(~valid, float("-inf"))
        weights = logits.softmax(dim=-1).nan_to_num(0.0).to(values.dtype)  # queries with no memory: all 0
        out = torch.einsum("bhqm,bhqmd->bhqd", weights, values)
        return out, valid.any(dim=-1).to(grouped.dtype)

    def extra_repr(self) -> str:
        return (
            f"heads={self.adapter.num_heads}, top_k_chunks={self.top_k_chunks}, search={self.search!r}, "
            f"query_block={self.query_block}"
        )
