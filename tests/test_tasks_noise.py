"""Noise corpora: the shipped Austen novels, users' book folders, the train/test split, the token cache."""

from __future__ import annotations

import numpy as np
import pytest

from memformers.tasks import get_tokenizer, load_noise, make_sample, split_sentences, tokenized_noise
from memformers.tasks.noise import AUSTEN_TEST, AUSTEN_TRAIN, austen_texts, book_files


def test_austen_ships_six_novels_split_four_to_two():
    texts = austen_texts()
    assert set(texts) == set(AUSTEN_TRAIN) | set(AUSTEN_TEST)
    assert sum(len(t.split()) for t in texts.values()) > 700_000
    train, test = load_noise("train"), load_noise("test")
    assert {b.name for b in train} == set(AUSTEN_TRAIN) and {b.name for b in test} == set(AUSTEN_TEST)
    assert not {b.name for b in train} & {b.name for b in test}
    long_test = {s for b in test for s in b.sentences if len(s.split()) > 10}
    assert not set(train[0].sentences[:500]) & long_test
    assert all(len(b.sentences) > 3000 for b in train + test)


def test_train_and_test_noise_never_share_a_book():
    tokenizer = get_tokenizer("minilm")
    train, test = tokenized_noise(tokenizer, "train"), tokenized_noise(tokenizer, "test")
    assert not set(train.books) & set(test.books)
    assert train.num_tokens > 500_000 and test.num_tokens > 150_000
    assert train.starts[-1] == len(train.ids) and np.all(np.diff(train.starts) > 0)
    # a test-split sample's noise comes from the test books only
    sample = make_sample("qa1", 3000, tokenizer, split="test", seed=4)
    noise = [p for p in sample.pieces if not isinstance(p, np.ndarray)]
    assert noise and all(p.noise is test for p in noise)


def test_sentence_splitting():
    text = 'CHAPTER I\n\nMr. Darcy came in. "Did he?" she\nasked! Yes.\n\nCHAPTER II\n\nThen St. Paul left.'
    assert split_sentences(text) == ["Mr. Darcy came in.", '"Did he?" she asked!', "Yes.", "Then St. Paul left."]


def _write_books(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        sentences = " ".join(f"Book {name} says thing number {j} of {i}." for j in range(200))
        (folder / f"{name}.txt").write_text(sentences, encoding="utf-8")


def test_a_folder_of_books_splits_by_file_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFORMERS_CACHE", str(tmp_path / "cache"))
    _write_books(tmp_path / "books", [f"b{i}" for i in range(10)])
    test = [p.stem for p in book_files("test", tmp_path / "books")]
    train = [p.stem for p in book_files("train", tmp_path / "books")]
    assert test == ["b8", "b9"] and train == [f"b{i}" for i in range(8)]
    tokenizer = get_tokenizer("minilm")
    sample = make_sample("qa1", 2000, tokenizer, split="test", noise_dir=tmp_path / "books")
    assert sample.num_tokens == 2000
    assert "book b8 says" in sample.input or "book b9 says" in sample.input
    assert "book b1 says" not in sample.input
    assert list((tmp_path / "cache" / "noise").glob("*.npz"))


def test_pg19_style_subfolders_are_the_split(tmp_path):
    _write_books(tmp_path / "train", ["x", "y"])
    _write_books(tmp_path / "test", ["z"])
    assert [b.name for b in load_noise("train", tmp_path)] == ["x", "y"]
    assert [b.name for b in load_noise("test", tmp_path)] == ["z"]
    assert [b.name for b in load_noise("all", tmp_path)] == ["x", "y", "z"]


def test_bad_noise_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_noise("dev")
    with pytest.raises(ValueError, match="noise_dir"):
        load_noise("train", tmp_path / "missing")
    with pytest.raises(ValueError, match="noise_dir"):
        load_noise("train", tmp_path)  # no .txt files
    _write_books(tmp_path / "one", ["only"])
    with pytest.raises(ValueError, match="noise_dir"):
        load_noise("test", tmp_path / "one")
    assert [b.name for b in load_noise("all", tmp_path / "one")] == ["only"]
