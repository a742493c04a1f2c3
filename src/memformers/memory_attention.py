"""The base of attention layers that also read a memory (kNN memory, LongMem's fusion layer).

Such a layer computes, from one decoder layer's own weights (through its `backbone_layers.AttentionAdapter`):
- local attention over the segment with the layer's own attention function (rotary, mask and generation cache as
  the backbone has them), so that where memory gets no weight the layer's output is bit-identical;
- memory attention from the pre-rotary queries (memories carry no positions): the mechanism's own search;
- their mix per head, before the layer's output projection: `out = local·(1 − g) + memory·g`, with the
  mechanism's own gate g ([batch, heads, n, 1]; exactly local where g = 0).

The layer takes the place of the attention module's `forward` only inside `patched()`, which a mechanism enters
for one pass of the backbone and always leaves: before and after, the module (the user's backbone's, or a copy the
mechanism owns) is exactly as it was. A subclass implements `read` (search and gate) and may implement `after_read`
(a kNN layer remembers the segment there, after reading, so a segment never retrieves itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .backbone_layers import AttentionAdapter, AttentionCall


@dataclass
class LocalAttention:
    """The layer's own attention over the segment, with what computed it (a joint softmax needs its scores)."""

    query: torch.Tensor  # [b, heads, n, d] positions applied
    key: torch.Tensor  # [b, kv_heads, past + n, d] positions applied, generation cache included
    output: torch.Tensor  # [b, heads, n, d]
    call: AttentionCall


class MemoryAttention(nn.Module):
    """One attention layer reading a memory; subclasses say how it is searched (`read`) and written (`after_read`)."""

    def __init__(self, adapter: AttentionAdapter) -> None:
        super().__init__()
        self.adapter = adapter  # a plain dataclass: the attention module is not registered as ours

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """This layer computes the module's attention for the duration of the block; its own forward after."""
        module = self.adapter.module
        if "forward" in module.__dict__:
            raise ValueError(
                f"backbone: layer {self.adapter.layer}'s attention already reads a memory (a memory pass inside "
                "another on the same backbone); run one mechanism's pass at a time"
            )
        module.forward = self.attend
        try:
            yield
        finally:
            del module.forward

    def attend(self, *args, **kwargs) -> tuple[torch.Tensor, None]:
        """The module's forward while patched: local and memory attention mixed by the gate."""
        adapter = self.adapter
        call = adapter.split_call(args, kwargs)
        query, key, value = adapter.project(call.hidden)  # pre-rotary: what memory sees
        local_query, local_key = adapter.rotate(query, key, call)
        local_key, local_value = adapter.update_cache(local_key, value, call)  # generation: past + new tokens
        local = adapter.attend(local_query, local_key, local_value, call)  # [b, heads, n, d], the layer's own
        memory, g = self.read(query, LocalAttention(local_query, local_key, local, call))
        out = local + g.to(local.dtype) * (memory - local)  # local·(1 − g) + memory·g; exactly local where g = 0
        self.after_read(key, value)
        out = out.transpose(1, 2).reshape(*call.hidden.shape[:-1], -1)  # [b, n, heads · d]
        return adapter.output(out), None

    def read(
        self, query: torch.Tensor, local: LocalAttention
    ) -> tuple[torch.Tensor, torch.Tensor]:  # memory [b, heads, n, d]; gate [b, heads, n, 1]
        """Memory attention for pre-rotary `query` [b, heads, n, d] and each head's share g of it."""
        raise NotImplementedError

    def after_read(self, key: torch.Tensor, value: torch.Tensor) -> None:  # [b, kv_heads, n, d] pre-rotary
        """What the layer does with the segment's own keys and values once memory has been read (default: nothing)."""

    def grouped(self, query: torch.Tensor) -> torch.Tensor:  # [b, heads, n, d] → [b, kv_heads, group · n, d]
        """Queries by key-value head: the query heads of a GQA group read that group's memory together."""
        batch, heads, length, head_dim = query.shape
        return query.reshape(batch, self.adapter.num_kv_heads, (heads // self.adapter.num_kv_heads) * length, head_dim)
