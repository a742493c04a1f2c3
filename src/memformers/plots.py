"""Pictures of how well a model remembers (BABILong-style accuracy heatmaps) and of how a run learned."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .evaluation import Cell, format_length  # noqa: E402
from .files import atomic_file  # noqa: E402


def accuracy_heatmap(cells: list[Cell], path: str | Path, title: str = "") -> Path:
    """Tasks × lengths, accuracy in % in each cell, red (0) to green (100), as BABILong draws them."""
    if not cells:
        raise ValueError("cells must not be empty")
    tasks = list(dict.fromkeys(c.task for c in cells))
    lengths = sorted({c.length for c in cells})
    grid = np.full((len(tasks), len(lengths)), np.nan)
    counts = np.zeros((len(tasks), len(lengths)), dtype=int)
    for c in cells:
        grid[tasks.index(c.task), lengths.index(c.length)] = 100 * c.accuracy
        counts[tasks.index(c.task), lengths.index(c.length)] = c.samples
    show_counts = len({c.samples for c in cells}) > 1  # cells of fewer samples say so: their intervals are wider
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(lengths), 0.9 + 0.55 * len(tasks)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(lengths)):
            if not np.isnan(grid[i, j]):
                text = f"{grid[i, j]:.0f}" + (f"\nn={counts[i, j]}" if show_counts else "")
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if show_counts else 9)
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("input length (tokens)")
    ax.set_title(title or "accuracy (%)")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02)
    fig.tight_layout()
    return _save_atomically(fig, Path(path))


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:  # [n] → [n]
    """Each point the mean of itself and up to `window` − 1 points before it: the line starts at the first log
    instead of `window` logs in, and a short run still gets one."""
    sums = np.cumsum(np.concatenate([[0.0], values]))  # [n + 1]
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _run_lines(records: list[dict], name: str = "records") -> tuple[list[dict], list[dict], list[dict]]:
    """A run's training lines, validation lines and curriculum changes; a run with nothing to draw is refused."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        raise ValueError(f"{name}: no training or validation lines")
    changes = [r for r in records if r.get("type") == "stage" and not r.get("done")]
    return train, evals, changes


def _long_validations(records: list[dict]) -> dict[str, list[dict]]:
    """`curriculum.eval_long_segments`' validations by what they read, named for a legend: their count of segments
    and, where the task's own placement (`eval_long_placement`), that (a continued run may change either)."""
    by_reading: dict[str, list[dict]] = {}
    for r in records:
        if r.get("type") == "eval_long":
            placed = ", facts where the task puts them" if r.get("placement") == "task" else ""
            by_reading.setdefault(f"{r['segments']} segments{placed}", []).append(r)
    return by_reading


def _validation_line(ax, records: list[dict], key: str, scale: float, style: str, color: str, label: str) -> None:
    """Validation records as points joined by a line: `key` (times `scale`) against the step."""
    steps, values = [r["step"] for r in records], [scale * r[key] for r in records]
    ax.plot(steps, values, style, color=color, markersize=3, label=label)


LONG_COLORS = ("tab:red", "tab:brown", "tab:pink", "tab:olive")  # the long validations' lines, in the order read

AUXILIARY_LOSSES = (  # logged name, colour, legend
    ("read_loss", "tab:green", "read-share loss"),
    ("noise_write_loss", "tab:purple", "noise-write loss"),
)


def training_curves(records: list[dict], path: str | Path, title: str = "", smooth: int = 20) -> Path:
    """Loss and accuracy against the step: training as the mean of the last `smooth` logged points, validation as
    points (and each task's, where several are learned together; at `eval_long_segments`, dashed), the read-share
    and noise-write losses where the run had them (`optim.read_loss_weight`, `noise_write_weight`), and a vertical
    line where the curriculum moved to more segments (labelled with their count)."""
    train, evals, changes = _run_lines(records)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        scale = 100 if key == "accuracy" else 1
        if train:
            steps = np.array([r["step"] for r in train])
            values = scale * np.array([r[key] for r in train], dtype=float)
            ax.plot(steps, values, color="tab:blue", alpha=0.2, linewidth=0.8)
            ax.plot(
                steps, trailing_mean(values, smooth), color="tab:blue", label=f"training (mean of the last {smooth})"
            )
        if evals:
            _validation_line(ax, evals, key, scale, "o-", "tab:orange", "validation")
        readings = _long_validations(records).items()  # where a memory that holds can still drift: a colour each
        for (reading, longs), color in zip(readings, LONG_COLORS, strict=False):
            _validation_line(ax, longs, key, scale, "s--", color, f"validation at {reading}")
        for name, color, label in AUXILIARY_LOSSES:  # beside the answer's loss, where the run had them
            logged = [r for r in train if name in r]
            if key == "loss" and logged:
                values = np.array([r[name] for r in logged], dtype=float)
                steps = [r["step"] for r in logged]
                ax.plot(steps, trailing_mean(values, smooth), color=color, label=f"{label} (mean of the last {smooth})")
                ax.legend(loc="upper right", fontsize=8)
        by_task = [r for r in evals if r.get("accuracy_by_task")]
        if key == "accuracy" and by_task:  # several tasks learned together: each one's validation, thin
            for name in dict.fromkeys(name for r in by_task for name in r["accuracy_by_task"]):
                points = [
                    (r["step"], 100 * r["accuracy_by_task"][name]) for r in by_task if name in r["accuracy_by_task"]
                ]
                ax.plot(*zip(*points, strict=True), "--", linewidth=0.9, alpha=0.8, label=f"validation {name}")
        for change in changes:
            ax.axvline(change["step"], color="grey", linestyle=":", linewidth=0.8)
            ax.text(change["step"], ax.get_ylim()[1], f" {change['segments']} seg", fontsize=7, va="top")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)" if key == "accuracy" else "loss")
        ax.grid(alpha=0.3)
    acc_ax.set_ylim(0, 100)
    acc_ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title or "training")
    fig.tight_layout()
    return _save_atomically(fig, Path(path))


def compare_runs(runs: dict[str, list[dict]], path: str | Path, title: str = "", smooth: int = 20) -> Path:
    """Several runs on one picture, one colour each: training loss as the mean of the last `smooth` logged points,
    and validation accuracy as points (at `eval_long_segments` dashed), with each run's curriculum changes as dotted
    lines in its colour. What an ablation needs: runs that differ in one setting, read against the same steps."""
    if not runs:
        raise ValueError("runs: give at least one run to draw")
    lines = {label: _run_lines(records, f"runs: {label!r}") for label, records in runs.items()}  # before drawing
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for index, (label, (train, evals, changes)) in enumerate(lines.items()):
        color = f"C{index % 10}"  # matplotlib's ten-colour cycle
        if train:
            losses = np.array([r["loss"] for r in train], dtype=float)
            loss_ax.plot([r["step"] for r in train], trailing_mean(losses, smooth), color=color, label=label)
        if evals:
            _validation_line(acc_ax, evals, "accuracy", 100, "o-", color, label)
        for reading, longs in _long_validations(runs[label]).items():
            _validation_line(acc_ax, longs, "accuracy", 100, "s--", color, f"{label}, {reading}")
        for change in changes:
            for ax in (loss_ax, acc_ax):
                ax.axvline(change["step"], color=color, linestyle=":", linewidth=0.8)
    loss_ax.set_ylabel(f"training loss (mean of the last {smooth} logs)")
    acc_ax.set_ylabel("validation accuracy (%)")
    acc_ax.set_ylim(0, 100)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "runs compared")
    fig.tight_layout()
    return _save_atomically(fig, Path(path))


def _save_atomically(fig, path: Path) -> Path:
    """A reader (a browser refreshing the picture, a run killed mid-write) never sees half a file."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
