"""memformers.bench and bench_results: a tiny run gives well-formed records for every mechanism, skipped cells say
why, the crossover is read correctly from measurements, and bad settings fail naming the argument."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from memformers import bench, bench_results
from memformers.cli import app

TINY = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 96}


def tiny_settings(**overrides) -> bench.BenchSettings:
    settings = {
        "lengths": (96, 192),
        "segment_size": 32,
        "memory_tokens": 4,
        "knn_memory_size": 64,
        "longmem_memory_size": 64,
        "longmem_top_k_chunks": 4,
        "train_segments": (1, 2),
        "repeats": 1,
        "tiny": TINY,
    }
    return bench.BenchSettings(**(settings | overrides))


def test_a_tiny_run_gives_a_record_per_mechanism_length_and_segment_count() -> None:
    seen = []
    records = bench.run(tiny_settings(), on_record=seen.append, say=lambda _: None)
    assert seen == records
    assert {r["mechanism"] for r in records} == set(bench.MECHANISMS)
    for name in bench.MECHANISMS:
        inference = [r for r in records if r["kind"] == "inference" and r["mechanism"] == name]
        assert [r["length"] for r in inference] == [96, 192]
        for r in inference:
            assert r["status"] == "ok" and r["seconds"] > 0 and r["tokens_per_s"] > 0
            assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0  # metered at every length here
        training = [r for r in records if r["kind"] == "training" and r["mechanism"] == name]
        assert [r["segments"] for r in training] == [1, 2]
        assert all(r["status"] == "ok" and r["step_seconds"] > 0 and r["tokens"] > 0 for r in training)
    json.dumps(records)  # JSON-ready as they are
    table = bench_results.markdown_tables(records, [96, 192])
    assert all(label in table for label in bench.LABELS.values())


def test_memory_grows_with_length_for_full_attention_only() -> None:
    records = bench.run(
        tiny_settings(lengths=(1024, 4096), segment_size=128, mechanisms=("rmt", "full"), train_segments=()),
        say=lambda _: None,
    )
    peak = {(r["mechanism"], r["length"]): r["peak_bytes"] for r in records}
    full_growth = peak[("full", 4096)] - peak[("full", 1024)]
    assert full_growth > peak[("full", 1024)]  # activations of the whole input at once
    # one segment at a time: what grows is only the input ids buffered in chunks of up to 4096 tokens
    assert peak[("rmt", 4096)] - peak[("rmt", 1024)] < 0.1 * full_growth


def test_cells_over_the_time_budget_are_skipped_with_the_reason_and_an_extrapolation(monkeypatch) -> None:
    # a measurement that takes 1 ms per token, whatever the machine's load: the budget check is what is tested
    def measure(name, model, backbone, length, settings, progress=None):
        record = {"kind": "inference", "mechanism": name, "length": length, "status": "ok", "seconds": length / 1000}
        return record | {"tokens_per_s": 1000.0, "peak_bytes": None}

    monkeypatch.setattr(bench, "measure_inference", measure)
    settings = tiny_settings(lengths=(64, 96, 128, 4096), mechanisms=("rmt",), train_segments=(), time_budget_s=0.1)
    first, second, third, fourth = bench.run(settings, say=lambda _: None)
    assert (first["status"], first["seconds"]) == ("ok", 0.064)  # nothing to predict from yet
    assert (second["status"], second["seconds"]) == ("ok", 0.096)  # predicted 0.096 s, within the budget
    assert third["status"] == fourth["status"] == "skipped"
    assert third["reason"] == "predicted 0.128 s > time budget 0.1 s"  # the log-log slope of 64 and 96: 1
    assert (third["extrapolated_seconds"], fourth["extrapolated_seconds"]) == (0.128, 4.096)
    assert fourth["reason"] == "predicted 4.1 s > time budget 0.1 s"  # each cites its own prediction


def test_a_fast_cell_keeps_significant_digits() -> None:
    assert bench._digits(0.000012345) == 1.234e-05 and bench._digits(123.456) == 123.5


def test_resuming_keeps_records_already_measured() -> None:
    settings = tiny_settings(mechanisms=("full",), train_segments=(1,))
    done = [{"kind": "inference", "mechanism": "full", "length": 96, "status": "ok", "seconds": 1.0}]
    records = bench.run(settings, done, say=lambda _: None)
    assert records[0] is done[0]
    assert [(r["kind"], r.get("length", r.get("segments"))) for r in records[1:]] == [
        ("inference", 192),
        ("training", 1),
    ]


def _rate(name: str, length: int, tokens_per_s: float) -> dict:
    return {"kind": "inference", "mechanism": name, "length": length, "status": "ok", "tokens_per_s": tokens_per_s}


def test_crossover_measured_and_extrapolated() -> None:
    measured = [_rate("full", 1000, 100.0), _rate("rmt", 1000, 50.0), _rate("full", 4000, 25.0)]
    measured.append(_rate("rmt", 4000, 50.0))
    result = bench_results.crossover(measured)
    assert result["length"] == 4000 and result["how"] == "measured: between 1,000 and 4,000 tokens"
    assert result["ratio"] == 2.0 and result["interpolated_length"] == 2000  # ratio ½ → 2 in log-log: halfway
    # full attention's time ~ n², RMT's ~ n: seconds n²/1e5 and n/50 meet at n = 2000
    extrapolated = [_rate("full", 100, 1000.0), _rate("full", 200, 500.0)]
    extrapolated += [_rate("rmt", 100, 50.0), _rate("rmt", 200, 50.0)]
    result = bench_results.crossover(extrapolated)
    assert result["length"] == 2000 and result["how"].startswith("extrapolated")
    assert bench_results.crossover([_rate("rmt", 100, 50.0)])["length"] is None


def test_predict_seconds_follows_the_measured_slope() -> None:
    assert bench.predict_seconds([], 10) is None
    assert bench.predict_seconds([(100, 1.0)], 400) == pytest.approx(4.0)  # linear from one point
    assert bench.predict_seconds([(100, 1.0), (200, 4.0)], 400) == pytest.approx(16.0)  # quadratic
    assert bench.predict_seconds([(100, 1.0), (200, 1.5)], 400) == pytest.approx(3.0)  # never below linear


def test_plots_are_written(tmp_path) -> None:
    records = [_rate("full", 100, 1000.0) | {"seconds": 0.1, "peak_bytes": 10}, _rate("rmt", 100, 50.0)]
    records[1] |= {"seconds": 2.0, "peak_bytes": None}  # a length whose memory was not metered
    bench_results.plot(records, tmp_path / "time.png", tmp_path / "memory.png")
    assert (tmp_path / "time.png").stat().st_size > 0 and (tmp_path / "memory.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"mechanisms": ("rmt", "mamba")}, "mechanisms"),
        ({"mechanisms": ()}, "mechanisms"),
        ({"lengths": (0,)}, "lengths"),
        ({"lengths": ()}, "lengths"),
        ({"train_segments": (1, -2)}, "train_segments"),
        ({"segment_size": 8}, "segment_size"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "fp8"}, "dtype"),
        ({"train_batch": 0}, "train_batch"),
        ({"repeats": 0}, "repeats"),
        ({"time_budget_s": 0}, "time_budget_s"),
    ],
)
def test_bad_settings_name_the_argument(overrides: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        bench.run(tiny_settings(**overrides))


def test_mfu_smoke_and_its_bad_arguments() -> None:
    result = bench.rmt_mfu(tiny_settings(), batch=2, segments=2, matmul_size=64)
    assert 0 < result["mfu"] and result["rmt_flops"] > 0 and result["tokens"] == 2 * 2 * (32 - 2 * 4)
    with pytest.raises(ValueError, match="batch"):
        bench.rmt_mfu(tiny_settings(), batch=0)
    with pytest.raises(ValueError, match="segments"):
        bench.rmt_mfu(tiny_settings(), segments=0)


def test_cli_bench_writes_json_and_rejects_bad_options(tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--lengths", "128", "--segment-size", "64", "--mechanisms", "rmt,full", "--train-segments", "1"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "full attention" in result.output and "{'" not in result.output  # a sentence, not a dict
    written = json.loads(out.read_text())
    assert {r["mechanism"] for r in written["records"]} == {"rmt", "full"}
    bad = CliRunner().invoke(app, ["bench", "--mechanisms", "rmt,mamba"])
    assert bad.exit_code != 0 and "mechanisms" in bad.output
