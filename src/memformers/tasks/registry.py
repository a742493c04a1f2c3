"""The task registry: one name per task, one way to make a sample of it, and export to JSONL.

Task names: qa1 .. qa5 (bAbI-style, facts scattered in noise as in BABILong), memorize, detect, reason (the RMT
paper's three tasks; answer one of 6 places), copy, reverse, associative (algorithmic, own vocabulary) and lm
(language modelling on windows of the noise books: `memformers.tasks.lm`).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from memformers.tasks.algorithmic import (
    ALGORITHMIC_TASKS,
    AlgorithmicSample,
    algorithmic_tokenizer,
    make_algorithmic,
    to_text,
)
from memformers.tasks.babi import ANSWERS, generate_story
from memformers.tasks.haystack import Sample, build_haystack
from memformers.tasks.noise import SPLITS


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: a bAbI-style story in noise, or an algorithmic problem; how its facts are placed."""

    name: str
    kind: str  # "babi" or "algorithmic"
    placement: str  # babi: "start" or "random"; algorithmic: ""
    answers: tuple[str, ...]  # the answer vocabulary (empty where the answer is a sequence)
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("qa1", "babi", "random", ANSWERS["qa1"], "single supporting fact: where is an actor"),
        TaskSpec("qa2", "babi", "random", ANSWERS["qa2"], "two supporting facts: where is an object"),
        TaskSpec("qa3", "babi", "random", ANSWERS["qa3"], "three supporting facts: where was an object before"),
        TaskSpec("qa4", "babi", "random", ANSWERS["qa4"], "two-argument relations: what is north of a room"),
        TaskSpec("qa5", "babi", "random", ANSWERS["qa5"], "three-argument relations: who gave what to whom"),
        TaskSpec("memorize", "babi", "start", ANSWERS["memorize"], "fact memorization: one fact at the start"),
        TaskSpec("detect", "babi", "random", ANSWERS["detect"], "fact detection: one fact anywhere"),
        TaskSpec("reason", "babi", "random", ANSWERS["reason"], "reasoning: two facts needed, one distractor"),
        TaskSpec("copy", "algorithmic", "", (), "copy: the source written twice"),
        TaskSpec("reverse", "algorithmic", "", (), "reverse: the source backwards"),
        TaskSpec("associative", "algorithmic", "", (), "associative retrieval: the value of a query key"),
        TaskSpec("lm", "lm", "", (), "language modelling: next-token loss on every token of long book windows"),
    )
}
assert set(ALGORITHMIC_TASKS) <= set(TASKS)


def task_spec(task: str) -> TaskSpec:
    """The registry entry of a task name, or a ValueError listing the names there are."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return TASKS[task]


def answer_vocabulary(tasks: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The answers of several tasks as one vocabulary (first task's answers first, then each new one in order).

    One classifier over qa1..qa5 needs a single label space: class i is answer i of this tuple.
    """
    vocabulary: dict[str, None] = {}
    for task in tasks:
        vocabulary.update(dict.fromkeys(task_spec(task).answers))
    return tuple(vocabulary)


def sample_rng(seed: int, task: str, length: int, index: int, training: bool = False) -> random.Random:
    """The random generator of one sample: fixed by (seed, task, length, index), independent of other samples.
    Training samples come from a stream of their own, so that no evaluation sample, whatever its seed, is ever one."""
    return random.Random(f"memformers{'-training' if training else ''}:{seed}:{task}:{length}:{index}")


TokenizerLike = str | Path | PreTrainedTokenizerBase  # an object, or a name/path for load_tokenizer
_TOKENIZERS: dict[str, PreTrainedTokenizerBase] = {}
ALGORITHMIC_TOKENIZER = "algorithmic:"  # "algorithmic:16": the algorithmic tasks' own ids, 16 symbols


def algorithmic_tokenizer_name(vocab_size: int) -> str:
    """The name `get_tokenizer` turns into the algorithmic tasks' tokenizer of `vocab_size` symbols."""
    return f"{ALGORITHMIC_TOKENIZER}{vocab_size}"


def get_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """A tokenizer object, loading names ("minilm", "smollm2", a path, "algorithmic:N") once per process."""
    if not isinstance(tokenizer, str | Path):
        return tokenizer
    name = str(tokenizer)
    if name.startswith(ALGORITHMIC_TOKENIZER) and name not in _TOKENIZERS:
        size = name.removeprefix(ALGORITHMIC_TOKENIZER)
        if not size.isdigit():
            raise ValueError(f"tokenizer: {name!r} must be {ALGORITHMIC_TOKENIZER}<number of symbols>")
        _TOKENIZERS[name] = algorithmic_tokenizer(int(size))
    if name not in _TOKENIZERS:
        from memformers.backbones import load_tokenizer

        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def make_sample(
    task: str,
    length: int,
    tokenizer: TokenizerLike,
    seed: int = 0,
    index: int = 0,
    split: str = "train",
    noise_dir: Path | str | None = None,
    *,
    training: bool = False,
    facts_first: bool = False,
    facts_apart: bool = False,
    num_facts: int | Sequence[int] | None = None,
    distinct_actors: bool = False,
) -> Sample:
    """Sample `index` of a bAbI-style task at `length` tokens (0 = no noise), deterministic in its arguments.

    `tokenizer` is a tokenizer object or a name for `memformers.backbones.load_tokenizer`. `training` draws from the
    trainer's own stream: the evaluation samples (any seed) are then stories it never trained on, even at length 0,
    where no noise book tells them apart. `facts_first` puts every fact of the same story before the noise
    (placement "start"), wherever the task puts them otherwise; `facts_apart` spaces them evenly through it
    (placement "apart"): as far from each other as the length allows. `num_facts` (qa1-qa5) sets the story's number
    of sentences, an int or a (low, high) range; None: the task's own. `distinct_actors` (qa1): every sentence
    moves another actor to another place, so no place in the story is the answer more often than another.
    """
    spec = task_spec(task)
    if spec.kind != "babi":
        raise ValueError(
            f"task {task!r} is algorithmic; use make_algorithmic (tasks that take a tokenizer: "
            f"{[t for t, s in TASKS.items() if s.kind == 'babi']})"
        )
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if facts_first and facts_apart:
        raise ValueError("facts_first and facts_apart place the facts in two ways; choose one")
    rng = sample_rng(seed, task, length, index, training)
    story = generate_story(task, rng, num_facts, distinct_actors)
    placement = "start" if facts_first else "apart" if facts_apart else spec.placement
    return build_haystack(story, length, get_tokenizer(tokenizer), rng, spec.answers, split, noise_dir, placement)


def make_algorithmic_sample(
    task: str, length: int, seed: int = 0, index: int = 0, segment_size: int | None = None, **options
) -> AlgorithmicSample:
    """Sample `index` of an algorithmic task whose source is `length` tokens (in segments of `segment_size`)."""
    if task_spec(task).kind != "algorithmic":
        raise ValueError(f"task {task!r} is not algorithmic; allowed: {list(ALGORITHMIC_TASKS)}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int for algorithmic tasks, got {length!r}")
    segment_size = segment_size or length
    if length % segment_size:
        raise ValueError(f"length {length} must be a multiple of segment_size {segment_size}")
    rng = sample_rng(seed, task, length, index)
    return make_algorithmic(task, length // segment_size, segment_size, rng, **options)


def _parse_tasks(task: str) -> list[str]:
    names = [t.strip() for t in str(task).split(",") if t.strip()]
    if not names:
        raise ValueError(f"task must name at least one of {list(TASKS)}, got {task!r}")
    for name in names:
        task_spec(name)
    return names


def export_jsonl(
    task: str,
    lengths: list[int],
    samples: int,
    tokenizer: TokenizerLike,
    seed: int,
    out: Path,
    noise_dir: Path | None = None,
    split: str = "test",
    *,
    facts_first: bool = False,
    facts_apart: bool = False,
) -> int:
    """Write a task x length grid of samples to JSONL (one sample a line), so any model can be evaluated on it.

    `task` is a name or comma-separated names. Each line has task, length, index, seed, input (the whole text,
    question included), question, target, label, answers, facts, supporting, fact_positions (token index of each
    fact in the sample's ids), num_tokens and tokenizer. Noise comes from the test books by default. For
    algorithmic tasks `length` is the source length in their own symbols and the tokenizer is not used.
    `facts_first` / `facts_apart` place the bAbI stories' facts as `make_sample` does (recorded in each line).
    Returns the number of lines written.
    """
    names = _parse_tasks(task)
    placement = {"facts_first": facts_first, "facts_apart": facts_apart}
    if (facts_first or facts_apart) and any(TASKS[name].kind != "babi" for name in names):
        raise ValueError(f"facts_first and facts_apart place bAbI tasks' facts; {task!r} includes algorithmic tasks")
    if isinstance(lengths, int) or not lengths:
        raise ValueError(f"lengths must be a non-empty list of ints, got {lengths!r}")
    for length in lengths:
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"lengths must hold ints >= 0 (0 = no noise), got {length!r} in {lengths!r}")
    if not isinstance(samples, int) or samples <= 0:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    tok = None
    if any(TASKS[name].kind == "babi" for name in names):
        tok = get_tokenizer(tokenizer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # renamed into place when whole: never half a file
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for name in names:
                for length in lengths:
                    for index in range(samples):
                        record = _record(name, length, index, seed, tok, tokenizer, noise_dir, split, placement)
                        f.write(json.dumps(record, ensure_ascii=False) + "\n")
                        written += 1
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _record(
    name: str,
    length: int,
    index: int,
    seed: int,
    tok: PreTrainedTokenizerBase | None,
    tokenizer_name: TokenizerLike,
    noise_dir: Path | None,
    split: str,
    placement: dict[str, bool],
) -> dict:
    base = {"task": name, "length": length, "index": index, "seed": seed}
    if TASKS[name].kind == "algorithmic":
        sample = make_algorithmic_sample(name, length, seed, index)
        query = to_text(sample.source[len(sample.source) - sample.query_size :]) if sample.query_size else ""
        return base | {
            "input": to_text(sample.source),
            "question": query,
            "target": to_text(sample.target),
            "label": sample.label,
            "answers": [],
            "facts": [],
            "supporting": [],
            "fact_positions": list(sample.fact_positions),
            "num_tokens": len(sample.source),
            "tokenizer": None,
        }
    sample = make_sample(name, length, tok, seed, index, split, noise_dir, **placement)
    return (
        base
        | placement
        | {
            "input": sample.input,
            "question": sample.question,
            "target": sample.target,
            "label": sample.label,
            "answers": list(sample.answers),
            "facts": list(sample.facts),
            "supporting": list(sample.supporting),
            "fact_positions": list(sample.fact_positions),
            "num_tokens": sample.num_tokens,
            "tokenizer": str(tokenizer_name) if isinstance(tokenizer_name, str | Path) else None,
        }
    )
