"""Judge the generated answers of BABILong grids again with today's scorer, the leaderboard's (`BABILONG_SCORER`).

A cell can be judged again only where it kept every generated output (one example per sample). Every other cell
of a decoder's grid keeps its numbers and is marked with the rule that judged it: a cell without a `scorer` was
written before the scorer followed the leaderboard, under `WHOLE_WORD_SCORER`. Grids scored by class (encoders)
are not affected and are left as they are. Where a number changed, the grid's .md table and heatmap are redrawn.

    python benchmarks/rescore_babilong.py benchmarks/results/babilong_qa1_rmt_decoder.json …
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT  # noqa: E402

from memformers.babilong_metric import BABILONG_SCORER, WHOLE_WORD_SCORER, babilong_correct, babilong_labels  # noqa: E402
from memformers.evaluation import Cell, load_cells, markdown_table, save_cells, wilson_interval  # noqa: E402
from memformers.plots import accuracy_heatmap  # noqa: E402


@dataclass
class Verdict:
    """What became of one cell: judged again, or marked with its old rule; and how many kept answers the
    leaderboard's rule decides differently from the stored decision."""

    cell: Cell
    rescored: bool
    kept: int
    changed: int


def kept_every_output(cell: Cell) -> bool:
    """Whether the cell stored the generated answer of each of its samples, so its count can be recomputed."""
    return sorted(example["index"] for example in cell.examples) == list(range(cell.samples))


def rescore_cell(cell: Cell) -> Verdict:
    """The cell judged by `BABILONG_SCORER` where it kept every output; otherwise the cell as it was, marked with
    the rule that judged it."""
    labels = list(babilong_labels(cell.task))
    decisions = [babilong_correct(e["output"], e["target"], e["question"], labels) for e in cell.examples]
    changed = sum(new != e["correct"] for new, e in zip(decisions, cell.examples, strict=True))
    if cell.scorer == BABILONG_SCORER:
        return Verdict(cell, False, len(decisions), changed)
    if not kept_every_output(cell):
        return Verdict(replace(cell, scorer=cell.scorer or WHOLE_WORD_SCORER), False, len(decisions), changed)
    correct = sum(decisions)
    low, high = wilson_interval(correct, cell.samples)
    examples = [e | {"correct": new} for e, new in zip(cell.examples, decisions, strict=True)]
    rescored = replace(cell, correct=correct, accuracy=correct / cell.samples, ci_low=low, ci_high=high)
    return Verdict(replace(rescored, examples=examples, scorer=BABILONG_SCORER), True, len(decisions), changed)


def rescore_grid(path: Path, command: str = "") -> list[Verdict]:
    """Judge one grid JSON again in place; where a cell was judged again, the grid records `command` and its table
    and heatmap are redrawn."""
    record = json.loads(path.read_text())
    if record.get("scoring") != "generation":
        return []  # scored by class: no generated answers, no rule to change
    verdicts = [rescore_cell(cell) for cell in load_cells(path)]
    cells = [verdict.cell for verdict in verdicts]
    meta = {key: value for key, value in record.items() if key != "results"}
    if any(verdict.rescored for verdict in verdicts):
        meta["rescored_by"] = command
        path.with_suffix(".md").write_text(markdown_table(cells) + "\n")
        checkpoint = Path(record.get("checkpoint", path.stem)).name
        accuracy_heatmap(cells, path.with_suffix(".png"), f"{checkpoint}: accuracy (%)")
    save_cells(path, cells, meta)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grids", nargs="+", type=Path, help="grid JSONs written by `memformers eval … --json`")
    args = parser.parse_args()
    command = "python " + " ".join([str(Path(__file__).resolve().relative_to(ROOT))] + sys.argv[1:])
    for path in args.grids:
        if not path.exists():
            raise SystemExit(f"grids: {str(path)!r} does not exist")
        verdicts = rescore_grid(path, command)
        if not verdicts:
            print(f"{path}: scored by class, not affected")
            continue
        rescored = sum(v.rescored for v in verdicts)
        kept, changed = sum(v.kept for v in verdicts), sum(v.changed for v in verdicts)
        rules = sorted({v.cell.scorer for v in verdicts})
        print(
            f"{path}: {rescored} of {len(verdicts)} cells judged again; rules now {rules}; "
            f"{changed} of {kept} kept answers decided differently by {BABILONG_SCORER}"
        )


if __name__ == "__main__":
    main()
