"""Official BABILong files (records of input, question and target) are read from JSON, JSONL and Parquet and
scored like our own samples: a file written by `memformers data` gives the same cells as the grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_evaluation import LastFactOracle

import memformers as mf
from memformers.babilong_files import evaluate_file, read_babilong_file, text_sample
from memformers.evaluation import evaluate_cell
from memformers.tasks import export_jsonl, make_sample


@pytest.fixture(scope="module")
def tokenizer():
    return mf.backbones.load_tokenizer("minilm")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("babilong") / "memorize.jsonl"
    export_jsonl("memorize", [0, 700], 12, tokenizer, 0, path, split="test")
    return path


def test_records_tokenize_to_the_samples_they_were_made_from(exported, tokenizer):
    records = read_babilong_file(exported)
    for record in records[:3] + records[-3:]:
        sample = make_sample("memorize", record["length"], tokenizer, 0, record["index"], "test")
        np.testing.assert_array_equal(text_sample(record, tokenizer).ids, sample.ids)


@pytest.mark.parametrize("form", ["jsonl", "json", "parquet"])
def test_a_file_scores_as_the_grid_does(exported, tokenizer, tmp_path, form):
    records = read_babilong_file(exported)
    official = [{key: r[key] for key in ("input", "question", "target")} for r in records[12:]]  # the 700s
    path = tmp_path / f"memorize.{form}"
    if form == "jsonl":
        path = exported
    elif form == "json":
        path.write_text(json.dumps({"memorize": official}))
    else:
        pa, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        parquet.write_table(pa.Table.from_pylist(official), path)
    cells = evaluate_file(LastFactOracle(tokenizer), path, tokenizer, task="memorize", batch_size=4)
    grid = [evaluate_cell(LastFactOracle(tokenizer), "memorize", n, 12, tokenizer, batch_size=4) for n in (0, 700)]
    if form == "jsonl":  # records name their task and length
        assert [(c.task, c.length, c.correct) for c in cells] == [(g.task, g.length, g.correct) for g in grid]
    else:  # bare records: one cell, its length the median token count
        (cell,) = cells
        assert (cell.task, cell.samples, cell.correct) == ("memorize", 12, grid[1].correct)
        assert cell.length == 700
    assert grid[1].correct == 12
    forgets = evaluate_file(LastFactOracle(tokenizer, forget=True), path, tokenizer, task="memorize", window=200)
    assert forgets[-1].correct < 12  # the file's facts must come through the state


def test_bad_files_name_what_is_wrong(tmp_path):
    missing = tmp_path / "none.jsonl"
    with pytest.raises(ValueError, match="is not a file"):
        read_babilong_file(missing)
    wrong = tmp_path / "bad.jsonl"
    wrong.write_text(json.dumps({"input": "x", "question": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks \['target'\]"):
        read_babilong_file(wrong)
    text = tmp_path / "bad.csv"
    text.write_text("input,question,target\n")
    with pytest.raises(ValueError, match=r"\.json, \.jsonl or \.parquet"):
        read_babilong_file(text)
