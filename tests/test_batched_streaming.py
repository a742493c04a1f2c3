"""Many documents of different lengths in one batch, streamed through the driver, give every row exactly what it
gets alone: logits at every real token and the final state, for every mechanism. Rows end at different segments
(one row of a single, partial segment; others many segments longer), so the driver's inactive rows, `select` and
padding are all exercised. A control per mechanism shows that memory changes the outputs, so equality cannot
hold only because memory is ignored."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, open_knn_gates, tiny_backbone, tiny_longmem

import memformers as mf
from memformers.segments import right_aligned_sizes, segment_starts, split_into_segments, stream_segments

SEGMENT = 16
ATOL = 5e-5  # float rounding differs between a padded batch and one row; mixing rows moves outputs by > 1e-2


def build(name: str) -> mf.MemoryModel:
    """Tiny random-weight models whose memory visibly matters."""
    if name == "rmt-encoder":
        backbone = tiny_backbone("bert")
        return mf.RecurrentMemoryTransformer(
            backbone, num_memory_tokens=3, segment_size=SEGMENT + 6, cls_token_id=3, sep_token_id=4
        )
    if name == "rmt-decoder":
        return mf.RecurrentMemoryTransformer(tiny_backbone("llama"), num_memory_tokens=3, segment_size=SEGMENT + 6)
    if name == "knn":
        model = mf.MemorizingTransformer(
            tiny_backbone("llama"), memory_layers=(-1,), memory_size=40, top_k=6, segment_size=SEGMENT
        )
        return open_knn_gates(model)
    if name == "longmem":
        return tiny_longmem(segment_size=SEGMENT)
    if name == "cache":
        return mf.SegmentCacheTransformer(tiny_backbone("llama"), segment_size=SEGMENT)
    raise KeyError(name)


MECHANISMS = ("rmt-encoder", "rmt-decoder", "knn", "longmem", "cache")


def ragged_batch(content: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 7 segments, 1 partial segment, 3 + a bit, exactly 2, and 5 + a bit: right-padded."""
    lengths = [7 * content, content // 2, 3 * content + 5, 2 * content, 5 * content + 1]
    ids = torch.randint(5, VOCAB, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids * mask, mask


def final_state(name: str, state, row: int) -> list[torch.Tensor]:
    """What of a row's final state can be compared with the same document read alone."""
    if name.startswith("rmt"):
        return [state.memory[row]]
    if name == "knn":
        return [t for store in state.stores for t in store.entries(row)]
    if name == "longmem":
        keys, values, valid = state.chunks(row)
        return [keys, values, valid.float()]
    real = state.mask[row].bool()  # cache: the row's last segment, at its real positions
    return [t[row][:, real] for t in (*state.keys, *state.values)]


def streamed_logits(model: mf.MemoryModel, ids: torch.Tensor, mask: torch.Tensor) -> tuple[list[torch.Tensor], object]:
    """`model.stream` over the driver's segments: each row's logits at its real tokens, in order, and the state."""
    segments = split_into_segments(ids, model.content_size, mask)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(ids.shape[0])]
    state = None
    for segment, output, state in model.stream(segments, batch_size=ids.shape[0]):
        for row in range(ids.shape[0]):
            pieces[row].append(output.logits[row][segment.attention_mask[row].bool()])
    return [torch.cat(p) for p in pieces], state


@pytest.mark.parametrize("name", MECHANISMS)
def test_each_row_of_a_ragged_batch_equals_its_document_alone(name: str) -> None:
    model = build(name).eval()
    ids, mask = ragged_batch(model.content_size)
    with torch.no_grad():
        together = model(ids, attention_mask=mask)
        streamed, streamed_state = streamed_logits(model, ids, mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real])
            expected = alone.logits[0]  # [length, vocab]
            torch.testing.assert_close(together.logits[row][real], expected, rtol=0, atol=ATOL)
            torch.testing.assert_close(streamed[row], expected, rtol=0, atol=ATOL)
            for state in (together.state, streamed_state):
                for got, want in zip(final_state(name, state, row), final_state(name, alone.state, 0), strict=True):
                    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", MECHANISMS)
def test_memory_changes_the_outputs(name: str) -> None:
    """The control: the longest row's last segment read with its memory differs from it read afresh."""
    model = build(name).eval()
    ids, mask = ragged_batch(model.content_size)
    document = ids[:1, mask[0].bool()]  # 7 full segments
    last = document[:, -model.content_size :]
    with torch.no_grad():
        with_memory = model(document).logits[0, -model.content_size :]
        fresh = model(last).logits[0]
    assert (with_memory - fresh).abs().max() > 1e-2


def test_right_alignment_rows_equal_their_documents_alone() -> None:
    """Right-aligned rows start at different segments and all end on the last one."""
    model = mf.RecurrentMemoryTransformer(
        tiny_backbone("llama"), num_memory_tokens=3, segment_size=SEGMENT + 6, alignment="right"
    ).eval()
    ids, mask = ragged_batch(model.content_size)
    with torch.no_grad():
        together = model(ids, attention_mask=mask)
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row : row + 1, real])
            torch.testing.assert_close(together.logits[row][real], alone.logits[0], rtol=0, atol=ATOL)
            torch.testing.assert_close(together.state.memory[row], alone.state.memory[0], rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("length", "sizes"),
    [(30, [10, 10, 10]), (25, [10, 5, 10]), (45, [10, 5, 10, 10, 10]), (15, [5, 10]), (7, [7]), (20, [10, 10])],
)
def test_right_alignment_keeps_the_first_and_last_segments_full_where_it_can(length: int, sizes: list[int]) -> None:
    """The remainder is a row's second segment (its first when it has two), in the padded batch as in a stream;
    a row beside a longer one keeps its own layout."""
    partial = next((i + 1 for i, size in enumerate(sizes) if size < 10), 0)
    assert right_aligned_sizes(length, 10) == sizes[:partial]  # the sizes up to the partial one
    ids = torch.arange(1, 61).reshape(1, 60)
    mask = torch.zeros_like(ids)
    mask[0, :length] = 1
    batch = torch.cat([ids, torch.arange(1, 61).reshape(1, 60)])
    batch_mask = torch.cat([mask, torch.ones_like(mask)])
    segments = split_into_segments(batch, 10, batch_mask, alignment="right")
    row = [int(s.attention_mask[0].sum()) for s in segments if s.attention_mask[0].any()]
    assert row == sizes
    assert torch.equal(torch.cat([s.input_ids[0, : int(s.attention_mask[0].sum())] for s in segments]), ids[0, :length])
    streamed = list(stream_segments(iter(ids[0, :length].split(3)), 10, right_aligned_sizes(length, 10)))
    assert [s.input_ids.shape[1] for s in streamed] == sizes
    starts = [int(s.input_ids[0, 0]) - 1 for s in segments if s.attention_mask[0].any()]  # ids count from 1
    assert segment_starts(length, 10) == starts
    left = split_into_segments(ids[:, :length], 10, alignment="left")
    assert segment_starts(length, 10, "left") == [int(s.input_ids[0, 0]) - 1 for s in left]
