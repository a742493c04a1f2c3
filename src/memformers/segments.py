"""Cutting long inputs into segments: the unit every memory mechanism steps over.

A batch of long documents becomes a sequence of `Segment`s of at most `content_size` tokens per row. Rows may have
different lengths: a row with nothing left in a segment is *inactive* there, and the driver carries its state
through unchanged, so documents in one batch never influence each other and each row ends on its own segment.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Alignment = Literal["left", "right"]
IGNORE_INDEX = -100


@dataclass
class Segment:
    """One segment of a batch: the tokens of every row for this step, right-padded."""

    input_ids: torch.Tensor  # [batch, length] long
    attention_mask: torch.Tensor  # [batch, length] long, 1 = real token
    labels: torch.Tensor | None = None  # [batch, length] token targets, already aligned (IGNORE_INDEX = none)
    index: int = 0  # 0-based position of this segment in the document
    is_last: torch.Tensor | None = None  # [batch] bool: this is the row's final segment

    @property
    def active(self) -> torch.Tensor:  # [batch] bool: the row has at least one token here
        return self.attention_mask.any(dim=1)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Segment:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Segment(
            move(self.input_ids), move(self.attention_mask), move(self.labels), self.index, move(self.is_last)
        )


def count_segments(tokens: int, content_size: int) -> int:
    """How many segments of `content_size` tokens `tokens` tokens fill (the last one possibly partly)."""
    return -(-tokens // content_size)


def right_aligned_sizes(tokens: int, content_size: int) -> list[int]:
    """The content sizes of a right-aligned row's first segments (every later one is full): every segment full but
    the remainder's, which is read second when the row has three segments or more and first when it has two, so
    that the last segment is always full. The first segment stays full where it can because an ARMT whose every
    position writes takes its normalizer's scale from the first segment's writes: a first segment of 4 tokens
    (4,096 = 4 + 66 × 62) left reads 3.5× too strong for the whole input (README, "qa1 across segments")."""
    count, remainder = count_segments(tokens, content_size), tokens % content_size
    if not remainder:
        return []
    return [remainder] if count <= 2 else [content_size, remainder]


def segment_starts(tokens: int, content_size: int, alignment: Alignment = "right") -> list[int]:
    """The first token of each segment a row of `tokens` tokens is cut into, as `split_into_segments` and a stream
    with `right_aligned_sizes` cut it: where a story's facts and question fall."""
    count = count_segments(tokens, content_size)
    leading = right_aligned_sizes(tokens, content_size) if alignment == "right" else []
    sizes = leading + [content_size] * (count - len(leading))
    return list(itertools.accumulate(sizes[:-1], initial=0))


def segment_of(position: int, tokens: int, content_size: int, alignment: Alignment = "right") -> int:
    """The index of the segment holding token `position` of a row of `tokens` tokens (`segment_starts`)."""
    return bisect.bisect_right(segment_starts(tokens, content_size, alignment), position) - 1


def check_input_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate a [batch, length] batch of ids and return its attention mask (all ones when not given)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        raise ValueError("input_ids must be 2-D [batch, length]; add a batch dimension with input_ids[None]")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, length], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token per row")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype.is_floating_point and not torch.all((attention_mask == 0) | (attention_mask == 1)):
        raise ValueError("attention_mask must hold only 0 and 1")
    attention_mask = attention_mask.long()
    if not attention_mask.any(dim=1).all():
        raise ValueError("attention_mask: every row needs at least one real token (a 1)")
    return attention_mask


def as_segment(segment: Segment | torch.Tensor) -> Segment:
    """Accept a bare [batch, length] id tensor wherever a `Segment` is expected."""
    if isinstance(segment, Segment):
        return segment
    mask = check_input_ids(segment, None)
    return Segment(segment, mask, None, 0, None)


def split_into_segments(
    input_ids: torch.Tensor,  # [batch, length]
    content_size: int,
    attention_mask: torch.Tensor | None = None,  # [batch, length], 1 = real token (padding anywhere)
    labels: torch.Tensor | None = None,  # [batch, length] token targets, aligned with input_ids
    alignment: Alignment = "left",
) -> list[Segment]:
    """Cut every row's real tokens into segments of `content_size`.

    `alignment="left"` starts each row at segment 0, so the last segment of a row may be partial and shorter rows
    end early; `"right"` ends every row on the final segment, which keeps a question at the end of each row in the
    same, full, last segment (the partial one is the row's second, or its first if it has two: `right_aligned_sizes`).
    """
    if content_size < 1:
        raise ValueError(f"content_size must be ≥ 1, got {content_size}")
    if alignment not in ("left", "right"):
        raise ValueError(f"alignment must be 'left' or 'right', got {alignment!r}")
    attention_mask = check_input_ids(input_ids, attention_mask)
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    batch = input_ids.shape[0]
    rows = [attention_mask[row].bool() for row in range(batch)]
    row_ids = [input_ids[row][keep] for row, keep in enumerate(rows)]
    row_labels = [None if labels is None else labels[row][keep] for row, keep in enumerate(rows)]
    row_segments = [count_segments(len(ids), content_size) for ids in row_ids]
    row_leading = [right_aligned_sizes(len(ids), content_size) for ids in row_ids]  # used when right-aligned
    num_segments = max(row_segments)

    segments = []
    for index in range(num_segments):
        ids = torch.zeros(batch, content_size, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros(batch, content_size, dtype=torch.long, device=input_ids.device)
        seg_labels = None if labels is None else torch.full_like(ids, IGNORE_INDEX, dtype=labels.dtype)
        is_last = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for row in range(batch):
            length, count = len(row_ids[row]), row_segments[row]
            if alignment == "left":
                local = index
                start, stop = local * content_size, min((local + 1) * content_size, length)
            else:  # the row's segments sit at the end; its first or second one holds the remainder
                local = index - (num_segments - count)
                leading = row_leading[row]
                start = sum(leading[: max(local, 0)]) + max(0, local - len(leading)) * content_size
                stop = start + (leading[local] if 0 <= local < len(leading) else content_size)
            if local < 0 or local >= count:
                continue
            n = stop - start
            ids[row, :n] = row_ids[row][start:stop]
            mask[row, :n] = 1
            if seg_labels is not None:
                seg_labels[row, :n] = row_labels[row][start:stop]
            is_last[row] = local == count - 1
        width = int(mask.sum(dim=1).max())  # trim padding every row shares
        segments.append(
            Segment(
                ids[:, :width],
                mask[:, :width],
                None if seg_labels is None else seg_labels[:, :width],
                index,
                is_last,
            )
        )
    return segments


def shift_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token targets over the whole document, so a loss crosses segment boundaries exactly.

    Position t is trained to predict the label of the next real token of its row; the last real token has none.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    for row in range(labels.shape[0]):
        keep = attention_mask[row].bool().nonzero().squeeze(1)
        shifted[row, keep[:-1]] = labels[row, keep[1:]]
    return shifted


def stream_segments(
    token_chunks: Iterable[torch.Tensor], content_size: int, first_sizes: Sequence[int] = ()
) -> Iterator[Segment]:
    """Regroup an iterator of 1-D id chunks (one document, any chunk sizes) into segments of one row.

    The first segments hold `first_sizes` tokens, the others `content_size`: give `right_aligned_sizes(length,
    content_size)` to align a document of known length to the right, so that its last segment is full. Holds at
    most one segment of ids at a time, so a 10M-token document streams in constant memory.
    """
    if content_size < 1:
        raise ValueError(f"content_size must be ≥ 1, got {content_size}")
    if not all(0 < size <= content_size for size in first_sizes):
        raise ValueError(f"first_sizes must be in [1, content_size={content_size}], got {list(first_sizes)}")
    sizes = iter(first_sizes)
    want = next(sizes, content_size)
    buffer: list[torch.Tensor] = []
    buffered = 0
    index = 0
    pending: torch.Tensor | None = None

    def make(ids: torch.Tensor, last: bool) -> Segment:
        return Segment(ids[None], torch.ones_like(ids)[None], None, index, torch.tensor([last]))

    for chunk in token_chunks:
        chunk = torch.as_tensor(chunk).reshape(-1)
        if chunk.dtype.is_floating_point:
            raise ValueError(f"token_chunks must hold integer ids, got dtype {chunk.dtype}")
        buffer.append(chunk)
        buffered += len(chunk)
        while buffered >= want:
            joined = torch.cat(buffer)
            if pending is not None:
                yield make(pending, False)
                index += 1
            pending, rest = joined[:want], joined[want:]
            buffer, buffered, want = [rest], len(rest), next(sizes, content_size)
    if buffered:
        if pending is not None:
            yield make(pending, False)
            index += 1
        pending = torch.cat(buffer)
    if pending is None:
        raise ValueError("token_chunks yielded no tokens")
    yield make(pending, True)


def stack_segments(rows: list[Segment]) -> Segment:
    """Stack one-row segments of equal width (documents of equal length streamed side by side) into a batch."""
    widths = {row.input_ids.shape[1] for row in rows}
    if len(widths) != 1:
        raise ValueError(f"rows must have segments of equal width to be stacked, got widths {sorted(widths)}")
    cat = lambda name: torch.cat([getattr(row, name) for row in rows])  # noqa: E731
    labels = None if rows[0].labels is None else cat("labels")
    return Segment(cat("input_ids"), cat("attention_mask"), labels, rows[0].index, cat("is_last"))
