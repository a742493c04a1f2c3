"""In-context learning with an arbitrary, episode-specific mapping: only the demonstrations reveal the labels.

An episode draws `num_demonstrations` distinct words from the shipped Austen text and gives each a random label
(balanced between the labels), so that no pretrained prior can answer: the label of a word is a fact of this
episode alone. The demonstrations are laid out as `" word: label\\n"`, exactly four tokens each (the word is one
token), so that a chunked memory of 4-token chunks holds one demonstration per chunk. The queries follow in the
same layout, teacher-forced: each asks for the label of a demonstrated word (distinct words, drawn uniformly from
all demonstrations, so most demonstrations of a long episode lie far before the query).

Words are split between "train" and "test" by a hash of the word, so that episodes for training and for evaluation
never share a word, whatever their seeds.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

from memformers.tasks.noise import austen_texts

ICL_LABELS = ("negative", "positive")
ICL_SPLITS = ("train", "test")
TOKENS_PER_ITEM = 4  # word, ":", label, newline
TEST_SHARE = 4  # one word in four (by hash) is a test word


@dataclass(frozen=True)
class ICLEpisode:
    """One episode: the demonstrations, the queries, their token ids and where each query's label is predicted."""

    demonstrations: tuple[tuple[str, int], ...]  # (word, label index), in order
    queries: tuple[tuple[str, int], ...]  # (word, label index): every word was demonstrated once
    input_ids: torch.Tensor  # [4 · (demonstrations + queries)]
    answer_positions: torch.Tensor  # [queries] the ":" of each query: the next token is its label
    label_ids: torch.Tensor  # [labels] the token id of each label

    @property
    def answers(self) -> torch.Tensor:  # [queries] label index of each query
        return torch.tensor([label for _, label in self.queries])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _single_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@lru_cache(maxsize=8)
def _vocabulary(tokenizer: PreTrainedTokenizerBase, split: str) -> tuple[tuple[str, int], ...]:
    words = set()
    for text in austen_texts().values():
        words.update(re.findall(r"\b[a-z]{4,12}\b", text))
    chosen = []
    for word in sorted(words):
        if (zlib.crc32(word.encode()) % TEST_SHARE == 0) != (split == "test"):
            continue
        token = _single_token(tokenizer, " " + word)
        if token is not None:
            chosen.append((word, token))
    return tuple(chosen)


def icl_vocabulary(tokenizer: PreTrainedTokenizerBase, split: str = "train") -> list[tuple[str, int]]:
    """The Austen words of a split that are one token after a space, with that token: (word, token id)."""
    if split not in ICL_SPLITS:
        raise ValueError(f"split must be one of {ICL_SPLITS}, got {split!r}")
    return list(_vocabulary(tokenizer, split))


def make_icl_episode(
    tokenizer: PreTrainedTokenizerBase,
    num_demonstrations: int,
    num_queries: int,
    seed: int,
    split: str = "train",
    labels: tuple[str, ...] = ICL_LABELS,
) -> ICLEpisode:
    """An episode of `num_demonstrations` labelled words, then `num_queries` of those words to label again."""
    vocabulary = icl_vocabulary(tokenizer, split)
    if not isinstance(num_demonstrations, int) or not 1 <= num_demonstrations <= len(vocabulary):
        raise ValueError(
            f"num_demonstrations must be an int in [1, {len(vocabulary)}] (the {split} words), "
            f"got {num_demonstrations!r}"
        )
    if not isinstance(num_queries, int) or not 1 <= num_queries <= num_demonstrations:
        raise ValueError(
            f"num_queries must be an int in [1, num_demonstrations={num_demonstrations}], got {num_queries!r}"
        )
    label_ids = [_single_token(tokenizer, " " + label) for label in labels]
    if len(labels) < 2 or None in label_ids or len(set(label_ids)) != len(labels):
        raise ValueError(f"labels must be at least two distinct words of one token each, got {labels!r}")
    colon, newline = _single_token(tokenizer, ":"), _single_token(tokenizer, "\n")
    if colon is None or newline is None:
        raise ValueError("tokenizer: ':' and a newline must be one token each")
    rng = random.Random(f"icl-{split}-{seed}")
    items = rng.sample(vocabulary, num_demonstrations)
    assignment = [i % len(labels) for i in range(num_demonstrations)]  # balanced, then shuffled: arbitrary
    rng.shuffle(assignment)
    demonstrations = [(word, label) for (word, _), label in zip(items, assignment, strict=True)]
    tokens = {word: token for word, token in items}
    queries = [demonstrations[i] for i in rng.sample(range(num_demonstrations), num_queries)]
    ids = []
    for word, label in demonstrations + queries:
        ids += [tokens[word], colon, label_ids[label], newline]
    start = TOKENS_PER_ITEM * num_demonstrations
    positions = torch.arange(num_queries) * TOKENS_PER_ITEM + start + 1
    return ICLEpisode(
        demonstrations=tuple(demonstrations),
        queries=tuple(queries),
        input_ids=torch.tensor(ids, dtype=torch.long),
        answer_positions=positions,
        label_ids=torch.tensor(label_ids, dtype=torch.long),
    )
