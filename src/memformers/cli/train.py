"""`memformers train`: a training config (TOML) and the command line's overrides of it, run by the trainer."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import threads_option, use_threads
from .output import console


def train(
    config: Path = typer.Argument(..., help="Training config (TOML); its keys: see memformers.training_config."),
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
    """Train a memory model (RMT, ARMT, kNN, LongMem, cache) on a task with a segment curriculum (Accelerate: CPU, GPU
    or `accelerate launch`)."""
    from ..training import train as run_training

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
