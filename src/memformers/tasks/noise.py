"""Noise text: the natural-language haystack that long-context samples hide their facts in.

By default the noise is Jane Austen's six novels, shipped inside the package (`data/austen.json.gz`, public domain,
rebuilt by `scripts/build_austen.py`). Users can bring their own books instead: any folder of `.txt` files, one book
per file (the PG-19 layout).

Train and test noise come from different books, so a model is evaluated on text it never saw in training:
- Austen: test = Persuasion + Northanger Abbey; train = Emma, Mansfield Park, Pride and Prejudice, Sense and
  Sensibility.
- a folder with `train/` and `test/` (or `validation/`) subfolders: those subfolders.
- any other folder of `.txt` files: in sorted file-name order, the last max(1, n // 5) books are test, the rest
  train (at least two books are needed to split).

Tokenizing books is slow next to building a sample, so each (tokenizer, split, corpus) is tokenized once, sentence
by sentence, and cached as numpy arrays under `memformers.backbones.cache_dir() / "noise"`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from memformers.backbones import cache_dir
from memformers.errors import InputError, warn_input
from memformers.files import atomic_file

AUSTEN_TEST = ("persuasion", "northangerabbey")
AUSTEN_TRAIN = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")
SPLITS = ("train", "test", "all")
CACHE_FORMAT = 1  # bump when the sentence splitting or the cache layout changes

_HEADING = re.compile(r"^(chapter|volume|book)\s+[\dIVXLC]+\.?$|^(the end|finis)\.?$", re.IGNORECASE)
_SENTENCE = re.compile(r".+?(?:[.!?]+[\"'”’)\]]*(?=\s+[\"'“‘(\[_]*[A-Z0-9])|$)", re.DOTALL)
_ABBREVIATION = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Esq|Col|Capt|Rev|Sir|Messrs|Mme|Mlle|[A-Z])\.$")


@dataclass(frozen=True)
class Book:
    """A book as a list of sentences (whitespace normalised, in reading order)."""

    name: str
    sentences: tuple[str, ...]


def split_sentences(text: str) -> list[str]:
    """Cut a book's text into sentences: paragraphs at blank lines, then at . ! ? before a capital letter.

    Chapter headings and front matter before the first heading are dropped; "Mr." and the like do not end a
    sentence.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]
    first = next((i for i, p in enumerate(paragraphs) if _HEADING.match(p)), 0)
    sentences: list[str] = []
    for paragraph in paragraphs[first:]:
        if _HEADING.match(paragraph):
            continue
        pending = ""
        for match in _SENTENCE.finditer(paragraph):
            piece = (pending + " " + match.group(0).strip()).strip()
            if _ABBREVIATION.search(piece):
                pending = piece
                continue
            sentences.append(piece)
            pending = ""
        if pending:
            sentences.append(pending)
    return sentences


def austen_texts() -> dict[str, str]:
    """The six novels shipped with memformers, by short name (e.g. "prideprejudice")."""
    data = resources.files("memformers").joinpath("data", "austen.json.gz").read_bytes()
    return json.loads(gzip.decompress(data))["books"]


def _folder_books(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    if not files:
        raise InputError(f"noise_dir: no .txt files in {str(folder)!r}; expected one book per .txt file")
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".txt" and p.name[0] != ".")
    if others:
        warn_input(
            f"noise_dir: {folder} holds {len(others)} file(s) that are not .txt books (e.g. {others[0]!r}); "
            "they are not read"
        )
    return files


def read_book(path: Path) -> str:
    """A book's text: UTF-8 (a byte-order mark allowed); other text is read as Windows-1252, with a warning rather
    than silently dropping its accented letters; a binary file is refused."""
    data = Path(path).read_bytes()
    if b"\x00" in data[: 1 << 16]:
        raise InputError(f"noise_dir: {path} is binary (it holds NUL bytes), not a text book; remove it")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        warn_input(
            f"noise_dir: {path} is not UTF-8 (byte {data[error.start]:#04x} at {error.start:,}); read as "
            "Windows-1252: convert it to UTF-8 if its letters come out wrong"
        )
        return data.decode("cp1252", errors="replace")


def book_files(split: str, noise_dir: Path) -> list[Path]:
    """The .txt files of a user's noise folder that belong to a split (see the module docstring)."""
    _check_split(split)
    noise_dir = Path(noise_dir)
    if not noise_dir.is_dir():
        raise ValueError(f"noise_dir: {str(noise_dir)!r} is not a folder; expected a folder of .txt books")
    if split == "all":
        subfolders = [noise_dir / s for s in ("train", "validation", "test") if (noise_dir / s).is_dir()]
        if subfolders:
            return [f for folder in subfolders for f in _folder_books(folder)]
        return _folder_books(noise_dir)
    candidates = [split] if split == "train" else ["test", "validation"]
    for name in candidates:
        if (noise_dir / name).is_dir():
            return _folder_books(noise_dir / name)
    files = _folder_books(noise_dir)
    if len(files) < 2:
        raise ValueError(
            f"noise_dir: {str(noise_dir)!r} holds {len(files)} book; a train/test split needs at least 2 "
            "(or use split='all')"
        )
    num_test = max(1, len(files) // 5)
    return files[-num_test:] if split == "test" else files[:-num_test]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def load_noise(split: str = "train", noise_dir: Path | str | None = None) -> list[Book]:
    """The books of a split, cut into sentences: Austen by default, or the `.txt` books of `noise_dir`."""
    _check_split(split)
    if noise_dir is None:
        texts = austen_texts()
        names = {"train": AUSTEN_TRAIN, "test": AUSTEN_TEST, "all": AUSTEN_TRAIN + AUSTEN_TEST}[split]
        return [Book(name, tuple(split_sentences(texts[name]))) for name in names]
    books = []
    for path in book_files(split, Path(noise_dir)):
        books.append(Book(path.stem, tuple(split_sentences(read_book(path)))))
    return books


# ----------------------------------------------------------------------------------------------------------------
# Tokenized noise, cached


@dataclass(frozen=True)
class TokenizedNoise:
    """All sentences of a split, tokenized one by one (each with a leading space) and laid end to end.

    Sentence i is `ids[starts[i]:starts[i + 1]]`; book j begins at sentence `book_starts[j]`.
    """

    ids: np.ndarray  # [num_tokens] int32
    starts: np.ndarray  # [num_sentences + 1] int64, starts[-1] == num_tokens
    book_starts: np.ndarray  # [num_books] int64
    books: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def num_sentences(self) -> int:
        return len(self.starts) - 1


_FINGERPRINTS: dict[int, tuple[object, str]] = {}


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash that changes whenever the tokenizer would split text differently."""
    cached = _FINGERPRINTS.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = backend.to_str()
    else:
        described = f"{type(tokenizer).__name__}:{tokenizer.name_or_path}:{sorted(tokenizer.get_vocab().items())}"
    fingerprint = hashlib.sha1(described.encode("utf-8")).hexdigest()[:16]
    _FINGERPRINTS[id(tokenizer)] = (tokenizer, fingerprint)
    return fingerprint


@lru_cache(maxsize=64)  # listing a big book folder once per process, not once per sample
def _corpus_fingerprint(noise_dir: Path | None, split: str) -> str:
    if noise_dir is None:
        size = resources.files("memformers").joinpath("data", "austen.json.gz").stat().st_size
        return f"austen{size}-{split}"
    files = book_files(split, noise_dir)
    listing = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps(listing).encode("utf-8")).hexdigest()[:16]


def tokenize_sentences(
    tokenizer: PreTrainedTokenizerBase, sentences: list[str], batch_size: int = 4096
) -> list[list[int]]:
    """Token ids of each sentence with a leading space and no special tokens: the unit haystacks are built of."""
    ids: list[list[int]] = []
    for i in range(0, len(sentences), batch_size):
        batch = [" " + s for s in sentences[i : i + batch_size]]
        ids.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
    return ids


def tokenized_noise(
    tokenizer: PreTrainedTokenizerBase, split: str = "train", noise_dir: Path | str | None = None
) -> TokenizedNoise:
    """The split's sentences tokenized by `tokenizer`: from memory, else from the disk cache, else built once."""
    _check_split(split)
    resolved = None if noise_dir is None else Path(noise_dir).resolve()
    key = f"{tokenizer_fingerprint(tokenizer)}-{_corpus_fingerprint(resolved, split)}-v{CACHE_FORMAT}"
    if key not in _LOADED:
        if len(_LOADED) >= 8:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = _load_or_build(key, tokenizer, split, resolved)
        if resolved is not None:
            _check_variety(_LOADED[key], split, resolved)
    return _LOADED[key]


VARIETY_SENTENCES = 20_000  # sentences looked at when judging whether the noise repeats itself
MIN_DISTINCT_SENTENCES = 100


def distinct_sentences(noise: TokenizedNoise, first: int = VARIETY_SENTENCES) -> tuple[int, int]:
    """(distinct, looked at) among the first `first` sentences of the noise."""
    count = min(first, noise.num_sentences)
    seen = {noise.ids[noise.starts[i] : noise.starts[i + 1]].tobytes() for i in range(count)}
    return len(seen), count


def _check_variety(noise: TokenizedNoise, split: str, noise_dir: Path) -> None:
    """Warn when a user's books repeat themselves (one sentence, or a short text pasted over and over): samples
    of millions of tokens would repeat them, and a model can learn the repetition instead of the facts."""
    distinct, looked_at = distinct_sentences(noise)
    if distinct < MIN_DISTINCT_SENTENCES or distinct < looked_at // 2:
        warn_input(
            f"noise_dir: the {split} books of {noise_dir} hold only {distinct:,} distinct sentences (of the first "
            f"{looked_at:,}; {noise.num_tokens:,} tokens), so long samples repeat them over and over: give more, "
            "varied books"
        )


_LOADED: dict[str, TokenizedNoise] = {}


def _load_or_build(key: str, tokenizer: PreTrainedTokenizerBase, split: str, noise_dir: Path | None) -> TokenizedNoise:
    path = cache_dir() / "noise" / f"{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as data:
            return TokenizedNoise(
                data["ids"], data["starts"], data["book_starts"], tuple(str(b) for b in data["books"])
            )
    books = load_noise(split, noise_dir)
    pieces: list[np.ndarray] = []
    lengths: list[int] = []
    book_starts: list[int] = []
    for book in books:
        book_starts.append(len(lengths))
        for sentence_ids in tokenize_sentences(tokenizer, list(book.sentences)):
            if sentence_ids:
                pieces.append(np.asarray(sentence_ids, dtype=np.int32))
                lengths.append(len(sentence_ids))
    if not lengths:
        raise ValueError(f"noise_dir: the {split} books of {noise_dir!s} hold no text")
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    noise = TokenizedNoise(
        np.concatenate(pieces), starts, np.asarray(book_starts, dtype=np.int64), tuple(b.name for b in books)
    )
    with atomic_file(path) as tmp:  # a reader never sees half a cache file
        np.savez(tmp, ids=noise.ids, starts=noise.starts, book_starts=noise.book_starts, books=np.asarray(noise.books))
    return noise
