"""torch datasets over the tasks, and the collate function that pads their samples into a batch.

Items are dicts of 1-D LongTensors: `input_ids` and `labels`. With `target="class"` the label is the answer's class
index (a 0-d tensor; an encoder classifies the last segment); with `target="text"` the answer's tokens are appended
to the input and `labels` is -100 everywhere else (a decoder learns to write the answer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from memformers.tasks.algorithmic import IGNORE_INDEX
from memformers.tasks.haystack import Sample, encode_sentence
from memformers.tasks.registry import TokenizerLike, get_tokenizer, make_algorithmic_sample, make_sample, task_spec

TARGETS = ("class", "text")


def _lengths(lengths: int | Sequence[int]) -> tuple[int, ...]:
    values = (lengths,) if isinstance(lengths, int) else tuple(lengths)
    if not values or any(not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"lengths must be an int >= 0 or a non-empty list of them, got {lengths!r}")
    return values


def sample_item(
    sample: Sample, target: str = "class", eos_id: int | None = None, answers: tuple[str, ...] | None = None
) -> dict[str, torch.Tensor]:
    """A haystack sample as training tensors (see the module docstring for the two target formats).

    `answers`: the class vocabulary of a classifier over several tasks (`answer_vocabulary`); by default the
    sample's own task's answers.
    """
    ids = torch.from_numpy(sample.ids)  # [num_tokens]
    if target == "class":
        if answers is not None and sample.target not in answers:
            raise ValueError(f"answers: {sample.target!r} (task {sample.task}) is not among {list(answers)}")
        label = sample.label if answers is None else answers.index(sample.target)
        return {"input_ids": ids, "labels": torch.tensor(label, dtype=torch.long)}
    if target != "text":
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    answer = encode_sentence(sample.tokenizer, sample.target).tolist() + ([] if eos_id is None else [eos_id])
    answer_ids = torch.tensor(answer, dtype=torch.long)
    labels = torch.cat([torch.full_like(ids, IGNORE_INDEX), answer_ids])
    return {"input_ids": torch.cat([ids, answer_ids]), "labels": labels}


class TaskDataset(Dataset):
    """A fixed set of `num_samples` samples of one task; sample i has length `lengths[i % len(lengths)]`.

    Samples are made on access (deterministic in seed and index), so the set costs no memory up front.
    Algorithmic tasks ignore `tokenizer`, `split` and `noise_dir`; their items are always decoder-style.
    """

    def __init__(
        self,
        task: str,
        lengths: int | Sequence[int],
        num_samples: int,
        tokenizer: TokenizerLike | None = None,
        seed: int = 0,
        split: str = "train",
        noise_dir: Path | str | None = None,
        target: str = "class",
        eos_id: int | None = None,
        segment_size: int | None = None,
    ) -> None:
        self.spec = task_spec(task)
        self.lengths = _lengths(lengths)
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if self.spec.kind == "babi" and tokenizer is None:
            raise ValueError(f"tokenizer is required for task {task!r}; give a tokenizer or a name like 'minilm'")
        self.tokenizer = get_tokenizer(tokenizer) if tokenizer is not None else None
        self.num_samples, self.seed, self.split, self.noise_dir = num_samples, seed, split, noise_dir
        self.target, self.eos_id, self.segment_size = target, eos_id, segment_size

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, index: int) -> Sample:
        """The full `Sample` behind item `index` (facts, positions, text) of a bAbI-style task."""
        length = self.lengths[index % len(self.lengths)]
        return make_sample(self.spec.name, length, self.tokenizer, self.seed, index, self.split, self.noise_dir)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return _item(self, index, self.lengths[index % len(self.lengths)])


def _item(dataset, index: int, length: int) -> dict[str, torch.Tensor]:
    if dataset.spec.kind == "algorithmic":
        problem = make_algorithmic_sample(dataset.spec.name, length, dataset.seed, index, dataset.segment_size)
        return {"input_ids": torch.from_numpy(problem.ids), "labels": torch.from_numpy(problem.labels)}
    sample = make_sample(
        dataset.spec.name, length, dataset.tokenizer, dataset.seed, index, dataset.split, dataset.noise_dir
    )
    return sample_item(sample, dataset.target, dataset.eos_id)


class StreamingTaskDataset(IterableDataset):
    """An endless (or `num_samples`-long) stream of fresh samples, each at a length drawn from `lengths`.

    For training on mixed lengths. With several DataLoader workers, worker w makes samples w, w + W, w + 2W, ...
    so no two workers repeat a sample.
    """

    def __init__(
        self,
        task: str,
        lengths: int | Sequence[int],
        tokenizer: TokenizerLike | None = None,
        seed: int = 0,
        split: str = "train",
        noise_dir: Path | str | None = None,
        target: str = "class",
        eos_id: int | None = None,
        num_samples: int | None = None,
        segment_size: int | None = None,
    ) -> None:
        self._inner = TaskDataset(
            task, lengths, num_samples or 1, tokenizer, seed, split, noise_dir, target, eos_id, segment_size
        )
        self.num_samples = num_samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        inner = self._inner
        index = worker
        while self.num_samples is None or index < self.num_samples:
            length = random.Random(f"{inner.seed}:length:{index}").choice(inner.lengths)
            yield _item(inner, index, length)
            index += workers


def collate(
    batch: list[dict[str, torch.Tensor]], pad_id: int = 0, label_pad_id: int = IGNORE_INDEX
) -> dict[str, torch.Tensor]:
    """Pad items on the right into `input_ids` [batch, max_len], `attention_mask` [batch, max_len] and `labels`
    ([batch] for class labels, [batch, max_len] padded with `label_pad_id` for token labels)."""
    if not batch:
        raise ValueError("batch must hold at least one item")
    longest = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)  # [batch, max_len]
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # [batch, max_len]
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in batch[0]:
        if batch[0]["labels"].dim() == 0:
            out["labels"] = torch.stack([item["labels"] for item in batch])  # [batch]
        else:
            labels = torch.full((len(batch), longest), label_pad_id, dtype=torch.long)  # [batch, max_len]
            for row, item in enumerate(batch):
                labels[row, : len(item["labels"])] = item["labels"]
            out["labels"] = labels
    return out


def make_collate(
    pad_id: int = 0, label_pad_id: int = IGNORE_INDEX
) -> Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]:
    """`collate` with the padding ids fixed, ready for `DataLoader(collate_fn=...)`."""
    return partial(collate, pad_id=pad_id, label_pad_id=label_pad_id)


def as_numpy(item: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """An item's tensors as numpy arrays (for export and inspection)."""
    return {key: value.numpy() for key, value in item.items()}
