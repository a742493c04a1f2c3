"""The kinds a qa2 wrong answer is put in (benchmarks/babilong_wrong_answers.py), and the segments a story spreads
over (benchmarks/babilong_fact_spread.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import babilong_wrong_answers as wrong  # noqa: E402

FACTS = (
    "Mary went to the office.",
    "Mary got the apple.",
    "John moved to the garden.",
    "Mary journeyed to the kitchen.",
    "Mary went back to the bedroom.",
    "John travelled to the hallway.",
)


def test_the_holders_trail_starts_where_the_object_was_taken():
    assert wrong.holder_trail(FACTS, "apple") == (["office", "kitchen", "bedroom"], {"John": "hallway"})
    assert wrong.holder_trail(FACTS, "milk")[0] == []  # nobody took it
    assert wrong.holder_trail(("Sandra grabbed the milk.",) + FACTS, "milk")[0] == [None]  # taken before any move
    dropped = FACTS[:4] + ("Mary put down the apple.",) + FACTS[4:]
    assert wrong.holder_trail(dropped, "apple")[0] == ["office", "kitchen"]  # it stayed in the kitchen


def test_a_wrong_answer_is_put_in_the_first_kind_it_fits():
    # facts at 0, 10, ... 50 of 70 tokens read in segments of 25: the question's segment holds the last two
    story = SimpleNamespace(question="Where is the apple?", facts=FACTS, fact_positions=(0, 10, 20, 30, 40, 50))
    story.num_tokens = 70
    assert wrong.wrong_kind(story, "office", 25) == "taken_at"
    assert wrong.wrong_kind(story, "kitchen", 25) == "holder_earlier"
    assert wrong.wrong_kind(story, "hallway", 25) == "question_segment"
    assert wrong.wrong_kind(story, "garden", 25) == "another_place"  # named, but no one's place now
    assert wrong.wrong_kind(story, "bathroom", 25) == "another_place"
    early = SimpleNamespace(question="Where is the apple?", facts=FACTS, fact_positions=(0, 10, 20, 30, 40, 50))
    early.num_tokens = 200  # every fact before the question's segment
    assert wrong.wrong_kind(early, "hallway", 25) == "other_actor"


def test_a_story_is_counted_by_the_segments_its_supporting_facts_and_question_fall_in():
    import babilong_fact_spread as fact_spread

    # 70 tokens in segments of 25, right-aligned: [0, 25), [25, 45), [45, 70) (the remainder second)
    story = SimpleNamespace(num_tokens=70, fact_positions=(0, 24, 25, 44, 45), question_position=60)
    where = lambda *supporting: fact_spread.spread(SimpleNamespace(**vars(story), supporting=supporting), 25, "right")  # noqa: E731
    assert where(0, 1) == "1 segment, question later"
    assert where(1, 2) == "2 segments, question later"  # 24 and 25 sit across the first boundary
    assert where(3, 4) == "2 segments, question beside the last"  # 44 closes the second, 45 opens the third
    assert where(0, 2, 4) == "3 segments, question beside the last"
    assert fact_spread.spread(SimpleNamespace(**vars(story), supporting=(3, 4)), 25, "left") == (
        "1 segment, question later"  # left-aligned: [0, 25), [25, 50), [50, 70)
    )
