"""ARMT behaviour that matters: the equations, equality with the backbone while nothing is read, memory that carries
information across many segments, rows that never mix, a state of constant size, gradients (checkpointing and
bptt_depth), generation, save/load, an unedited backbone, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODERS, ENCODERS, assert_batch_generates_as_rows_alone, random_ids, tiny_backbone

import memformers as mf
from memformers import backbone_layers
from memformers.associative_memory import AssociativeMemory, associative_read, delta_rule_write, dpfp

ALL = ENCODERS + DECODERS
FAMILIES = ("bert", "gpt2", "llama")
ARRANGEMENTS = [(family, None) for family in ALL] + [(family, "causal") for family in ENCODERS]  # memory_attention


def tiny_armt(family: str, m: int = 3, segment_size: int = 16, head: str = "token", d_mem: int = 4, **kwargs):
    if family in ENCODERS:
        kwargs = {"cls_token_id": 3, "sep_token_id": 4, **kwargs}
    backbone = tiny_backbone(family, head)
    return mf.AssociativeMemoryTransformer(
        backbone, num_memory_tokens=m, segment_size=segment_size, d_mem=d_mem, **kwargs
    )


def writing(model: mf.AssociativeMemoryTransformer, seed: int = 0) -> mf.AssociativeMemoryTransformer:
    """The model with random W_V (as after training), so that the memory holds something and reads matter."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        writing_layer(layer, generator)
    return model


def writing_layer(layer: AssociativeMemory, generator: torch.Generator) -> AssociativeMemory:
    """One layer's W_V drawn at random from `generator` (`writing`)."""
    with torch.no_grad():
        weight = layer.value.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
    return layer


def _keeper(captured: list):
    """A forward hook keeping each call's output with its gradient retained (each segment's input embeddings)."""

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    return keep


# --- the equations ---------------------------------------------------------------------------------------------


def test_batched_write_equals_a_per_token_loop_of_the_equations():
    """fp64: A ← A + Σ_i β_i (v_i − v̄_i) ⊗ k_i and z ← z + Σ_i γ_i k_i, with v̄_i and γ_i against the old A, z."""
    generator = torch.Generator().manual_seed(0)
    batch, m, d_key, hidden = 3, 5, 12, 7
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    keys, values, betas = rand(batch, m, d_key), rand(batch, m, hidden) - 0.5, rand(batch, m)
    matrix, normalizer = rand(batch, d_key, hidden) - 0.5, rand(batch, d_key) * 0.05
    normalizer[0] = 0  # row 0: an empty memory (first segment)
    matrix[0] = 0
    new_matrix, new_normalizer = delta_rule_write(keys, values, betas, matrix, normalizer)

    eps = 1e-5
    gammas = []
    for row in range(batch):
        a, z = matrix[row].clone(), normalizer[row].clone()
        for i in range(m):
            k, v, beta = keys[row, i], values[row, i], betas[row, i]
            previous = (k @ matrix[row]) / (normalizer[row] @ k + eps)  # what the old memory returns for k
            gamma = min(max(1 - float(normalizer[row] @ k) / (float(k @ k) + eps), 0.0), 1.0)
            gammas.append(gamma)
            a += beta * torch.outer(k, v - previous)
            z += gamma * k
        torch.testing.assert_close(new_matrix[row], a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new_normalizer[row], z, rtol=1e-12, atol=1e-12)
    assert all(g == 1.0 for g in gammas[:m])  # an empty memory: every key is new
    assert any(0 < g < 1 for g in gammas[m:])  # the correction is exercised

    # and the read: y_j = A φ_j / (zᵀ φ_j + ε)
    features = rand(batch, 4, d_key)
    read = associative_read(features, new_matrix, new_normalizer)
    for row in range(batch):
        for j in range(4):
            f = features[row, j]
            expected = (f @ new_matrix[row]) / (new_normalizer[row] @ f + eps)
            torch.testing.assert_close(read[row, j], expected, rtol=1e-12, atol=1e-12)


def test_writes_under_bf16_autocast_round_nothing_that_is_carried():
    """200 writes under bf16 autocast equal fp32's: A and z are kept and written in fp32 (a bf16 A loses the delta
    rule's small corrections, 8 bits of mantissa at every segment); a bf16 model's state is fp32 too."""
    generator = torch.Generator().manual_seed(0)
    layer = writing_layer(AssociativeMemory(hidden=16, d_mem=4, nu=3), generator)
    tokens = [torch.randn(2, 3, 16, generator=generator) for _ in range(200)]  # memory tokens' outputs, per segment

    def carried(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        matrix, normalizer = torch.zeros(2, 24, 16), torch.zeros(2, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for memory in tokens:
                matrix, normalizer = layer.write(memory, matrix, normalizer)
        return matrix, normalizer

    exact, under_autocast = carried(False), carried(True)
    assert under_autocast[0].dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=0)
    model = tiny_armt("llama").to(torch.bfloat16)
    assert model.init_state(2).matrix.dtype == torch.float32
    with torch.no_grad():
        assert model(random_ids(2, 3 * model.content_size)).state.matrix.dtype == torch.float32


def test_dpfp_has_two_nu_d_nonnegative_features():
    x = torch.randn(2, 5, 4)
    features = dpfp(x, nu=3)
    assert features.shape == (2, 5, 24) and bool((features >= 0).all())
    doubled = torch.cat([x.relu(), (-x).relu()], -1)
    torch.testing.assert_close(features[..., 8:16], doubled * doubled.roll(2, dims=-1))


@pytest.mark.parametrize("normalize", [True, False])
def test_queries_and_keys_are_dpfp_at_unit_length_unless_told_otherwise(normalize):
    """As in the ARMT authors' code: φ of a query or key is scaled to length 1, so a hidden state 10× larger
    weighs the same in a read; without it (models saved before the knob) it weighs 100×."""
    model = tiny_armt("llama", normalize_features=normalize)
    layer = model.layers[0]
    hidden = torch.randn(2, 5, 32)
    raw = dpfp(layer.query(hidden), nu=3)
    expected = raw / raw.norm(dim=-1, keepdim=True) if normalize else raw
    torch.testing.assert_close(layer.queries(hidden), expected)
    keys, _, _ = layer.write_terms(hidden)
    raw_keys = dpfp(layer.key(hidden), nu=3)
    torch.testing.assert_close(keys, raw_keys / raw_keys.norm(dim=-1, keepdim=True) if normalize else raw_keys)
    scale = 1.0 if normalize else 100.0
    torch.testing.assert_close(layer.queries(10 * hidden), scale * layer.queries(hidden))


def test_a_shared_query_key_asks_with_the_key_a_hidden_state_writes_with():
    """share_query_key: no W_Q; a hidden state's query is its key, so of two writes each token's own has the larger
    read share (unit keys: kᵢᵀkᵢ = 1 > kᵢᵀkⱼ), where separate projections start with no such preference."""
    shared = tiny_armt("llama", share_query_key=True).layers[0]
    assert shared.query is None and not any("query" in name for name, _ in shared.named_parameters())
    separate = tiny_armt("llama").layers[0]
    hidden = torch.randn(64, 2, 32)  # 64 pairs of tokens that write one association each
    own_larger = {}
    for name, layer in (("shared", shared), ("separate", separate)):
        keys, _, _ = layer.write_terms(hidden)  # [64, 2, d_key]
        shares = layer.queries(hidden) @ keys.transpose(1, 2)  # [64, 2 queries, 2 keys]
        own_larger[name] = (shares.diagonal(dim1=1, dim2=2) > shares.flip(-1).diagonal(dim1=1, dim2=2)).float().mean()
        if name == "shared":
            torch.testing.assert_close(layer.queries(hidden), keys)
    assert own_larger["shared"] == 1.0 and own_larger["separate"] < 0.9


@pytest.mark.parametrize("normalize_gate", [True, False])
def test_a_normalised_gate_reads_the_direction_of_a_memory_output_not_its_size(normalize_gate):
    """normalize_gate: β of m and of 10·m are the same, so a large residual stream cannot start a gate saturated."""
    layer = tiny_armt("llama", normalize_gate=normalize_gate).layers[0]
    memory = torch.randn(2, 3, 32)
    _, _, betas = layer.write_terms(memory)
    _, _, betas_of_larger = layer.write_terms(10 * memory)
    assert torch.allclose(betas, betas_of_larger, atol=1e-5) == normalize_gate
    rms = memory.square().mean(-1, keepdim=True).sqrt()
    unit = torch.sigmoid(layer.beta(memory / rms)).squeeze(-1)
    torch.testing.assert_close(betas, unit if normalize_gate else torch.sigmoid(layer.beta(memory)).squeeze(-1))


def test_the_authors_later_initialisation_changes_only_the_gate_bias_and_the_memory_scale():
    """gate_bias and memory_init_std set W_β's bias and the memory embeddings' std at creation; every other weight
    is drawn as without them (same seed), so a run with them differs from one without in these alone."""
    torch.manual_seed(0)
    plain = tiny_armt("llama")
    torch.manual_seed(0)
    authors = tiny_armt("llama", gate_bias=1.0, memory_init_std=0.02)
    for layer in authors.layers:
        assert torch.equal(layer.beta.bias, torch.ones(1))
    _, _, betas = authors.layers[0].write_terms(torch.zeros(1, 3, 32))
    torch.testing.assert_close(betas, torch.full((1, 3), torch.sigmoid(torch.tensor(1.0)).item()))
    embedding_std = plain.backbone.get_input_embeddings().weight.float().std()
    torch.testing.assert_close(authors.memory / 0.02, plain.memory / embedding_std)
    changed = {"memory"} | {f"layers.{i}.beta.bias" for i in range(len(plain.layers))}
    for (name, ours), (_, theirs) in zip(plain.named_parameters(), authors.named_parameters(), strict=True):
        assert torch.equal(ours, theirs) != (name in changed), name


def test_read_from_an_empty_memory_is_exactly_zero():
    torch.manual_seed(0)
    layer = AssociativeMemory(hidden=8, d_mem=3, nu=3)
    hidden = torch.randn(2, 5, 8) * 100
    zero = layer.read(hidden, torch.zeros(2, 18, 8), torch.zeros(2, 18))
    assert torch.equal(zero, torch.zeros_like(zero))
    model = tiny_armt("llama")
    assert torch.equal(model.init_state(2).matrix, torch.zeros(2, 2, 2 * 3 * 4, 32))


def test_value_projection_starts_at_zero_and_memory_has_constant_size():
    model = tiny_armt("gpt2")
    assert all(torch.equal(layer.value.weight, torch.zeros_like(layer.value.weight)) for layer in model.layers)
    sizes = []
    with torch.no_grad():
        for segments in (2, 12):
            state = model(random_ids(2, segments * model.content_size)).state
            sizes.append((state.matrix.shape, state.normalizer.shape))
    layers, d_key = 2, 2 * 3 * 4
    assert sizes[0] == sizes[1] == ((layers, 2, d_key, 32), (layers, 2, d_key))


# --- equality with the backbone while nothing is read ------------------------------------------------------------


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("writers", ["memory", "all"])
def test_untrained_segments_equal_the_backbone_with_memory_tokens_appended(family, writers):
    """W_V = 0: every segment's outputs are the bare backbone's on [segment ; memory tokens] (encoders:
    [CLS] segment [SEP] memory), though the memory has been written (z grows) for several segments."""
    model = tiny_armt(family, writers=writers).eval()
    c = model.content_size
    ids = random_ids(2, 4 * c)
    embed = model.backbone.get_input_embeddings()
    with torch.no_grad():
        out = model(ids)
        assert bool((out.state.normalizer > 0).any())  # the memory tokens did write
        for s in range(4):
            segment = ids[:, s * c : (s + 1) * c]
            parts = [embed(segment)]
            if family in ENCODERS:
                parts = [embed(torch.full((2, 1), 3)), parts[0], embed(torch.full((2, 1), 4))]
            parts.append(model.memory.unsqueeze(0).expand(2, -1, -1))
            embeds = torch.cat(parts, dim=1)
            bare = model.backbone(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2])).logits
            start = 1 if family in ENCODERS else 0
            torch.testing.assert_close(out.logits[:, s * c : (s + 1) * c], bare[:, start : start + c])


@pytest.mark.parametrize("family", ENCODERS)
def test_causal_memory_leaves_an_encoders_segment_as_the_backbone_reads_it_alone(family):
    """memory_attention="causal", W_V = 0: the segment's outputs are the bare backbone's on [CLS] segment [SEP],
    memory tokens nowhere in sight."""
    model = tiny_armt(family, memory_attention="causal").eval()
    c = model.content_size
    ids = random_ids(2, 3 * c)
    embed = model.backbone.get_input_embeddings()
    with torch.no_grad():
        out = model(ids)
        for s in range(3):
            parts = [torch.full((2, 1), 3), ids[:, s * c : (s + 1) * c], torch.full((2, 1), 4)]
            bare = model.backbone(inputs_embeds=embed(torch.cat(parts, dim=1))).logits
            torch.testing.assert_close(out.logits[:, s * c : (s + 1) * c], bare[:, 1 : 1 + c])


@pytest.mark.parametrize(("memory_attention", "later_tokens_matter"), [("causal", False), ("full", True)])
def test_causal_memory_tokens_see_only_the_ones_before_them(memory_attention, later_tokens_matter):
    """Changing the last memory token's embedding leaves the others' outputs, in every layer, as they were."""
    model = tiny_armt("bert", m=3, memory_attention=memory_attention).eval()
    ids = random_ids(2, model.content_size)
    outputs = []
    blocks = backbone_layers.layer_stack(model.backbone)
    keep = lambda _module, _args, output: outputs.append(backbone_layers.block_output_hidden(output))  # noqa: E731
    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        with torch.no_grad():
            model(ids)
            model.memory[-1] += torch.randn(model.memory.shape[-1])  # not a constant: LayerNorm would remove it
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    first = slice(model.content_size + 2, model.content_size + 4)  # memory tokens 1 and 2 of 3
    before, after = outputs[:2], outputs[2:]
    changed = [bool((a[:, first] - b[:, first]).abs().max() > 1e-6) for a, b in zip(before, after, strict=True)]
    assert changed == [later_tokens_matter] * 2
    assert bool((outputs[-1][:, -1] - outputs[1][:, -1]).abs().max() > 1e-6)  # the changed token itself does


def _step_two_rows(family: str, model: mf.AssociativeMemoryTransformer, empty: tuple[bool, bool] = (False, False)):
    """One step of `model` on two rows (the second 4 tokens short) from a written state (a row's memory emptied
    where `empty` says), recording every block's output: (the rows' lengths, the state before, the state after,
    the block outputs)."""
    c = model.content_size
    lengths = [c, c - 4]
    ids = random_ids(2, c)
    mask = torch.ones_like(ids)
    mask[1, lengths[1] :] = 0
    outputs = []
    handles = [
        b.register_forward_hook(lambda _m, _a, out: outputs.append(backbone_layers.block_output_hidden(out)))
        for b in backbone_layers.layer_stack(model.backbone)
    ]
    with torch.no_grad():
        state = writing(tiny_armt(family, writers="all"), seed=1).double()(random_ids(2, 2 * c)).state
        state = state.reset(torch.tensor(empty))
        try:
            _, new_state = model.step(mf.Segment(ids, mask), state)
        finally:
            for handle in handles:
                handle.remove()
    return lengths, state, new_state, outputs


def _written_by(model, layer: int, row: int, state, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, z) of `row` after `tokens` [1, k, hidden], the block outputs of `layer`, write the state before."""
    matrix, normalizer = state.matrix[layer, row : row + 1], state.normalizer[layer, row : row + 1]
    return model.layers[layer].write(tokens, matrix, normalizer)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_with_every_position_writing_each_real_position_of_a_row_writes_and_its_padding_does_not(family):
    """writers="all": a segment's new state is the delta rule applied to the block outputs of every real position
    ([CLS], content, [SEP] and memory tokens of an encoder; content and memory tokens of a decoder), per row, and
    not the memory tokens' outputs alone."""
    model = writing(tiny_armt(family, writers="all")).double().eval()
    lengths, state, new_state, outputs = _step_two_rows(family, model)
    m, extra = model.num_memory_tokens, 2 if family in ENCODERS else 0  # [CLS] and [SEP]
    with torch.no_grad():
        for layer, hidden in enumerate(outputs):
            for row, n in enumerate(lengths):
                real = hidden[row : row + 1, : n + extra + m]
                expected = _written_by(model, layer, row, state, real)
                torch.testing.assert_close(new_state.matrix[layer, row : row + 1], expected[0], rtol=1e-9, atol=1e-10)
                torch.testing.assert_close(new_state.normalizer[layer, row : row + 1], expected[1])
                memory_only = _written_by(model, layer, row, state, real[:, -m:])[0]
                assert not torch.allclose(new_state.matrix[layer, row : row + 1], memory_only)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_without_layout_writes_only_the_content_of_each_row_writes(family):
    """layout_writes=False: the new state is the delta rule applied to the block outputs of the content's tokens
    alone, per row: [CLS], [SEP], the memory tokens and padding add nothing. A saved model can be read so
    (`tunable`), and the knob needs writers="all"."""
    model = writing(tiny_armt(family, writers="all", layout_writes=False)).double().eval()
    lengths, state, new_state, outputs = _step_two_rows(family, model)
    with torch.no_grad():
        for layer, hidden in enumerate(outputs):
            for row, n in enumerate(lengths):
                content = hidden[row : row + 1, model.prefix : model.prefix + n]
                expected = _written_by(model, layer, row, state, content)
                torch.testing.assert_close(new_state.matrix[layer, row : row + 1], expected[0], rtol=1e-9, atol=1e-10)
                torch.testing.assert_close(new_state.normalizer[layer, row : row + 1], expected[1])
    assert "layout_writes" in model.config.tunable
    with pytest.raises(ValueError, match="layout_writes"):
        tiny_armt(family, writers="memory", layout_writes=False)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_with_layout_writes_first_the_layout_writes_only_into_an_empty_memory(family):
    """layout_writes="first": a row whose memory is empty (its first segment) writes with every real position, as
    layout_writes=True; a row with something written, with its content alone, as layout_writes=False; in one
    batch, each row by its own memory."""
    model = writing(tiny_armt(family, writers="all", layout_writes="first")).double().eval()
    lengths, state, new_state, outputs = _step_two_rows(family, model, empty=(True, False))
    assert float(state.matrix[:, 0].abs().sum()) == 0 and float(state.matrix[:, 1].abs().sum()) > 0
    m, extra = model.num_memory_tokens, 2 if family in ENCODERS else 0  # [CLS] and [SEP]
    with torch.no_grad():
        for layer, hidden in enumerate(outputs):
            every_position = hidden[0:1, : lengths[0] + extra + m]
            expected = _written_by(model, layer, 0, state, every_position)
            torch.testing.assert_close(new_state.matrix[layer, 0:1], expected[0], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(new_state.normalizer[layer, 0:1], expected[1])
            content = hidden[1:2, model.prefix : model.prefix + lengths[1]]
            expected = _written_by(model, layer, 1, state, content)
            torch.testing.assert_close(new_state.matrix[layer, 1:2], expected[0], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(new_state.normalizer[layer, 1:2], expected[1])
    with pytest.raises(ValueError, match="layout_writes"):
        tiny_armt(family, writers="all", layout_writes="last")


# --- memory carries information -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "knobs", [{"writers": "memory"}, {"writers": "all"}, {"writers": "all", "share_query_key": True}], ids=str
)
def test_a_token_in_segment_one_changes_segment_eight(family, knobs):
    c = tiny_armt(family).content_size
    ids = random_ids(1, 8 * c)
    changed = ids.clone()
    changed[0, 2] += 1
    last = slice(7 * c, 8 * c)
    with torch.no_grad():
        silent = tiny_armt(family, **knobs).eval()  # W_V = 0: nothing is read, segment 8 cannot know
        torch.testing.assert_close(silent(ids).logits[0, last], silent(changed).logits[0, last], rtol=0, atol=0)
        model = writing(tiny_armt(family, **knobs)).eval()
        difference = (model(ids).logits[0, last] - model(changed).logits[0, last]).abs().max()
    assert difference > 1e-4


# --- rows never mix ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "memory_attention", "writers"),
    [(*arrangement, "memory") for arrangement in ARRANGEMENTS]
    + [("bert", None, "all"), ("bert", "causal", "all"), ("llama", None, "all"), ("gpt2", None, "all")]
    + [("bert", None, "shared"), ("llama", None, "shared")],  # every position writing, W_Q = W_K
)
@pytest.mark.parametrize("alignment", ["left", "right"])
def test_each_row_equals_running_it_alone(family, memory_attention, writers, alignment):
    """In fp64, so that any difference is mixing, not rounding amplified by the reads' division. With every
    position writing, a row's padding writes nothing."""
    knobs = {"writers": "all", "share_query_key": True} if writers == "shared" else {"writers": writers}
    model = tiny_armt(family, alignment=alignment, memory_attention=memory_attention, **knobs)
    model = writing(model).double().eval()
    c = model.content_size
    lengths = [3 * c + 5, c - 3, 2 * c]
    ids = random_ids(3, max(lengths))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    with torch.no_grad():
        together = model(ids, attention_mask=mask)
        for row, n in enumerate(lengths):
            alone = model(ids[row : row + 1, :n])
            torch.testing.assert_close(together.logits[row, :n], alone.logits[0], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(together.state.matrix[:, row], alone.state.matrix[:, 0], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("writers", ["memory", "all"])
def test_gradient_of_one_row_reaches_no_other_row(writers):
    model = writing(tiny_armt("llama", writers=writers))
    ids = random_ids(2, 3 * model.content_size)
    captured = []
    handle = model.backbone.get_input_embeddings().register_forward_hook(_keeper(captured))
    try:
        out = model(ids)
        out.logits[0, -1].sum().backward()
    finally:
        handle.remove()
    assert all(float(t.grad[1].abs().sum()) == 0 for t in captured)
    assert float(captured[0].grad[0].abs().sum()) > 0  # row 0's first segment does reach its last one


def test_classification_rows_equal_running_alone():
    model = writing(tiny_armt("bert", head="classification")).eval()
    c = model.content_size
    ids = random_ids(2, 3 * c)
    mask = torch.ones_like(ids)
    mask[1, c:] = 0
    with torch.no_grad():
        together = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(together[1], model(ids[1:, :c]).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[0], model(ids[:1]).logits[0], rtol=1e-4, atol=1e-5)


def test_reset_clears_only_marked_rows_and_steps_never_change_their_input():
    model = writing(tiny_armt("gpt2")).eval()
    ids = random_ids(2, 2 * model.content_size)
    with torch.no_grad():
        state = model(ids).state
        before = (state.matrix.clone(), state.normalizer.clone())
        model.step(ids[:, : model.content_size], state)
    assert torch.equal(state.matrix, before[0]) and torch.equal(state.normalizer, before[1])
    reset = state.reset(torch.tensor([True, False]))
    assert torch.equal(reset.matrix[:, 0], torch.zeros_like(reset.matrix[:, 0]))
    assert torch.equal(reset.normalizer[:, 0], torch.zeros_like(reset.normalizer[:, 0]))
    assert torch.equal(reset.matrix[:, 1], state.matrix[:, 1])


# --- gradients -------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = writing(tiny_armt("llama"))
    checkpointed = writing(tiny_armt("llama", gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    ids = random_ids(2, 4 * plain.content_size)
    for model in (plain, checkpointed):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for name in ("memory", "layers.0.key.weight", "layers.1.value.weight", "layers.0.beta.weight"):
        assert plain.get_parameter(name).grad.abs().sum() > 0, name


def test_gradients_reach_the_memory_weights_even_at_initialisation():
    """W_V = 0 must still learn: its gradient flows through the reads of later segments."""
    model = tiny_armt("bert", head="classification")
    out = model(random_ids(2, 3 * model.content_size), labels=torch.tensor([1, 4]))
    out.loss.backward()
    assert model.layers[0].value.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("depth", [None, 0, 1, 2])
def test_gradient_reaches_exactly_bptt_depth(depth):
    k = 4
    model = writing(tiny_armt("llama", bptt_depth=depth))
    c = model.content_size
    ids = random_ids(1, k * c)
    labels = torch.full_like(ids, -100)
    labels[0, (k - 1) * c + 1 :] = ids[0, (k - 1) * c + 1 :]
    captured = []
    handle = model.backbone.get_input_embeddings().register_forward_hook(_keeper(captured))
    try:
        model(ids, labels=labels).loss.backward()
    finally:
        handle.remove()
    reach = [t.grad is not None and bool(t.grad.abs().sum() > 0) for t in captured]
    allowed = k - 1 if depth is None else min(depth, k - 1)
    assert reach == [i >= k - 1 - allowed for i in range(k)]


# --- the backbone is not edited -------------------------------------------------------------------------------------


def test_the_backbone_is_left_as_it_was():
    backbone = tiny_backbone("llama")
    flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
    bare_ids = random_ids(1, 20)
    with torch.no_grad():
        bare = backbone(bare_ids).logits

    def hooks():  # transformers installs output-capturing hooks of its own, on demand: only ours count
        ours = lambda table: [h for h in table.values() if h.__module__.startswith("memformers")]  # noqa: E731
        return {name: ours(m._forward_pre_hooks) + ours(m._forward_hooks) for name, m in backbone.named_modules()}

    before = hooks()
    model = writing(mf.AssociativeMemoryTransformer(backbone, num_memory_tokens=3, segment_size=16, d_mem=4))
    model(random_ids(2, 40), labels=random_ids(2, 40)).loss.backward()
    model.eval().generate(random_ids(1, 30), max_new_tokens=3, do_sample=False)
    assert hooks() == before
    assert flags == {name: p.requires_grad for name, p in backbone.named_parameters()}
    with torch.no_grad():
        assert torch.equal(backbone(bare_ids).logits, bare)


# --- generation -------------------------------------------------------------------------------------------------


def test_generate_reads_the_memory_and_batches_like_single_rows():
    model = writing(tiny_armt("llama")).eval()
    ids = assert_batch_generates_as_rows_alone(model)
    # The first generated token is the greedy choice of the forward pass's last logits: the same reads.
    with torch.no_grad():
        logits = model(ids[:1]).logits[0, -1]
    first = model.generate(ids[:1], max_new_tokens=1, do_sample=False)
    assert int(first[0, 0]) == int(logits.argmax())


# --- save / load ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("share_query_key", [False, True])
def test_save_and_load_round_trip_exact(family, share_query_key, tmp_path):
    model = writing(tiny_armt(family, bptt_depth=2, d_mem=5, share_query_key=share_query_key)).eval()
    model.save_pretrained(tmp_path / "armt")
    loaded = mf.load(tmp_path / "armt")
    assert type(loaded) is mf.AssociativeMemoryTransformer
    assert loaded.config_dict() == model.config_dict()
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    ids = random_ids(1, 3 * model.content_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_memory_in_chosen_layers_equals_every_layer_with_the_others_silent(family, tmp_path):
    """memory_layers=[-1]: the top block alone reads and writes; the same as a memory in every block whose other
    blocks read nothing (W_V = 0), and it saves and loads with its one layer."""
    top = writing(tiny_armt(family, memory_layers=[-1])).eval()
    assert top.memory_blocks == (1,) and len(top.layers) == 1
    every = tiny_armt(family).eval()
    every.memory.data.copy_(top.memory.data)
    every.layers[1].load_state_dict(top.layers[0].state_dict())
    ids = random_ids(2, 3 * top.content_size)
    with torch.no_grad():
        out = top(ids)
        torch.testing.assert_close(out.logits, every(ids).logits)
    assert out.state.matrix.shape[0] == 1
    top.save_pretrained(tmp_path / "armt")
    loaded = mf.load(tmp_path / "armt")
    assert loaded.memory_blocks == (1,)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out.logits)


def test_a_model_saved_before_normalize_features_loads_unnormalised(tmp_path):
    """Its JSON lacks the knob: it computes as it was trained (normalize_features False), a new model normalises."""
    import json

    assert tiny_armt("gpt2").normalize_features is True
    model = writing(tiny_armt("gpt2", normalize_features=False)).eval()
    model.save_pretrained(tmp_path / "armt")
    saved = tmp_path / "armt" / "memformers.json"
    data = json.loads(saved.read_text())
    del data["config"]["normalize_features"]
    saved.write_text(json.dumps(data))
    loaded = mf.load(tmp_path / "armt")
    assert loaded.normalize_features is False and not loaded.layers[0].normalize
    ids = random_ids(1, 3 * model.content_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


# --- streaming ------------------------------------------------------------------------------------------------------


def test_streaming_equals_reading_whole():
    model = writing(tiny_armt("gpt2")).eval()
    ids = random_ids(1, 5 * model.content_size)
    with torch.no_grad():
        whole = model(ids)
        chunks = iter(ids[0].split(7))
        streamed = list(model.stream(mf.stream_segments(chunks, model.content_size)))
    torch.testing.assert_close(torch.cat([out.logits for _, out, _ in streamed], 1), whole.logits)
    torch.testing.assert_close(streamed[-1][2].matrix, whole.state.matrix)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    import transformers
    from conftest import tiny_config

    for kwargs, name in (
        ({"m": 0}, "num_memory_tokens"),
        ({"d_mem": 0}, "d_mem"),
        ({"nu": 0}, "nu"),
        ({"segment_size": 4, "m": 4}, "segment_size"),
        ({"bptt_depth": -1}, "bptt_depth"),
        ({"alignment": "middle"}, "alignment"),
        ({"normalize_features": "yes"}, "normalize_features"),
        ({"memory_layers": []}, "memory_layers"),
        ({"normalize_gate": 1}, "normalize_gate"),
        ({"writers": "content"}, "writers"),
        ({"share_query_key": 1}, "share_query_key"),
        ({"gate_bias": "one"}, "gate_bias"),
        ({"gate_bias": float("nan")}, "gate_bias"),
        ({"memory_init_std": 0.0}, "memory_init_std"),
        ({"memory_init_std": True}, "memory_init_std"),
        ({"memory_layers": [2]}, "memory_layers"),
        ({"memory_layers": [0, -2]}, "memory_layers"),
    ):
        with pytest.raises(ValueError, match=name):
            tiny_armt("gpt2", **kwargs)
    with pytest.raises(ValueError, match="segment_size"):
        tiny_armt("bert", m=4, segment_size=6)
    with pytest.raises(ValueError, match="memory_attention"):
        tiny_armt("bert", memory_attention="sideways")
    with pytest.raises(ValueError, match="memory_attention"):
        tiny_armt("gpt2", memory_attention="full")
    with pytest.raises(ValueError, match="cls_token_id"):
        mf.AssociativeMemoryTransformer(tiny_backbone("bert"), segment_size=32, d_mem=4)
    with pytest.raises(ValueError, match="backbone"):
        mf.AssociativeMemoryTransformer(transformers.GPT2ForSequenceClassification(tiny_config("gpt2")), d_mem=4)
    with pytest.raises(ValueError, match="generate"):
        tiny_armt("bert").generate(random_ids(1, 10))
    with pytest.raises(ValueError, match="batch_size"):
        tiny_armt("gpt2").init_state(0)
    model = tiny_armt("gpt2")
    with pytest.raises(ValueError, match="segment"):
        model.step(random_ids(1, model.content_size + 1), model.init_state(1))
    with pytest.raises(ValueError, match="state"):
        model.step(random_ids(2, 4), model.init_state(1))


# --- memformers eval ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["classification", "causal-lm"])
def test_cli_eval_reads_a_saved_armt(tmp_path, head):
    """`memformers eval` on a saved ARMT: classes for an encoder classifier, generated answers for a decoder."""
    import json

    import transformers
    from typer.testing import CliRunner

    from memformers.cli import app

    tokenizer = mf.backbones.load_tokenizer("minilm")
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    if head == "classification":
        config = transformers.BertConfig(**common, intermediate_size=64, num_labels=6)
        backbone = transformers.BertForSequenceClassification(config)
        special = {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
    else:
        config = transformers.LlamaConfig(
            **common, intermediate_size=64, max_position_embeddings=64, bos_token_id=101, eos_token_id=102
        )
        backbone, special = transformers.LlamaForCausalLM(config), {}
    model = writing(mf.AssociativeMemoryTransformer(backbone, num_memory_tokens=2, segment_size=48, d_mem=4, **special))
    model.save_pretrained(tmp_path / "armt", tokenizer)
    grid = tmp_path / "grid.json"
    args = ["eval", str(tmp_path / "armt"), "--task", "qa1", "--lengths", "100,400", "--samples", "2"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "2", "--max-new-tokens", "3", "--json", str(grid)])
    assert result.exit_code == 0, result.output
    saved = json.loads(grid.read_text())
    assert saved["scoring"] == ("classes" if head == "classification" else "generation")
    assert [(r["length"], r["samples"]) for r in saved["results"]] == [(100, 2), (400, 2)]
