"""Official BABILong files: their records (`input`, `question`, `target`) read, tokenized and scored.

Why apart from `evaluation`: reading a file (JSON, JSONL or Parquet, the published data set's fields, checked
record by record) and tokenizing its records is needed by nothing else. Scoring is not repeated here: a file's
samples go through `evaluation.score_samples`, the loop that scores generated samples, so a file's cells and a
grid's are judged alike. This module imports `evaluation`; `evaluation` never imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .babilong_metric import babilong_labels
from .evaluation import Cell, score_samples

BABILONG_FIELDS = ("input", "question", "target")


def read_babilong_file(path: str | Path) -> list[dict]:
    """The records of a BABILong file: JSON (a list of records, or an object holding one), JSONL or Parquet.

    Every record needs `input` (the context), `question` and `target`, as in the published data set; `task`,
    `length` and `answers` are used where present (files written by `memformers data` have them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is not a file (JSON, JSONL or Parquet with input, question, target)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as parquet
            except ImportError:
                raise ValueError("data: reading Parquet needs pyarrow: pip install 'memformers[parquet]'") from None
            records = parquet.read_table(path).to_pylist()
        elif suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        elif suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(records, dict):  # {"qa1": [...]} or {"data": [...]}: one list inside
                lists = [value for value in records.values() if isinstance(value, list)]
                if len(lists) != 1:
                    raise ValueError(f"data: {path} holds an object without exactly one list of records")
                records = lists[0]
        else:
            raise ValueError(f"data: {path} must end in .json, .jsonl or .parquet, got {suffix or 'no suffix'!r}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"data: {path} is not valid UTF-8 JSON: {error}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"data: {path} holds no records")
    for number, record in enumerate(records):
        missing = [name for name in BABILONG_FIELDS if not isinstance(record, dict) or name not in record]
        if missing:
            raise ValueError(
                f"data: record {number} of {path} lacks {missing}; BABILong records need {BABILONG_FIELDS}"
            )
    return records


@dataclass
class TextSample:
    """A sample read from a file: its ids (input then question, as our own samples end) and the answer."""

    ids: np.ndarray
    question: str
    target: str
    label: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def blocks(self, block: int = 1 << 16) -> Iterator[np.ndarray]:
        for start in range(0, len(self.ids), block):
            yield self.ids[start : start + block]


def text_sample(record: dict, tokenizer) -> TextSample:
    """Tokenize a record: its input, then its question (unless the input already ends with the question's tokens,
    as in files written by `memformers data`)."""
    question = str(record["question"]).strip()
    ids = tokenizer(str(record["input"]).strip(), add_special_tokens=False).input_ids
    question_ids = tokenizer(question, add_special_tokens=False).input_ids
    if ids[-len(question_ids) :] != question_ids:
        ids = ids + question_ids
    return TextSample(np.asarray(ids, dtype=np.int64), question, str(record["target"]).strip())


def evaluate_file(
    model,
    path: str | Path,
    tokenizer,
    task: str | None = None,
    on_cell=None,
    records: list[dict] | None = None,
    **options,
) -> list[Cell]:
    """Score `model` on the records of a BABILong file, one cell per (task, length) the records name.

    Records without `task` take `task`; without `length`, the cell's length is the median of their token counts.
    `records`: the file's records, where the caller has already read them (`read_babilong_file`).
    The allowed labels of the BABILong metric are each record's `answers`, else the task's leaderboard set, else the
    union of qa1–qa5's. `options` go to `score_samples` (batch_size, device, window, max_new_tokens, progress)."""
    from .tasks import answer_vocabulary, get_tokenizer

    tokenizer = get_tokenizer(tokenizer)
    groups: dict[tuple[str, int | None], list[dict]] = {}
    for record in read_babilong_file(path) if records is None else records:
        name = str(record.get("task") or task or Path(path).stem)
        groups.setdefault((name, record.get("length")), []).append(record)
    cells = []
    for (name, length), records in groups.items():
        if records[0].get("answers"):
            labels = list(records[0]["answers"])
        else:
            try:
                labels = list(babilong_labels(name))  # the leaderboard's set, qa1–qa20
            except ValueError:
                labels = list(answer_vocabulary(["qa1", "qa2", "qa3", "qa4", "qa5"]))
        made = [text_sample(record, tokenizer) for record in records]
        cell = score_samples(model, made, labels, tokenizer, **options)
        cell.task = name
        cell.length = int(length) if length is not None else int(np.median([s.num_tokens for s in made]))
        cell.split = "file"
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)
    return cells
