"""bf16 where it pays: `auto` picks it only where the hardware runs it natively, an explicit bf16 elsewhere falls back
to fp32 in one warning, evaluation really reads under autocast, and a grid never keeps a cell read in another
precision as if it were done."""

from __future__ import annotations

import json

import pytest
import torch
from test_evaluation import LastFactOracle, save_tiny_classifier
from typer.testing import CliRunner

import memformers as mf
from memformers import precision
from memformers.cli import app
from memformers.errors import InputWarning
from memformers.evaluation import evaluate_grid
from memformers.precision import autocast, resolve_precision


@pytest.fixture(scope="module")
def tokenizer():
    return mf.backbones.load_tokenizer("minilm")


@pytest.mark.parametrize("native", [True, False])
def test_auto_takes_bf16_only_where_the_cpu_has_it_and_an_explicit_bf16_falls_back_with_a_warning(
    monkeypatch, native
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    if native:
        assert resolve_precision("bf16", "cpu") == "bf16"
    else:
        with pytest.warns(InputWarning, match=r"--precision bf16: this CPU .* no bf16 instructions.*using fp32"):
            assert resolve_precision("bf16", "cpu", "--precision") == "fp32"


def test_an_unknown_precision_names_the_option() -> None:
    with pytest.raises(ValueError, match=r"--precision must be one of \('fp32', 'bf16', 'auto'\), got 'fp16'"):
        resolve_precision("fp16", "cpu", "--precision")
    with pytest.raises(ValueError, match="precision must be one of"):
        with autocast("auto"):
            pass


def test_autocast_computes_in_bf16_and_fp32_leaves_the_model_as_it_is() -> None:
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32"):
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # autocast casts per operation, never the weights


class AutocastRecorder(LastFactOracle):
    """Records, at every segment, whether the reading ran under CPU autocast."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.seen: list[bool] = []

    def step(self, segment, state, logit_positions=None):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return super().step(segment, state, logit_positions)


def test_a_grid_reads_in_the_precision_asked_records_it_and_measures_again_a_cell_read_in_another(
    tokenizer, tmp_path
) -> None:
    path = tmp_path / "grid.json"
    model = AutocastRecorder(tokenizer)
    evaluate_grid(model, ["memorize"], [300, 600], 4, tokenizer, path, batch_size=4)
    assert model.seen and not any(model.seen)
    assert {r["precision"] for r in json.loads(path.read_text())["results"]} == {"fp32"}

    model.seen.clear()
    measured = []
    cells = evaluate_grid(
        model, ["memorize"], [300, 600], 4, tokenizer, path, on_cell=measured.append, batch_size=4, precision="bf16"
    )
    assert [c.length for c in measured] == [300, 600] and all(model.seen)
    assert [c.precision for c in cells] == ["bf16", "bf16"] and [c.accuracy for c in cells] == [1.0, 1.0]

    measured.clear()
    evaluate_grid(model, ["memorize"], [300], 4, tokenizer, path, on_cell=measured.append, precision="bf16")
    assert measured == []  # read in bf16 already: done


def test_cli_eval_falls_back_to_fp32_in_one_warning_line_and_records_the_precision(
    tokenizer, tmp_path, monkeypatch
) -> None:
    save_tiny_classifier(tmp_path / "tiny", tokenizer)
    grid = tmp_path / "grid.json"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    args = ["eval", str(tmp_path / "tiny"), "--task", "memorize", "--lengths", "128", "--samples", "2"]
    result = CliRunner().invoke(app, [*args, "--precision", "bf16", "--json", str(grid)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("memformers: warning: ")]
    assert len(warnings) == 1 and "--precision bf16" in warnings[0] and "using fp32" in warnings[0]
    saved = json.loads(grid.read_text())
    assert saved["results"][0]["precision"] == "fp32" and "--precision" not in saved["command"]

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    result = CliRunner().invoke(app, [*args, "--precision", "bf16", "--json", str(grid)])
    assert result.exit_code == 0, result.output
    saved = json.loads(grid.read_text())
    assert saved["results"][0]["precision"] == "bf16" and "--precision bf16" in saved["command"]

    bad = CliRunner().invoke(app, [*args, "--precision", "half"])
    assert bad.exit_code == 2 and "--precision must be one of" in bad.stderr
