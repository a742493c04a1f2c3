"""Scoring a model's answers: accuracy × length grids.

A classifier is scored by its predicted class; a decoder's generated answers are scored with the BABILong metric
exactly as the leaderboard scores them (`memformers.babilong_metric.babilong_correct`).

This module holds the scoring loop (`score_samples`), the grid of generated samples around it (cells, their JSON,
resuming, the table). The records of an official BABILong file are read and tokenized in `babilong_files`, which
scores them through `score_samples`; this module never imports it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .babilong_metric import BABILONG_SCORER, babilong_correct, babilong_labels
from .files import atomic_file
from .recurrence import restore_state, state_tensors
from .segments import Segment, count_segments, right_aligned_sizes, stack_segments, stream_segments

# ----------------------------------------------------------------------------------------------------------------
# Accuracy × length grids


@dataclass
class Cell:
    """Accuracy of one task at one length, with its 95% Wilson interval and the time it took."""

    task: str
    length: int
    samples: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    seconds: float
    tokens_per_s: float
    seed: int = 0
    split: str = "test"
    examples: list[dict] = field(default_factory=list)  # generated answers: the first few, for inspection
    command: str = ""  # the command that measured this cell (grids are filled by several)
    scorer: str = ""  # how generated answers were judged (BABILONG_SCORER); "" for a classifier's classes
    precision: str = "fp32"  # what the reading computed in ("bf16": autocast; memformers.precision)
    facts_first: bool = False  # every fact before the noise: no window holds one, only a memory can answer
    facts_apart: bool = False  # the facts evenly spaced through the noise: as few to a segment as the length allows
    knobs: dict = field(default_factory=dict)  # the tunable knobs read with (older cells: only those set by --set)
    wrong: list[int] | None = None  # the samples answered wrong, by index: two readings compared story by story
    wrong_answers: list[str] | None = None  # what the model answered to each of `wrong`, in its order


@dataclass
class PartialCell:
    """What a cell has finished so far: the samples answered (index → right), the seconds and tokens they took and
    their examples. A grid saves it after every batch, so a cell of hours (1M tokens and more) that is stopped
    resumes from its last batch instead of its first."""

    right: dict[int, bool] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0
    examples: list[dict] = field(default_factory=list)
    said: dict[int, str] = field(default_factory=dict)  # the wrong samples' answers, by index

    def to_json(self, key: dict) -> dict:
        """`key` (what the cell is: task, length, samples and how it is read) with the progress."""
        progress = {"right": sorted(self.right.items()), "seconds": round(self.seconds, 2), "tokens": self.tokens}
        return key | progress | {"examples": self.examples, "said": sorted(self.said.items())}

    @classmethod
    def from_json(cls, record: dict) -> PartialCell:
        right = {int(index): bool(ok) for index, ok in record["right"]}
        said = {int(index): str(answer) for index, answer in record.get("said", [])}
        return cls(right, float(record["seconds"]), int(record["tokens"]), list(record.get("examples", [])), said)


@dataclass
class ReadingCheckpoint:
    """Where the batch being read has got to: its memory state after so many segments, saved to `path` at most every
    `every_s` seconds, so a batch of hours (5 samples of 10M tokens) that is stopped goes on from there rather than
    from its first segment. Only a state whose fields are all tensors is saved (ARMT, RMT, a segment cache); a
    kNN store or memory bank is not, and such a batch starts again."""

    path: Path
    every_s: float = 300.0

    def load(self, model, indices: list[int]) -> tuple[int, object, float] | None:
        """(segments read, state, the cell's seconds then) saved for the batch of sample `indices`, else None."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, weights_only=True)
        if saved["indices"] != indices:  # another batch's (the cell's samples were split otherwise): not this one
            return None
        return saved["segments"], restore_state(model.init_state(len(indices)), saved["state"]), saved["seconds"]

    def save(self, indices: list[int], segments: int, state, seconds: float) -> None:
        tensors = state_tensors(state)
        if tensors is None:
            return
        record = {"indices": indices, "segments": segments, "seconds": seconds, "state": tensors}
        with atomic_file(self.path) as tmp:
            torch.save(record, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


NUM_EXAMPLES = 3  # generated answers kept per cell


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion that stays inside [0, 1] and is honest at 0% and 100%."""
    if total <= 0:
        raise ValueError(f"total must be ≥ 1, got {total}")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def sample_segments(
    samples: list, content_size: int, alignment: str = "right", window: int | None = None
) -> Iterator[Segment]:
    """Stream equal-length samples side by side as batched segments; memory O(batch × segment).

    `window` keeps only each sample's last `window` tokens (a model without memory sees just its window).
    """
    lengths = {sample.num_tokens for sample in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples must have equal lengths to be streamed together, got {sorted(lengths)}")
    length = lengths.pop()
    skip = 0 if window is None else max(0, length - window)
    length -= skip
    first = right_aligned_sizes(length, content_size) if alignment == "right" else ()
    streams = [
        stream_segments((torch.from_numpy(block) for block in _skip(sample.blocks(1 << 16), skip)), content_size, first)
        for sample in samples
    ]
    for rows in zip(*streams, strict=True):
        yield stack_segments(list(rows))


def _skip(blocks: Iterator, count: int) -> Iterator:
    """The blocks of ids without their first `count` tokens."""
    for block in blocks:
        if count >= len(block):
            count -= len(block)
            continue
        yield block[count:]
        count = 0


def predict_classes(
    model,
    samples: list,
    device: torch.device | str = "cpu",
    callback=None,
    window: int | None = None,
    state=None,
    skip: int = 0,
    on_segment=None,
) -> list[int]:
    """Read each sample (or its last `window` tokens) through `model`, a classification memory model, and return
    the predicted classes. To go on from a reading stopped part way: `state` after its first `skip` segments;
    `on_segment(segments_read, state)` is called after every segment but the last."""
    if getattr(model, "token_level", True):
        raise ValueError(
            "model: accuracy grids score classification heads (an encoder *ForSequenceClassification); "
            f"this model has a {getattr(model, 'info', None) and model.info.head} head"
        )
    segments = itertools.islice(sample_segments(samples, model.content_size, model.alignment, window), skip, None)
    segments = (s.to(device) for s in segments)
    logits = None
    with torch.no_grad():
        read = model.stream(segments, state, batch_size=len(samples), callback=callback)
        for segments_read, (segment, output, state) in enumerate(read, start=skip + 1):
            if bool(segment.is_last.all()):
                logits = output.logits
            elif on_segment is not None:
                on_segment(segments_read, state)
    return logits.argmax(dim=-1).tolist()


def class_answers(model) -> tuple[str, ...] | None:
    """The answer each class of a classifier stands for (its backbone's `id2label`), or None where the labels are
    the default `LABEL_i`: then class i is answer i of the task's own vocabulary."""
    config = getattr(getattr(model, "backbone", None), "config", None)
    id2label = getattr(config, "id2label", None) or {}
    answers = tuple(id2label[i] for i in sorted(id2label))
    return None if all(a == f"LABEL_{i}" for i, a in enumerate(answers)) else answers


def generates(model) -> bool:
    """Whether `model` is scored by generating its answer (a mechanism that declares `generates`, on a causal-LM
    head) rather than by its classes."""
    return bool(getattr(model, "generates", False) and model.token_level and model.causal)


def generate_answers(
    model,
    samples: list,
    tokenizer,
    device: torch.device | str = "cpu",
    callback=None,
    window: int | None = None,
    max_new_tokens: int = 8,
) -> list[str]:
    """Stream each sample (or its last `window` tokens) through `model`, a memory model with a causal-LM head,
    and return its greedy answers as text, cut at the end-of-text token.

    The haystack is never held whole: segments come from the samples' blocks, and generation starts from the
    read memory and each sample's last segment (`MemoryModel.generate_streamed`).
    """
    from .tasks import get_tokenizer

    if not generates(model):
        raise ValueError(
            "model: generation scores decoders with a causal-LM head; this model has a "
            f"{getattr(model, 'info', None) and model.info.head} head (use predict_classes for classifiers)"
        )
    tokenizer = get_tokenizer(tokenizer)  # max_new_tokens is checked by generate_streamed, before any reading
    eos = end_of_text_id(model, tokenizer)
    segments = (s.to(device) for s in sample_segments(samples, model.content_size, model.alignment, window))
    new = model.generate_streamed(
        segments, len(samples), callback, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos
    )  # [batch, ≤ max_new_tokens]
    answers = []
    for row in new.tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def end_of_text_id(model, tokenizer) -> int | None:
    """The token that ends an answer: the backbone's EOS, else the tokenizer's EOS, else its [SEP] (what the
    trainer appends to answers when the tokenizer has no EOS)."""
    config = getattr(getattr(model, "backbone", None), "config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id, tokenizer.sep_token_id):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def evaluate_cell(
    model,
    task: str,
    length: int,
    samples: int,
    tokenizer,
    seed: int = 0,
    split: str = "test",
    noise_dir: str | Path | None = None,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress=None,
    window: int | None = None,
    max_new_tokens: int = 8,
    precision: str = "fp32",
    facts_first: bool = False,
    facts_apart: bool = False,
    done: PartialCell | None = None,
    on_batch=None,
    reading_checkpoint: ReadingCheckpoint | None = None,
) -> Cell:
    """Accuracy of `model` on `samples` fresh samples of `task` at `length` tokens, noise from `split`.

    Samples come from `memformers.tasks.make_sample` with indices 0..samples-1, so every model sees the same ones.
    A classifier is scored by its predicted class; a decoder with a causal-LM head generates its answer (greedy,
    at most `max_new_tokens`), scored with `babilong_correct`, and the cell keeps its first answers as examples.
    `progress(done_segments, total_segments)` is called after every segment. `window` reads only the last
    `window` tokens of each sample: the baseline of a backbone without memory, truncated to its window.
    `precision` "bf16" reads under autocast (`memformers.precision`): on a CPU with bf16 instructions ~2.6× faster.
    `facts_first` puts every fact of the story before the noise (the same stories, placed otherwise), so that past
    one window only what the memory carried can answer: its share, with no help from the segment in front of it.
    `facts_apart` spaces them evenly through the noise instead: a memory then takes in about one at a time.
    `done`, `on_batch` and `reading_checkpoint` resume a stopped cell: see `score_samples`.
    """
    from .tasks import make_sample, task_spec

    if task_spec(task).kind != "babi":
        raise ValueError(f"task must be a question-answering task for an accuracy grid, got {task!r}")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be ≥ 1, got samples={samples}, batch_size={batch_size}")
    options = {"facts_first": facts_first, "facts_apart": facts_apart}
    made = [make_sample(task, length, tokenizer, seed, index, split, noise_dir, **options) for index in range(samples)]
    labels = list(babilong_labels(task))
    reading = (batch_size, device, progress, window, max_new_tokens, precision)
    resuming = {"done": done, "on_batch": on_batch, "reading_checkpoint": reading_checkpoint}
    cell = score_samples(model, made, labels, tokenizer, *reading, **resuming)
    cell.task, cell.length, cell.seed, cell.split = task, length, seed, split
    cell.facts_first, cell.facts_apart = facts_first, facts_apart
    return cell


def score_samples(
    model,
    made: list,
    labels: list[str],
    tokenizer,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress=None,
    window: int | None = None,
    max_new_tokens: int = 8,
    precision: str = "fp32",
    done: PartialCell | None = None,
    on_batch=None,
    reading_checkpoint: ReadingCheckpoint | None = None,
) -> Cell:
    """Accuracy of `model` on `made` samples (anything with `num_tokens`, `blocks()`, `question`, `target` and
    `label`), read in batches of equal length; `labels` are the answers the BABILong metric knows for them.
    The returned cell has no task or length yet: the caller names them. `done` (a `PartialCell` of these samples)
    skips the samples it has answered and counts them, its time and tokens in; `on_batch(progress)` is called
    with the `PartialCell` so far after every batch. A classifier's batch also saves where it has got to in
    `reading_checkpoint` and goes on from there when read again."""
    from .precision import autocast

    model.eval()
    generating = generates(model)
    classes = None if generating else class_answers(model)
    if classes is not None and not set(labels) <= set(classes):
        raise ValueError(f"task: the model's classes {list(classes)} do not cover the answers {labels}")
    done = done or PartialCell()
    if any(not 0 <= index < len(made) for index in done.right):
        raise ValueError(f"done: sample indices outside 0..{len(made) - 1}: not a partial cell of these samples")
    so_far = PartialCell(dict(done.right), done.seconds, done.tokens, list(done.examples), dict(done.said))
    examples = so_far.examples
    clock = {"start": time.perf_counter() - done.seconds, "saved": time.perf_counter()}

    def elapsed() -> float:  # this cell's seconds: those before it was stopped and these
        return time.perf_counter() - clock["start"]

    todo = [index for index in range(len(made)) if index not in so_far.right]
    batches = [[todo[i] for i in b] for b in equal_length_batches([made[i] for i in todo], batch_size)]
    reads = [made[b[0]].num_tokens if window is None else min(window, made[b[0]].num_tokens) for b in batches]
    per_batch = [count_segments(read, model.content_size) for read in reads]
    for number, (indices, read) in enumerate(zip(batches, reads, strict=True)):
        batch = [made[index] for index in indices]

        resumed = None if reading_checkpoint is None else reading_checkpoint.load(model, indices)
        skip, state = 0, None
        if resumed is not None:  # this batch was stopped part way: its state after `skip` segments, its seconds
            skip, state, seconds = resumed
            clock["start"] = time.perf_counter() - seconds

        def callback(done, _total, _tokens, before=sum(per_batch[:number])):  # done counts the skipped segments
            if progress is not None:
                progress(before + done, sum(per_batch))

        def save_reading(segments_read: int, state, indices=indices) -> None:
            if time.perf_counter() - clock["saved"] >= reading_checkpoint.every_s:
                reading_checkpoint.save(indices, segments_read, state, elapsed())
                clock["saved"] = time.perf_counter()

        with autocast(precision, device):
            if generating:
                answers = generate_answers(model, batch, tokenizer, device, callback, window, max_new_tokens)
            else:
                on_segment = None if reading_checkpoint is None else save_reading
                predicted = predict_classes(model, batch, device, callback, window, state, skip, on_segment)
        if not generating:
            # a classifier "says" its class's answer; without named classes, class i is the i-th label
            answers = [classes[p] if classes is not None else labels[p] if p < len(labels) else "" for p in predicted]
        if generating:
            right = [babilong_correct(a, s.target, s.question, labels) for a, s in zip(answers, batch, strict=True)]
            for index, answer, sample, ok in zip(indices, answers, batch, right, strict=True):
                if len(examples) < NUM_EXAMPLES:
                    examples.append(
                        {"index": index, "question": sample.question, "target": sample.target, "output": answer}
                        | {"correct": ok}
                    )
        else:  # a class is its answer exactly
            right = [a == s.target for a, s in zip(answers, batch, strict=True)]
        so_far.right.update(zip(indices, right, strict=True))
        so_far.said.update((index, answer) for index, answer, ok in zip(indices, answers, right, strict=True) if not ok)
        so_far.tokens += read * len(batch)
        so_far.seconds = elapsed()
        if on_batch is not None:
            on_batch(so_far)
        if reading_checkpoint is not None:  # the batch is in `so_far` (and saved): nothing of it left to go on from
            reading_checkpoint.clear()
    correct, tokens, seconds = sum(so_far.right.values()), so_far.tokens, elapsed()
    wrong = sorted(index for index, ok in so_far.right.items() if not ok)
    low, high = wilson_interval(correct, len(made))
    return Cell(
        "",
        0,
        len(made),
        correct,
        correct / len(made),
        low,
        high,
        round(seconds, 2),
        round(tokens / seconds, 1) if seconds else 0.0,
        examples=examples,
        scorer=BABILONG_SCORER if generating else "",
        precision=precision,
        wrong=wrong,
        wrong_answers=[so_far.said.get(index, "") for index in wrong],  # "": answered before answers were kept
    )


def equal_length_batches(samples: list, batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of at most `batch_size` that share one length (they stream side by side)."""
    by_length: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_length.setdefault(sample.num_tokens, []).append(index)
    batches = [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    return sorted(batches)


def load_cells(path: str | Path) -> list[Cell]:
    """The cells already in a results JSON (`{"results": [...]}`), so an interrupted grid resumes."""
    path = Path(path)
    if not path.exists():
        return []
    return [Cell(**row) for row in json.loads(path.read_text()).get("results", [])]


def load_partial_cells(path: str | Path) -> list[dict]:
    """The unfinished cells of a results JSON (`"partial"`: each cell's key and its `PartialCell`)."""
    path = Path(path)
    return json.loads(path.read_text()).get("partial", []) if path.exists() else []


def save_cells(
    path: str | Path, cells: list[Cell], meta: dict | None = None, partial: list[dict] | None = None
) -> None:
    """Write `{"results": [...], **meta}` atomically (temporary file, then rename), with `"partial"`: the unfinished
    cells (`PartialCell.to_json`), those already in the file where `partial` is None.

    Where answers were generated, `"scorer"` names the rule that judged them (a list where cells differ), so a
    grid says whether its numbers are comparable with the BABILong leaderboard's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = load_partial_cells(path) if partial is None else partial
    record = {key: value for key, value in (meta or {}).items() if key not in ("scorer", "partial")}
    scorers = sorted({cell.scorer for cell in cells if cell.scorer})
    if scorers:
        record["scorer"] = scorers[0] if len(scorers) == 1 else scorers
    record["results"] = [asdict(cell) for cell in cells]
    if partial:
        record["partial"] = partial
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def evaluate_grid(
    model,
    tasks: list[str],
    lengths: list[int],
    samples: int | list[int],
    tokenizer,
    json_path: str | Path | None = None,
    meta: dict | None = None,
    on_cell=None,
    knobs: dict | None = None,
    reading_every_s: float = 300.0,
    saved_knobs: dict | None = None,
    **cell_options,
) -> list[Cell]:
    """Every task × length cell; each finished cell is saved at once, and cells already saved are skipped.

    `samples`: per cell, or one count per length (long inputs cost more: fewer samples, wider intervals).
    Cells of other tasks and lengths already in `json_path` are kept, so several commands can fill one grid;
    each cell records the command of `meta` that measured it. A cell stopped part way resumes from its last
    finished batch (saved as `"partial"` after every batch), and a classifier's batch from where its reading had
    got to (its memory state, saved beside the JSON at most every `reading_every_s` seconds: `ReadingCheckpoint`).
    A decoder's cell judged by another rule than today's (`BABILONG_SCORER`), or a cell read in another precision
    or placement of facts, or with other `knobs` (the tunable knobs the model reads with now, recorded in each cell),
    is measured again, so one grid never mixes them. Knobs compare by value: a cell that names only some (recorded
    before every knob was) read the others as `saved_knobs`, the loaded model's, so a model stored with a knob set
    (`memformers export --set`) takes up the cells measured on its source with that `--set`.
    """
    counts = [samples] * len(lengths) if isinstance(samples, int) else list(samples)
    if len(counts) != len(lengths) or any(n < 1 for n in counts):
        raise ValueError(f"samples: one count ≥ 1, or one per length ({len(lengths)}), got {samples!r}")
    cells = load_cells(json_path) if json_path else []
    seed, split = cell_options.get("seed", 0), cell_options.get("split", "test")
    scorer = BABILONG_SCORER if generates(model) else ""
    placement = (cell_options.get("facts_first", False), cell_options.get("facts_apart", False))
    knobs, saved_knobs = dict(knobs or {}), dict(saved_knobs or {})
    how = (seed, split, scorer, cell_options.get("precision", "fp32"), placement, saved_knobs | knobs)
    done = {
        (c.task, c.length, c.samples)
        for c in cells
        if (c.seed, c.split, c.scorer, c.precision, (c.facts_first, c.facts_apart), saved_knobs | c.knobs) == how
    }
    partial = load_partial_cells(json_path) if json_path else []
    names = ("seed", "split", "scorer", "precision", "placement", "knobs")
    noise_dir = cell_options.get("noise_dir")  # a partial cell goes on only on the very same samples, read alike
    read_alike = {"window": cell_options.get("window"), "noise_dir": None if noise_dir is None else str(noise_dir)}
    for task in tasks:
        for length, count in zip(lengths, counts, strict=True):
            if (task, length, count) in done:
                continue
            key = {"task": task, "length": length, "samples": count} | dict(zip(names, how, strict=True)) | read_alike
            key = json.loads(json.dumps(key | {"knobs": knobs}))  # as the file holds it: the placement a list

            def same_reading(record: dict, key=key) -> bool:
                knobs_alike = saved_knobs | record.get("knobs", {}) == saved_knobs | key["knobs"]
                return knobs_alike and all(record.get(k) == value for k, value in key.items() if k != "knobs")

            mine = [p for p in partial if same_reading(p)]
            others = [p for p in partial if p not in mine]

            def save_progress(so_far: PartialCell, cells=cells, others=others, key=key) -> None:
                save_cells(json_path, cells, meta, others + [so_far.to_json(key)])

            done_so_far = PartialCell.from_json(mine[0]) if mine else None
            options = cell_options | {"done": done_so_far, "on_batch": save_progress if json_path else None}
            if json_path:  # one file a cell, named by what it reads: a cell read otherwise never takes it up
                state_path = reading_state_path(json_path, key)
                set_only = {k: v for k, v in key["knobs"].items() if k not in saved_knobs or saved_knobs[k] != v}
                begun_before = reading_state_path(json_path, key | {"knobs": set_only})
                if not state_path.exists() and begun_before.exists():  # named when cells recorded --set knobs alone
                    state_path = begun_before
                options["reading_checkpoint"] = ReadingCheckpoint(state_path, reading_every_s)
            cell = evaluate_cell(model, task, length, count, tokenizer, **options)
            cell.command, cell.knobs = (meta or {}).get("command", ""), knobs
            cells, partial = [c for c in cells if (c.task, c.length) != (task, length)] + [cell], others
            if json_path:
                save_cells(json_path, cells, meta, partial)
            if on_cell is not None:
                on_cell(cell)
    return cells


def reading_state_path(json_path: str | Path, key: dict) -> Path:
    """Where a cell's reading state is saved beside its grid's JSON, named by what the cell reads (`key`)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(json_path).with_name(f"{Path(json_path).name}.{digest}.state.pt")


def markdown_table(cells: list[Cell]) -> str:
    """Tasks as rows, lengths as columns, accuracy (%) in the cells."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    lengths = sorted({c.length for c in cells})
    by_key = {(c.task, c.length): c for c in cells}
    lines = ["| task | " + " | ".join(format_length(n) for n in lengths) + " |"]
    lines.append("|---|" + "---:|" * len(lengths))
    for task in tasks:
        row = [f"{100 * by_key[task, n].accuracy:.0f}" if (task, n) in by_key else "–" for n in lengths]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_length(tokens: int) -> str:
    """2043904 → '2M', 65536 → '64K', 512 → '512'."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= size:
            value = tokens / size
            return f"{value:.0f}{unit}" if value >= 10 or value == int(value) else f"{value:.1f}{unit}"
    return str(tokens)
