"""The probes of what a memory keeps: qa1 errors sorted by kind, memory tokens that write the same thing, and which
segment's write an ARMT answer comes from."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_backbone

import memformers as mf
from memformers.segments import split_into_segments
from memformers.tasks.babi import qa1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import armt_memory_probe  # noqa: E402
import armt_segment_writes  # noqa: E402
import memory_errors  # noqa: E402

STORY = [("Mary", "kitchen"), ("John", "garden"), ("Mary", "office")]  # where is Mary? the office


def test_wrong_answers_are_sorted_by_what_the_memory_lost():
    assert memory_errors.error_kind(STORY, "Mary", "office", "kitchen") == "earlier place of the actor"
    assert memory_errors.error_kind(STORY, "Mary", "office", "garden") == "another actor's place"
    assert memory_errors.error_kind(STORY, "Mary", "office", "bathroom") == "a place not in the story"
    # a place both the actor (earlier) and another actor went to counts as the actor's own
    assert memory_errors.error_kind([*STORY, ("John", "kitchen")], "Mary", "office", "kitchen") == (
        "earlier place of the actor"
    )


def test_a_generated_answer_names_one_place_or_counts_as_none():
    assert memory_errors.named_place("The kitchen. Then the garden") == "kitchen"  # only the first sentence counts
    assert memory_errors.named_place(" office") == "office"
    assert memory_errors.named_place("kitchen or garden") == ""
    assert memory_errors.named_place("Mary") == ""
    assert memory_errors.error_kind(STORY, "Mary", "office", "") == "no single place"


def test_generated_stories_parse_into_moves_that_end_at_the_answer():
    for seed in range(20):
        story = qa1(random.Random(seed))
        moves = memory_errors.moves(story.facts)
        actor = next(a for a in ("Mary", "John", "Daniel", "Sandra") if a in story.question)
        assert [place for who, place in moves if who == actor][-1] == story.answer
        assert moves[story.supporting[-1]] == (actor, story.answer)


def test_buckets_name_their_ranges():
    labels = [memory_errors.bucket(value, (0, 1, 3, 6)) for value in (0, 1, 2, 3, 5, 6, 9)]
    assert labels == ["0", "1–2", "1–2", "3–5", "3–5", "6+", "6+"]


def test_pairwise_cosine_is_one_for_copies_and_ignores_each_token_with_itself():
    one = torch.randn(2, 1, 8)
    assert abs(armt_memory_probe.pairwise_cosine(one.expand(2, 4, 8)) - 1) < 1e-6
    orthogonal = torch.eye(4).unsqueeze(0)  # [1, 4 tokens, 4]
    assert abs(armt_memory_probe.pairwise_cosine(orthogonal)) < 1e-6


def test_segments_are_counted_from_the_first_as_the_model_reads_them():
    where = armt_segment_writes.segment_of
    assert [where(p, 248, 62, "right") for p in (0, 61, 62, 247)] == [0, 0, 1, 3]
    assert [where(p, 250, 62, "right") for p in (0, 61, 62, 63, 64, 249)] == [0, 0, 1, 1, 2, 4]  # a short second one
    assert [where(p, 250, 62, "left") for p in (0, 61, 62, 249)] == [0, 0, 1, 4]


def test_segment_starts_invert_segment_of():
    for length, alignment in ((248, "right"), (250, "right"), (250, "left")):
        for position in range(length):
            index = armt_segment_writes.segment_of(position, length, 62, alignment)
            start = armt_segment_writes.segment_start(index, length, 62, alignment)
            assert start <= position and armt_segment_writes.segment_of(start, length, 62, alignment) == index
            assert start == 0 or armt_segment_writes.segment_of(start - 1, length, 62, alignment) == index - 1


def test_writing_positions_are_sorted_into_fact_tokens_other_content_and_memory():
    from types import SimpleNamespace

    from memformers.tasks import make_sample

    sample = make_sample("qa1", 248, "minilm", 0, 0, "test", facts_apart=True, num_facts=(2, 3))
    fact = [len(p) for p in sample.pieces if isinstance(p, np.ndarray)][0]  # the first fact's tokens
    assert sample.fact_positions[0] == 0
    encoder = SimpleNamespace(num_memory_tokens=3, prefix=1, suffix=1, config=SimpleNamespace(writers="all"))
    kinds = armt_segment_writes.position_kinds(encoder, [sample], 0, 62)[0].tolist()
    names = [armt_segment_writes.KINDS[k] for k in kinds]
    assert names == ["memory"] + ["fact"] * fact + ["other content"] * (62 - fact) + ["memory"] * 4  # [CLS] … [SEP] m×3
    last = armt_segment_writes.position_kinds(encoder, [sample], 186, 62)[0].tolist()  # holds no fact
    assert armt_segment_writes.KINDS.index("fact") not in last
    owners = armt_segment_writes.fact_indices(encoder, [sample], 0, 62)[0].tolist()
    assert owners[1 : 1 + fact] == [0] * fact and set(owners[1 + fact : 63]) == {armt_segment_writes.OTHER_CONTENT}
    second = sample.fact_positions[1]  # the second fact, found in its own segment as fact 1
    assert armt_segment_writes.fact_indices(encoder, [sample], 62 * (second // 62), 62)[0, 1 + second % 62] == 1
    encoder.config.writers = "memory"
    assert armt_segment_writes.position_kinds(encoder, [sample], 0, 62).tolist() == [[2, 2, 2]]


def test_the_question_tokens_read_are_its_actor_and_cls():
    from types import SimpleNamespace

    from memformers.tasks import make_sample

    samples = [make_sample("qa1", 248, "minilm", 0, i, "test", facts_apart=True, num_facts=(2, 3)) for i in range(6)]
    encoder = SimpleNamespace(prefix=1)
    first = armt_segment_writes.segment_start(3, 248, 62, "right")
    found = armt_segment_writes.query_positions(encoder, samples, first)
    assert found["[CLS]"] == [0] * 6
    for sample, position in zip(samples, found["actor"], strict=True):
        actor = sample.question.rstrip("?").split()[-1].lower()
        assert sample.tokenizer.convert_ids_to_tokens(int(sample.ids[first + position - 1])) == actor


def test_a_query_matching_one_facts_keys_gives_that_fact_its_read_share():
    keys = [torch.eye(4)[None, :2], torch.eye(4)[None, 2:]]  # segment 0 writes keys e0, e1; segment 1 e2, e3
    gates = [torch.ones(1, 2), torch.ones(1, 2)]
    owners = [torch.tensor([[0, armt_segment_writes.MEMORY]]), torch.tensor([[1, armt_segment_writes.OTHER_CONTENT]])]
    query = torch.tensor([[0.9, 0.0, 0.1, 0.0]])  # mostly fact 0's key
    found = armt_segment_writes.match_shares(query, keys, gates, owners, torch.tensor([0]), torch.tensor([1]))
    assert float(found["answering fact"][0]) == pytest.approx(0.9)
    assert float(found["other facts"][0]) == pytest.approx(0.1)
    assert found["top is answering"].tolist() == [True] and found["top is last"].tolist() == [False]
    gates[0] = torch.tensor([[0.05, 1.0]])  # fact 0 written weakly: fact 1 has the larger share
    found = armt_segment_writes.match_shares(query, keys, gates, owners, torch.tensor([0]), torch.tensor([1]))
    assert found["top is answering"].tolist() == [False] and found["top is last"].tolist() == [True]
    assert sum(float(found[name][0]) for name in armt_segment_writes.MATCH_SHARES) == pytest.approx(1.0)


def _classifier() -> mf.AssociativeMemoryTransformer:
    """A tiny ARMT classifier whose memory is read (random W_V, as after training)."""
    torch.manual_seed(0)
    model = mf.AssociativeMemoryTransformer(
        tiny_backbone("bert", "classification"),
        num_memory_tokens=3,
        segment_size=16,
        d_mem=4,
        cls_token_id=3,
        sep_token_id=4,
    )
    with torch.no_grad():
        for layer in model.layers:
            layer.value.weight.normal_(0, layer.value.weight.shape[1] ** -0.5)
    return model.eval()


def test_reading_with_every_write_is_the_model_and_skipped_writes_are_never_written():
    model = _classifier()
    ids = random_ids(4, 4 * model.content_size)
    segments = split_into_segments(ids, content_size=model.content_size)
    record = {s: {key: [] for key in (*armt_segment_writes.WRITE_TERMS, "change")} for s in range(4)}
    with torch.no_grad():
        entering = {}
        assert (
            armt_segment_writes.read(model, segments, {0, 1, 2, 3}, record, entering)
            == model(ids).logits.argmax(-1).tolist()
        )
        width = segments[-1].input_ids.shape[1] + 2 + model.num_memory_tokens  # [CLS] content [SEP] memory
        assert sorted(entering) == list(range(len(model.layers)))
        assert all(hidden.shape == (4, width, model.info.hidden_size) for hidden in entering.values())
        alone = armt_segment_writes.read(model, segments[-1:], set())  # the last segment, from an empty memory
        assert armt_segment_writes.read(model, segments, set()) == alone
        logits = {}
        for skipped in range(3):
            state = model.init_state(4)
            for index, segment in enumerate(segments):
                output, new_state = model.step(segment, state)
                state = state if index == skipped else new_state
            logits[skipped] = output.logits
            assert (
                armt_segment_writes.read(model, segments, {0, 1, 2, 3} - {skipped}) == output.logits.argmax(-1).tolist()
            )
    assert not torch.equal(logits[0], logits[1])  # the probe's reads differ, so the comparison above can fail
    assert not {"write", "read"} & set(vars(model.layers[0]))  # the recording is removed
    betas = [b for s in range(4) for row in record[s]["beta"] for b in row]
    assert len(record[0]["beta"]) == 1 and len(betas) == 4 * len(model.layers) and all(0 < b < 1 for b in betas)
    assert record[0]["change"] == [pytest.approx([1.0] * len(model.layers))]  # the first write fills an empty memory
