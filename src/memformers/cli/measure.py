"""`memformers stream`, `flops` and `bench`: speed, memory and FLOPs of the mechanisms against the input length."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from ..errors import InputError
from ..registry import MECHANISMS
from .options import parse_ints, threads_option, use_threads
from .output import console, segment_progress, stream_throughput, write_atomic


def stream(
    backbone: str = typer.Option("minilm", help="'minilm', 'smollm2' or a local Hugging Face model folder."),
    segments: str = typer.Option("4,16,64,256", help="Segment counts to stream (each ≥ 1), comma-separated."),
    segment_size: int = typer.Option(512, min=1, help="Backbone positions per segment, memory included."),
    memory_tokens: int = typer.Option(10, min=0, help="Number of memory tokens."),
    threads: int = threads_option(),
) -> None:
    """Stream long inputs through an (untrained) RMT: tokens/s and peak memory against the number of segments."""
    from .. import backbones
    from ..rmt import RecurrentMemoryTransformer

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

    from .. import flops as model_flops
    from ..evaluation import format_length

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

    from .. import bench as benchmark
    from ..bench_results import crossover, markdown_tables

    use_threads(threads)
    settings = benchmark.BenchSettings(
        backbone=backbone,
        lengths=tuple(parse_ints(lengths, "--lengths", minimum=1)),
        segment_size=segment_size,
        device=device,
        dtype=dtype,
        mechanisms=tuple(m.strip() for m in mechanisms.split(",") if m.strip()),
        train_segments=tuple(parse_ints(train_segments, "--train-segments", minimum=1)),
        time_budget_s=time_budget,
    ).check()
    records = benchmark.run(settings, say=console.print, progress=segment_progress)
    result = {"settings": settings.to_dict(), "records": records, "crossover": crossover(records)}
    if mfu:
        result["mfu"] = benchmark.rmt_mfu(settings)
    console.print(markdown_tables(records, sorted(settings.lengths)))
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
    """`bench_results.crossover`'s finding as a sentence."""
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
