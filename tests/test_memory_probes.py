"""The two probes of what a memory keeps: qa1 errors sorted by kind, and memory tokens that write the same thing."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from memformers.tasks.babi import qa1

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import armt_memory_probe  # noqa: E402
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
