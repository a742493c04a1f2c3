"""MemorizingTransformer: unchanged at initialisation, exact memory attention, information across segments, row
isolation, gradients, generation, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_backbone

import memformers as mf

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
SEGMENT = 16


def open_gate(model: mf.MemorizingTransformer) -> None:
    """g = 1 for every head: the memory layers read only memory (where there is any)."""
    with torch.no_grad():
        for layer in model.layers:
            layer.mix.fill_(1.0)
            layer.gate_bias.fill_(50.0)  # sigmoid(50) == 1.0 in float32


def bare_logits(backbone, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone alone on each segment (positions restart per segment), as the mechanism cuts them."""
    pieces = []
    for start in range(0, ids.shape[1], SEGMENT):
        piece, piece_mask = ids[:, start : start + SEGMENT], mask[:, start : start + SEGMENT]
        pieces.append(backbone(input_ids=piece, attention_mask=piece_mask).logits)
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("combine", ["gate", "joint"])
@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_equal_the_backbone_at_initialisation(family: str, combine: str) -> None:
    backbone = tiny_backbone(family)
    model = mf.MemorizingTransformer(
        backbone, memory_layers=(0, -1), memory_size=40, top_k=8, segment_size=SEGMENT, combine=combine
    )
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # a padded row
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        expected = bare_logits(backbone, ids, mask)
    assert out.state.stores[0].size.tolist() == [40, 40]  # memory is full, and read
    real = mask.bool()
    assert torch.equal(out.logits[real], expected[real])  # the layer's own attention function: bit-identical


def _layer_inputs(family: str, combine: str, stored: int, top_k: int):
    torch.manual_seed(4)
    backbone = tiny_backbone(family)
    model = mf.MemorizingTransformer(
        backbone, memory_layers=(-1,), memory_size=64, top_k=top_k, segment_size=SEGMENT, combine=combine
    )
    layer = model.layers[0]
    adapter = layer.adapter
    state = model.init_state(2)
    store = state.stores[0].write(
        torch.randn(2, adapter.num_kv_heads, stored, adapter.head_dim),
        torch.randn(2, adapter.num_kv_heads, stored, adapter.head_dim),
    )
    return model, layer, adapter, store


def _exact(adapter, query, keys, values, bias=None):
    """softmax(q·Kᵀ·scale + bias)·V with every key-value head shared by its group of query heads."""
    group = adapter.num_heads // adapter.num_kv_heads
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = query @ keys.transpose(-1, -2) * adapter.scaling
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_attention_is_exact_when_top_k_covers_the_store(family: str) -> None:
    model, layer, adapter, store = _layer_inputs(family, "gate", stored=30, top_k=48)
    open_gate(model)
    hidden = torch.randn(2, 6, 32)
    layer.store = store
    with torch.no_grad(), layer.patched():
        out, _ = adapter.module(hidden, position_embeddings=_rotary(model, 6))
        query, _, _ = adapter.project(hidden)  # memory sees pre-rotary queries and keys
        expected = _exact(adapter, query, store.keys[:, :, :30], store.values[:, :, :30])
        expected = adapter.output(expected.transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_joint_softmax_is_one_softmax_over_memory_and_local_keys() -> None:
    model, layer, adapter, store = _layer_inputs("llama", "joint", stored=30, top_k=48)
    with torch.no_grad():
        layer.mix.fill_(1.0)  # gate_bias stays 0: exactly the joint softmax
    hidden = torch.randn(2, 6, 32)
    cos_sin = _rotary(model, 6)
    layer.store = store
    with torch.no_grad(), layer.patched():
        out, _ = adapter.module(hidden, position_embeddings=cos_sin)
        query, key, value = adapter.project(hidden)
        call = adapter.split_call((hidden,), {"position_embeddings": cos_sin})  # the call the module received
        local_query, local_key = adapter.rotate(query, key, call)
        # One key set: the stored keys (no positions) then the segment's (rotary), scores computed with each's query.
        group = adapter.num_heads // adapter.num_kv_heads
        memory_scores = query @ store.keys[:, :, :30].repeat_interleave(group, 1).transpose(-1, -2)
        local_scores = local_query @ local_key.repeat_interleave(group, 1).transpose(-1, -2)
        causal = torch.ones(6, 6, dtype=torch.bool).tril()
        local_scores = local_scores.masked_fill(~causal, float("-inf"))
        weights = (torch.cat([memory_scores, local_scores], -1) * adapter.scaling).softmax(-1)
        all_values = torch.cat([store.values[:, :, :30], value], 2).repeat_interleave(group, 1)
        expected = adapter.output((weights @ all_values).transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _rotary(model, length: int):
    base = model.backbone.base_model
    if not hasattr(base, "rotary_emb"):
        return None
    x = torch.zeros(1, length, 32)
    return base.rotary_emb(x, torch.arange(length).unsqueeze(0))


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_segment_one_reaches_segment_three_through_the_store(search: str) -> None:
    backbone = tiny_backbone("llama")
    ids = torch.randint(0, VOCAB, (1, 3 * SEGMENT))
    changed = ids.clone()
    changed[0, :SEGMENT] = torch.randint(0, VOCAB, (SEGMENT,))  # only segment 1 differs

    def third_segment(memory_size: int, open_: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = mf.MemorizingTransformer(
            backbone, memory_layers=(-1,), memory_size=memory_size, top_k=4, segment_size=SEGMENT, search=search
        )
        if open_:
            open_gate(model)
        with torch.no_grad():
            a, b = model(ids).logits[:, -SEGMENT:], model(changed).logits[:, -SEGMENT:]
        return a, b

    a, b = third_segment(3 * SEGMENT, open_=True)
    assert (a - b).abs().max() > 1e-3  # the memory carried segment 1 to segment 3
    a, b = third_segment(3 * SEGMENT, open_=False)
    assert torch.equal(a, b)  # closed gate: segments are independent
    a, b = third_segment(SEGMENT, open_=True)
    assert torch.equal(a, b)  # FIFO: segment 2 overwrote segment 1 before segment 3 read


def test_memory_is_read_before_the_segment_is_written() -> None:
    backbone = tiny_backbone("llama")
    model = mf.MemorizingTransformer(backbone, memory_layers=(-1,), memory_size=64, top_k=8, segment_size=SEGMENT)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (1, 2 * SEGMENT))
    later = ids.clone()
    later[0, SEGMENT + 10 :] = (later[0, SEGMENT + 10 :] + 1) % VOCAB  # the future of segment 2 differs
    with torch.no_grad():
        a, b = model(ids).logits, model(later).logits
        first = backbone(ids[:, :SEGMENT]).logits
    torch.testing.assert_close(a[:, :SEGMENT], first, rtol=1e-5, atol=1e-5)  # empty memory: the backbone
    assert torch.equal(a[:, : SEGMENT + 10], b[:, : SEGMENT + 10])  # no token reads its own segment's future
    assert (a[:, SEGMENT + 10 :] - b[:, SEGMENT + 10 :]).abs().max() > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rows_never_mix_and_reset_clears_one_row(family: str) -> None:
    backbone = tiny_backbone(family)
    model = mf.MemorizingTransformer(backbone, memory_layers=(-1,), memory_size=64, top_k=8, segment_size=SEGMENT)
    open_gate(model)
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    mask = torch.ones_like(ids)
    mask[0, 2 * SEGMENT + 3 :] = 0  # rows of different lengths
    with torch.no_grad():
        both = model(ids, attention_mask=mask)
        for row in range(2):
            alone = model(ids[row : row + 1], attention_mask=mask[row : row + 1])
            real = mask[row].bool()
            torch.testing.assert_close(both.logits[row][real], alone.logits[0][real], rtol=1e-5, atol=1e-5)
        # A planted key in row 0 that every query prefers is never returned to row 1.
        empty = model.init_state(2)
        heads, dim = empty.stores[0].keys.shape[1], empty.stores[0].keys.shape[3]
        planted = torch.zeros(2, heads, 1, dim)
        planted[0] = 1e4
        state = mf.knn.KNNMemoryState([empty.stores[0].write(planted, planted, torch.tensor([[1], [0]]))])
        _, state = model.step(ids[:, :SEGMENT], state)
        store = state.stores[0]
        slots = store.search(torch.ones(2, heads, 3, dim), k=4)[1]
        assert bool((slots[0, :, :, 0] == 0).all()) and store.size.tolist() == [17, 16]
        assert not bool((store.gather(slots)[1][1] == 1e4).any())
        # Reset row 0 only: it reads as a fresh document; row 1 keeps its memory.
        _, state = model.step(ids[:, SEGMENT : 2 * SEGMENT], state)
        kept = state.stores[0].entries(1)
        state = model.reset(state, torch.tensor([True, False]))
        out, state = model.step(ids[:, 2 * SEGMENT :], state)
        fresh, _ = model.step(ids[:1, 2 * SEGMENT :], model.init_state(1))
        torch.testing.assert_close(out.logits[0], fresh.logits[0], rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b[:, : a.shape[1]]) for a, b in zip(kept, state.stores[0].entries(1), strict=True))


def test_gate_and_temperature_learn_the_store_does_not() -> None:
    backbone = tiny_backbone("llama")
    model = mf.MemorizingTransformer(
        backbone, memory_layers=(-1,), memory_size=64, top_k=8, segment_size=SEGMENT, normalize_keys=True
    )
    layer = model.layers[0]
    ids = torch.randint(0, VOCAB, (2, 3 * SEGMENT))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert layer.mix.grad is not None and bool((layer.mix.grad != 0).all())  # g = 0 at init, yet it learns
    for store in out.state.stores:
        assert not store.keys.requires_grad and store.keys.grad_fn is None and store.values.grad_fn is None
    model.zero_grad()
    with torch.no_grad():
        layer.mix.fill_(0.5)
    model(ids, labels=ids).loss.backward()
    for parameter in (layer.mix, layer.gate_bias, layer.log_temperature):
        assert parameter.grad is not None and bool((parameter.grad != 0).any())


def test_generate_reads_the_context_through_memory() -> None:
    backbone = tiny_backbone("llama")
    model = mf.MemorizingTransformer(backbone, memory_layers=(-1,), memory_size=64, top_k=8, segment_size=SEGMENT)
    ids = torch.randint(0, VOCAB, (2, 2 * SEGMENT + 5))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    new = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert new.shape == (2, 6)
    # At initialisation: the backbone alone, generating from each row's last segment.
    for row, last in ((0, ids[0, 2 * SEGMENT :]), (1, ids[1, 2 * SEGMENT : -3])):
        expected = backbone.generate(
            last[None], attention_mask=torch.ones_like(last[None]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert torch.equal(new[row], expected[0, len(last) :])
    # With the gate open, what is in memory changes what is generated; the state can be kept and reset.
    open_gate(model)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    state, _ = model.read_context(ids, attention_mask=mask)
    assert state.stores[0].size.tolist() == [32, 32]
    other = ids.clone()
    other[:, :SEGMENT] = (other[:, :SEGMENT] + 1) % VOCAB
    assert not torch.equal(first, model.generate(other, attention_mask=mask, max_new_tokens=6, do_sample=False))
    assert model.reset(state).stores[0].size.tolist() == [0, 0]


def test_save_and_load_round_trip(tmp_path) -> None:
    model = mf.MemorizingTransformer(
        tiny_backbone("gpt2"), memory_layers=(-1,), memory_size=262_144, top_k=8, segment_size=SEGMENT, combine="joint"
    )
    with torch.no_grad():
        model.layers[0].mix.uniform_()
        model.layers[0].gate_bias.normal_()
    model.save_pretrained(tmp_path / "knn")
    loaded = mf.load(tmp_path / "knn")
    assert isinstance(loaded, mf.MemorizingTransformer) and loaded.config_dict() == model.config_dict()
    ids = torch.randint(0, VOCAB, (1, 3 * SEGMENT))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="model types"):
        mf.MemorizingTransformer(tiny_backbone("opt"), segment_size=SEGMENT)
    with pytest.raises(ValueError, match="decoder"):
        mf.MemorizingTransformer(tiny_backbone("bert"), segment_size=SEGMENT)
    backbone = tiny_backbone("llama")
    for kwargs, name in (
        ({"memory_layers": (5,)}, "memory_layers"),
        ({"memory_layers": (1, -1)}, "memory_layers"),
        ({"memory_size": 0}, "memory_size"),
        ({"top_k": 0}, "top_k"),
        ({"combine": "sum"}, "combine"),
        ({"search": "annoy"}, "search"),
        ({"segment_size": 4096}, "segment_size"),
    ):
        with pytest.raises(ValueError, match=name):
            mf.MemorizingTransformer(backbone, **{"segment_size": SEGMENT, **kwargs})
    # Two models on one backbone are fine (each patches the attention only while it runs); nesting passes is not.
    first = mf.MemorizingTransformer(backbone, memory_layers=(-1,), segment_size=SEGMENT)
    second = mf.MemorizingTransformer(backbone, memory_layers=(-1,), segment_size=SEGMENT)
    ids = torch.randint(0, VOCAB, (1, SEGMENT))
    with torch.no_grad():
        first(ids), second(ids)
        with first.memory(first.init_state(1)), pytest.raises(ValueError, match="one mechanism's pass at a time"):
            second(ids)
    assert "forward" not in backbone.model.layers[-1].self_attn.__dict__
