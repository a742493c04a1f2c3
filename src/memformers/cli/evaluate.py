"""`memformers data`, `eval` and `perplexity`: samples written out, accuracy on a grid or a BABILong file,
perplexity per segment index."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import typer

from ..errors import InputError, InputWarning
from .checkpoints import (
    check_vocabulary,
    checkpoint_tokenizer,
    read_checkpoint,
    resolve_tokenizer,
    tunable_knobs,
    tune_knobs,
    warn_untrained_tasks,
)
from .options import check_device, parse_ints, threads_option, use_threads
from .output import console, progress_bar, write_atomic


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
    facts_first: bool = typer.Option(False, "--facts-first", help="Every fact of each story before the noise."),
    facts_apart: bool = typer.Option(False, "--facts-apart", help="The facts spaced evenly through the noise."),
    threads: int = threads_option(),
) -> None:
    """Export a task × length grid to JSONL, one sample a line.

    Each line has BABILong's fields (input, question, target), so `memformers eval CKPT --data FILE` and other
    BABILong tooling read it, plus the task, length, facts, their token positions and the tokenizer they count.
    """
    from ..tasks import export_jsonl

    use_threads(threads)
    name = resolve_tokenizer(tokenizer)
    grid = (task, parse_ints(lengths, "--lengths"), samples, name, seed, out, noise_dir, split)
    written = export_jsonl(*grid, facts_first=facts_first, facts_apart=facts_apart)  # both: refused by make_sample
    console.print(f"wrote {written} samples to {out}")


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
    facts_first: bool = typer.Option(
        False,
        "--facts-first",
        help="Put every fact of each story before the noise (the same stories): past one window only the memory "
        "can answer, so this measures what it carries. Recorded in each cell.",
    ),
    facts_apart: bool = typer.Option(
        False,
        "--facts-apart",
        help="Space the facts of each story evenly through the noise (the same stories): the memory takes in about "
        "one at a time, as far apart as the length allows. Recorded in each cell.",
    ),
    max_new_tokens: int = typer.Option(8, help="Decoders: most tokens generated per answer (greedy, stops at EOS)."),
    precision: str = typer.Option(
        "fp32",
        help="fp32, bf16 (autocast: about 2.6× faster on a CPU with bf16 instructions, 96% of answers the same as "
        "fp32's; fp32 with a warning where it would be slower) or auto (bf16 where it pays). Recorded in each cell.",
    ),
    knob: list[str] = typer.Option(
        [],
        "--set",
        help="KEY=VALUE: read with this value of a knob no weight depends on, e.g. ARMT's write_threshold=0.01 "
        "(repeatable). Recorded in each cell.",
    ),
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

    from ..babilong_files import evaluate_file, read_babilong_file
    from ..evaluation import evaluate_grid, generates, markdown_table, save_cells
    from ..plots import accuracy_heatmap
    from ..precision import resolve_precision
    from ..saving import load
    from ..tasks import get_tokenizer, task_spec

    use_threads(threads)
    check_device(device)
    precision = resolve_precision(precision, device, "--precision")
    config = read_checkpoint(checkpoint, "checkpoint")
    tasks = [t.strip() for t in (task or "memorize").split(",") if t.strip()]
    counts = parse_ints(samples, "--samples", minimum=1)
    tokenizer = checkpoint_tokenizer(checkpoint, config)
    if data is not None and (facts_first or facts_apart):
        option = "--facts-first" if facts_first else "--facts-apart"
        raise InputError(f"{option} places the facts of generated samples; a --data file's stay where it put them")
    if facts_first and facts_apart:
        raise InputError("--facts-first and --facts-apart place the facts in two ways; choose one")
    records = read_babilong_file(data) if data is not None else None
    if records is None:
        for name in tasks:
            task_spec(name)  # an unknown task fails here, before any warning or loading
    else:
        tasks = list(dict.fromkeys(str(r.get("task") or (task or data.stem)) for r in records))
        warn_other_tokenizer(data, records, tokenizer)
    warn_untrained_tasks(checkpoint, config, tasks)
    model = load(checkpoint, device=device)
    saved_knobs = tunable_knobs(model)
    tune_knobs(model, knob)
    knobs = tunable_knobs(model)  # every one, as read: a cell says how it was read whichever model it came from
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
            + (["--facts-first"] if facts_first else [])
            + (["--facts-apart"] if facts_apart else [])
            + (["--max-new-tokens", str(max_new_tokens)] if generates(model) else [])
            + (["--precision", precision] if precision != "fp32" else [])
            + [word for text in knob for word in ("--set", text)]
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
        options |= {"max_new_tokens": max_new_tokens, "precision": precision}
        if records is not None:
            cells = evaluate_file(model, data, tokenizer, task, on_cell, records=records, **options)
            for cell in cells:
                cell.command, cell.knobs = meta["command"], knobs
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
                knobs,
                saved_knobs=saved_knobs,
                seed=seed,
                split=split,
                noise_dir=noise_dir,
                facts_first=facts_first,
                facts_apart=facts_apart,
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
    from ..tasks import get_tokenizer
    from ..tasks.noise import tokenizer_fingerprint

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

    from ..perplexity import run as run_perplexity

    use_threads(threads)
    check_device(device)
    options = {"--tokens": tokens, "--documents": documents, "--split": split, "--noise-dir": noise_dir}
    options |= {"--memory-size": memory_size, "--segment-size": segment_size, "--json": json_out}
    words = ["memformers", "perplexity", str(checkpoint)]
    words += [str(v) for k, v in options.items() if v is not None for v in (k, v)]
    batch = min(batch_size, documents)
    args = (checkpoint, tokens, documents, split, noise_dir, batch, device, memory_size, segment_size)
    run_perplexity(*args, json_out=json_out, command=shlex.join(words), console=console)
