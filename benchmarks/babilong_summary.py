"""One table and one plot from the BABILong grids of every mechanism: accuracy against input length.

Each grid is a JSON written by `memformers eval … --json` (each cell keeps the command that measured it). The
summary averages qa1..qa5 where a length has all five, and shows qa1 alone (the task measured out to 10M tokens).

    python benchmarks/babilong_summary.py "RMT encoder=benchmarks/results/babilong_rmt_encoder.json" …
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, write_result  # noqa: E402

from memformers.evaluation import format_length, load_cells  # noqa: E402
from memformers.tasks import task_spec  # noqa: E402

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")


def summarize(cells) -> dict[int, dict]:
    """Per length: the mean over qa1..qa5 (None unless all five are there), qa1, and the samples per task."""
    rows = {}
    for length in sorted({c.length for c in cells}):
        here = {c.task: c for c in cells if c.length == length and c.task in TASKS}
        mean = sum(c.accuracy for c in here.values()) / 5 if len(here) == 5 else None
        qa1 = here.get("qa1")
        rows[length] = {
            "mean": mean,
            "qa1": qa1 and qa1.accuracy,
            "qa1_ci": qa1 and [qa1.ci_low, qa1.ci_high],
            "samples": {task: c.samples for task, c in here.items()},
        }
    return rows


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", help="NAME=PATH of a grid JSON, one per mechanism")
    parser.add_argument("--name", default="babilong_summary", help="Results file name under benchmarks/results")
    args = parser.parse_args()
    summary = {}
    for item in args.grids:
        name, _, path = item.partition("=")
        if not path or not Path(path).exists():
            raise SystemExit(f"grids: {item!r} must be NAME=PATH of an existing grid JSON")
        summary[name] = summarize(load_cells(path)) | {"grid": path}

    lengths = sorted({n for rows in summary.values() for n in rows if isinstance(n, int)})
    header = "| mechanism | " + " | ".join(format_length(n) for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    # the qa1–qa5 mean exists only where all five tasks were measured
    measured = [row for rows in summary.values() for n, row in rows.items() if isinstance(n, int)]
    has_mean = any(row["mean"] is not None for row in measured)
    lines = []
    if has_mean:
        lines += ["Mean accuracy over qa1–qa5 (%):", "", header, rule]
        for name, rows in summary.items():
            lines.append(f"| {name} | " + " | ".join(percent(rows.get(n, {}).get("mean")) for n in lengths) + " |")
        lines.append("")
    lines += ["qa1 accuracy (%), 95% interval:", "", header, rule]
    for name, rows in summary.items():
        cells = []
        for n in lengths:
            row = rows.get(n, {})
            ci = row.get("qa1_ci")
            cells.append(percent(row.get("qa1")) + (f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / f"{args.name}.md").write_text(table + "\n")

    panels = [("qa1", "qa1")]
    if has_mean:
        panels.insert(0, ("mean", "mean over qa1–qa5"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4), sharey=True, squeeze=False)
    axes = axes[0]
    shortest = min([n for n in lengths if n > 0], default=512)

    def x(n: int) -> int:  # length 0 (the story alone) drawn one octave left of the shortest, on a log axis
        return n or shortest // 2

    mechanisms = list(dict.fromkeys(name.split(",")[0] for name in summary))  # "NAME, last window" → NAME
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, rows in summary.items():
            points = [(n, rows[n][key]) for n in lengths if n in rows and rows[n][key] is not None]
            if points:  # "NAME, last window" and "NAME, facts first" rows: NAME's colour, dashed
                color = f"C{mechanisms.index(name.split(',')[0])}"
                style = "--" if "window" in name else "-." if "facts first" in name else "-"
                ax.plot(
                    [x(n) for n, _ in points], [100 * v for _, v in points], style, marker="o", color=color, label=name
                )
        tasks = TASKS if key == "mean" else ("qa1",)
        chance = 100 * sum(1 / len(task_spec(task).answers) for task in tasks) / len(tasks)
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.0f}%)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([x(n) for n in lengths], [format_length(n) for n in lengths], rotation=45)
        ax.set_xlabel("input length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)
    plt.close(fig)
    write_result(args.name, {"summary": {k: {str(n): r for n, r in v.items()} for k, v in summary.items()}})


if __name__ == "__main__":
    main()
