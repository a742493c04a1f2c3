"""The LongMem memory bank: a row's most recent tokens of one backbone layer, in chunks indexed by their mean key.

A `KNNStore` per batch row and key-value head: its keys are chunk-mean keys (the search index) and its values the
chunk's token keys, values and a validity flag, FIFO over `memory_size // chunk_size` chunks. Rows never share
slots, so a row can only retrieve its own past.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knn.store import Backend, KNNStore


@dataclass
class MemoryBank:
    """The LongMem state: each row's most recent chunks of the memory layer's keys and values, FIFO.

    `store.keys` [batch, kv_heads, chunks, head_dim] are chunk-mean keys (the search index); `store.values`
    [batch, kv_heads, chunks, chunk_size · (2·head_dim + 1)] hold per token its key, its value and a 1 (0 = empty
    place in a chunk that was cut short by the end of a segment). A value, like its store: writing returns a new
    bank. It holds no graph.
    """

    store: KNNStore
    chunk_size: int

    def detach(self) -> MemoryBank:
        return self  # nothing in the bank carries gradients

    def reset(self, rows: torch.Tensor) -> MemoryBank:
        return MemoryBank(self.store.reset(rows), self.chunk_size)

    def select(self, rows: torch.Tensor, other: MemoryBank) -> MemoryBank:
        return MemoryBank(self.store.select(rows, other.store), self.chunk_size)

    @property
    def head_dim(self) -> int:
        return self.store.keys.shape[-1]

    @torch.no_grad()
    def write(
        self,
        keys: torch.Tensor,  # [batch, kv_heads, length, head_dim] pre-rotary
        values: torch.Tensor,  # [batch, kv_heads, length, head_dim]
        mask: torch.Tensor,  # [batch, length] 1 = a real token to remember
    ) -> MemoryBank:
        """A new bank: this one with each row's real tokens, in order, cut into chunks of `chunk_size` and appended."""
        batch, heads, length, d = keys.shape
        c = self.chunk_size
        mask = mask.to(keys.device).bool()
        rank = mask.long().cumsum(dim=1) - 1  # [batch, length] place among the row's real tokens
        num_chunks = -(-length // c)
        payload = keys.new_zeros(batch, heads, num_chunks, c, 2 * d + 1)
        rows, tokens = mask.nonzero(as_tuple=True)  # [entries]
        chunk, place = rank[rows, tokens] // c, rank[rows, tokens] % c
        # Advanced indices around a slice: both sides are [entries, heads, d].
        payload[rows, :, chunk, place, :d] = keys.detach()[rows, :, tokens]
        payload[rows, :, chunk, place, d : 2 * d] = values.detach()[rows, :, tokens]
        payload[rows, :, chunk, place, 2 * d] = 1
        valid = payload[..., 2 * d]  # [batch, heads, chunks, c]
        mean_keys = payload[..., :d].sum(dim=3) / valid.sum(dim=3, keepdim=True).clamp(min=1)
        chunk_mask = valid[:, 0].any(dim=-1)  # [batch, chunks]
        return MemoryBank(self.store.write(mean_keys, payload.flatten(-2), chunk_mask), self.chunk_size)

    @torch.no_grad()
    def retrieve(
        self,
        queries: torch.Tensor,  # [batch, kv_heads, queries, head_dim]
        top_k_chunks: int,
        backend: Backend = "torch",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # keys, values [b, kv, q, k·c, d]; valid [b, kv, q, k·c]
        """The tokens of each query's `top_k_chunks` chunks by inner product with their mean keys."""
        batch, heads, num_queries, d = queries.shape
        _, slots = self.store.search(queries, top_k_chunks, backend)  # [b, kv, q, k]; -1 = nothing there
        _, payload = self.store.gather(slots)  # [b, kv, q, k, c · (2d + 1)]
        payload = payload.view(batch, heads, num_queries, slots.shape[-1], self.chunk_size, 2 * d + 1)
        valid = (payload[..., 2 * d] > 0) & (slots >= 0).unsqueeze(-1)  # [b, kv, q, k, c]
        keys = payload[..., :d].flatten(3, 4)
        values = payload[..., d : 2 * d].flatten(3, 4)
        return keys, values, valid.flatten(3, 4)

    def chunks(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A row's chunks, oldest first: keys, values [kv_heads, chunks, c, d], valid [chunks, c] (for tests)."""
        _, payload = self.store.entries(row)
        heads, n, _ = payload.shape
        payload = payload.view(heads, n, self.chunk_size, -1)
        d = self.head_dim
        return payload[..., :d], payload[..., d : 2 * d], payload[0, ..., 2 * d] > 0

    def nbytes(self) -> int:
        return self.store.nbytes()
