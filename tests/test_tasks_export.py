"""JSONL export, torch datasets and the collate function."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from memformers.tasks import (
    TASKS,
    StreamingTaskDataset,
    TaskDataset,
    export_jsonl,
    get_tokenizer,
    make_collate,
    make_sample,
)


def test_export_writes_the_grid(tmp_path):
    out = tmp_path / "grid.jsonl"
    written = export_jsonl("qa1,reason", [0, 1024], 3, "minilm", 0, out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == len(lines) == 12
    assert {(r["task"], r["length"]) for r in lines} == {(t, n) for t in ("qa1", "reason") for n in (0, 1024)}
    for record in lines:
        for field in ("task", "length", "input", "question", "target", "fact_positions", "label", "facts"):
            assert field in record
        assert record["target"] in record["answers"]
        assert record["input"].endswith(record["question"].lower())  # MiniLM is uncased
        assert len(record["fact_positions"]) == len(record["facts"])
        if record["length"]:
            assert record["num_tokens"] == record["length"]
    again = tmp_path / "again.jsonl"
    export_jsonl("qa1,reason", [0, 1024], 3, "minilm", 0, again)
    assert again.read_bytes() == out.read_bytes()


def test_export_matches_make_sample_from_the_test_books(tmp_path):
    out = tmp_path / "one.jsonl"
    export_jsonl("qa2", [2048], 1, "minilm", 7, out)
    record = json.loads(out.read_text())
    sample = make_sample("qa2", 2048, "minilm", seed=7, index=0, split="test")
    assert record["input"] == sample.input and record["fact_positions"] == list(sample.fact_positions)


def test_export_places_the_facts_as_make_sample_does(tmp_path):
    """`facts_first` / `facts_apart`: the same placement as the grid's, recorded in each line; bAbI tasks only."""
    for placement in ({"facts_first": True}, {"facts_apart": True}):
        out = tmp_path / "placed.jsonl"
        export_jsonl("qa1", [1024], 2, "minilm", 7, out, **placement)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        for index, record in enumerate(records):
            sample = make_sample("qa1", 1024, "minilm", seed=7, index=index, split="test", **placement)
            assert record["input"] == sample.input and record["fact_positions"] == list(sample.fact_positions)
            assert all(record[key] for key in placement)
            scattered = make_sample("qa1", 1024, "minilm", seed=7, index=index, split="test")
            assert record["fact_positions"] != list(scattered.fact_positions)  # placed otherwise: the same story
            assert record["facts"] == list(scattered.facts)
    with pytest.raises(ValueError, match="algorithmic"):
        export_jsonl("qa1,copy", [64], 1, "minilm", 0, tmp_path / "x.jsonl", facts_first=True)


def test_export_algorithmic(tmp_path):
    out = tmp_path / "algo.jsonl"
    assert export_jsonl("copy,associative", [32], 2, "minilm", 0, out) == 4
    copy, _, associative, _ = [json.loads(line) for line in out.read_text().splitlines()]
    assert copy["target"] == copy["input"] + " " + copy["input"]
    assert associative["input"].endswith(associative["question"])


def test_export_bad_arguments(tmp_path):
    out = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="task"):
        export_jsonl("qa7", [1024], 1, "minilm", 0, out)
    with pytest.raises(ValueError, match="lengths"):
        export_jsonl("qa1", [-1], 1, "minilm", 0, out)
    with pytest.raises(ValueError, match="lengths"):
        export_jsonl("qa1", [], 1, "minilm", 0, out)
    with pytest.raises(ValueError, match="samples"):
        export_jsonl("qa1", [1024], 0, "minilm", 0, out)
    with pytest.raises(ValueError, match="length 3 is shorter"):
        export_jsonl("qa1", [3], 1, "minilm", 0, out)


def test_task_dataset_batches_for_classification():
    dataset = TaskDataset("qa1", [512, 1024], 6, "minilm", seed=0)
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=make_collate(pad_id=0))))
    assert batch["input_ids"].shape == (4, 1024) and batch["attention_mask"].shape == (4, 1024)
    assert batch["attention_mask"].sum(1).tolist() == [512, 1024, 512, 1024]
    assert batch["labels"].shape == (4,) and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [dataset.sample(i).label for i in range(4)]
    assert (batch["input_ids"][0, 512:] == 0).all()


def test_task_dataset_text_targets_for_decoders():
    tokenizer = get_tokenizer("minilm")
    dataset = TaskDataset("qa5", 300, 2, tokenizer, target="text", eos_id=102)
    item = dataset[0]
    answer = (item["labels"] != -100).nonzero().flatten()
    assert tokenizer.decode(item["input_ids"][answer].tolist()).split()[0] == dataset.sample(0).target.lower()
    assert item["input_ids"][-1] == 102 and len(item["labels"]) == len(item["input_ids"])
    batch = make_collate(pad_id=0)([dataset[0], dataset[1]])
    assert batch["labels"].shape == batch["input_ids"].shape


def test_streaming_dataset_mixes_lengths_and_stops():
    dataset = StreamingTaskDataset("memorize", [256, 512, 768], "minilm", num_samples=12)
    lengths = [len(item["input_ids"]) for item in dataset]
    assert len(lengths) == 12 and set(lengths) == {256, 512, 768}
    algorithmic = TaskDataset("reverse", 64, 2, segment_size=16)
    assert len(algorithmic[0]["input_ids"]) == 64 + 1 + 64


def test_dataset_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        TaskDataset("nope", 512, 1, "minilm")
    with pytest.raises(ValueError, match="num_samples"):
        TaskDataset("qa1", 512, -3, "minilm")
    with pytest.raises(ValueError, match="lengths"):
        TaskDataset("qa1", [], 2, "minilm")
    with pytest.raises(ValueError, match="tokenizer"):
        TaskDataset("qa1", 512, 2)
    with pytest.raises(ValueError, match="target"):
        TaskDataset("qa1", 512, 2, "minilm", target="logits")
    assert set(TASKS) == {
        "qa1",
        "qa2",
        "qa3",
        "qa4",
        "qa5",
        "memorize",
        "detect",
        "reason",
        "copy",
        "reverse",
        "associative",
        "lm",
    }
