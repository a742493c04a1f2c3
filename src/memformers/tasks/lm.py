"""Language modelling on long documents: windows of the noise books, every token a next-token target.

The text is the tokenized noise of `memformers.tasks.noise` (the Austen novels by default, or a folder of `.txt`
books), so a split's books are tokenized once and cached. Training samples are random windows inside one book;
evaluation documents are consecutive, non-overlapping stretches from the start of each held-out book.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from memformers.tasks.noise import TokenizedNoise, tokenized_noise


def book_ranges(noise: TokenizedNoise) -> list[tuple[int, int]]:
    """Each book's [start, end) token range in `noise.ids`."""
    firsts = [int(noise.starts[s]) for s in noise.book_starts] + [noise.num_tokens]
    return list(zip(firsts[:-1], firsts[1:], strict=True))


def lm_window(
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    seed: int = 0,
    index: int = 0,
    split: str = "train",
    noise_dir: Path | str | None = None,
) -> np.ndarray:  # [length] int64
    """Sample `index`: `length` consecutive tokens of one book, starting at a sentence; fixed by (seed, index).

    Books are drawn in proportion to their length, so every sentence start is about equally likely.
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int ≥ 1, got {length!r}")
    noise = tokenized_noise(tokenizer, split, noise_dir)
    ranges = [(a, b) for a, b in book_ranges(noise) if b - a >= length]
    if not ranges:
        longest = max(b - a for a, b in book_ranges(noise))
        raise ValueError(f"length {length} is longer than every {split} book (the longest has {longest} tokens)")
    rng = random.Random(f"memformers:{seed}:lm:{length}:{index}")
    start, end = rng.choices(ranges, weights=[b - a - length + 1 for a, b in ranges])[0]
    sentences = noise.starts[(noise.starts >= start) & (noise.starts <= end - length)]  # possible first tokens
    first = int(sentences[rng.randrange(len(sentences))]) if len(sentences) else start
    return noise.ids[first : first + length].astype(np.int64)


def lm_documents(
    tokenizer: PreTrainedTokenizerBase,
    tokens: int,
    documents: int,
    split: str = "test",
    noise_dir: Path | str | None = None,
) -> list[np.ndarray]:  # documents × [tokens] int64
    """`documents` held-out documents of `tokens` tokens each: book j mod B, its (j // B)-th stretch from the start.

    Stretches never overlap, so no token is scored twice; fails when the books hold fewer such stretches.
    """
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be an int ≥ 1, got {tokens!r}")
    if not isinstance(documents, int) or documents < 1:
        raise ValueError(f"documents must be an int ≥ 1, got {documents!r}")
    noise = tokenized_noise(tokenizer, split, noise_dir)
    ranges = book_ranges(noise)
    out = []
    for j in range(documents):
        start, end = ranges[j % len(ranges)]
        first = start + (j // len(ranges)) * tokens
        if first + tokens > end:
            available = sum((b - a) // tokens for a, b in ranges)
            raise ValueError(
                f"documents: the {split} books hold {available} stretches of {tokens} tokens "
                f"({len(ranges)} books); ask for fewer documents or fewer tokens, got {documents}"
            )
        out.append(noise.ids[first : first + tokens].astype(np.int64))
    return out
