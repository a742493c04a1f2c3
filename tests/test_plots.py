"""The training-curve pictures, of one run and of several side by side: drawn from metrics records, written whole
or not at all."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from memformers.plots import compare_runs, read_metrics, trailing_mean, training_curves


def run_records() -> list[dict]:
    train = [{"type": "train", "step": s, "loss": 2.0 / s, "accuracy": min(1.0, s / 40)} for s in range(1, 41)]
    evals = [{"type": "eval", "step": s, "loss": 2.5 / s, "accuracy": s / 50} for s in (10, 20, 30, 40)]
    stage = [{"type": "stage", "step": 20, "reason": "threshold", "accuracy": 0.4, "segments": 2, "done": False}]
    return train + evals + stage


def test_curves_are_drawn_from_a_run_folder_and_leave_no_temporary_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run_records()) + "\n")
    records = read_metrics(tmp_path)
    assert len(records) == 45
    png = training_curves(records, tmp_path / "curves.png", title="rmt on qa1")
    assert plt.imread(png).shape[:2] == (456, 1320)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_records_without_training_or_validation_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no training or validation"):
        training_curves([{"type": "stage", "step": 1, "segments": 2}], tmp_path / "curves.png")
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)


def test_each_tasks_validation_is_drawn_where_several_are_learned_together(tmp_path, monkeypatch):
    labels = spy_on_labels(monkeypatch)
    records = run_records()
    for record in records:
        if record["type"] == "eval":
            record["accuracy_by_task"] = {"qa1": 1.0, "qa2": record["accuracy"] / 2}
    training_curves(records, tmp_path / "curves.png")
    assert labels.count("validation qa1") == labels.count("validation qa2") == 1  # on the accuracy panel only
    labels.clear()
    training_curves(run_records(), tmp_path / "curves.png")
    assert not any(label and label.startswith("validation q") for label in labels)


@pytest.mark.parametrize(("logged", "legend"), [("read_loss", "read-share"), ("noise_write_loss", "noise-write")])
def test_an_auxiliary_loss_is_drawn_where_the_run_had_one(tmp_path, monkeypatch, logged, legend):
    labels = spy_on_labels(monkeypatch)
    records = run_records()
    for record in records:
        if record["type"] == "train" and record["step"] > 5:
            record[logged] = 1.0 / record["step"]
    training_curves(records, tmp_path / "curves.png")
    assert sum(1 for label in labels if label and label.startswith(f"{legend} loss")) == 1
    others = [label for label in labels if label and label.startswith(("read-share", "noise-write"))]
    assert all(label.startswith(legend) for label in others)  # the other loss was not logged
    labels.clear()
    training_curves(run_records(), tmp_path / "curves.png")
    assert not any(label and label.startswith(legend) for label in labels)


def test_the_trailing_mean_starts_at_the_first_point():
    assert trailing_mean(np.array([1.0, 2.0, 3.0, 4.0]), 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert trailing_mean(np.array([2.0, 4.0]), 20).tolist() == [2.0, 3.0]


def spy_on_labels(monkeypatch) -> list:
    """The label of every line drawn from now on."""
    from matplotlib.axes import Axes

    labels = []
    plot = Axes.plot

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    return labels


def test_runs_compared_draw_each_runs_loss_and_validation_once(tmp_path, monkeypatch):
    labels = spy_on_labels(monkeypatch)
    slower = [dict(r, accuracy=r["accuracy"] / 2) for r in run_records()]
    png = compare_runs({"lr 1e-4": run_records(), "lr 1e-3": slower}, tmp_path / "compared.png", title="lr")
    assert plt.imread(png).shape[:2] == (456, 1320)
    assert labels == ["lr 1e-4", "lr 1e-4", "lr 1e-3", "lr 1e-3"]  # training loss, then validation, per run
    assert [p.name for p in tmp_path.iterdir()] == ["compared.png"]


def test_runs_compared_refuse_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        compare_runs({}, tmp_path / "compared.png")
    with pytest.raises(ValueError, match="'empty': no training or validation"):
        compare_runs({"full": run_records(), "empty": [{"type": "stage", "step": 1}]}, tmp_path / "compared.png")
    assert not list(tmp_path.iterdir())


def test_validation_at_the_long_length_is_drawn_beside_the_stages(tmp_path, monkeypatch):
    """`curriculum.eval_long_segments`' records ("eval_long"): their own dashed line, labelled with the count, at
    the accuracies logged; in a comparison each run's in its colour."""
    from matplotlib.axes import Axes

    drawn = []
    plot = Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), args))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    longs = [{"type": "eval_long", "step": s, "segments": 64, "loss": 3.0, "accuracy": 0.25} for s in (20, 40)]
    training_curves(run_records() + longs, tmp_path / "curves.png")
    lines = [args for label, args in drawn if label == "validation at 64 segments"]
    assert len(lines) == 2  # loss and accuracy panels
    assert [list(a) for a in lines[1][:2]] == [[20, 40], [25.0, 25.0]]
    drawn.clear()
    training_curves(run_records(), tmp_path / "curves.png")
    assert not any(label and "segments" in label for label, _ in drawn)
    drawn.clear()
    compare_runs({"carry": run_records() + longs, "plain": run_records()}, tmp_path / "compared.png")
    assert [label for label, _ in drawn] == ["carry", "carry", "carry, 64 segments", "plain", "plain"]
    drawn.clear()
    task_placed = [r | {"step": r["step"] + 40, "placement": "task"} for r in longs]
    training_curves(run_records() + longs + task_placed, tmp_path / "curves.png")  # switched: a line each
    lines = [args for label, args in drawn if label == "validation at 64 segments, facts where the task puts them"]
    assert len(lines) == 2 and list(lines[1][0]) == [60, 80]
