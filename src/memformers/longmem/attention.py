"""The SideNet's fusion layer: local attention and memory attention over retrieved chunks, gated per head."""

from __future__ import annotations

import torch
from torch import nn

from .. import backbone_layers
from ..knn.store import Backend
from ..memory_attention import LocalAttention, MemoryAttention
from .bank import MemoryBank


class JointAttention(MemoryAttention):
    """The fusion layer's attention: local attention and memory attention over retrieved chunks, gated per head.

    Takes the place of the `forward` of the SideNet's own copy of an attention module (never the backbone's) while a
    SideNet pass runs (`patched`); the copy's projections compute queries, keys and values, its own attention
    function the local part.
    """

    def __init__(
        self,
        adapter: backbone_layers.AttentionAdapter,
        top_k_chunks: int,
        search: Backend = "torch",
        query_block: int | None = None,
    ) -> None:
        super().__init__(adapter)
        self.top_k_chunks = top_k_chunks
        self.search = search
        self.query_block = query_block  # queries per key-value head retrieved at once; None: all
        # sigmoid(0) = 0.5: memory and local attention weighted equally at first, as in Memorizing Transformers.
        self.gate_bias = nn.Parameter(torch.zeros(adapter.num_heads))
        self.bank: MemoryBank | None = None  # the bank read during a pass

    def read(self, query: torch.Tensor, local: LocalAttention) -> tuple[torch.Tensor, torch.Tensor]:
        memory, found = self.memory_attention(query, self.bank)
        return memory, torch.sigmoid(self.gate_bias).view(1, -1, 1, 1) * found.unsqueeze(-1)  # [b, heads, n, 1]

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
        grouped = self.grouped(query)
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
