"""The kNN memory store: past (key, value) pairs of one attention layer, per batch row and head.

A ring buffer on the model's device: each row writes its real tokens at `(count + rank) % capacity`, so the
oldest entries are overwritten first (FIFO) and slots `[0, size)` are always the valid ones. Rows never share
slots, so a search can only return a row's own entries. The store holds no graph: it is written with detached
tensors and read under `no_grad`; gradients reach the queries through the memory attention, never the store.

A store is a value: `write` and `reset` return a new store and leave the one they were called on as it was, so a
segment recomputed during backward (gradient checkpointing) searches exactly the store it searched the first time.
The price is one copy of the filled slots per write, a pass over memory far cheaper than the search that reads
them for every query.

Search backends return the top-k slots by inner product:
- "torch": exact, blockwise matmul + top-k (CPU and GPU), memory bounded by the block size;
- "faiss": exact `faiss.knn` per row and head on the CPU (imported only when used), faster for large stores.
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["torch", "faiss"]
BACKENDS = ("torch", "faiss")
SCORE_BUDGET = 1 << 25  # score elements computed at once by the torch search (128 MiB in float32)


class KNNStore:
    """A FIFO memory of `capacity` (key, value) pairs per batch row and head."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        value_dim: int | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be ≥ 1, got {capacity}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.capacity = capacity
        if value_dim is not None and value_dim < 1:
            raise ValueError(f"value_dim must be None or ≥ 1, got {value_dim}")
        # Values default to the keys' width; a wider value holds a payload searched by its key (e.g. a chunk).
        value_dim = head_dim if value_dim is None else value_dim
        self.keys = torch.zeros(batch_size, num_heads, capacity, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(batch_size, num_heads, capacity, value_dim, device=device, dtype=dtype)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # [batch] written since reset

    @property
    def size(self) -> torch.Tensor:  # [batch] valid entries per row
        return self.count.clamp(max=self.capacity)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def write(
        self,
        keys: torch.Tensor,  # [batch, heads, length, head_dim]
        values: torch.Tensor,  # [batch, heads, length, head_dim]
        mask: torch.Tensor | None = None,  # [batch, length], 1 = a real token to remember
    ) -> KNNStore:
        """A new store: this one with each row's real tokens appended in order; only the newest `capacity` survive."""
        batch, _, length, _ = keys.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=keys.device)
        mask = mask.to(self.count.device).bool()
        rank = mask.long().cumsum(dim=1) - 1  # [batch, length] position among the row's real tokens
        real = mask.sum(dim=1, keepdim=True)  # [batch, 1]
        keep = mask & (rank >= real - self.capacity)  # a segment longer than the store keeps its tail
        rows, tokens = keep.nonzero(as_tuple=True)  # [entries]
        slots = (self.count[rows] + rank[rows, tokens]) % self.capacity
        out = self._with(self._copy(self.keys), self._copy(self.values), self.count + real.squeeze(1))
        # Advanced indices around a slice: both sides are [entries, heads, head_dim].
        out.keys[rows, :, slots] = keys.detach()[rows, :, tokens].to(self.keys.dtype)
        out.values[rows, :, slots] = values.detach()[rows, :, tokens].to(self.values.dtype)
        return out

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:  # [batch, heads, capacity, width]
        """A copy of the slots that may hold entries, [0, size.max()), and of slot 0 (which `gather` reads for slot
        -1, masked by every reader, so it must hold a number: a zero of the fresh store or an entry); the rest is
        left unset, as nothing reads a slot past its row's size (searches mask them). So a write costs a pass over
        what the store holds, never over its whole capacity."""
        used = max(1, int(self.size.max()))
        out = torch.empty_like(tensor)
        out[:, :, :used] = tensor[:, :, :used]
        return out

    def _with(self, keys: torch.Tensor, values: torch.Tensor, count: torch.Tensor) -> KNNStore:
        """A store of the same capacity holding these tensors."""
        out = KNNStore.__new__(KNNStore)
        out.capacity, out.keys, out.values, out.count = self.capacity, keys, values, count
        return out

    @torch.no_grad()
    def search(
        self,
        queries: torch.Tensor,  # [batch, heads, queries, head_dim]
        k: int,
        backend: Backend = "torch",
    ) -> tuple[torch.Tensor, torch.Tensor]:  # scores, slots: [batch, heads, queries, k]; slot -1 = none
        """The `k` entries of each row and head with the largest inner product with each query."""
        if backend == "torch":
            return torch_search(queries, self.keys, self.size, k)
        if backend == "faiss":
            return faiss_search(queries, self.keys, self.size, k)
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` [batch, heads, queries, k] (-1 reads slot 0; mask it): [..., k, width]."""
        batch, heads, queries, k = slots.shape
        flat = slots.clamp(min=0).reshape(batch, heads, queries * k, 1)
        keys = self.keys.gather(2, flat.expand(-1, -1, -1, self.keys.shape[-1])).view(batch, heads, queries, k, -1)
        values = self.values.gather(2, flat.expand(-1, -1, -1, self.values.shape[-1]))
        values = values.view(batch, heads, queries, k, -1)
        return keys, values

    @torch.no_grad()
    def reset(self, rows: torch.Tensor | None = None) -> KNNStore:
        """A new store: this one with everything forgotten in the rows marked (all rows when None)."""
        if rows is None:
            rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.count.device)
        rows = rows.to(self.count.device).bool()
        keep = lambda t: t.masked_fill(rows.view(-1, *[1] * (t.dim() - 1)), 0)  # noqa: E731
        return self._with(keep(self.keys), keep(self.values), keep(self.count))

    def entries(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's valid keys and values, oldest first: each [heads, size, head_dim] (for inspection and tests)."""
        count, size = int(self.count[row]), int(self.size[row])
        order = (torch.arange(size, device=self.keys.device) + count - size) % self.capacity
        return self.keys[row][:, order], self.values[row][:, order]

    def select(self, rows: torch.Tensor, other: KNNStore) -> KNNStore:
        """This store in the rows marked, `other` elsewhere (a copy; the same store when both are one)."""
        if other is self:
            return self
        where = lambda a, b: torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)  # noqa: E731
        return self._with(
            where(self.keys, other.keys), where(self.values, other.values), where(self.count, other.count)
        )

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def __repr__(self) -> str:
        batch, heads, capacity, head_dim = self.keys.shape
        return f"KNNStore(batch={batch}, heads={heads}, capacity={capacity}, head_dim={head_dim}, size={self.size})"


def torch_search(
    queries: torch.Tensor,  # [batch, heads, queries, head_dim]
    keys: torch.Tensor,  # [batch, heads, capacity, head_dim]
    size: torch.Tensor,  # [batch] valid slots per row: [0, size)
    k: int,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product, one block of keys at a time, keeping a running top-k."""
    batch, heads, num_queries, _ = queries.shape
    best_scores = queries.new_full((batch, heads, num_queries, k), float("-inf"), dtype=torch.float32)
    best_slots = torch.full((batch, heads, num_queries, k), -1, dtype=torch.long, device=queries.device)
    end = int(size.max()) if size.numel() else 0
    if block is None:
        block = max(1024, SCORE_BUDGET // max(1, batch * heads * num_queries))
    queries = queries.to(keys.dtype)
    for start in range(0, end, block):
        stop = min(start + block, end)
        scores = torch.matmul(queries, keys[:, :, start:stop].transpose(-1, -2)).float()  # [b, h, q, block]
        slot = torch.arange(start, stop, device=keys.device)
        scores.masked_fill_(slot.view(1, 1, 1, -1) >= size.view(-1, 1, 1, 1), float("-inf"))
        top_scores, top = scores.topk(min(k, stop - start), dim=-1)
        scores = torch.cat([best_scores, top_scores], dim=-1)
        slots = torch.cat([best_slots, top + start], dim=-1)
        best_scores, pick = scores.topk(k, dim=-1)
        best_slots = slots.gather(-1, pick)
    best_slots = best_slots.masked_fill(best_scores == float("-inf"), -1)
    return best_scores, best_slots


def faiss_search(
    queries: torch.Tensor,  # [batch, heads, queries, head_dim]
    keys: torch.Tensor,  # [batch, heads, capacity, head_dim]
    size: torch.Tensor,  # [batch]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k with faiss-cpu, one call per row and head over that row's valid slots (no index to maintain)."""
    if keys.device.type != "cpu":
        raise ValueError(f"backend='faiss' searches CPU stores only, got a store on {keys.device}; use 'torch'")
    try:
        import faiss
    except ImportError as error:
        raise ValueError("backend='faiss' needs faiss-cpu: pip install faiss-cpu") from error
    batch, heads, num_queries, _ = queries.shape
    scores = torch.full((batch, heads, num_queries, k), float("-inf"))
    slots = torch.full((batch, heads, num_queries, k), -1, dtype=torch.long)
    q = queries.detach().float().cpu().contiguous()
    for row in range(batch):
        n = int(size[row])
        if n == 0:
            continue
        for head in range(heads):
            base = keys[row, head, :n].float().contiguous().numpy()
            found_scores, found = faiss.knn(q[row, head].numpy(), base, min(k, n), metric=faiss.METRIC_INNER_PRODUCT)
            scores[row, head, :, : found.shape[1]] = torch.from_numpy(found_scores)
            slots[row, head, :, : found.shape[1]] = torch.from_numpy(found)
    slots = slots.masked_fill(slots < 0, -1)
    scores = scores.masked_fill(slots < 0, float("-inf"))
    return scores, slots
