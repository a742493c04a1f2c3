"""The BABILong answer metric decides every case as the leaderboard's scorer (`compare_answers` of
booydar/babilong) does, quirks included; each group of cases is one way it differs from a whole-word reading."""

from __future__ import annotations

import pytest

from memformers.babilong_metric import LEADERBOARD_LABELS, answer_part, babilong_correct, babilong_labels
from memformers.tasks import ANSWERS

PLACES = list(ANSWERS["qa1"])
QA5 = list(ANSWERS["qa5"])
QA7 = list(LEADERBOARD_LABELS["qa7"])
QA8 = list(LEADERBOARD_LABELS["qa8"])
QA19 = list(LEADERBOARD_LABELS["qa19"])
WHERE = "Where is Mary?"


@pytest.mark.parametrize(
    ("output", "target", "question", "labels", "expected"),
    [
        ("office", "office", WHERE, PLACES, True),
        ("Mary is in the Office.", "office", WHERE, PLACES, True),
        ("The answer is kitchen", "kitchen", WHERE, PLACES, True),
        ("bathroom", "office", WHERE, PLACES, False),
        ("Mary is in the office or the kitchen.", "office", WHERE, PLACES, False),
        ("Mary is in the office. Earlier she was in the kitchen.", "office", WHERE, PLACES, True),
        ("She was in the kitchen. Now the office.", "office", WHERE, PLACES, False),
        ("I do not know", "office", WHERE, PLACES, False),
        ("", "office", WHERE, PLACES, False),
        ("Fred gave the apple to Bill.", "Fred", "Who gave the apple to Bill?", QA5, True),
        ("Jeff gave the apple to Bill.", "Fred", "Who gave the apple to Bill?", QA5, False),
        ("Fred and Jeff.", "Fred", "Who gave the apple?", QA5, False),
        ("office", "OFFICE", WHERE, PLACES, True),  # the target is lower-cased too
    ],
)
def test_plain_answers(output, target, question, labels, expected):
    assert babilong_correct(output, target, question, labels) is expected


@pytest.mark.parametrize(
    ("output", "target", "labels", "expected"),
    [
        ("gardens", "garden", PLACES, True),  # a label counts as a substring, not as a whole word
        ("In the kitchenette", "kitchen", PLACES, True),
        ("billiards", "Bill", QA5, True),
        ("the bedrooms", "garden", PLACES, False),
        ("Freddy has the milk", "milk", QA5, False),  # "fred" is named too, inside "freddy"
    ],
)
def test_labels_match_as_substrings(output, target, labels, expected):
    assert babilong_correct(output, target, "Who has it?", labels) is expected


@pytest.mark.parametrize(
    ("output", "target", "expected"),
    [
        ("?. kitchen.", "kitchen", False),  # only "." ends the answer, and an empty first piece is not skipped
        (". kitchen", "kitchen", False),
        ("kitchen! Or the office.", "kitchen", False),  # "!" does not end it
        ("kitchen? office", "kitchen", False),  # nor does "?"
        ("kitchen\noffice", "kitchen", False),  # nor a line end
        ("\n\nhallway\n", "hallway", True),
        ("hallway...", "hallway", True),
    ],
)
def test_the_answer_ends_at_the_first_full_stop_only(output, target, expected):
    assert babilong_correct(output, target, WHERE, PLACES) is expected


@pytest.mark.parametrize(
    ("output", "target", "expected"),
    [
        ("kitchen <context> Mary went to the office", "kitchen", True),  # the model starts a new prompt
        ("kitchen<example>office", "kitchen", True),
        ("kitchen <CONTEXT> office", "kitchen", True),  # cut after lower-casing: any case
        ("<example> kitchen", "kitchen", False),
        # The official code also splits at "Question" after lower-casing the output, so that split never happens.
        ("kitchen Question: where is the office?", "kitchen", False),
    ],
)
def test_the_answer_ends_at_a_prompt_marker(output, target, expected):
    assert babilong_correct(output, target, WHERE, PLACES) is expected
    assert answer_part("Kitchen <Context> office") == "kitchen "


@pytest.mark.parametrize(
    ("output", "target", "question", "labels", "expected"),
    [
        # a target that the question names never counts, so it can never be right
        ("garden", "garden", "Where was the milk before the garden?", PLACES, False),
        ("Bill", "Bill", "Who gave the apple to Bill?", QA5, False),
        # labels the question names are ignored in the answer, so repeating the question does no harm
        ("Before the kitchen it was in the garden.", "garden", "Where was the milk before the kitchen?", PLACES, True),
        ("Fred gave the apple.", "Fred", "Who gave the apple to Bill?", QA5, True),
        # the question is read as a substring too: "bill" in "billboard" hides an answer "Bill"
        ("Bill", "Bill", "Who stood by the billboard?", QA5, False),
    ],
)
def test_labels_in_the_question_never_count(output, target, question, labels, expected):
    assert babilong_correct(output, target, question, labels) is expected


@pytest.mark.parametrize(
    ("output", "target", "expected"),
    [
        ("apple,football", "apple,football", True),
        ("the football and the apple", "apple,football", True),  # any order
        ("the apple", "apple,football", False),  # a part missing
        ("apple, football, milk", "apple,football", False),  # one label too many
        ("apple, football", "apple, football", False),  # a space after the comma: " football" is not a label
        ("the apple and the milk", "apple,apple", True),  # a repeated part leaves room for one other label
        ("nothing", "nothing", True),
    ],
)
def test_comma_separated_targets_are_lists_of_labels(output, target, expected):
    assert babilong_correct(output, target, "What is Mary carrying?", QA8) is expected


def test_quirks_of_label_sets():
    """qa19's paths are three characters, so they are one label each; qa7's "none" names "one" as well."""
    assert babilong_correct("n,e", "n,e", "How do you go from the kitchen to the garden?", QA19)
    assert not babilong_correct("n,e,s", "n,e", "How do you go from the kitchen to the garden?", QA19)
    assert babilong_correct("two", "two", "How many objects is Mary carrying?", QA7)
    assert not babilong_correct("none", "none", "How many objects is Mary carrying?", QA7)


def test_label_sets_are_the_leaderboards():
    assert set(LEADERBOARD_LABELS) == {f"qa{i}" for i in range(1, 21)}
    for task in ("qa1", "qa2", "qa3", "qa4", "qa5"):  # our tasks answer with the leaderboard's labels
        assert set(babilong_labels(task)) == set(ANSWERS[task])
    assert babilong_labels("qa8") == ("apple", "football", "milk", "nothing")
    assert babilong_labels("memorize") == ANSWERS["memorize"]  # the RMT paper's tasks: their own answers
    with pytest.raises(ValueError, match="copy"):
        babilong_labels("copy")


def test_bad_arguments():
    with pytest.raises(ValueError, match="labels"):
        babilong_correct("office", "office", WHERE, "office")
    with pytest.raises(ValueError, match="labels"):
        babilong_correct("office", "office", WHERE, ["office", ""])
    with pytest.raises(ValueError, match="target"):
        babilong_correct("office", " ", WHERE, PLACES)
