"""`memformers …`: the command line (typer)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Read millions of tokens through memory with any Hugging Face transformer.", no_args_is_help=True
)
console = Console()


@app.callback()
def _startup() -> None:
    """Settings every command shares (the allocator's, for speed on the CPU)."""
    from .profiling import keep_freed_memory

    keep_freed_memory()


def parse_ints(text: str, name: str) -> list[int]:
    """'4096,65536' → [4096, 65536], with an error that names the option."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise typer.BadParameter(f"{name} must be non-negative integers, got {text!r}")
    return values


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


def stream_throughput(model, token_chunks, num_segments: int, description: str) -> tuple[float, int, int | None]:
    """Stream one document through `model`; (tokens/s, peak activation bytes, peak resident bytes)."""
    from .profiling import PeakMemory, peak_rss_bytes, reset_peak_rss
    from .segments import stream_segments

    reset_peak_rss()
    tokens = 0
    start = time.perf_counter()
    with progress_bar() as bar, torch.no_grad(), PeakMemory() as meter:
        task = bar.add_task(description, total=num_segments, rate="")
        for segment, _, _ in model.stream(stream_segments(token_chunks, model.content_size)):
            tokens += segment.input_ids.shape[1]
            rate = tokens / (time.perf_counter() - start)
            bar.update(task, advance=1, rate=f"{rate:,.0f} tokens/s")
    return tokens / (time.perf_counter() - start), meter.peak_bytes, peak_rss_bytes()


SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "rmt-cpu"


@app.command()
def demo(
    checkpoint: Path = typer.Option(SHIPPED_CHECKPOINT, help="A classification RMT saved by memformers train."),
    task: str = typer.Option("detect", help="memorize, detect or reason: where the facts hide."),
    length: int = typer.Option(1_048_576, help="Tokens of Austen around the facts in the showcase samples."),
    samples: int = typer.Option(3, help="Showcase samples, read side by side."),
    table_lengths: str = typer.Option("1024,4096,16384,131072", help="Lengths of the closing accuracy table."),
    table_samples: int = typer.Option(16, help="Samples per cell of the closing table."),
    seed: int = typer.Option(0, help="Which samples (test books: never seen in training)."),
) -> None:
    """Hide facts in a million tokens of Austen, stream them through a trained RMT, and ask about them."""
    from .evaluation import class_answers, evaluate_cell, format_length, predict_classes
    from .profiling import peak_rss_bytes
    from .saving import load, read_config
    from .tasks import make_sample

    if not (Path(checkpoint) / "memformers.json").exists():
        if checkpoint != SHIPPED_CHECKPOINT:
            raise typer.BadParameter(f"--checkpoint {checkpoint} holds no model saved by memformers")
        console.print(f"no trained model at {checkpoint}: streaming an untrained RMT instead (speed and memory only)")
        stream(backbone="minilm", segments="4,16,64,256", segment_size=512, memory_tokens=10)
        return
    config = read_config(checkpoint)
    tokenizer = config.get("extra", {}).get("tokenizer") or str(Path(checkpoint) / "backbone")
    model = load(checkpoint)
    console.print(f"[bold]memformers demo[/]: RMT ({model.extra_repr()}) from {checkpoint}")
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

    table = Table(title=f"{task}: accuracy on test books ({table_samples} samples a cell)")
    for value in ["length"] + [format_length(n) for n in parse_ints(table_lengths, "--table-lengths")]:
        table.add_column(value, justify="right")
    row = []
    with progress_bar() as bar:
        job = bar.add_task("accuracy table", total=None, rate="")
        for n in parse_ints(table_lengths, "--table-lengths"):
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
            row.append(f"{100 * cell.accuracy:.0f}%")
    table.add_row("accuracy", *row)
    console.print(table)


@app.command()
def stream(
    backbone: str = typer.Option("minilm", help="'minilm', 'smollm2' or a local Hugging Face model folder."),
    segments: str = typer.Option("4,16,64,256", help="Segment counts to stream, comma-separated."),
    segment_size: int = typer.Option(512, help="Backbone positions per segment, memory included."),
    memory_tokens: int = typer.Option(10, help="Number of memory tokens."),
) -> None:
    """Stream long inputs through an (untrained) RMT: tokens/s and peak memory against the number of segments."""
    from . import backbones
    from .rmt import RecurrentMemoryTransformer

    counts = parse_ints(segments, "--segments")
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


@app.command()
def data(
    task: str = typer.Option(..., help="qa1…qa5, memorize, detect, reason, copy, reverse, associative."),
    lengths: str = typer.Option(..., help="Sample lengths in tokens, comma-separated (e.g. 4096,65536)."),
    samples: int = typer.Option(20, help="Samples per length."),
    tokenizer: str = typer.Option("minilm", help="'minilm', 'smollm2' or a tokenizer folder."),
    seed: int = typer.Option(0, help="Random seed."),
    out: Path = typer.Option(..., help="Output JSONL file."),
    noise_dir: Path | None = typer.Option(None, help="Folder of .txt books to use as noise instead of Austen."),
) -> None:
    """Export a task × length grid to JSONL, one sample a line."""
    from .tasks import export_jsonl

    try:
        written = export_jsonl(task, parse_ints(lengths, "--lengths"), samples, tokenizer, seed, out, noise_dir)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console.print(f"wrote {written} samples to {out}")


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A model saved with save_pretrained (e.g. by memformers train)."),
    task: str = typer.Option("memorize", help="Tasks, comma-separated: memorize, detect, reason, qa1…qa5."),
    lengths: str = typer.Option("512,4096,65536", help="Input lengths in tokens, comma-separated."),
    samples: str = typer.Option("100", help="Samples per cell, or one count per length (e.g. 100,100,20,5)."),
    batch_size: int = typer.Option(32, help="Samples read side by side."),
    noise_dir: Path | None = typer.Option(None, help="Folder of .txt books to use as noise instead of Austen."),
    split: str = typer.Option("test", help="Noise books: 'test' (never trained on) or 'train'."),
    seed: int = typer.Option(0, help="Seed of the evaluation samples."),
    json_out: Path | None = typer.Option(None, "--json", help="Results JSON; cells already in it are skipped."),
    plot: Path | None = typer.Option(None, help="Heatmap PNG (default: beside --json)."),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu", help="Device."),
    window: int | None = typer.Option(
        None, help="Read only the last N tokens of each sample (the backbone-alone baseline, truncated to its window)."
    ),
    max_new_tokens: int = typer.Option(8, help="Decoders: most tokens generated per answer (greedy, stops at EOS)."),
    perplexity: bool = typer.Option(
        False, "--perplexity", help="Perplexity of held-out books per segment index instead (decoders)."
    ),
    tokens: int | None = typer.Option(None, help="--perplexity: tokens per document (default 20 segments)."),
    documents: int = typer.Option(8, help="--perplexity: documents (stretches of the split's books)."),
    memory_size: int | None = typer.Option(None, help="--perplexity: kNN/LongMem store size to read with."),
    segment_size: int | None = typer.Option(None, help="--perplexity of a bare backbone: tokens per segment."),
) -> None:
    """Accuracy on a task × length grid, streaming every sample through the model (memory stays flat).

    Classifiers are scored by their class; decoders with a causal-LM head generate the answer, scored with the
    BABILong metric (the target in the first sentence, no other answer there).
    With --perplexity: next-token perplexity of held-out documents per segment index, 1..16 and 16+ pooled.
    """
    import shlex

    if perplexity:
        from .perplexity import run as run_perplexity

        options = {"--tokens": tokens, "--documents": documents, "--split": split, "--noise-dir": noise_dir}
        options |= {"--memory-size": memory_size, "--segment-size": segment_size, "--json": json_out}
        words = ["memformers", "eval", str(checkpoint), "--perplexity"]
        words += [str(v) for k, v in options.items() if v is not None for v in (k, v)]
        try:
            batch = min(batch_size, documents)
            args = (checkpoint, tokens, documents, split, noise_dir, batch, device, memory_size, segment_size)
            run_perplexity(*args, json_out=json_out, command=shlex.join(words), console=console)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
        return

    from .evaluation import evaluate_grid, generates, markdown_table
    from .plots import accuracy_heatmap
    from .saving import load, read_config

    try:
        config = read_config(checkpoint)
        tasks = [t.strip() for t in task.split(",") if t.strip()]
        counts = parse_ints(samples, "--samples")
        model = load(checkpoint, device=device)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    tokenizer = config.get("extra", {}).get("tokenizer") or str(Path(checkpoint) / "backbone")
    meta = {
        "checkpoint": str(checkpoint),
        "command": shlex.join(
            ["memformers", "eval", str(checkpoint), "--task", task, "--lengths", lengths, "--samples", samples]
            + (["--noise-dir", str(noise_dir)] if noise_dir else [])
            + ["--split", split, "--seed", str(seed)]
            + (["--window", str(window)] if window else [])
            + (["--max-new-tokens", str(max_new_tokens)] if generates(model) else [])
            + (["--json", str(json_out)] if json_out else [])
        ),
        "scoring": "generation" if generates(model) else "classes",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
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

        try:
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
                batch_size=batch_size,
                device=device,
                progress=on_progress,
                window=window,
                max_new_tokens=max_new_tokens,
            )
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    console.print(markdown_table(cells))
    if json_out is not None:
        json_out.with_suffix(".md").write_text(markdown_table(cells) + "\n")
    target = plot or (json_out.with_suffix(".png") if json_out is not None else None)
    if target is not None:
        accuracy_heatmap(cells, target, f"{Path(checkpoint).name}: accuracy (%)")
        console.print(f"heatmap: {target}")


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
    stop_after: int | None = typer.Option(None, help="Checkpoint and stop after this many steps in all."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
) -> None:
    """Train an RMT on a task with a segment curriculum (Accelerate: CPU, GPU or `accelerate launch`)."""
    from .training import train as run_training

    overrides = list(set_)
    if output_dir is not None:
        overrides.append(f"output.dir={str(output_dir)!r}")
    if max_steps_per_stage is not None:
        overrides.append(f"curriculum.max_steps_per_stage={max_steps_per_stage}")
    if vary_segments is not None:
        overrides.append(f"curriculum.vary_segments={str(vary_segments).lower()}")
    try:
        path = run_training(config, overrides, progress=progress, resume=resume, stop_after_steps=stop_after)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
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
    try:
        spec = model_flops.resolve_spec(config)
        reports = [
            model_flops.compare(spec, n, segment_size, memory_tokens, layout, knn=knn, longmem=longmem) for n in lengths
        ]
        if plot is not None:
            plot_lengths = sorted({*lengths, *(1 << p for p in range(9, 22))}) if length is None else lengths
            model_flops.plot_flops(spec, plot_lengths, plot, segment_size, memory_tokens, knn, longmem)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
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
    mechanisms: str = typer.Option("rmt,knn,longmem,cache,full", help="Which to measure, comma-separated."),
    train_segments: str = typer.Option("1,2,4,8", help="Segments back-propagated through in a training step."),
    time_budget: float = typer.Option(150.0, help="Seconds a cell may take; longer ones are skipped (and say so)."),
    mfu: bool = typer.Option(False, "--mfu", help="Also RMT inference's model FLOPs utilisation at batch 16."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the settings and records as JSON."),
) -> None:
    """Speed and memory of every mechanism and of full attention, side by side, on one backbone and one input."""
    import json

    from . import bench as measure

    try:
        settings = measure.BenchSettings(
            backbone=backbone,
            lengths=tuple(parse_ints(lengths, "--lengths")),
            segment_size=segment_size,
            device=device,
            dtype=dtype,
            mechanisms=tuple(m.strip() for m in mechanisms.split(",") if m.strip()),
            train_segments=tuple(parse_ints(train_segments, "--train-segments")),
            time_budget_s=time_budget,
        ).check()
        records = measure.run(settings, say=console.print)
        result = {"settings": settings.to_dict(), "records": records, "crossover": measure.crossover(records)}
        if mfu:
            result["mfu"] = measure.rmt_mfu(settings)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    console.print(measure.markdown_tables(records, sorted(settings.lengths)))
    console.print(f"RMT reads faster than full attention from {result['crossover']}")
    if mfu:
        console.print(f"MFU of RMT inference: {result['mfu']}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_out}")


if __name__ == "__main__":
    app()
