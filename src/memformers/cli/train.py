"""`memformers train`: a training config (TOML) and the command line's overrides of it, run by the trainer;
`memformers curves`: how runs learned, drawn from their metrics; `memformers export`: a run's model, stored to
share."""

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


def curves(
    runs: list[str] = typer.Argument(
        ..., help="Run folders or metrics.jsonl files, each as PATH or LABEL=PATH (the label defaults to the folder)."
    ),
    out: Path = typer.Option(..., "--out", help="The picture to write (.png, .pdf or .svg)."),
    title: str = typer.Option("", help="Title (default: 'training' for one run, 'runs compared' for several)."),
    smooth: int = typer.Option(20, min=1, help="Training points averaged into each point of the line."),
) -> None:
    """Draw training curves from metrics.jsonl: one run as the trainer draws it, several on one picture."""
    from ..plots import compare_runs, read_metrics, training_curves

    labelled: dict[str, list[dict]] = {}  # label → the run's metrics records
    for item in runs:
        label, _, path = item.rpartition("=")
        path = Path(path)
        label = label or _run_name(path)
        if label in labelled:
            raise ValueError(f"runs: the label {label!r} is given twice; name them as LABEL=PATH")
        try:
            labelled[label] = read_metrics(path)
        except FileNotFoundError as error:  # bad input, not a bug: one line
            raise ValueError(f"runs: {error} (give a run folder or its metrics.jsonl)") from None
    if len(labelled) == 1:
        written = training_curves(next(iter(labelled.values())), out, title=title, smooth=smooth)
    else:
        written = compare_runs(labelled, out, title=title, smooth=smooth)
    console.print(f"saved {written}")


def _run_name(path: Path) -> str:
    """A run's default label: its folder's name (for `run/` or `run/metrics.jsonl`), else the file's stem."""
    if path.name == "metrics.jsonl":
        return path.parent.name
    return path.stem if path.is_file() else path.name


def export(
    source: Path = typer.Argument(
        ..., help="A run folder (its final model, else its latest checkpoint's) or a saved model folder."
    ),
    out: Path = typer.Argument(..., help="The folder to write (replaced whole, never left half written)."),
    dtype: str = typer.Option("float16", help="How the weights are stored: float16, bfloat16 or float32."),
    knob: list[str] = typer.Option(
        [],
        "--set",
        help="KEY=VALUE: store the model with this value of a knob no weight depends on, e.g. ARMT's "
        "layout_writes=false, so that it reads so wherever it is loaded (repeatable).",
    ),
) -> None:
    """Store a trained model to share: weights in half precision (half the size; `memformers.load` computes in
    float32 again), with its tokenizer and what the trainer recorded (task, tokenizer, config, step); `--set` stores
    it with the tunable knobs it was measured reading best with (`memformers eval … --set`)."""
    from transformers import AutoTokenizer

    from ..saving import BACKBONE_DIR, CONFIG_NAME, load, save_pretrained
    from ..training_checkpoints import latest_checkpoint
    from .checkpoints import read_checkpoint, tune_knobs

    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: one of float16, bfloat16, float32")
    model_dir = source
    if not (source / CONFIG_NAME).is_file():  # a run folder: its final model, else its latest checkpoint's
        latest = latest_checkpoint(source)
        if (source / "final").is_dir():
            model_dir = source / "final"
        elif latest is not None:
            model_dir = latest / "model"
    config = read_checkpoint(model_dir, "source")
    if out.resolve() == model_dir.resolve():
        raise ValueError(f"out: {str(out)!r} is the model being exported; give another folder")
    model = load(model_dir)
    tune_knobs(model, knob)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir / BACKBONE_DIR)
    except (OSError, ValueError):  # saved without one: the model alone
        tokenizer = None
    save_pretrained(model, out, tokenizer, config.get("extra", {}), dtype=None if dtype == "float32" else dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    console.print(f"saved {out} ({size / 2**20:.0f} MB, {dtype}) from {model_dir}")
