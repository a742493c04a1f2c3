"""The BABILong answer metric."""

from __future__ import annotations

import pytest

from memformers.evaluation import babilong_correct
from memformers.tasks import ANSWERS

PLACES = list(ANSWERS["qa1"])
QA5 = list(ANSWERS["qa5"])


@pytest.mark.parametrize(
    ("output", "target", "question", "labels", "expected"),
    [
        ("office", "office", "Where is Mary?", PLACES, True),
        ("Mary is in the Office.", "office", "Where is Mary?", PLACES, True),
        ("The answer is kitchen", "kitchen", "Where is Mary?", PLACES, True),
        ("bathroom", "office", "Where is Mary?", PLACES, False),
        ("Mary is in the office or the kitchen.", "office", "Where is Mary?", PLACES, False),
        ("Mary is in the office. Earlier she was in the kitchen.", "office", "Where is Mary?", PLACES, True),
        ("She was in the kitchen. Now the office.", "office", "Where is Mary?", PLACES, False),
        ("\n\nhallway\n", "hallway", "Where is Mary?", PLACES, True),
        ("I do not know", "office", "Where is Mary?", PLACES, False),
        ("", "office", "Where is Mary?", PLACES, False),
        # labels the question mentions are ignored
        ("Before the kitchen it was in the garden.", "garden", "Where was the milk before the kitchen?", PLACES, True),
        ("Fred gave the apple to Bill.", "Fred", "Who gave the apple to Bill?", QA5, True),
        ("Jeff gave the apple to Bill.", "Fred", "Who gave the apple to Bill?", QA5, False),
        ("Fred and Jeff.", "Fred", "Who gave the apple?", QA5, False),
        # whole words only; a comma-separated target is a list of labels
        ("billiards", "Bill", "Who received the milk?", QA5, False),
        ("the apple and the milk", "apple,milk", "What is Mary carrying?", QA5, True),
        ("the apple", "apple,milk", "What is Mary carrying?", QA5, False),
    ],
)
def test_babilong_correct(output, target, question, labels, expected):
    assert babilong_correct(output, target, question, labels) is expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        babilong_correct("office", "office", "Where is Mary?", "office")
    with pytest.raises(ValueError, match="target"):
        babilong_correct("office", " ", "Where is Mary?", PLACES)
