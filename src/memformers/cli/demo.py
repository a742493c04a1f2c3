"""`memformers demo`: a trained RMT finds facts hidden in a million tokens of books it never saw."""

from __future__ import annotations

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


def chance_level(task: str) -> float:
    """What guessing uniformly among a task's answers scores."""
    from ..tasks import task_spec

    return 1 / len(task_spec(task).answers)


def demo(
    checkpoint: Path = typer.Option(SHIPPED_CHECKPOINT, help="A classification RMT saved by memformers train."),
    task: str | None = typer.Option(
        None,
        help="A task the checkpoint was trained on (the shipped model: memorize, detect or reason); "
        "default: detect, one fact hidden anywhere.",
    ),
    length: int = typer.Option(1_048_576, min=1, help="Tokens of Austen around the facts in the showcase samples."),
    samples: int = typer.Option(3, min=1, help="Showcase samples, read side by side."),
    table_lengths: str = typer.Option("1024,4096,16384,131072", help="Lengths of the closing accuracy table."),
    table_samples: int = typer.Option(16, min=1, help="Samples per cell of the closing table."),
    seed: int = typer.Option(0, help="Which samples (test books: never seen in training)."),
    threads: int = threads_option(),
) -> None:
    """Hide facts in a million tokens of Austen, stream them through a trained RMT, and ask about them.

    By default: 3 samples of the detect task (one fact at a random place in 1,048,576 tokens of books the model never
    saw), read side by side by the shipped RMT; then its accuracy at 1K to 128K tokens, 16 samples a length, with
    the chance level beside each accuracy.
    """
    from ..evaluation import class_answers, evaluate_cell, format_length, predict_classes
    from ..profiling import peak_rss_bytes
    from ..saving import CONFIG_NAME, load
    from ..tasks import make_sample

    use_threads(threads)
    lengths = parse_ints(table_lengths, "--table-lengths")
    if not (Path(checkpoint) / CONFIG_NAME).exists() and checkpoint == SHIPPED_CHECKPOINT:
        console.print(f"no trained model at {checkpoint}: streaming an untrained RMT instead (speed and memory only)")
        stream(backbone="minilm", segments="4,16,64,256", segment_size=512, memory_tokens=10, threads=threads)
        return
    config = read_checkpoint(checkpoint, "--checkpoint")
    if config.get("mechanism") != "RecurrentMemoryTransformer" or not config.get("backbone_class", "").endswith(
        "ForSequenceClassification"
    ):
        raise InputError(
            f"--checkpoint: {checkpoint} holds a {config.get('mechanism')} over a {config.get('backbone_class')}; the "
            "demo reads an RMT classifier (an encoder with a classification head, like checkpoints/rmt-cpu); "
            "score other models with memformers eval"
        )
    allowed = trained_tasks(config) or list(CLASSIFIER_TASKS)
    task = task or ("detect" if "detect" in allowed else allowed[0])
    if task not in allowed:
        raise InputError(f"--task: {checkpoint} was trained on {', '.join(allowed)}; got {task!r}")
    tokenizer = checkpoint_tokenizer(checkpoint, config)
    model = load(checkpoint)
    console.print(f"[bold]memformers demo[/]: RMT ({model.extra_repr()}) from {checkpoint}")
    console.print(
        f"Showing: {samples} {task} sample{'s' * (samples > 1)} (facts hidden in {length:,} tokens of books the model "
        f"never saw), read side by side; then accuracy at {', '.join(format_length(n) for n in lengths)} tokens, "
        f"{table_samples} samples a length, beside the chance level. Other tasks and lengths: memformers demo --help"
    )
    trained = config.get("extra", {}).get("segments")
    if trained:
        console.print(
            f"trained on inputs of up to {max(trained) * model.content_size:,} tokens ({max(trained)} segments)"
        )
    batch = [make_sample(task, length, tokenizer, seed, index, "test") for index in range(samples)]
    total = -(-length // model.content_size)
    start = time.perf_counter()
    with progress_bar() as bar:
        job = bar.add_task(f"reading {samples} × {length:,} tokens", total=total, rate="")

        def on_segment(done: int, _total, _tokens) -> None:
            seconds = time.perf_counter() - start
            rss = (peak_rss_bytes() or 0) / 2**20
            bar.update(
                job,
                completed=done,
                rate=f"{done * model.content_size * samples / seconds:,.0f} tokens/s · memory {rss:,.0f} MiB",
            )

        predicted = predict_classes(model, batch, "cpu", on_segment)
    seconds = time.perf_counter() - start
    classes = class_answers(model)
    console.print(
        f"read {samples * length:,} tokens in {seconds:.0f} s ({samples * length / seconds:,.0f} tokens/s), "
        f"peak resident memory {(peak_rss_bytes() or 0) / 2**20:,.0f} MiB"
    )
    for sample, answer in zip(batch, predicted, strict=True):
        where = ", ".join(f"token {p:,}" for p in sample.fact_positions)
        console.print(f"\n[bold]facts[/] (at {where} of {sample.num_tokens:,}):")
        for fact in sample.facts:
            console.print(f"  {fact}")
        guess = (classes or sample.answers)[answer]
        mark = "[green]right[/]" if guess == sample.target else f"[red]wrong[/] (the answer is {sample.target})"
        console.print(f"[bold]question[/]: {sample.question}  [bold]model[/]: {guess}  {mark}")

    chance = chance_level(task)
    table = Table(title=f"{task}: accuracy on test books ({table_samples} samples a cell)")
    for value in ["length"] + [format_length(n) for n in lengths]:
        table.add_column(value, justify="right")
    row = []
    with progress_bar() as bar:
        job = bar.add_task("accuracy table", total=None, rate="")
        for n in lengths:
            cell = evaluate_cell(
                model,
                task,
                n,
                table_samples,
                tokenizer,
                seed=seed + 1,
                batch_size=table_samples,
                progress=lambda done, count: bar.update(job, completed=done, total=count),
            )
            row.append(f"{100 * cell.accuracy:.0f}% [dim](chance {100 * chance:.0f}%)[/]")
    table.add_row("accuracy", *row)
    console.print(table)
