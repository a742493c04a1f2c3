"""Scoring a model's answers.

The BABILong metric (arXiv 2406.10149) scores free-text answers of generative models: the answer is right when the
target label appears in the output's first sentence and no other label does. Labels that the question itself
mentions (e.g. "apple" in "Who gave the apple to Bill?") are ignored, since a model may well repeat the question.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?\n]")


def _first_sentence(output: str) -> str:
    for piece in _SENTENCE_END.split(output):
        if piece.strip():
            return piece
    return ""


def _mentions(text: str, label: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text) is not None


def babilong_correct(output: str, target: str, question: str, labels: list[str]) -> bool:
    """Whether a free-text `output` answers `question` with `target`, under BABILong's answer comparison.

    Case-insensitive. Right when every target label (a comma-separated target is a list of labels) is in the
    output's first sentence, and no other label from `labels` is there, except labels that occur in the question.
    Labels match as whole words ("bill" does not match "billiards").
    """
    if not isinstance(labels, list | tuple) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"labels must be a list of strings, got {labels!r}")
    if not target.strip():
        raise ValueError(f"target must be a non-empty label, got {target!r}")
    sentence = _first_sentence(output.lower())
    question = question.lower()
    wanted = {t.strip() for t in target.lower().split(",") if t.strip()}
    found = {label.lower() for label in labels if _mentions(sentence, label.lower())}
    in_question = {label.lower() for label in labels if _mentions(question, label.lower())}
    extra = found - wanted - in_question
    return all(_mentions(sentence, t) for t in wanted) and not extra
