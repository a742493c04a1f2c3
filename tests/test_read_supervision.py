"""The read-share loss: which tokens it names, what it computes, where its gradient goes, and the trainer's use."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import random_ids
from test_armt import _keeper, tiny_armt, writing
from test_training import tiny

import memformers as mf
from memformers import backbone_layers, read_supervision
from memformers.associative_memory import ReadTerms, delta_rule_write
from memformers.read_supervision import (
    ENTITIES,
    OTHER,
    QUERY,
    STORY,
    SUPPORTING,
    noise_write_loss,
    read_codes,
    read_share_loss,
)
from memformers.tasks import get_tokenizer, make_sample
from memformers.training import Trainer


@pytest.mark.parametrize("tokenizer", ["minilm", "smollm2"])
def test_codes_name_the_supporting_facts_and_the_questions_entity(tokenizer):
    tok = get_tokenizer(tokenizer)
    for task, index in (("qa1", 0), ("qa1", 5), ("qa2", 1), ("qa3", 2), ("qa4", 3), ("qa5", 4)):
        sample = make_sample(task, 300, tok, 0, index, num_facts=(3, 4) if task == "qa1" else None)
        codes = read_codes(sample)  # the default: every token of the supporting facts
        assert codes.shape == (sample.num_tokens,)
        facts = [piece for piece in sample.pieces if not hasattr(piece, "blocks")][: len(sample.facts)]
        expected = set()
        for fact in sample.supporting:
            start = sample.fact_positions[fact]
            expected |= set(range(start, start + len(facts[fact])))
        assert set(map(int, (codes == SUPPORTING).nonzero()[0])) == expected
        named = tok.decode(sample.ids[codes == QUERY]).lower().split()
        assert named == [w.lower() for w in sample.question.rstrip("?").split() if w.lower() in ENTITIES]
        assert named  # qa1 "Where is Mary?": mary; qa2 "Where is the milk?": milk; qa4: the place it names
        assert ((codes == QUERY).nonzero()[0] >= sample.question_position).all()
        assert int((codes == OTHER).sum()) == sample.num_tokens - sample.story_tokens  # the noise
        assert int((codes == STORY).sum()) == sample.story_tokens - len(expected) - int((codes == QUERY).sum())
        assert (codes[sample.question_position :] != OTHER).all()
        answer = read_codes(sample, "answer")  # the answer's word in the supporting facts
        assert tok.decode(sample.ids[answer == SUPPORTING]).strip().lower() == sample.target.lower()
        assert set(map(int, (answer == SUPPORTING).nonzero()[0])) < expected
        assert np.array_equal(answer == QUERY, codes == QUERY)
    with pytest.raises(ValueError, match="target"):
        read_codes(sample, "place")


def test_named_codes_keep_the_supporting_facts_that_name_what_the_question_names():
    """qa2 "Where is the milk?": "John took the milk." is named (the first hop), "John went to the kitchen." not;
    on qa1 every supporting fact names the asked actor, so "named" is "fact"."""
    tok = get_tokenizer("minilm")
    hops = 0
    for index in range(6):
        sample = make_sample("qa2", 300, tok, 0, index)
        asked = {w.rstrip("?").lower() for w in sample.question.split()} & ENTITIES
        named, every = read_codes(sample, "named"), read_codes(sample, "fact")
        assert np.array_equal(named == QUERY, every == QUERY)
        for fact in sample.supporting:
            start = sample.fact_positions[fact]
            mentions = bool({w.rstrip(".").lower() for w in sample.facts[fact].split()} & asked)
            expected = SUPPORTING if mentions else STORY
            assert (named[start : start + len(tok(" " + sample.facts[fact], add_special_tokens=False)["input_ids"])]
                    == expected).all()  # fmt: skip
            hops += not mentions
        assert (named == SUPPORTING).any()  # the first hop is always named
    assert hops >= 3  # the second hop ("John went to the kitchen.") is left out
    qa1 = make_sample("qa1", 300, tok, 0, 0)
    assert np.array_equal(read_codes(qa1, "named"), read_codes(qa1, "fact"))


def test_last_codes_keep_the_supporting_fact_that_comes_last_alone():
    """qa3 "Where was the apple before the kitchen?": of its three supporting facts, "John went to the kitchen."
    (the latest) alone is named; the others are story, the question's entities as with every target."""
    tok = get_tokenizer("minilm")
    for index in range(6):
        sample = make_sample("qa3", 300, tok, 0, index)
        last, every = read_codes(sample, "last"), read_codes(sample, "fact")
        latest = max(sample.supporting, key=lambda fact: sample.fact_positions[fact])
        assert len(sample.supporting) > 1 and sample.facts[latest].rstrip(".").endswith(
            sample.question.split()[-1][:-1]
        )
        start = sample.fact_positions[latest]
        expected = set(
            range(start, start + len(tok(" " + sample.facts[latest], add_special_tokens=False)["input_ids"]))
        )
        assert set(map(int, (last == SUPPORTING).nonzero()[0])) == expected
        assert np.array_equal(last == QUERY, every == QUERY)
        assert ((every == SUPPORTING) & ~(last == SUPPORTING) == (last == STORY) & (every == SUPPORTING)).all()
        assert ((every == SUPPORTING) & (last == STORY)).any()  # the earlier links are left to the answer's loss


def _terms(queries, keys, gates) -> ReadTerms:
    return ReadTerms(queries=queries, keys=keys, gates=gates, positions=None)


def test_the_loss_is_minus_log_the_supporting_writes_share_by_hand():
    """Two segments of 2 content tokens ([CLS] a b [SEP]): the first's second token is supporting, the second's
    first token asks. Shares are β_i φ(q)ᵀk_i over the first segment's writes; rows that ask nothing are left out."""
    ids = torch.ones(2, 4, dtype=torch.long)
    codes = torch.tensor([[OTHER, SUPPORTING, QUERY, OTHER], [OTHER, OTHER, OTHER, OTHER]])
    keys0 = torch.tensor([[[1.0, 0], [0.6, 0.8], [0, 1], [1, 0]]]).repeat(2, 1, 1)  # [CLS] a b [SEP]
    gates0 = torch.tensor([[0.5, 0.5, 1.0, 0.25]]).repeat(2, 1)
    query = torch.zeros(2, 4, 2)
    query[:, 1] = torch.tensor([0.0, 1.0])  # layout position 1 = content token 0 of segment 2
    record = [[_terms(torch.zeros(2, 4, 2), keys0, gates0)], [_terms(query, keys0, gates0)]]
    loss, counted = read_share_loss(record, codes, ids, torch.ones_like(ids), 2, "left", prefix=1)
    weights = torch.tensor([0.5 * 0, 0.5 * 0.8, 1.0 * 1, 0.25 * 0])
    assert counted == 1
    assert float(loss) == pytest.approx(-math.log(float(weights[2] / weights.sum())))


def test_a_row_counts_only_where_its_supporting_fact_was_written_before_the_question():
    ids = torch.ones(1, 4, dtype=torch.long)
    terms = _terms(torch.rand(1, 4, 3), torch.rand(1, 4, 3), torch.rand(1, 4))
    same_segment = torch.tensor([[OTHER, OTHER, SUPPORTING, QUERY]])
    loss, counted = read_share_loss([[terms], [terms]], same_segment, ids, torch.ones_like(ids), 2, "left", 1)
    assert counted == 0 and float(loss) == 0


def test_a_row_not_yet_begun_wrote_nothing_that_counts():
    """Right alignment: a two-segment row beside a three-segment one is inactive in the first segment, where its
    [CLS]/[SEP]/memory tokens still run (the driver keeps its state as it was); those writes take no share of its
    read, so its loss in the batch is its loss alone."""
    model = writing(tiny_armt("bert", head="classification", writers="all", alignment="right"), seed=3)
    content = model.content_size
    ids = random_ids(2, 3 * content)
    mask = torch.ones_like(ids)
    mask[1, :content] = 0  # row 1: two segments, right-aligned into the last two
    codes = torch.zeros_like(ids)
    codes[1, content + 2 : content + 5] = SUPPORTING  # row 1's first segment
    codes[1, 2 * content + 1] = QUERY  # its second; row 0 asks nothing
    with model.recording_reads() as record:
        model(ids, attention_mask=mask)
    in_batch, counted = read_share_loss(record, codes, ids, mask, content, "right", model.prefix)
    alone_ids = ids[1:, content:]
    with model.recording_reads() as record:
        model(alone_ids)
    alone, _ = read_share_loss(record, codes[1:, content:], alone_ids, torch.ones_like(alone_ids), content, "right", 1)
    assert counted == len(model.layers)
    assert in_batch.item() == pytest.approx(alone.item(), rel=1e-5)


def _recorded_loss(model, ids, codes):
    with model.recording_reads() as record:
        out = model(ids)
    loss, counted = read_share_loss(record, codes, ids, torch.ones_like(ids), model.content_size, "left", 1)
    return out, loss, counted


def _codes(ids: torch.Tensor, content: int) -> torch.Tensor:
    codes = torch.zeros_like(ids)
    codes[:, 3:6] = SUPPORTING  # first segment
    codes[:, 2 * content + 1] = QUERY  # third segment
    return codes


def test_the_recording_is_the_steps_own_queries_keys_and_gates_and_leaves_the_outputs_alone():
    model = writing(tiny_armt("bert", writers="all"))
    ids = random_ids(2, 3 * model.content_size)
    plain = model(ids).logits
    out, _, counted = _recorded_loss(model, ids, _codes(ids, model.content_size))
    assert torch.equal(out.logits, plain)
    assert counted == 2 * len(model.layers)
    assert model._reads_recorded is None  # recording ends with the block
    block = backbone_layers.layer_stack(model.backbone)[1]
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda _m, args: seen.setdefault("in", []).append(args[0])),
        block.register_forward_hook(
            lambda _m, _a, output: seen.setdefault("out", []).append(backbone_layers.block_output_hidden(output))
        ),
    ]  # registered first, so they see the block's input before its read is added
    try:
        with model.recording_reads() as record:
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert len(record) == 3 and all(len(step) == len(model.layers) for step in record)
    layer = model.layers[1]
    for step, terms in enumerate(record):
        assert torch.allclose(terms[1].queries, layer.queries(seen["in"][step]))
        keys, _, gates = layer.write_terms(seen["out"][step])
        assert torch.allclose(terms[1].keys, keys) and torch.allclose(terms[1].gates, gates)
    with model.recording_reads(), pytest.raises(RuntimeError, match="already"):
        with model.recording_reads():
            pass


def test_gradient_reaches_the_reading_and_writing_projections_not_the_head():
    """The loss reads queries, keys and gates (and, through the hidden states that made them, what earlier reads
    added: W_V too); the classifier never takes part."""
    model = writing(tiny_armt("bert", head="classification", writers="all"))
    ids = random_ids(2, 3 * model.content_size)
    _, loss, _ = _recorded_loss(model, ids, _codes(ids, model.content_size))
    loss.backward()
    for layer in model.layers:
        for weights in (layer.query.weight, layer.key.weight, layer.beta.weight):
            assert float(weights.grad.abs().sum()) > 0
    head = model.backbone.classifier.weight
    assert head.grad is None or float(head.grad.abs().sum()) == 0


def test_rows_are_scored_apart():
    """The batch's loss is the mean of each row's alone, and a row that asks nothing gets no gradient from the
    others' reads."""
    model = writing(tiny_armt("bert", writers="all"))
    ids = random_ids(2, 3 * model.content_size)
    codes = _codes(ids, model.content_size)
    alone = [_recorded_loss(model, ids[r : r + 1], codes[r : r + 1])[1].item() for r in range(2)]
    assert _recorded_loss(model, ids, codes)[1].item() == pytest.approx(sum(alone) / 2, rel=1e-5)
    codes[1] = OTHER
    captured = []
    handle = model.backbone.get_input_embeddings().register_forward_hook(_keeper(captured))
    try:
        _recorded_loss(model, ids, codes)[1].backward()
    finally:
        handle.remove()
    assert all(float(t.grad[1].abs().sum()) == 0 for t in captured)
    assert float(captured[0].grad[0].abs().sum()) > 0


def test_training_on_the_loss_alone_raises_the_supporting_share():
    model = writing(tiny_armt("bert", writers="all"))
    ids = random_ids(4, 3 * model.content_size)
    codes = _codes(ids, model.content_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = _recorded_loss(model, ids, codes)[1].item()
    for _ in range(20):
        _, loss, _ = _recorded_loss(model, ids, codes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert _recorded_loss(model, ids, codes)[1].item() < 0.5 * first


CHANGES = {
    "task.name": "qa1",
    "model.mechanism": "armt",
    "model.armt.writers": "all",
    "model.head": "classification",
    "model.alignment": "right",
    "curriculum.segments": [3],
    "task.facts_first": 1.0,
}


def test_the_trainer_adds_the_weighted_loss_and_logs_it(tmp_path):
    weighted = Trainer(tiny(tmp_path, "w", **CHANGES, **{"optim.read_loss_weight": 0.5}), progress=False)
    plain = Trainer(tiny(tmp_path, "p", **CHANGES), progress=False)
    record = weighted.train_step()
    assert record["read_loss"] > 0 and "read_loss" not in plain.train_step()
    batch = weighted.batches.batch(list(range(4)), 3, seed=0)
    assert "read_codes" in batch and "read_codes" not in weighted.batches.batch(list(range(4)), 3, 0, vary=False)
    for row, index in enumerate(range(4)):
        sample_codes = batch["read_codes"][row][batch["attention_mask"][row].bool()]
        assert int((sample_codes == QUERY).sum()) == 1  # qa1: the asked actor


def _noise_loss(model, ids, codes, threshold, over="all"):
    with model.recording_reads() as record:
        model(ids)
    layout = (ids, torch.ones_like(ids), model.content_size, "left", 1)
    return record, noise_write_loss(record, codes, *layout, threshold, over)


def test_the_noise_write_loss_is_the_noise_gates_hinge_by_hand():
    """Per noise token and layer, max(0, logit β − logit(τ/4)); story tokens, [CLS], [SEP] and memory tokens are
    left out, and gates already under τ/4 add 0 and no gradient."""
    model = writing(tiny_armt("bert", writers="all"))
    ids = random_ids(2, 2 * model.content_size)
    codes = torch.full_like(ids, STORY)
    codes[0, 1:4] = OTHER  # three noise tokens in row 0's first segment, two in row 1's second
    codes[1, model.content_size + 2 : model.content_size + 4] = OTHER
    for layer in model.layers:
        torch.nn.init.constant_(layer.beta.bias, 0.0)  # β around 1/2: every gate above τ/4
    record, (loss, counted) = _noise_loss(model, ids, codes, 0.01)
    margin = math.log(0.0025 / 0.9975)
    expected = []
    for step, (row, columns) in enumerate(((0, [1, 2, 3]), (1, [2, 3]))):
        for terms in record[step]:
            logits = terms.gate_logits[row, [1 + c for c in columns]]  # [CLS] first
            assert torch.allclose(torch.sigmoid(logits), terms.gates[row, [1 + c for c in columns]])  # τ = 0
            expected.append(logits - margin)
    assert counted == 5 * len(model.layers)
    assert loss.item() == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)
    logits = [terms.gate_logits for step in record for terms in step]
    touched = [(grad != 0).nonzero().tolist() for grad in torch.autograd.grad(loss, logits)]
    layers = len(model.layers)
    assert touched == [[[0, 2], [0, 3], [0, 4]]] * layers + [[[1, 3], [1, 4]]] * layers  # the noise alone ([CLS] first)
    for layer in model.layers:
        torch.nn.init.constant_(layer.beta.bias, -30.0)  # every gate far under τ/4
    _, (quiet, counted) = _noise_loss(model, ids, codes, 0.01)
    assert counted == 5 * len(model.layers) and quiet.item() == 0


def test_the_noise_write_loss_over_the_breaking_writes_alone():
    """`over="breaking"`: the same hinges, averaged over the writes above τ/4 only, so a few hard writers among
    many quiet ones weigh in full; their sum is the same as over every write."""
    model = writing(tiny_armt("bert", writers="all"))
    ids = random_ids(2, 2 * model.content_size)
    codes = torch.full_like(ids, OTHER)
    margin = math.log(0.0025 / 0.9975)
    for layer in model.layers:
        torch.nn.init.constant_(layer.beta.bias, margin)  # gates around τ/4: some above, some under
    record, (every, counted) = _noise_loss(model, ids, codes, 0.01)
    _, (breaking, breaking_counted) = _noise_loss(model, ids, codes, 0.01, over="breaking")
    logits = torch.cat([terms.gate_logits[:, 1 : 1 + model.content_size].flatten() for s in record for terms in s])
    above = logits[logits > margin]
    assert counted == logits.numel() and 0 < breaking_counted == above.numel() < counted
    assert breaking.item() == pytest.approx((above - margin).mean().item(), rel=1e-5)
    assert breaking.item() * breaking_counted == pytest.approx(every.item() * counted, rel=1e-5)
    with pytest.raises(ValueError, match="over must be one of"):
        _noise_loss(model, ids, codes, 0.01, over="most")


def test_training_on_the_noise_write_loss_closes_the_noise_gates():
    model = writing(tiny_armt("bert", writers="all"))
    for layer in model.layers:
        torch.nn.init.constant_(layer.beta.bias, 0.0)
    ids = random_ids(4, 2 * model.content_size)
    ids[:, :4] = 7  # a story token (the same id everywhere) against noise that differs
    codes = torch.full_like(ids, OTHER)
    codes[:, :4] = STORY
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = _noise_loss(model, ids, codes, 0.01)[1][0].item()
    for _ in range(30):
        _, (loss, _) = _noise_loss(model, ids, codes, 0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    record, (last, _) = _noise_loss(model, ids, codes, 0.01)
    assert last.item() < 0.2 * first
    noise_gates = torch.cat([t.gates[:, 5:-1].flatten() for step in record for t in step]).detach()
    assert float(noise_gates.max()) < 0.01  # under τ: they would write nothing


def test_a_write_under_the_threshold_leaves_A_as_it_was():
    """β ≤ τ writes nothing into A (z as before); above, (β − τ)/(1 − τ): the delta rule with that strength."""
    layer = tiny_armt("bert", writers="all").layers[0]
    torch.nn.init.normal_(layer.value.weight)
    memory = torch.randn(2, 3, layer.key.in_features)
    keys, values, betas = layer.write_terms(memory)
    matrix = torch.randn(2, keys.shape[-1], memory.shape[-1])  # a memory that already holds something
    normalizer = torch.rand(2, keys.shape[-1]) + 0.5
    threshold = float(betas.detach().median())
    new_matrix, new_normalizer = layer.write(memory, matrix, normalizer, threshold=threshold)
    written = ((betas - threshold) / (1 - threshold)).clamp_min(0)
    assert int((written == 0).sum()) >= 3  # the lower half writes nothing
    expected = delta_rule_write(keys, values, written, matrix, normalizer)
    assert torch.allclose(new_matrix, expected[0]) and torch.equal(new_normalizer, expected[1])
    assert torch.equal(new_normalizer, layer.write(memory, matrix, normalizer)[1])  # z: as without a threshold
    quiet = layer.write(memory, matrix, normalizer, threshold=float(betas.detach().max()))
    assert torch.equal(quiet[0], matrix)


def test_without_gradients_only_the_tokens_above_the_threshold_are_projected_and_write(monkeypatch):
    """Reading (no gradients), W_V and the delta rule's reads run on the tokens whose gate passes τ, as many a row as
    its most writing row has; A equals the full write's up to rounding, z exactly; padding (mask 0) never writes."""
    layer = writing(tiny_armt("bert", writers="all")).layers[0]
    memory = torch.randn(3, 8, layer.key.in_features)
    mask = torch.ones(3, 8)
    mask[1, 6:] = 0  # row 1 ends early
    mask[2] = 0  # row 2 has not begun: it writes nothing
    betas = layer.write_terms(memory)[2].detach()
    threshold = float(betas.quantile(0.7))
    matrix = torch.randn(3, layer.key.out_features * 6, memory.shape[-1])  # d_key = 2·nu·d_mem (nu 3)
    normalizer = torch.rand(3, matrix.shape[1]) + 0.5
    full = layer.write(memory, matrix, normalizer, mask, threshold=threshold)  # parameters need grads: all write

    projected = []
    linear = torch.nn.functional.linear

    def spy(inputs, weight, bias=None):
        if weight is layer.value.weight:
            projected.append(inputs.shape[1])
        return linear(inputs, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with torch.no_grad():
        sparse = layer.write(memory, matrix, normalizer, mask, threshold=threshold)
    above = ((betas > threshold) & mask.bool()).sum(1)
    assert projected == [int(above.max())] and 0 < projected[0] < 8
    torch.testing.assert_close(sparse[0], full[0].detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse[1], full[1].detach())
    with torch.no_grad():  # a threshold above every gate: A as it was, no value projected
        quiet = layer.write(memory, matrix, normalizer, mask, threshold=float(betas.max()))
    assert torch.equal(quiet[0], matrix) and len(projected) == 1


def test_a_thresholded_model_reads_the_same_without_gradients():
    """Streaming segments under no_grad (writes above τ only) gives the logits and memory of the full write."""
    model = writing(tiny_armt("bert", writers="all", write_threshold=0.5, head="classification"))
    model.eval().requires_grad_(False)
    ids = random_ids(2, 5 * model.content_size)

    def read(gradients: bool):
        with torch.set_grad_enabled(gradients):  # nothing requires a gradient: grad mode alone picks the write
            output = model(ids)
        return output.logits, output.state

    (full_logits, full_state), (logits, state) = read(True), read(False)
    torch.testing.assert_close(logits, full_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.matrix, full_state.matrix, rtol=1e-5, atol=1e-6)
    assert bool(state.matrix.abs().sum() > 0)  # something was written


def test_the_trainer_adds_the_noise_write_loss_and_a_saved_model_takes_the_configs_threshold(tmp_path, monkeypatch):
    changes = CHANGES | {"model.armt.write_threshold": 0.01, "optim.noise_write_weight": 1.0}
    trainer = Trainer(tiny(tmp_path, "n", **changes), progress=False)
    assert trainer.unwrapped.config.write_threshold == 0.01
    record = trainer.train_step()
    assert record["noise_write_loss"] >= 0 and "read_loss" not in record
    seen = []
    monkeypatch.setattr(
        read_supervision, "noise_write_loss", lambda *args: seen.append(args[-1]) or noise_write_loss(*args)
    )
    breaking = Trainer(tiny(tmp_path, "b", **changes, **{"optim.noise_write_mean": "breaking"}), progress=False)
    breaking.train_step()
    breaking.close()
    assert set(seen) == {"breaking"}  # the config's mean reaches the loss
    trainer.unwrapped.save_pretrained(tmp_path / "saved")
    assert mf.load(tmp_path / "saved").config.write_threshold == 0.01
    further = tiny(tmp_path, "m", **(CHANGES | {"model.backbone": str(tmp_path / "saved")}))
    assert Trainer(further, progress=False).unwrapped.config.write_threshold == 0.0  # the config's: a tunable knob


@pytest.mark.parametrize(
    "changes",
    [
        {"optim.read_loss_weight": -1.0},
        {"optim.read_loss_weight": float("nan")},
        {"optim.read_loss_weight": 1.0, "model.armt.writers": "memory"},
        {"optim.read_loss_weight": 1.0, "model.mechanism": "rmt"},
        {"optim.read_loss_weight": 1.0, "model.gradient_checkpointing": True},
        {"optim.read_target": "place"},
    ],
)
def test_bad_settings_name_the_key(tmp_path, changes):
    with pytest.raises(
        ValueError, match="optim.read_loss_weight" if "optim.read_target" not in changes else "optim.read_target"
    ):
        tiny(tmp_path, **(CHANGES | changes))


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"optim.noise_write_weight": 1.0}, "optim.noise_write_weight"),  # no write_threshold
        (
            {"optim.noise_write_weight": 1.0, "model.armt.write_threshold": 0.01, "optim.noise_write_mean": "most"},
            "optim.noise_write_mean",
        ),
        ({"optim.noise_write_weight": -1.0, "model.armt.write_threshold": 0.01}, "optim.noise_write_weight"),
        ({"optim.noise_write_weight": 1.0, "model.mechanism": "rmt"}, "optim.noise_write_weight"),
        ({"model.armt.write_threshold": 1.0}, "write_threshold"),
        ({"model.armt.write_threshold": -0.1}, "write_threshold"),
    ],
)
def test_bad_noise_write_settings_name_the_key(tmp_path, changes, key):
    with pytest.raises(ValueError, match=key):
        tiny(tmp_path, **(CHANGES | changes))


def _spy_on_states(trainer) -> list[tuple]:
    """(state given, state returned) of every forward pass of the trainer's model."""
    seen = []
    forward = trainer.model.forward

    def spy(*args, state=None, **kwargs):
        out = forward(*args, state=state, **kwargs)
        seen.append((state, out.state))
        return out

    trainer.model.forward = spy
    return seen


def test_carried_memory_starts_each_row_where_its_place_left_off_or_empty(tmp_path):
    """curriculum.carry_memory: a row keeps the (detached) memory its place's previous row left with that chance,
    else starts empty; at 0 every row starts empty, as validation always does."""
    trainer = Trainer(tiny(tmp_path, "c", **CHANGES, **{"curriculum.carry_memory": 0.5}), progress=False)
    seen = _spy_on_states(trainer)
    for _ in range(3):
        trainer.train_step()
    assert seen[0][0] is None  # nothing to carry yet
    kept_rows = emptied_rows = 0
    for (_, left), (given, _) in itertools.pairwise(seen):
        assert not given.matrix.requires_grad
        for row in range(given.matrix.shape[1]):
            if float(given.normalizer[:, row].abs().sum()) == 0:  # z: > 0 once anything wrote (A: W_V starts at 0)
                emptied_rows += 1
                assert float(given.matrix[:, row].abs().sum()) == 0
            else:
                kept_rows += 1
                assert torch.equal(given.normalizer[:, row], left.normalizer[:, row].detach())
                assert torch.equal(given.matrix[:, row], left.matrix[:, row].detach())
    assert kept_rows and emptied_rows  # 2 steps × 4 rows at a chance of 1/2
    seen.clear()
    trainer.evaluate()
    assert seen and all(given is None for given, _ in seen)  # validation: empty memories
    plain = Trainer(tiny(tmp_path, "p0", **CHANGES), progress=False)
    seen = _spy_on_states(plain)
    plain.train_step()
    plain.train_step()
    assert all(given is None for given, _ in seen)


def test_carried_memory_must_be_a_chance(tmp_path):
    with pytest.raises(ValueError, match="curriculum.carry_memory"):
        tiny(tmp_path, **(CHANGES | {"curriculum.carry_memory": 1.0}))
