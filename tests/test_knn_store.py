"""The kNN store: FIFO ring buffer per row and head, row isolation, per-row reset, torch and faiss search."""

from __future__ import annotations

import pytest
import torch

from memformers.knn import KNNStore, faiss_search, torch_search


def numbered(batch: int, heads: int, length: int, start: int, head_dim: int = 4) -> torch.Tensor:
    """Keys whose every component is the token's running number: entry identity is readable back."""
    ids = torch.arange(start, start + length, dtype=torch.float32)
    return ids.view(1, 1, length, 1).expand(batch, heads, length, head_dim).clone()


def test_fifo_keeps_exactly_the_newest_entries() -> None:
    store = KNNStore(batch_size=2, num_heads=3, head_dim=4, capacity=10)
    written = [[], []]
    start = 0
    for length, lengths in ((7, (7, 3)), (8, (8, 8)), (25, (25, 4)), (5, (0, 5))):
        keys = numbered(2, 3, length, start)
        mask = (torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).long()
        store = store.write(keys, -keys, mask)
        for row in range(2):
            written[row] += list(range(start, start + lengths[row]))
        start += length
    for row in range(2):
        keys, values = store.entries(row)
        expected = torch.tensor(written[row][-10:], dtype=torch.float32)
        assert int(store.size[row]) == len(expected) == 10
        assert int(store.count[row]) == len(written[row])
        assert torch.equal(keys[:, :, 0], expected.expand(3, -1))  # oldest first, every head
        assert torch.equal(values, -keys)


def test_a_row_never_retrieves_another_rows_entries() -> None:
    torch.manual_seed(1)
    store = KNNStore(batch_size=3, num_heads=2, head_dim=8, capacity=64)
    keys = torch.randn(3, 2, 40, 8)
    values = torch.randn(3, 2, 40, 8)
    planted = torch.full((8,), 100.0)  # a key every query of direction (1, …, 1) prefers
    keys[0, :, 17] = planted
    values[0, :, 17] = 12345.0
    store = store.write(keys, values)
    queries = torch.ones(3, 2, 5, 8)
    for backend in ("torch", "faiss"):
        scores, slots = store.search(queries, k=40, backend=backend)
        _, found_values = store.gather(slots)
        assert bool((slots[0] == 17).any(dim=-1).all())  # row 0 finds it first …
        assert torch.equal(slots[0, :, :, 0], torch.full((2, 5), 17))
        assert not bool((found_values[1:] == 12345.0).any())  # … rows 1 and 2 never see it
        for row in (1, 2):  # every row's results are those of its own store alone
            alone = KNNStore(1, 2, 8, 64)
            alone = alone.write(keys[row : row + 1], values[row : row + 1])
            alone_scores, alone_slots = alone.search(queries[row : row + 1], k=40, backend=backend)
            assert torch.equal(alone_slots[0], slots[row])
            torch.testing.assert_close(alone_scores[0], scores[row])


def test_reset_clears_one_row_and_keeps_the_others() -> None:
    torch.manual_seed(2)
    store = KNNStore(batch_size=3, num_heads=2, head_dim=8, capacity=16)
    store = store.write(torch.randn(3, 2, 12, 8), torch.randn(3, 2, 12, 8))
    before = [store.entries(row) for row in range(3)]
    queries = torch.randn(3, 2, 4, 8)
    before_slots = store.search(queries, k=5)[1]
    kept = store
    store = store.reset(torch.tensor([False, True, False]))
    assert store.size.tolist() == [12, 0, 12] and kept.size.tolist() == [12, 12, 12]  # a new store; the old one kept
    scores, slots = store.search(queries, k=5)
    assert bool((slots[1] == -1).all()) and bool(torch.isinf(scores[1]).all())
    for row in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(store.entries(row), before[row], strict=True))
        assert torch.equal(slots[row], before_slots[row])
    store = store.write(torch.ones(3, 2, 2, 8), torch.ones(3, 2, 2, 8))  # the reset row starts writing at slot 0 again
    assert store.size.tolist() == [14, 2, 14]
    assert torch.equal(store.entries(1)[0], torch.ones(2, 2, 8))


@pytest.mark.parametrize("sizes", [(300, 300), (300, 7), (0, 130)])
def test_torch_and_faiss_return_the_same_neighbours(sizes) -> None:
    torch.manual_seed(3)
    store = KNNStore(batch_size=2, num_heads=2, head_dim=16, capacity=256)
    for row, size in enumerate(sizes):
        mask = torch.zeros(2, size, dtype=torch.long)
        mask[row] = 1
        store = store.write(torch.randn(2, 2, size, 16), torch.randn(2, 2, size, 16), mask)
    queries = torch.randn(2, 2, 33, 16)
    torch_scores, torch_slots = store.search(queries, k=32, backend="torch")
    faiss_scores, faiss_slots = store.search(queries, k=32, backend="faiss")
    assert torch.equal(torch_slots, faiss_slots)
    torch.testing.assert_close(torch_scores, faiss_scores, rtol=1e-5, atol=1e-5)
    # Small blocks (many merges of running top-k) give the same answer as one big block.
    small_scores, small_slots = torch_search(queries, store.keys, store.size, 32, block=50)
    assert torch.equal(small_slots, torch_slots)
    # Brute force: the full score matrix, sorted.
    for row, size in enumerate(store.size.tolist()):
        full = queries[row] @ store.keys[row, :, :size].transpose(-1, -2)
        take = min(32, size)
        assert torch.equal(full.topk(take, dim=-1).indices, torch_slots[row, :, :, :take])
        assert bool((torch_slots[row, :, :, take:] == -1).all())


def test_search_and_gather_hold_no_graph() -> None:
    store = KNNStore(batch_size=1, num_heads=1, head_dim=4, capacity=8)
    keys = torch.randn(1, 1, 5, 4, requires_grad=True)
    store = store.write(keys * 2, keys * 3)
    assert not store.keys.requires_grad and store.keys.grad_fn is None
    queries = torch.randn(1, 1, 2, 4, requires_grad=True)
    scores, slots = store.search(queries, k=3)
    found_keys, _ = store.gather(slots)
    assert not scores.requires_grad and not found_keys.requires_grad


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="capacity"):
        KNNStore(1, 1, 4, capacity=0)
    store = KNNStore(1, 1, 4, capacity=8)
    with pytest.raises(ValueError, match="backend"):
        store.search(torch.randn(1, 1, 2, 4), k=2, backend="annoy")
    assert faiss_search(torch.randn(1, 1, 2, 4), store.keys, store.size, 2)[1].eq(-1).all()


def test_write_returns_a_new_store_and_leaves_the_old_one_as_it_was() -> None:
    """A store is a value: what a recomputed step (gradient checkpointing) searches is what it searched first."""
    store = KNNStore(batch_size=2, num_heads=1, head_dim=4, capacity=3).write(
        torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4)
    )
    held = int(store.size.max())  # slots past it are left unset (`_copy`), so they may hold anything, NaN too
    keys, values, count = store.keys[:, :, :held].clone(), store.values[:, :, :held].clone(), store.count.clone()
    written = store.write(torch.full((2, 1, 2, 4), 7.0), torch.full((2, 1, 2, 4), 7.0))
    assert torch.equal(store.keys[:, :, :held], keys) and torch.equal(store.values[:, :, :held], values)
    assert torch.equal(store.count, count) and held == 2
    assert written.count.tolist() == [4, 4] and bool((written.keys == 7).any())
