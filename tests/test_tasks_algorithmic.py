"""Copy, reverse and associative retrieval, checked against their definitions."""

from __future__ import annotations

import random

import numpy as np
import pytest

from memformers.tasks import make_algorithmic, make_algorithmic_sample
from memformers.tasks.algorithmic import FIRST_SYMBOL_ID, IGNORE_INDEX, SEP_ID


@pytest.mark.parametrize("num_segments", [1, 3, 7])
def test_copy_and_reverse(num_segments):
    rng = random.Random(num_segments)
    copy = make_algorithmic("copy", num_segments, 24, rng, vocab_size=10)
    assert len(copy.source) == num_segments * 24
    assert np.array_equal(copy.target, np.concatenate([copy.source, copy.source]))
    assert copy.source.min() >= FIRST_SYMBOL_ID and copy.source.max() < FIRST_SYMBOL_ID + 10
    reverse = make_algorithmic("reverse", num_segments, 24, rng)
    assert np.array_equal(reverse.target, reverse.source[::-1])
    assert np.array_equal(copy.ids, np.concatenate([copy.source, [SEP_ID], copy.target]))
    assert (copy.labels[: len(copy.source) + 1] == IGNORE_INDEX).all()
    assert np.array_equal(copy.labels[len(copy.source) + 1 :], copy.target)


def test_associative_retrieval_answers_the_query_key():
    for seed in range(200):
        key_size, value_size = 2, 1 + seed % 2
        sample = make_algorithmic("associative", 2, 16, random.Random(seed), key_size=key_size, value_size=value_size)
        source = sample.source.tolist()
        pair = key_size + value_size
        pairs = [source[i : i + pair] for i in range(0, len(source) - key_size, pair)]
        keys = [tuple(p[:key_size]) for p in pairs]
        assert len(set(keys)) == len(keys)  # keys are distinct
        query = tuple(source[-key_size:])
        (asked,) = [i for i, k in enumerate(keys) if k == query]
        assert sample.target.tolist() == pairs[asked][key_size:]
        assert sample.fact_positions == (asked * pair,)
        assert len(source) <= 32 and len(source) > 32 - pair
        if value_size == 1:
            assert sample.label == sample.target[0] - FIRST_SYMBOL_ID


def test_same_seed_same_problem():
    a = make_algorithmic_sample("associative", 64, seed=3, index=1, segment_size=16)
    b = make_algorithmic_sample("associative", 64, seed=3, index=1, segment_size=16)
    assert np.array_equal(a.ids, b.ids)


def test_bad_arguments_name_the_argument():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="task"):
        make_algorithmic("sort", 1, 10, rng)
    with pytest.raises(ValueError, match="num_segments"):
        make_algorithmic("copy", -1, 10, rng)
    with pytest.raises(ValueError, match="segment_size"):
        make_algorithmic("copy", 1, 0, rng)
    with pytest.raises(ValueError, match="vocab_size"):
        make_algorithmic("copy", 1, 10, rng, vocab_size=1000)
    with pytest.raises(ValueError, match="key_size"):
        make_algorithmic("associative", 100, 10, rng, vocab_size=4, key_size=2)
    with pytest.raises(ValueError, match="segment_size"):
        make_algorithmic_sample("copy", 100, segment_size=30)
    with pytest.raises(ValueError, match="length"):
        make_algorithmic_sample("copy", 0)
