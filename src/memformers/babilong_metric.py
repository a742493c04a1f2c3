"""The BABILong answer metric, decided exactly as the published leaderboard decides it.

BABILong (arXiv 2406.10149) scores a generative model's free-text answer against the task's answer labels. The
leaderboard's numbers come from `compare_answers` in `babilong/metrics.py` of github.com/booydar/babilong, whose
code differs from the paper's prose in several ways; `babilong_correct` reproduces the code, quirks included, so
our numbers are comparable with the published ones:

- the answer is the output, lower-cased, up to its first "." (only "."; "?. kitchen." reads "?"), or up to an
  earlier "<context>" or "<example>" (a model that starts writing a new prompt);
- a label counts where it occurs anywhere as a substring ("gardens" names garden, "billiards" names bill);
- a label that occurs (as a substring) in the question never counts, so a target the question mentions is never
  right;
- right when the labels the answer names are exactly the target, or, for a comma-separated target longer than
  three characters (qa8: "apple,football"), exactly its parts.
"""

from __future__ import annotations

import re

# How generated answers are scored: the name recorded in every grid cell that a decoder's answers scored.
BABILONG_SCORER = "babilong-leaderboard"  # compare_answers of booydar/babilong, quirks included
# The rule used before: labels as whole words, the first non-empty piece cut at ". ! ? or a line end", labels
# named by the question ignored but a target in the question accepted. Grids scored with it say so.
WHOLE_WORD_SCORER = "whole-words"

# The leaderboard's label set of each bAbI task (what its scorer looks for in an answer). qa1..qa5 are ours too,
# with the same sets (`memformers.tasks.ANSWERS`).
_ROOMS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
LEADERBOARD_LABELS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("qa1", "qa2", "qa3", "qa4", "qa11", "qa12", "qa13"), _ROOMS),
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
    **dict.fromkeys(("qa6", "qa9", "qa17", "qa18"), ("no", "yes")),
    # an answer "none" names "one" too, so a target "none" is never right (unless the question says "one")
    "qa7": ("none", "one", "three", "two"),
    "qa8": ("apple", "football", "milk", "nothing"),
    "qa10": ("maybe", "no", "yes"),
    "qa14": ("bedroom", "cinema", "kitchen", "office", "park", "school"),
    "qa15": ("cat", "mouse", "sheep", "wolf"),
    "qa16": ("gray", "green", "white", "yellow"),
    # paths: three characters, so a target is scored as one label, not as a list of two
    "qa19": tuple(f"{a},{b}" for a, b in ("ee", "en", "es", "ne", "nn", "nw", "se", "ss", "sw", "wn", "ws", "ww")),
    "qa20": ("bedroom", "bored", "garden", "hungry", "kitchen", "thirsty", "tired"),
}

# The answer ends at the first "." or at a prompt marker, whichever comes first. The official code also cuts at
# "Question", but only after lower-casing the output, so that cut never happens; it is left out here.
_ANSWER_END = re.compile(r"\.|<context>|<example>")


def answer_part(output: str) -> str:
    """The part of a generated `output` that is read as its answer: lower-cased, up to the first "." or prompt
    marker (an empty answer where the output starts with one)."""
    return _ANSWER_END.split(output.lower(), maxsplit=1)[0]


def babilong_labels(task: str) -> tuple[str, ...]:
    """The labels a generated answer to `task` is scored against: the leaderboard's set for a bAbI task, else the
    task's own answer vocabulary (the RMT paper's memorize, detect, reason)."""
    if task in LEADERBOARD_LABELS:
        return LEADERBOARD_LABELS[task]
    from .tasks import task_spec

    answers = task_spec(task).answers
    if not answers:
        raise ValueError(f"task: {task!r} has no answer labels to score a generated answer against")
    return answers


def babilong_correct(output: str, target: str, question: str, labels: list[str] | tuple[str, ...]) -> bool:
    """Whether a free-text `output` answers `question` with `target`, decided as the BABILong leaderboard does.

    `labels` is the task's label set (`babilong_labels`). The labels named in the answer (`answer_part`, as
    substrings, case-insensitive), less those the question names, must be exactly the target: one label, or the
    parts of a comma-separated target of more than three characters.
    """
    if not isinstance(labels, list | tuple) or not all(isinstance(label, str) and label for label in labels):
        raise ValueError(f"labels must be a list of non-empty strings, got {labels!r}")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty label, got {target!r}")
    answer, question = answer_part(output), question.lower()
    label_set = {label.lower() for label in labels}
    named = {label for label in label_set if label in answer and label not in question}
    target = target.lower()  # not stripped: " office" is not a label, so it is never right (as in the official code)
    if "," not in target or len(target) <= 3:  # one label; qa19's "n,e" too
        return named == {target}
    parts = target.split(",")
    # Compared by count, not as sets: a repeated part ("apple,apple") leaves room for one other label, as there.
    return set(parts) <= named and len(named) == len(parts)
