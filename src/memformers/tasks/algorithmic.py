"""The algorithmic tasks of the first RMT paper (2207.06881): copy, reverse, associative retrieval.

They use a small vocabulary of their own, not a tokenizer's: id 0 is padding, id 1 separates the source from the
target, ids 2 .. 2 + vocab_size - 1 are data symbols (written as letters and digits in text form). Lengths are given
as a number of segments times the segment's content size, so a task spans exactly as many segments as asked.

- copy: the target is the source written twice.
- reverse: the target is the source backwards.
- associative: K key -> value pairs (keys distinct, `key_size` symbols each; values `value_size` symbols), then
  a query key; the target is that key's value.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import numpy as np

PAD_ID, SEP_ID, FIRST_SYMBOL_ID = 0, 1, 2
SYMBOLS = string.ascii_lowercase + string.ascii_uppercase + string.digits
ALGORITHMIC_TASKS = ("copy", "reverse", "associative")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class AlgorithmicSample:
    """Source and target ids of one algorithmic problem; `ids`/`labels` lay them out for a causal decoder."""

    task: str
    source: np.ndarray  # [source_len] int64, data ids (associative: the pairs, then the query key)
    target: np.ndarray  # [target_len] int64
    fact_positions: tuple[int, ...]  # associative: where the queried pair starts in `source`; else empty
    label: int | None  # associative with value_size 1: the value's class (0 .. vocab_size - 1); else None
    query_size: int  # associative: the query key's length at the end of `source`; else 0

    @property
    def ids(self) -> np.ndarray:
        """source, separator, target: [source_len + 1 + target_len] int64."""
        return np.concatenate([self.source, [SEP_ID], self.target]).astype(np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Aligned with `ids` (the model shifts): IGNORE_INDEX over source and separator, then the target."""
        return np.concatenate([np.full(len(self.source) + 1, IGNORE_INDEX), self.target]).astype(np.int64)


def algorithmic_tokenizer(vocab_size: int = 16):
    """A word-level tokenizer over the tasks' own ids (so a model trained on them saves and loads like any other).

    Id 0 is "[PAD]", id 1 the separator "|", ids 2 .. 1 + vocab_size the symbols; `to_text` output encodes back to
    the same ids.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or not 2 <= vocab_size <= len(SYMBOLS):
        raise ValueError(f"vocab_size must be an int between 2 and {len(SYMBOLS)}, got {vocab_size!r}")
    vocab = {"[PAD]": PAD_ID, "|": SEP_ID} | {s: FIRST_SYMBOL_ID + i for i, s in enumerate(SYMBOLS[:vocab_size])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", sep_token="|")


def to_text(ids: np.ndarray) -> str:
    """Data ids as space-separated symbols (the text form used in exported JSONL)."""
    return " ".join(SYMBOLS[int(i) - FIRST_SYMBOL_ID] if i >= FIRST_SYMBOL_ID else "|" for i in ids)


def make_algorithmic(
    task: str,
    num_segments: int,
    segment_size: int,
    rng: random.Random,
    vocab_size: int = 16,
    key_size: int = 2,
    value_size: int = 1,
) -> AlgorithmicSample:
    """One problem whose source fills `num_segments` segments of `segment_size` content tokens.

    (associative: as many whole pairs as fit, plus the query; the source may be a few tokens shorter.)
    """
    if task not in ALGORITHMIC_TASKS:
        raise ValueError(f"task must be one of {ALGORITHMIC_TASKS}, got {task!r}")
    for name, value in (("num_segments", num_segments), ("segment_size", segment_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 2 <= vocab_size <= len(SYMBOLS):
        raise ValueError(f"vocab_size must be between 2 and {len(SYMBOLS)}, got {vocab_size!r}")
    length = num_segments * segment_size
    if task in ("copy", "reverse"):
        source = np.asarray([rng.randrange(vocab_size) for _ in range(length)], dtype=np.int64) + FIRST_SYMBOL_ID
        target = np.concatenate([source, source]) if task == "copy" else source[::-1].copy()
        return AlgorithmicSample(task, source, target, (), None, 0)
    for name, value in (("key_size", key_size), ("value_size", value_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    pair = key_size + value_size
    num_pairs = (length - key_size) // pair
    if num_pairs < 1:
        raise ValueError(
            f"num_segments * segment_size = {length} tokens cannot hold one {pair}-token pair and a "
            f"{key_size}-token query; allowed: at least {pair + key_size}"
        )
    if num_pairs > vocab_size**key_size:
        raise ValueError(
            f"key_size {key_size} gives {vocab_size**key_size} distinct keys, fewer than the {num_pairs} pairs "
            f"that {length} tokens hold; raise key_size or vocab_size"
        )
    keys: set[tuple[int, ...]] = set()
    pairs: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    while len(pairs) < num_pairs:
        key = tuple(rng.randrange(vocab_size) for _ in range(key_size))
        if key not in keys:
            keys.add(key)
            pairs.append((key, tuple(rng.randrange(vocab_size) for _ in range(value_size))))
    asked = rng.randrange(num_pairs)
    flat = [s for key, value in pairs for s in key + value] + list(pairs[asked][0])
    source = np.asarray(flat, dtype=np.int64) + FIRST_SYMBOL_ID
    target = np.asarray(pairs[asked][1], dtype=np.int64) + FIRST_SYMBOL_ID
    label = pairs[asked][1][0] if value_size == 1 else None
    return AlgorithmicSample(task, source, target, (asked * pair,), label, key_size)
