"""Grids judged by the earlier whole-word rule: re-scored where every output was kept, otherwise marked."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from memformers.babilong_metric import BABILONG_SCORER, WHOLE_WORD_SCORER
from memformers.evaluation import Cell, load_cells

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import rescore_babilong  # noqa: E402

WHERE = "Where is Mary?"


def example(index: int, output: str, target: str, correct: bool) -> dict:
    return {"index": index, "question": WHERE, "target": target, "output": output, "correct": correct}


def old_cell(length: int, samples: int, examples: list[dict]) -> dict:
    """A cell as the earlier code wrote it: no `scorer` key, its count from the whole-word rule."""
    correct = sum(e["correct"] for e in examples)
    row = asdict(Cell("qa1", length, samples, correct, correct / samples, 0.0, 1.0, 1.0, 1.0, examples=examples))
    del row["scorer"]
    return row


def write_grid(path: Path, scoring: str, rows: list[dict]) -> None:
    meta = {"checkpoint": "runs/decoder/final", "command": "memformers eval …", "scoring": scoring}
    path.write_text(json.dumps(meta | {"results": rows}, indent=2) + "\n")


def test_cells_that_kept_every_output_are_judged_again_the_others_marked(tmp_path):
    grid = tmp_path / "decoder.json"
    whole = [
        example(0, "gardens", "garden", False),  # substring: right for the leaderboard
        example(1, "?. kitchen.", "kitchen", True),  # only "." ends the answer: wrong for the leaderboard
        example(2, "office <context> kitchen", "office", False),  # a prompt marker ends the answer: right
    ]
    partial = [example(i, "hallway", "hallway", True) for i in range(3)]  # 3 of 10 answers kept
    write_grid(grid, "generation", [old_cell(512, 3, whole), old_cell(2048, 10, partial)])
    rescore_babilong.rescore_grid(grid, "python benchmarks/rescore_babilong.py decoder.json")

    saved = json.loads(grid.read_text())
    assert saved["scorer"] == [BABILONG_SCORER, WHOLE_WORD_SCORER]  # the grid says it mixes rules
    assert saved["rescored_by"].startswith("python benchmarks/rescore_babilong.py")
    rescored, marked = load_cells(grid)
    assert (rescored.scorer, rescored.correct) == (BABILONG_SCORER, 2)
    assert [e["correct"] for e in rescored.examples] == [True, False, True]
    assert rescored.ci_low > 0 and rescored.ci_high < 1  # the interval follows the new count
    assert (marked.scorer, marked.correct, marked.accuracy) == (WHOLE_WORD_SCORER, 3, 0.3)  # numbers unchanged
    assert "| qa1 | 67 | 30 |" in grid.with_suffix(".md").read_text()
    assert grid.with_suffix(".png").stat().st_size > 1000

    before = grid.read_text()
    rescore_babilong.rescore_grid(grid)  # judging again changes nothing more
    assert grid.read_text() == before


def test_a_grid_scored_by_class_is_left_alone(tmp_path):
    grid = tmp_path / "encoder.json"
    write_grid(grid, "classes", [old_cell(512, 4, [])])
    before = grid.read_text()
    assert rescore_babilong.rescore_grid(grid) == []
    assert grid.read_text() == before and not grid.with_suffix(".md").exists()
