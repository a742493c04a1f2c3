"""`memformers demo`: a trained memory model answers questions about facts hidden in a million tokens of books it
never saw, and says how far it can be trusted."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import typer
from rich.table import Table

from ..errors import InputError
from .checkpoints import SHIPPED_CHECKPOINT, checkpoint_tokenizer, read_checkpoint, trained_tasks
from .measure import stream
from .options import parse_ints, threads_option, use_threads
from .output import console, progress_bar

CLASSIFIER_TASKS = ("memorize", "detect", "reason")  # what a classifier's demo can ask when its tasks are not recorded
SHOWCASE_LENGTH = 1_048_576  # the length the demo hides facts in, where the model is right there
RIGHT = 0.9  # the accuracy from which the demo calls a model right at a length
EVALUATION_NAME = "evaluation.json"  # a checkpoint's recorded grid: memformers eval CKPT --json CKPT/evaluation.json
LIVE_TABLE_LENGTHS = "1024,4096,16384,131072"


def chance_level(task: str) -> float:
    """What guessing uniformly among a task's answers scores."""
    from ..tasks import task_spec

    return 1 / len(task_spec(task).answers)


def recorded_evaluation(checkpoint: Path) -> list:
    """The accuracy grid saved beside a checkpoint (cells of `memformers eval --json`), [] where there is none."""
    from ..evaluation import load_cells

    return load_cells(Path(checkpoint) / EVALUATION_NAME)


def showcase_length(cells: list, tasks: list[str]) -> tuple[int, str]:
    """The demo's default length, and a sentence saying why when it is not a million tokens.

    A million tokens, unless the recorded grid says the model is not right there (every task ≥ RIGHT): then the
    longest recorded length where it is, or, where it is right nowhere, the length of its best mean accuracy.
    Lengths recorded for only some of `tasks` do not count.
    """
    from ..evaluation import format_length

    by_length: dict[int, dict[str, float]] = {}
    for cell in cells:
        if cell.task in tasks:
            by_length.setdefault(cell.length, {})[cell.task] = cell.accuracy
    complete = {n: scores for n, scores in by_length.items() if len(scores) == len(set(tasks))}
    if not complete:
        return SHOWCASE_LENGTH, ""
    right = [n for n, scores in complete.items() if min(scores.values()) >= RIGHT]
    if any(n >= SHOWCASE_LENGTH for n in right):
        return SHOWCASE_LENGTH, ""

    def scores(n: int) -> str:
        return ", ".join(f"{task} {100 * complete[n][task]:.0f}%" for task in dict.fromkeys(tasks))

    def shown(n: int) -> str:
        return f"length {format_length(n)}" + (" (the story alone)" if n == 0 else "")

    million = format_length(SHOWCASE_LENGTH)
    measured = [n for n in complete if n >= SHOWCASE_LENGTH]
    rule = f"right: every task ≥ {100 * RIGHT:.0f}% in its recorded evaluation, {EVALUATION_NAME}"
    if measured:
        there = (
            f"this model is not right at {million} tokens ({scores(min(measured))} at {format_length(min(measured))})"
        )
    else:
        there = f"this model's recorded evaluation stops at {format_length(max(complete))}, short of {million} tokens"
    if right:
        n = max(right)
        return n, f"{there}; showing {shown(n)}, the longest length where it is right: {scores(n)} ({rule})"
    n = max(complete, key=lambda n: (statistics.mean(complete[n].values()), -n))
    return n, f"{there}, and it is right at no length ({rule}); showing {shown(n)}, its best: {scores(n)}"


def demo(
    checkpoint: Path = typer.Option(
        SHIPPED_CHECKPOINT, help="A classifier saved by memformers train (RMT or ARMT over an encoder)."
    ),
    task: str | None = typer.Option(
        None,
        help="Tasks the checkpoint was trained on, comma-separated (the shipped model: qa1, qa2, qa3, qa4, qa5); "
        "default: detect, one fact hidden anywhere, else every task it was trained on.",
    ),
    length: int | None = typer.Option(
        None,
        min=0,
        help="Tokens of Austen around the facts in the showcase samples (0: the story alone); default: 1,048,576, "
        f"or the longest length where the checkpoint's recorded evaluation ({EVALUATION_NAME}) says it is right.",
    ),
    samples: int | None = typer.Option(
        None, min=1, help="Showcase samples a task, read side by side; default: 3 for one task, else 1 a task."
    ),
    table_lengths: str | None = typer.Option(
        None,
        help="Lengths of a closing accuracy table measured live; default: the checkpoint's recorded evaluation, "
        f"else {LIVE_TABLE_LENGTHS}.",
    ),
    table_samples: int = typer.Option(16, min=1, help="Samples per cell of a live closing table."),
    seed: int = typer.Option(0, help="Which samples (test books: never seen in training)."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 where the CPU or GPU has it: reads about 2.6× faster), fp32 or bf16."
    ),
    threads: int = threads_option(),
) -> None:
    """Hide facts in a million tokens of Austen, stream them through a trained memory model, and ask about them.

    By default: one story of each of BABILong's qa1-qa5, hidden in 1,048,576 tokens of books the model never saw,
    read side by side by the shipped ARMT; then its recorded accuracy grid, with the chance level beside each
    accuracy. A checkpoint whose recorded evaluation says it is not right at a million tokens is shown at the
    longest length where it is, and says so.
    """
    from ..precision import resolve_precision
    from ..registry import get as mechanism_named
    from ..saving import CONFIG_NAME, load

    use_threads(threads)
    precision = resolve_precision(precision, "cpu", "--precision")
    if not (Path(checkpoint) / CONFIG_NAME).exists() and checkpoint == SHIPPED_CHECKPOINT:
        console.print(f"no trained model at {checkpoint}: streaming an untrained RMT instead (speed and memory only)")
        stream(backbone="minilm", segments="4,16,64,256", segment_size=512, memory_tokens=10, threads=threads)
        return
    config = read_checkpoint(checkpoint, "--checkpoint")
    if not config.get("backbone_class", "").endswith("ForSequenceClassification"):
        raise InputError(
            f"--checkpoint: {checkpoint} holds a {config.get('mechanism')} over a {config.get('backbone_class')}; the "
            "demo reads a classifier (RMT or ARMT over an encoder with a classification head, like "
            "checkpoints/babilong-armt); score other models with memformers eval"
        )
    allowed = trained_tasks(config) or list(CLASSIFIER_TASKS)
    default = ["detect"] if "detect" in allowed else allowed
    tasks = [name.strip() for name in task.split(",") if name.strip()] if task else default
    unknown = [name for name in tasks if name not in allowed] or ([task] if not tasks else [])
    if unknown:
        raise InputError(
            f"--task: {checkpoint} was trained on {', '.join(allowed)}; got {', '.join(map(repr, unknown))}"
        )
    per_task = samples or (3 if len(tasks) == 1 else 1)
    cells = recorded_evaluation(checkpoint)
    if length is None:
        length, why = showcase_length(cells, tasks)
        if why:
            console.print(f"[yellow]{why}[/]")
    tokenizer = checkpoint_tokenizer(checkpoint, config)
    model = load(checkpoint)
    label = mechanism_named(config["mechanism"]).label
    console.print(f"[bold]memformers demo[/]: {label} ({model.extra_repr()}) from {checkpoint}")
    live = parse_ints(table_lengths or LIVE_TABLE_LENGTHS, "--table-lengths")
    recorded = [cell for cell in cells if cell.task in tasks] if table_lengths is None else []
    _say_what_is_shown(tasks, per_task, length, recorded, live, table_samples, checkpoint)
    trained = config.get("extra", {}).get("segments")
    if trained:
        console.print(
            f"trained on inputs of up to {max(trained) * model.content_size:,} tokens "
            f"({max(trained)} segment{'s' * (max(trained) > 1)})"
        )
    _showcase(model, tasks, per_task, length, tokenizer, seed, precision)
    if recorded:
        _recorded_table(recorded, tasks, checkpoint)
    else:
        _live_table(model, tasks, live, table_samples, tokenizer, seed + 1, precision)


def _say_what_is_shown(
    tasks: list[str], per_task: int, length: int, recorded: list, live: list[int], table_samples: int, checkpoint: Path
) -> None:
    from ..evaluation import format_length

    count = per_task * len(tasks)
    names = " and ".join(", ".join(tasks).rsplit(", ", 1))
    where = f"facts hidden in {length:,} tokens of books the model never saw" if length else "the story alone, no noise"
    if recorded:
        table = f"then the accuracy recorded in {Path(checkpoint) / EVALUATION_NAME}"
    else:
        table = f"then accuracy at {', '.join(format_length(n) for n in live)} tokens, {table_samples} samples a length"
    console.print(
        f"Showing: {count} {names} sample{'s' * (count > 1)} ({where}), read side by side; {table}, beside the chance "
        "level. Other tasks and lengths: memformers demo --help"
    )


def _showcase(model, tasks: list[str], per_task: int, length: int, tokenizer, seed: int, precision: str) -> None:
    """Read the samples (those of one length side by side), then print each one's facts, question and answer."""
    from ..evaluation import class_answers, equal_length_batches, predict_classes
    from ..precision import autocast
    from ..profiling import peak_rss_bytes
    from ..tasks import make_sample

    batch = [make_sample(task, length, tokenizer, seed, index, "test") for task in tasks for index in range(per_task)]
    groups = equal_length_batches(batch, len(batch))  # samples of one length stream side by side
    segments = [-(-batch[indices[0]].num_tokens // model.content_size) for indices in groups]
    tokens = sum(sample.num_tokens for sample in batch)
    total = sum(segments)
    predicted: dict[int, int] = {}
    start = time.perf_counter()
    with progress_bar() as bar:
        job = bar.add_task(f"reading {len(batch)} × {length:,} tokens", total=total, rate="")
        done_before = 0
        for indices, count in zip(groups, segments, strict=True):

            def on_segment(done: int, _total, _tokens, rows: int = len(indices), before: int = done_before) -> None:
                seconds = time.perf_counter() - start
                rss = (peak_rss_bytes() or 0) / 2**20
                rate = f"{(before + done) * model.content_size * rows / seconds:,.0f} tokens/s · memory {rss:,.0f} MiB"
                bar.update(job, completed=before + done, rate=rate)

            with autocast(precision):
                answers = predict_classes(model, [batch[i] for i in indices], "cpu", on_segment)
            predicted.update(zip(indices, answers, strict=True))
            done_before += count
    seconds = time.perf_counter() - start
    console.print(
        f"read {tokens:,} tokens in {seconds:.0f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s), "
        f"peak resident memory {(peak_rss_bytes() or 0) / 2**20:,.0f} MiB, in {precision}"
    )
    classes = class_answers(model)
    for index, sample in enumerate(batch):
        where = ", ".join(f"token {p:,}" for p in sample.fact_positions)
        console.print(f"\n[bold]{sample.task} facts[/] (at {where} of {sample.num_tokens:,}):")
        for fact in sample.facts:
            console.print(f"  {fact}")
        guess = (classes or sample.answers)[predicted[index]]
        mark = "[green]right[/]" if guess == sample.target else f"[red]wrong[/] (the answer is {sample.target})"
        console.print(f"[bold]question[/]: {sample.question}  [bold]model[/]: {guess}  {mark}")


def _accuracy(accuracy: float, task: str) -> str:
    return f"{100 * accuracy:.0f}% [dim](chance {100 * chance_level(task):.0f}%)[/]"


def _recorded_table(cells: list, tasks: list[str], checkpoint: Path) -> None:
    """The grid saved beside the checkpoint: measured once on more samples than a demo can afford."""
    from ..evaluation import format_length

    lengths = sorted({cell.length for cell in cells})
    by_key = {(cell.task, cell.length): cell for cell in cells}
    counts = sorted({cell.samples for cell in cells})
    table = Table(title=f"accuracy on test books ({'/'.join(map(str, counts))} samples a cell)")
    for value in ["task"] + [format_length(n) for n in lengths]:
        table.add_column(value, justify="right")
    for task in dict.fromkeys(tasks):
        row = [_accuracy(by_key[task, n].accuracy, task) if (task, n) in by_key else "–" for n in lengths]
        table.add_row(task, *row)
    console.print(table)
    console.print(f"[dim]recorded in {Path(checkpoint) / EVALUATION_NAME}[/]")
    for command in sorted({cell.command for cell in cells if cell.command}):
        console.print(f"[dim]measured by: {command}[/]")


def _live_table(
    model, tasks: list[str], lengths: list[int], table_samples: int, tokenizer, seed: int, precision: str
) -> None:
    from ..evaluation import evaluate_cell, format_length

    table = Table(title=f"accuracy on test books ({table_samples} samples a cell)")
    for value in ["task"] + [format_length(n) for n in lengths]:
        table.add_column(value, justify="right")
    with progress_bar() as bar:
        job = bar.add_task("accuracy table", total=None, rate="")
        for task in dict.fromkeys(tasks):
            row = []
            for n in lengths:
                cell = evaluate_cell(
                    model,
                    task,
                    n,
                    table_samples,
                    tokenizer,
                    seed=seed,
                    batch_size=table_samples,
                    precision=precision,
                    progress=lambda done, count: bar.update(job, completed=done, total=count),
                )
                row.append(_accuracy(cell.accuracy, task))
            table.add_row(task, *row)
    console.print(table)
