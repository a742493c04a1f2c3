"""`memformers …`: the command line (typer).

This is the edge where bad input becomes one line: every command raises (or lets the library raise) a `ValueError`
that names the argument and what is allowed, and `OneLineErrors` prints it as `memformers: error: …` on stderr with
exit status 2, no traceback. Suspicious input the library accepts (`memformers.errors.InputWarning`) is printed as
one `memformers: warning: …` line.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from .backbones import BackboneNotFoundError
from .errors import InputError, InputWarning
from .files import atomic_file
from .registry import MECHANISMS

EXIT_BAD_INPUT = 2  # click's status for a usage error
# click's exceptions, wherever this typer takes click from (newer releases carry their own copy)
CLICK = sys.modules[typer.BadParameter.__module__]
# Ctrl-C: click's Abort where this copy of click has one (typer's own copy lets KeyboardInterrupt through)
INTERRUPTED = (KeyboardInterrupt, getattr(CLICK, "Abort", KeyboardInterrupt))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class OneLineErrors(TyperGroup):
    """Runs a command so that bad input ends it with one line on stderr and exit status 2, never a traceback.

    Bad input is click's usage errors (an option's value, a missing option) and the library's `ValueError`s (the
    house rule: they name the argument and what is allowed), including a backbone that cannot be found. Anything
    else is a bug and keeps its traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode: bool = True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        shown = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLICK.NoArgsIsHelpError as error:  # `memformers` alone: the help
            error.show()
            sys.exit(error.exit_code)
        except CLICK.ClickException as error:
            _fail(error.format_message())
        except (ValueError, BackboneNotFoundError) as error:
            if os.environ.get("MEMFORMERS_TRACEBACK"):  # where a ValueError came from, when it is a bug after all
                raise
            _fail(str(error))
        except INTERRUPTED:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = shown
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str) -> None:
    typer.echo(f"memformers: error: {_one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`InputWarning`s as one line; other warnings as Python shows them."""
    if issubclass(category, InputWarning):
        typer.echo(f"memformers: warning: {_one_line(message)}", err=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


app = typer.Typer(
    cls=OneLineErrors,
    help="Read millions of tokens through memory with any Hugging Face transformer.",
    no_args_is_help=True,
)
console = Console()


@app.callback()
def _startup() -> None:
    """Settings every command shares: the allocator's (for speed on the CPU), and no progress bars of transformers'
    own (loading a model's weights), which would bury the command's output and its one-line errors."""
    from transformers.utils import logging as transformers_logging

    from .profiling import keep_freed_memory

    keep_freed_memory()
    transformers_logging.disable_progress_bar()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """$OMP_NUM_THREADS where the user set it, else half the cores: fast enough alone, and no pile-up of spinning
    threads when another process shares the machine (the README has both measurements)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else max(1, available_cores() // 2)


DEFAULT_THREADS = default_threads()


def threads_option():
    return typer.Option(
        DEFAULT_THREADS,
        "--threads",
        min=1,
        help="Threads for torch, faiss and the tokenizers. Default: $OMP_NUM_THREADS if set, else half the cores, "
        "which stays fast when another process shares the machine (every core ran 2-13x slower then; see the "
        "README). On a machine of your own, every core is faster.",
    )


def use_threads(threads: int) -> None:
    """Give torch (now) and OpenMP / the tokenizers' pool (when they start) `threads` threads."""
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # faiss's OpenMP, if it starts after this
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the Rust tokenizers' pool, if it starts after this
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)


def parse_ints(text: str, name: str, minimum: int = 0) -> list[int]:
    """'4096,65536' → [4096, 65536], with an error that names the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise InputError(f"{name} must be integers ≥ {minimum}, comma-separated, got {text!r}")
    return values


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any model is loaded onto it."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: {device!r}, but no CUDA device is available here; use --device cpu")


def write_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a reader never sees half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("segments · {task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def segment_progress(description: str, total: int | None):
    """A progress bar for one streamed document; yields the driver's progress callback."""
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(description, total=total, rate="")

        def callback(done: int, _total: int | None, tokens: int) -> None:
            bar.update(task, completed=done, rate=f"{tokens / (time.perf_counter() - start):,.0f} tokens/s")

        yield callback


def stream_throughput(model, token_chunks, num_segments: int, description: str) -> tuple[float, int, int | None]:
    """Stream one document through `model` under a progress bar; (tokens/s, peak activation bytes, peak resident)."""
    from .profiling import stream_throughput as measure

    with segment_progress(description, num_segments) as callback:
        return measure(model, token_chunks, callback)


SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "rmt-cpu"
CLASSIFIER_TASKS = ("memorize", "detect", "reason")  # what a classifier's demo can ask when its tasks are not recorded


def read_checkpoint(checkpoint: Path, option: str) -> dict:
    """The `memformers.json` of a saved model, or an error naming the option that gave the folder."""
    from .saving import CONFIG_NAME, read_config

    if not (Path(checkpoint) / CONFIG_NAME).is_file():
        raise InputError(f"{option}: {str(checkpoint)!r} holds no model saved by memformers (no {CONFIG_NAME} inside)")
    return read_config(checkpoint)


def checkpoint_tokenizer(checkpoint: Path, config: dict) -> str:
    """The tokenizer a checkpoint was trained with (recorded by the trainer), else the one saved beside it."""
    return config.get("extra", {}).get("tokenizer") or str(Path(checkpoint) / "backbone")


def trained_tasks(config: dict) -> list[str]:
    """The tasks a checkpoint was trained on, as the trainer recorded them ([] when not recorded)."""
    return [name.strip() for name in str(config.get("extra", {}).get("task") or "").split(",") if name.strip()]


def warn_untrained_tasks(checkpoint: Path, config: dict, tasks: list[str]) -> None:
    trained = trained_tasks(config)
    untrained = [name for name in tasks if trained and name not in trained]
    if untrained:
        warnings.warn(
            f"{checkpoint} was trained on {', '.join(trained)}, not on {', '.join(untrained)}: expect chance-level "
            "answers there",
            InputWarning,
            stacklevel=2,
        )


def check_vocabulary(model, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embeddings: ids from another tokenizer."""
    rows = model.backbone.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(
            f"tokenizer: {where} gives ids up to {len(tokenizer) - 1:,}, but the model embeds only {rows:,}: the ids "
            "come from another tokenizer; use the tokenizer the model was trained with"
        )


def chance_level(task: str) -> float:
    """What guessing uniformly among a task's answers scores."""
    from .tasks import task_spec

    return 1 / len(task_spec(task).answers)


@app.command()
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
    from .evaluation import class_answers, evaluate_cell, format_length, predict_classes
    from .profiling import peak_rss_bytes
    from .saving import CONFIG_NAME, load
    from .tasks import make_sample

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


@app.command()
def stream(
    backbone: str = typer.Option("minilm", help="'minilm', 'smollm2' or a local Hugging Face model folder."),
    segments: str = typer.Option("4,16,64,256", help="Segment counts to stream (each ≥ 1), comma-separated."),
    segment_size: int = typer.Option(512, min=1, help="Backbone positions per segment, memory included."),
    memory_tokens: int = typer.Option(10, min=0, help="Number of memory tokens."),
    threads: int = threads_option(),
) -> None:
    """Stream long inputs through an (untrained) RMT: tokens/s and peak memory against the number of segments."""
    from . import backbones
    from .rmt import RecurrentMemoryTransformer

    use_threads(threads)
    counts = parse_ints(segments, "--segments", minimum=1)
    if Path(backbone).is_absolute() and not Path(backbone).is_dir():
        raise InputError(f"--backbone: {backbone!r} is not a folder; give 'minilm', 'smollm2' or a model folder")
    model_backbone, _ = backbones.load(backbone)
    model = RecurrentMemoryTransformer(model_backbone, num_memory_tokens=memory_tokens, segment_size=segment_size)
    model.eval()
    console.print(f"[bold]RMT[/] over {backbone} ({type(model_backbone).__name__}): {model.extra_repr()}")
    vocab = model_backbone.get_input_embeddings().num_embeddings
    table = Table(title="Streaming an RMT: memory stays flat as the input grows")
    for column in ("segments", "tokens", "tokens/s", "peak activations", "peak RSS"):
        table.add_column(column, justify="right")
    generator = torch.Generator().manual_seed(0)
    for count in counts:
        length = count * model.content_size
        # ids generated chunk by chunk: the whole input never sits in memory
        chunks = (
            torch.randint(1000, vocab, (min(4096, length - i),), generator=generator) for i in range(0, length, 4096)
        )
        rate, peak, rss = stream_throughput(model, chunks, count, f"{count} segments")
        table.add_row(
            str(count), f"{length:,}", f"{rate:,.0f}", f"{peak / 2**20:.1f} MiB", f"{(rss or 0) / 2**20:.0f} MiB"
        )
    console.print(table)


def resolve_tokenizer(tokenizer: str) -> str:
    """A tokenizer name or folder as given, or, for a saved memformers model, the tokenizer it records."""
    from .saving import CONFIG_NAME

    if (Path(tokenizer) / CONFIG_NAME).is_file():
        return checkpoint_tokenizer(Path(tokenizer), read_checkpoint(Path(tokenizer), "--tokenizer"))
    return tokenizer


@app.command()
def data(
    task: str = typer.Option(..., help="qa1…qa5, memorize, detect, reason, copy, reverse, associative."),
    lengths: str = typer.Option(..., help="Sample lengths in tokens, comma-separated (e.g. 4096,65536)."),
    samples: int = typer.Option(20, min=1, help="Samples per length."),
    tokenizer: str = typer.Option(
        "minilm", help="'minilm', 'smollm2', a tokenizer folder, or a saved model (the tokenizer it was trained with)."
    ),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(..., help="Output JSONL file (BABILong's fields input, question, target, and more)."),
    noise_dir: Path | None = typer.Option(None, help="Folder of .txt books to use as noise instead of Austen."),
    split: str = typer.Option("test", help="Noise books: 'test' (held out from training), 'train' or 'all'."),
    threads: int = threads_option(),
) -> None:
    """Export a task × length grid to JSONL, one sample a line.

    Each line has BABILong's fields (input, question, target), so `memformers eval CKPT --data FILE` and other
    BABILong tooling read it, plus the task, length, facts, their token positions and the tokenizer they count.
    """
    from .tasks import export_jsonl

    use_threads(threads)
    name = resolve_tokenizer(tokenizer)
    written = export_jsonl(task, parse_ints(lengths, "--lengths"), samples, name, seed, out, noise_dir, split)
    console.print(f"wrote {written} samples to {out}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A model saved with save_pretrained (e.g. by memformers train)."),
    task: str | None = typer.Option(
        None,
        help="Tasks, comma-separated: memorize, detect, reason, qa1…qa5 (default memorize; with --data, the task "
        "of records that name none, else the file's name).",
    ),
    lengths: str = typer.Option("512,4096,65536", help="Input lengths in tokens, comma-separated."),
    samples: str = typer.Option("100", help="Samples per cell, or one count per length (e.g. 100,100,20,5)."),
    data: Path | None = typer.Option(
        None,
        help="Score the records of a BABILong file instead (fields input, question, target; JSON, JSONL or "
        "Parquet), e.g. the published data set or one written by memformers data; --lengths, --samples, --split, "
        "--noise-dir and --seed then do not apply.",
    ),
    batch_size: int = typer.Option(32, min=1, help="Samples read side by side."),
    noise_dir: Path | None = typer.Option(None, help="Folder of .txt books to use as noise instead of Austen."),
    split: str = typer.Option("test", help="Noise books: 'test' (never trained on), 'train' or 'all'."),
    seed: int = typer.Option(0, help="Seed of the evaluation samples."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Results JSON; grid cells already in it are skipped (a --data file is scored afresh)."
    ),
    plot: Path | None = typer.Option(None, help="Heatmap PNG (default: beside --json)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Device."),
    window: int | None = typer.Option(
        None,
        min=1,
        help="Read only the last N tokens of each sample (the backbone-alone baseline, truncated to its window).",
    ),
    max_new_tokens: int = typer.Option(8, help="Decoders: most tokens generated per answer (greedy, stops at EOS)."),
    perplexity: bool = typer.Option(False, "--perplexity", help="Deprecated: use memformers perplexity."),
    tokens: int | None = typer.Option(None, help="--perplexity: tokens per document (default 20 segments)."),
    documents: int = typer.Option(8, help="--perplexity: documents (stretches of the split's books)."),
    memory_size: int | None = typer.Option(None, help="--perplexity: kNN/LongMem store size to read with."),
    segment_size: int | None = typer.Option(None, help="--perplexity of a bare backbone: tokens per segment."),
    threads: int = threads_option(),
) -> None:
    """Accuracy on a task × length grid, or on a BABILong file (--data), streaming every sample (memory stays flat).

    Classifiers are scored by their class; decoders with a causal-LM head generate the answer, scored with the
    BABILong metric as the leaderboard scores it.
    """
    import shlex

    if perplexity:
        warnings.warn("eval --perplexity is deprecated: use memformers perplexity", InputWarning, stacklevel=1)
        options = (tokens, documents, split, noise_dir, batch_size, device, memory_size, segment_size, json_out)
        return perplexity_command(checkpoint, *options, threads)

    from .evaluation import evaluate_file, evaluate_grid, generates, markdown_table, read_babilong_file, save_cells
    from .plots import accuracy_heatmap
    from .saving import load
    from .tasks import get_tokenizer, task_spec

    use_threads(threads)
    check_device(device)
    config = read_checkpoint(checkpoint, "checkpoint")
    tasks = [t.strip() for t in (task or "memorize").split(",") if t.strip()]
    counts = parse_ints(samples, "--samples", minimum=1)
    tokenizer = checkpoint_tokenizer(checkpoint, config)
    records = read_babilong_file(data) if data is not None else None
    if records is None:
        for name in tasks:
            task_spec(name)  # an unknown task fails here, before any warning or loading
    else:
        tasks = list(dict.fromkeys(str(r.get("task") or (task or data.stem)) for r in records))
        warn_other_tokenizer(data, records, tokenizer)
    warn_untrained_tasks(checkpoint, config, tasks)
    model = load(checkpoint, device=device)
    check_vocabulary(model, get_tokenizer(tokenizer), f"{tokenizer!r} (the checkpoint's)")
    meta = {
        "checkpoint": str(checkpoint),
        "command": shlex.join(
            ["memformers", "eval", str(checkpoint)]
            + (["--data", str(data)] if data is not None else ["--task", ",".join(tasks), "--lengths", lengths])
            + (["--task", task] if data is not None and task else [])
            + (["--samples", samples] if data is None else [])
            + (["--noise-dir", str(noise_dir)] if noise_dir and data is None else [])
            + (["--split", split, "--seed", str(seed)] if data is None else [])
            + (["--window", str(window)] if window else [])
            + (["--max-new-tokens", str(max_new_tokens)] if generates(model) else [])
            + (["--json", str(json_out)] if json_out else [])
        ),
        "scoring": "generation" if generates(model) else "classes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    } | ({"data": str(data)} if data is not None else {})
    with progress_bar() as bar:
        job = bar.add_task("evaluating", total=None, rate="")

        def on_progress(done: int, total: int) -> None:
            bar.update(job, completed=done, total=total)

        def on_cell(cell) -> None:
            console.print(
                f"{cell.task:>9} {cell.length:>10,} tokens: {100 * cell.accuracy:5.1f}% "
                f"[{100 * cell.ci_low:.0f}–{100 * cell.ci_high:.0f}] ({cell.samples} samples, "
                f"{cell.tokens_per_s:,.0f} tokens/s)"
            )
            bar.reset(job, total=None)
            bar.update(job, description=f"{cell.task} after {cell.length:,}")

        options = {"batch_size": batch_size, "device": device, "progress": on_progress, "window": window}
        options["max_new_tokens"] = max_new_tokens
        if records is not None:
            cells = evaluate_file(model, data, tokenizer, task, on_cell, records=records, **options)
            for cell in cells:
                cell.command = meta["command"]
            if json_out is not None:
                save_cells(json_out, cells, meta)
        else:
            cells = evaluate_grid(
                model,
                tasks,
                parse_ints(lengths, "--lengths"),
                counts[0] if len(counts) == 1 else counts,
                tokenizer,
                json_out,
                meta,
                on_cell,
                seed=seed,
                split=split,
                noise_dir=noise_dir,
                **options,
            )
    console.print(markdown_table(cells))
    if json_out is not None:
        write_atomic(json_out.with_suffix(".md"), markdown_table(cells) + "\n")
    target = plot or (json_out.with_suffix(".png") if json_out is not None else None)
    if target is not None:
        accuracy_heatmap(cells, target, f"{Path(checkpoint).name}: accuracy (%)")
        console.print(f"heatmap: {target}")


def warn_other_tokenizer(data: Path, records: list[dict], tokenizer: str) -> None:
    """A file written by `memformers data` names the tokenizer its lengths and fact positions count: say so when
    the checkpoint reads with another (its text is tokenized again, so the answers still count)."""
    from .tasks import get_tokenizer
    from .tasks.noise import tokenizer_fingerprint

    written = {r.get("tokenizer") for r in records if r.get("tokenizer")}
    for name in sorted(written):
        try:
            same = tokenizer_fingerprint(get_tokenizer(name)) == tokenizer_fingerprint(get_tokenizer(tokenizer))
        except (OSError, ValueError):  # the file's tokenizer is not at hand: nothing to compare
            continue
        if not same:
            warnings.warn(
                f"--data: {data} was written with tokenizer {name!r}, but the checkpoint reads with {tokenizer!r}: its "
                "text is tokenized again, so its lengths count the other tokenizer's tokens",
                InputWarning,
                stacklevel=2,
            )


@app.command("perplexity")
def perplexity_command(
    checkpoint: Path = typer.Argument(..., help="A saved decoder, or a bare causal LM folder (with --segment-size)."),
    tokens: int | None = typer.Option(None, min=1, help="Tokens per document (default 20 segments)."),
    documents: int = typer.Option(8, min=1, help="Documents (stretches of the split's books)."),
    split: str = typer.Option("test", help="Books: 'test' (never trained on), 'train' or 'all'."),
    noise_dir: Path | None = typer.Option(None, help="Folder of .txt books instead of Austen."),
    batch_size: int = typer.Option(8, min=1, help="Documents read side by side (at most --documents)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Device."),
    memory_size: int | None = typer.Option(None, min=1, help="kNN/LongMem store size to read with."),
    segment_size: int | None = typer.Option(None, min=1, help="A bare backbone: tokens per segment."),
    json_out: Path | None = typer.Option(None, "--json", help="Results JSON (and a markdown table beside it)."),
    threads: int = threads_option(),
) -> None:
    """Next-token perplexity of held-out documents per segment index, 1..16 and 16+ pooled (decoders)."""
    import shlex

    from .perplexity import run as run_perplexity

    use_threads(threads)
    check_device(device)
    options = {"--tokens": tokens, "--documents": documents, "--split": split, "--noise-dir": noise_dir}
    options |= {"--memory-size": memory_size, "--segment-size": segment_size, "--json": json_out}
    words = ["memformers", "perplexity", str(checkpoint)]
    words += [str(v) for k, v in options.items() if v is not None for v in (k, v)]
    batch = min(batch_size, documents)
    args = (checkpoint, tokens, documents, split, noise_dir, batch, device, memory_size, segment_size)
    run_perplexity(*args, json_out=json_out, command=shlex.join(words), console=console)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training config (TOML); see memformers.training for its keys."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set curriculum.max_steps_per_stage=20."),
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Output folder (overrides output.dir)."),
    max_steps_per_stage: int | None = typer.Option(None, help="Step budget per stage (overrides the config)."),
    vary_segments: bool | None = typer.Option(
        None, "--vary-segments/--no-vary-segments", help="Also train on shorter lengths (1 .. current segments)."
    ),
    resume: bool | None = typer.Option(
        None, "--resume/--no-resume", help="Continue from the latest checkpoint (default: when there is one)."
    ),
    stop_after: int | None = typer.Option(None, min=1, help="Checkpoint and stop after this many steps in all."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    threads: int = threads_option(),
) -> None:
    """Train an RMT on a task with a segment curriculum (Accelerate: CPU, GPU or `accelerate launch`)."""
    from .training import train as run_training

    use_threads(threads)
    overrides = list(set_)
    if output_dir is not None:
        overrides.append(f"output.dir={str(output_dir)!r}")
    if max_steps_per_stage is not None:
        overrides.append(f"curriculum.max_steps_per_stage={max_steps_per_stage}")
    if vary_segments is not None:
        overrides.append(f"curriculum.vary_segments={str(vary_segments).lower()}")
    path = run_training(config, overrides, progress=progress, resume=resume, stop_after_steps=stop_after)
    console.print(f"saved {path}")


@app.command()
def flops(
    config: str = typer.Option("opt-125m", help="opt-125m … opt-175b, or a folder with a Hugging Face config.json."),
    length: int | None = typer.Option(None, help="One input length in tokens (default: 1K … 2M)."),
    segment_size: int = typer.Option(512, help="RMT positions per segment, memory included."),
    memory_tokens: int = typer.Option(10, help="RMT memory tokens."),
    layout: str = typer.Option("encoder", help="RMT layout: 'encoder' (m + 3 positions) or 'decoder' (2m)."),
    knn_top_k: int = typer.Option(32, help="kNN memory: retrieved keys per query."),
    knn_memory_size: int = typer.Option(65_536, help="kNN memory: stored keys per document."),
    knn_layers: int = typer.Option(1, help="kNN memory: layers that retrieve."),
    longmem_segment_size: int = typer.Option(1024, help="LongMem: tokens per segment."),
    longmem_memory_size: int = typer.Option(65_536, help="LongMem: tokens in the memory bank."),
    longmem_chunk_size: int = typer.Option(4, help="LongMem: tokens per retrieved chunk."),
    longmem_chunks: int = typer.Option(16, help="LongMem: chunks retrieved per query."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON (one object with --length) instead of a table."),
    plot: Path | None = typer.Option(None, help="Write a log-log plot of FLOPs against length (PNG)."),
) -> None:
    """Forward FLOPs of full attention, RMT, kNN memory and LongMem against the input length."""
    import json

    from . import flops as model_flops
    from .evaluation import format_length

    lengths = [length] if length is not None else [1 << p for p in range(10, 22, 2)] + [1 << 21]
    knn = {
        "segment_size": segment_size,
        "top_k": knn_top_k,
        "memory_size": knn_memory_size,
        "memory_layers": knn_layers,
    }
    longmem = {
        "segment_size": longmem_segment_size,
        "memory_size": longmem_memory_size,
        "chunk_size": longmem_chunk_size,
        "top_k_chunks": longmem_chunks,
    }
    spec = model_flops.resolve_spec(config)
    reports = [
        model_flops.compare(spec, n, segment_size, memory_tokens, layout, knn=knn, longmem=longmem) for n in lengths
    ]
    if plot is not None:
        plot_lengths = sorted({*lengths, *(1 << p for p in range(9, 22))}) if length is None else lengths
        model_flops.plot_flops(spec, plot_lengths, plot, segment_size, memory_tokens, knn, longmem)
    if json_output:
        items = [r.to_dict() for r in reports]
        typer.echo(json.dumps(items[0] if length is not None else items, indent=2))
        return
    table = Table(title=f"{spec.name}: forward FLOPs (RMT {segment_size} positions, {memory_tokens} memory tokens)")
    for column in ("length", "full attention", "RMT", "full / RMT", "kNN memory", "LongMem"):
        table.add_column(column, justify="right")
    for r in reports:
        table.add_row(
            format_length(r.length),
            f"{r.full_attention_flops:.3g}",
            f"{r.rmt_flops:.3g}",
            f"×{r.ratio:,.1f}",
            f"{r.knn_flops:.3g}",
            f"{r.longmem_flops:.3g}",
        )
    console.print(table)
    if plot is not None:
        console.print(f"plot: {plot}")


@app.command()
def bench(
    backbone: str = typer.Option("tiny", help="'tiny' (a small random-weight Llama built in code) or 'smollm2'."),
    lengths: str = typer.Option("1024,2048,4096,16384,65536,262144,1048576", help="Input lengths, comma-separated."),
    segment_size: int = typer.Option(512, help="Backbone positions per segment."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("fp32", help="fp32 or bf16 (bf16 on GPU)."),
    mechanisms: str = typer.Option(
        ",".join((*MECHANISMS, "full")), help="Which to measure, comma-separated (full: the backbone alone)."
    ),
    train_segments: str = typer.Option("1,2,4,8", help="Segments back-propagated through in a training step."),
    time_budget: float = typer.Option(150.0, help="Seconds a cell may take; longer ones are skipped (and say so)."),
    mfu: bool = typer.Option(False, "--mfu", help="Also RMT inference's model FLOPs utilisation at batch 16."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the settings and records as JSON."),
    threads: int = threads_option(),
) -> None:
    """Speed and memory of every mechanism and of full attention, side by side, on one backbone and one input."""
    import json

    from . import bench as measure

    use_threads(threads)
    settings = measure.BenchSettings(
        backbone=backbone,
        lengths=tuple(parse_ints(lengths, "--lengths", minimum=1)),
        segment_size=segment_size,
        device=device,
        dtype=dtype,
        mechanisms=tuple(m.strip() for m in mechanisms.split(",") if m.strip()),
        train_segments=tuple(parse_ints(train_segments, "--train-segments", minimum=1)),
        time_budget_s=time_budget,
    ).check()
    records = measure.run(settings, say=console.print, progress=segment_progress)
    result = {"settings": settings.to_dict(), "records": records, "crossover": measure.crossover(records)}
    if mfu:
        result["mfu"] = measure.rmt_mfu(settings)
    console.print(measure.markdown_tables(records, sorted(settings.lengths)))
    console.print(crossover_sentence(result["crossover"]))
    if mfu:
        found = result["mfu"]
        console.print(
            f"RMT inference at batch {found['batch']} used {100 * found['mfu']:.1f}% of what a {found['matmul_size']}² "
            f"matrix product reaches on this {settings.device} ({found['rmt_tflops']:.3g} of "
            f"{found['matmul_tflops']:.3g} TFLOP/s)."
        )
    if json_out is not None:
        write_atomic(json_out, json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def crossover_sentence(found: dict, name: str = "RMT") -> str:
    """`bench.crossover`'s finding as a sentence."""
    how = found["how"]
    if found.get("length") is None:
        return f"{name} did not read faster than full attention at any length measured ({how})."
    if how.startswith("measured: already"):
        return f"{name} read faster than full attention already at {found['length']:,} tokens, the shortest measured."
    if how.startswith("measured"):
        near = found.get("interpolated_length")
        return (
            f"{name} reads faster than full attention from about {near:,} tokens on ({how.removeprefix('measured: ')}; "
            f"{found['ratio']:.2f}× as fast at {found['length']:,})."
        )
    return f"{name} would read faster than full attention from about {found['length']:,} tokens ({how})."


if __name__ == "__main__":
    app()
