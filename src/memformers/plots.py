"""Pictures of how well a model remembers: BABILong-style accuracy heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .evaluation import Cell, format_length  # noqa: E402


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
