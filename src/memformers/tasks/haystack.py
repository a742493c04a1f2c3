"""Hide a story's facts in noise text so that a sample has exactly the requested number of tokens.

A sample is a sequence of pieces: noise, a fact, noise, a fact, ..., noise, the question. Facts keep their order;
they sit between noise sentences (at the start for `placement="start"`, evenly apart for `"apart"`, else at random
sentence boundaries); the question is always last. The last noise sentence before the question is cut at the token
level so that the whole sample, question included, is exactly `length` tokens (`length=0`: the story and question
with no noise).

Tokenization: every sentence is tokenized on its own, with a leading space and without special tokens, and the
sample's token ids are the concatenation of those pieces. `Sample.ids` is therefore the authoritative tokenization:
re-tokenizing `Sample.input` (which is `tokenizer.decode(ids)`) may differ slightly, e.g. around a cut sentence.

Samples are lazy: `ids` and `input` are built on first use, and `segments(size)` streams the ids in chunks
straight from the cached noise, so a 10M-token sample never has to sit in memory.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from memformers.tasks.babi import Story
from memformers.tasks.noise import TokenizedNoise, tokenized_noise

PLACEMENTS = ("random", "start", "apart")


@dataclass(frozen=True)
class NoiseSpan:
    """`length` tokens of the noise corpus from token `start` on, wrapping around at its end."""

    noise: TokenizedNoise = field(repr=False)
    start: int
    length: int

    def blocks(self, block: int) -> Iterator[np.ndarray]:
        """The span's ids in consecutive slices of at most `block` tokens (views, no copy)."""
        ids, total = self.noise.ids, self.noise.num_tokens
        position, left = self.start % total, self.length
        while left > 0:
            take = min(left, block, total - position)
            yield ids[position : position + take]
            position, left = (position + take) % total, left - take


Piece = np.ndarray | NoiseSpan  # explicit token ids (a fact, the question) or a stretch of noise


@dataclass(eq=False)
class Sample:
    """One long-context question: its token ids (lazily), where its facts are, and the answer.

    `fact_positions[i]` is the index in `ids` where fact i's tokens begin; `supporting` lists the facts (indices
    into `facts`) that the answer needs; `label` is the answer's index in `answers` (the task's answer vocabulary).
    """

    task: str
    length: int  # requested length in tokens; 0 = story and question without noise
    num_tokens: int  # tokens in the sample (== length unless length == 0)
    facts: tuple[str, ...]
    question: str
    target: str
    label: int | None
    supporting: tuple[int, ...]
    fact_positions: tuple[int, ...]
    question_position: int
    answers: tuple[str, ...]
    pieces: tuple[Piece, ...] = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)

    @property
    def story_tokens(self) -> int:
        """Tokens of the facts and the question, the rest being noise: the shortest length the story fits in."""
        return sum(len(piece) for piece in self.pieces if isinstance(piece, np.ndarray))

    def blocks(self, block: int = 1 << 16) -> Iterator[np.ndarray]:
        """The ids piece by piece, in slices of at most `block` tokens."""
        for piece in self.pieces:
            if isinstance(piece, NoiseSpan):
                yield from piece.blocks(block)
            else:
                for i in range(0, len(piece), block):
                    yield piece[i : i + block]

    def segments(self, size: int) -> Iterator[np.ndarray]:
        """Stream the ids in chunks of exactly `size` tokens (the last may be shorter); memory O(size)."""
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        buffer = np.empty(size, dtype=np.int64)  # [size]
        filled = 0
        for block in self.blocks(size):
            while len(block):
                take = min(size - filled, len(block))
                buffer[filled : filled + take] = block[:take]
                filled, block = filled + take, block[take:]
                if filled == size:
                    yield buffer.copy()
                    filled = 0
        if filled:
            yield buffer[:filled].copy()

    @cached_property
    def ids(self) -> np.ndarray:
        """All token ids, [num_tokens] int64 (built on first use)."""
        out = np.empty(self.num_tokens, dtype=np.int64)
        position = 0
        for block in self.blocks(1 << 20):
            out[position : position + len(block)] = block
            position += len(block)
        return out

    @cached_property
    def input(self) -> str:
        """The sample as text, question included: the decoded `ids` (built on first use)."""
        return self.tokenizer.decode(self.ids.tolist()).strip()


def encode_sentence(tokenizer: PreTrainedTokenizerBase, sentence: str) -> np.ndarray:
    """One sentence's ids as they appear inside a sample: leading space, no special tokens. [tokens] int64."""
    return np.asarray(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"], dtype=np.int64)


def build_haystack(
    story: Story,
    length: int,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    answers: tuple[str, ...] = (),
    split: str = "train",
    noise_dir: Path | str | None = None,
    placement: str = "random",
) -> Sample:
    """Put `story`'s facts, in order, into noise from `split` so that the sample has exactly `length` tokens.

    `placement="start"` puts all facts first (fact memorization); `"random"` scatters them over sentence
    boundaries of the noise; `"apart"` spaces them evenly, fact i at the sentence boundary at or before i/k of the
    noise (k facts), so a memory sees about one fact per stretch of needed/k tokens. The noise starts at a random
    sentence of the split's books and cycles through them.
    """
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise ValueError(f"length must be an int >= 0 (0 = no noise), got {length!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    fact_ids = [encode_sentence(tokenizer, fact) for fact in story.facts]
    question_ids = encode_sentence(tokenizer, story.question)
    fixed = sum(len(ids) for ids in fact_ids) + len(question_ids)
    if 0 < length < fixed:
        raise ValueError(
            f"length {length} is shorter than the facts and question of this {story.task} sample ({fixed} tokens); "
            f"use 0 (no noise) or at least {fixed}"
        )
    needed = length - fixed if length else 0  # noise tokens
    pieces: list[Piece] = []
    fact_positions: list[int] = []
    if needed == 0:
        points = [0] * len(fact_ids)
        noise = None
    else:
        noise = tokenized_noise(tokenizer, split, noise_dir)
        begin = int(noise.starts[rng.randrange(noise.num_sentences)])  # corpus token where the noise starts
        if placement == "start":
            points = [0] * len(fact_ids)
        elif placement == "apart":
            points = [_sentence_boundary(noise, begin, i * needed // len(fact_ids)) for i in range(len(fact_ids))]
        else:
            points = sorted(_sentence_boundary(noise, begin, rng.randint(0, needed)) for _ in fact_ids)
    position = previous = 0
    for point, ids in zip(points, fact_ids, strict=True):
        if point > previous:
            pieces.append(NoiseSpan(noise, begin + previous, point - previous))
            position += point - previous
        fact_positions.append(position)
        pieces.append(ids)
        position += len(ids)
        previous = point
    if needed > previous:
        pieces.append(NoiseSpan(noise, begin + previous, needed - previous))
        position += needed - previous
    pieces.append(question_ids)
    total = position + len(question_ids)
    assert total == (length or fixed), (total, length, fixed)
    return Sample(
        task=story.task,
        length=length,
        num_tokens=total,
        facts=story.facts,
        question=story.question,
        target=story.answer,
        label=story.label,
        supporting=story.supporting,
        fact_positions=tuple(fact_positions),
        question_position=position,
        answers=tuple(answers),
        pieces=tuple(pieces),
        tokenizer=tokenizer,
    )


def _sentence_boundary(noise: TokenizedNoise, begin: int, offset: int) -> int:
    """The last sentence start at or before `offset` tokens into noise that begins at corpus token `begin`."""
    corpus = (begin + offset) % noise.num_tokens
    sentence = int(np.searchsorted(noise.starts, corpus, side="right")) - 1
    return offset - (corpus - int(noise.starts[sentence]))
