"""LongMem: frozen backbone, cross-network residual, write after read, FIFO and isolated rows, information through
the bank, generation, save/load, bad arguments."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import VOCAB, tiny_backbone, tiny_config

import memformers as mf
from memformers import backbone_layers
from memformers.longmem import MemoryBank
from memformers.profiling import PeakMemory

FAMILIES = ("llama", "gpt2")
SEGMENT = 16


def backbone4(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny 4-block causal LM: a SideNet of 2 layers by default."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    config.num_hidden_layers = 4
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def make(family: str = "llama", **kwargs) -> mf.LongMem:
    kwargs = {"memory_size": 64, "chunk_size": 4, "top_k_chunks": 3, "segment_size": SEGMENT, **kwargs}
    return mf.LongMem(backbone4(family), **kwargs)


def open_gate(model: mf.LongMem) -> None:
    """g = 1: the fusion layer reads only memory wherever there is some."""
    with torch.no_grad():
        model.fusion.gate_bias.fill_(50.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_gets_no_gradient_while_the_sidenet_does(family: str) -> None:
    model = make(family)
    flags = [p.requires_grad for p in model.backbone.parameters()]
    model.train()
    assert model.sidenet.training
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen, yet its flags are the user's
    assert [p.requires_grad for p in model.backbone.parameters()] == flags
    side = [p.grad for p in model.sidenet.parameters()]
    assert all(g is not None for g in side) and all(g.abs().sum() > 0 for g in side)
    assert model.fusion.gate_bias.grad.abs().sum() > 0  # memory was read
    assert all(not name.startswith("backbone.") for name, _ in model.trainable_parameters())


@pytest.mark.parametrize("sidenet_layers", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_sidenet_layers_telescope_to_the_backbone(family: str, sidenet_layers: int) -> None:
    """x[i+1] = layer_i(x[i]) + H[r(i+1)] − H[ri]: with layers that return their input, x[S] = H[L]."""
    model = make(family, sidenet_layers=sidenet_layers, fusion_layer=0)
    for layer in model.sidenet:
        layer.forward = lambda hidden, *args, **kwargs: hidden
    ids = torch.randint(0, VOCAB, (2, SEGMENT))
    with torch.no_grad():
        logits, _, _ = model.side_forward(ids, torch.ones_like(ids), model.init_state(2))
        expected = model.backbone(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_is_the_backbone_blocks_difference(family: str) -> None:
    """Checked with hooks on the real SideNet: what a layer adds to its output is H[2l] − H[2l−2] (1-based l)."""
    model = make(family)
    seen = []
    for layer in model.sidenet:
        layer.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    ids = torch.randint(0, VOCAB, (1, SEGMENT))
    with torch.no_grad():
        _, hidden, capture = model.side_forward(ids, torch.ones_like(ids), None)
    h = capture.hidden  # H[0..4]
    assert len(h) == 5 and torch.equal(seen[0][0], h[0])
    torch.testing.assert_close(seen[1][0], seen[0][1] + h[2] - h[0])  # input of layer 2 = layer 1 out + residual
    torch.testing.assert_close(hidden, backbone_layers.final_norm(model.backbone)(seen[1][1] + h[4] - h[2]))
    # The SideNet starts as copies of blocks 1 and 3.
    blocks = backbone_layers.decoder_layers(model.backbone)
    for layer, block in zip(model.sidenet, (blocks[1], blocks[3]), strict=True):
        mine, theirs = layer.state_dict(), block.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_segment_never_reads_what_it_writes(family: str) -> None:
    model = make(family)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (1, SEGMENT))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        out, bank = model.step(ids, model.init_state(1))
        alone, _, _ = model.side_forward(ids, torch.ones_like(ids), None)  # no memory at all
        out_changed, _ = model.step(changed, model.init_state(1))
    assert int(bank.store.size[0]) == SEGMENT // 4  # it did write
    torch.testing.assert_close(out.logits, alone)
    torch.testing.assert_close(out.logits[:, :-1], out_changed.logits[:, :-1])  # causal, and no self-retrieval
    # The next segment does read it.
    with torch.no_grad():
        again, _ = model.step(ids, bank)
    assert not torch.allclose(again.logits, out.logits)


def test_bank_is_fifo_per_row_in_chunks() -> None:
    model = make(memory_size=8, chunk_size=4)  # two chunks per row
    bank = model.init_state(2)
    heads, d = bank.store.keys.shape[1], bank.head_dim

    def tokens(start: int, n: int) -> torch.Tensor:  # token t's key is t everywhere
        return torch.arange(start, start + n, dtype=torch.float).view(1, 1, n, 1).expand(2, heads, n, d)

    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])  # row 1: 3 real tokens, one partial chunk
    bank = bank.write(tokens(0, 6), -tokens(0, 6), mask)
    keys, values, valid = bank.chunks(1)
    assert keys.shape[1] == 1 and valid.tolist() == [[True, True, True, False]]
    assert keys[0, 0, :3, 0].tolist() == [0, 1, 2] and values[0, 0, :3, 0].tolist() == [0, -1, -2]
    assert bank.store.keys[1, 0, 0, 0] == 1.0  # the chunk's mean key, over its real tokens
    bank = bank.write(tokens(6, 8), -tokens(6, 8), torch.ones(2, 8))
    keys, _, valid = bank.chunks(0)  # row 0 wrote chunks [0-3], [4-5], [6-9], [10-13]: the last two remain
    assert keys[0, :, :, 0].tolist() == [[6, 7, 8, 9], [10, 11, 12, 13]] and bool(valid.all())
    assert bank.store.size.tolist() == [2, 2] and bank.store.count.tolist() == [4, 3]
    keys, _, _ = bank.chunks(1)
    assert keys[0, :, :, 0].tolist() == [[6, 7, 8, 9], [10, 11, 12, 13]]
    assert bank.reset(torch.tensor([True, False])).store.size.tolist() == [0, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_never_read_each_other(family: str) -> None:
    model = make(family)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    with torch.no_grad():
        batched = model(ids).logits
        alone = torch.cat([model(ids[row : row + 1]).logits for row in range(2)])
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
        # Planting content in row 0's bank changes row 0, never row 1.
        bank = model.init_state(2)
        kv, d = bank.store.keys.shape[1], bank.head_dim
        bank = bank.write(
            torch.randn(2, kv, 32, d) * 3, torch.randn(2, kv, 32, d) * 3, torch.tensor([[1] * 32, [0] * 32])
        )
        planted = model(ids, state=bank).logits
    assert not torch.allclose(planted[0], batched[0])
    torch.testing.assert_close(planted[1], batched[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_segment_one_reaches_segment_three_through_the_bank(family: str) -> None:
    ids = torch.randint(0, VOCAB, (1, 3 * SEGMENT))
    changed = ids.clone()
    changed[0, :SEGMENT] = torch.randint(0, VOCAB, (SEGMENT,))
    for memory_size, reaches in ((64, True), (SEGMENT, False)):  # a bank of one segment has forgotten segment 1
        model = make(family, memory_size=memory_size)
        open_gate(model)
        with torch.no_grad():
            first, second = model(ids).logits, model(changed).logits
        assert torch.allclose(first[:, 2 * SEGMENT :], second[:, 2 * SEGMENT :]) is not reaches


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_reads_the_context_then_continues(family: str) -> None:
    model = make(family)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    with torch.no_grad():
        logits = model(ids).logits
    new = model.generate(ids, max_new_tokens=4)
    assert new.shape == (2, 4)
    assert torch.equal(new[:, 0], logits[:, -1].argmax(-1))  # the last segment reads segments 1-2 in both
    assert torch.equal(new, model.generate(ids, max_new_tokens=4))
    other = ids.clone()
    other[:, :SEGMENT] = torch.randint(0, VOCAB, (2, SEGMENT))
    with torch.no_grad():
        other_logits = model(other).logits
    assert torch.equal(model.generate(other, max_new_tokens=1)[:, 0], other_logits[:, -1].argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family: str, tmp_path) -> None:
    model = make(family, memory_layer=1, top_k_chunks=2)
    with torch.no_grad():  # as if trained: the SideNet no longer equals the backbone's blocks
        for p in model.sidenet.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.fusion.gate_bias.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = mf.load(tmp_path / "m")
    assert isinstance(loaded, mf.LongMem) and loaded.config_dict() == model.config_dict()
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.freeze_backbone


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sidenet_layers": 3}, "sidenet_layers"),
        ({"sidenet_layers": 0}, "sidenet_layers"),
        ({"memory_layer": 4}, "memory_layer"),
        ({"fusion_layer": 2}, "fusion_layer"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory_size": 10, "chunk_size": 4}, "memory_size"),
        ({"top_k_chunks": 0}, "top_k_chunks"),
        ({"segment_size": 1000}, "segment_size"),
        ({"search": "annoy"}, "search"),
        ({"query_block": 0}, "query_block"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_backbones_and_states() -> None:
    with pytest.raises(ValueError, match="backbone"):
        mf.LongMem(tiny_backbone("bert"))
    with pytest.raises(ValueError, match="backbone"):
        mf.LongMem(tiny_backbone("opt"))
    model = make()
    with pytest.raises(ValueError, match="state"):
        model.step(torch.zeros(2, SEGMENT, dtype=torch.long), model.init_state(3))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, SEGMENT, dtype=torch.long), max_new_tokens=0)
    assert isinstance(model.init_state(1), MemoryBank)


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_attention_is_exact_over_the_retrieved_chunks(family: str) -> None:
    model = make(family, memory_size=32, chunk_size=4, top_k_chunks=8)
    adapter = model.fusion.adapter
    bank = model.init_state(1)
    kv, d, group = adapter.num_kv_heads, adapter.head_dim, adapter.num_heads // adapter.num_kv_heads
    keys, values = torch.randn(1, kv, 30, d), torch.randn(1, kv, 30, d)  # 8 chunks, the last one of 2 tokens
    bank = bank.write(keys, values, torch.ones(1, 30))
    query = torch.randn(1, adapter.num_heads, 5, d)
    out, found = model.fusion.memory_attention(query, bank)  # every chunk retrieved: exact attention over all 30
    full_keys, full_values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    expected = (query @ full_keys.transpose(-1, -2) * adapter.scaling).softmax(-1) @ full_values
    torch.testing.assert_close(out, expected)
    assert bool(found.all())
    # With one chunk per query, it is the chunk whose mean key scores best.
    model.fusion.top_k_chunks = 1
    out, _ = model.fusion.memory_attention(query, bank)
    mean_keys = torch.stack([chunk.mean(2) for chunk in keys.split(4, dim=2)], 2)  # [1, kv, 8, d]
    best = (query.view(1, kv, group * 5, d) @ mean_keys.transpose(-1, -2)).argmax(-1)  # [1, kv, group * 5]
    head, q = 1, 3  # one query of the second query head: kv head 0 (group 2)
    chunk = int(best[0, head // group, (head % group) * 5 + q])
    k, v = keys[0, head // group, 4 * chunk : 4 * chunk + 4], values[0, head // group, 4 * chunk : 4 * chunk + 4]
    torch.testing.assert_close(out[0, head, q], (query[0, head, q] @ k.T * adapter.scaling).softmax(-1) @ v)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_their_unpadded_selves(family: str) -> None:
    model = make(family)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0  # row 1 is 41 tokens long: its last chunks are partial
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        alone = model(ids[1:, :-7]).logits
    torch.testing.assert_close(out.logits[1, :-7], alone[0], atol=1e-5, rtol=1e-5)
    assert out.state.store.count.tolist() == [12, 11]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate", ["open", "initial"])
def test_cached_generation_equals_recomputing_and_rows_equal_their_own_generation(family: str, gate: str) -> None:
    """The key-value caches (backbone and SideNet) give the very tokens of recomputing the window per token, and a
    batch with rows of different lengths gives each row what it gives alone."""
    model = make(family)
    if gate == "open":
        open_gate(model)
    ids = torch.randint(0, VOCAB, (3, 3 * SEGMENT))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # row 1: a shorter prompt segment
    mask[2, -SEGMENT - 3 :] = 0  # row 2: one segment fewer in the bank
    cached = model.generate(ids, mask, max_new_tokens=12)
    assert torch.equal(cached, model.generate(ids, mask, max_new_tokens=12, use_cache=False))
    for row in range(3):
        alone = ids[row : row + 1, : int(mask[row].sum())]
        assert torch.equal(cached[row : row + 1], model.generate(alone, max_new_tokens=12))
    assert len(set(map(tuple, cached.tolist()))) == 3  # the rows differ: nothing was shared


@pytest.mark.parametrize("family", FAMILIES)
def test_blocked_retrieval_equals_all_at_once(family: str) -> None:
    model = make(family, memory_size=64, top_k_chunks=3)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    outputs, grads = [], []
    for block in (None, 1, 7, 10_000):
        model.fusion.query_block = block
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.sidenet.parameters()]))
    for logits, grad in zip(outputs[1:], grads[1:], strict=True):
        torch.testing.assert_close(logits, outputs[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, grads[0], atol=1e-5, rtol=1e-4)


def test_blocked_retrieval_bounds_peak_memory() -> None:
    """Without a graph, the retrieved keys and values exist for one block of queries at a time."""
    model = make(memory_size=256, chunk_size=4, top_k_chunks=16)
    adapter = model.fusion.adapter
    bank = model.init_state(1)
    kv, d = adapter.num_kv_heads, adapter.head_dim
    bank = bank.write(torch.randn(1, kv, 256, d), torch.randn(1, kv, 256, d), torch.ones(1, 256))
    query = torch.randn(1, adapter.num_heads, 64, d)
    peaks, outs = {}, {}
    for block in (None, 16):
        model.fusion.query_block = block
        with torch.no_grad(), PeakMemory() as meter:
            outs[block], _ = model.fusion.memory_attention(query, bank)
        peaks[block] = meter.peak_bytes
    torch.testing.assert_close(outs[16], outs[None])
    # Unblocked: the keys and values of 16 chunks of 4 tokens for 128 grouped queries per kv head.
    retrieved = kv * 128 * 16 * 4 * d * 4
    assert peaks[None] > retrieved and peaks[16] < peaks[None] / 3
