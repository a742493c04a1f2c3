"""Perplexity per segment index: does memory make later segments of a long document easier to predict?

A document is read segment by segment through the one driver (`recurrence.iterate`), with the state carried and
nothing else kept: memory stays flat in the document's length. Every token but a document's last is a target of
the position before it, across segment boundaries (the driver's `shift_labels`), and its negative log-likelihood
is booked to the segment that *predicts* it, exactly as `model(ids, labels=ids)` counts it; so the pooled
perplexity is exp of that loss. Segment indices are 1-based in reports; indices from `POOLED_FROM` on are also
pooled into one "16+" column, where a model without memory has nothing left to gain.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .recurrence import iterate
from .segments import IGNORE_INDEX, count_segments, shift_labels, split_into_segments

POOLED_FROM = 16  # segment index (1-based) from which segments are pooled into "16+"


@dataclass
class SegmentScores:
    """Summed negative log-likelihood, target count and argmax hits per segment index (0-based lists)."""

    nll: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)

    def add(self, index: int, nll: float, tokens: int, correct: int) -> None:
        while len(self.nll) <= index:
            self.nll.append(0.0)
            self.tokens.append(0)
            self.correct.append(0)
        self.nll[index] += nll
        self.tokens[index] += tokens
        self.correct[index] += correct

    def pooled(self, first: int = 1, last: int | None = None) -> tuple[float, int, int]:
        """(nll, tokens, correct) summed over 1-based segment indices first..last (None = to the end)."""
        span = slice(first - 1, last)
        return sum(self.nll[span]), sum(self.tokens[span]), sum(self.correct[span])

    def loss(self, first: int = 1, last: int | None = None) -> float:
        nll, tokens, _ = self.pooled(first, last)
        return nll / tokens if tokens else float("nan")

    def perplexity(self, first: int = 1, last: int | None = None) -> float:
        return math.exp(self.loss(first, last))

    def accuracy(self, first: int = 1, last: int | None = None) -> float:
        _, tokens, correct = self.pooled(first, last)
        return correct / tokens if tokens else float("nan")

    def summary(self, pooled_from: int = POOLED_FROM) -> dict:
        """Perplexity per segment index (1..pooled_from), pooled from `pooled_from` on, and overall."""
        per_segment = {str(i + 1): self.perplexity(i + 1, i + 1) for i in range(min(len(self.nll), pooled_from))}
        return {
            "perplexity": per_segment | ({f"{pooled_from}+": self.perplexity(pooled_from)} if per_segment else {}),
            "overall": self.perplexity(),
            "loss": self.loss(),
            "token_accuracy": self.accuracy(),
            "tokens": sum(self.tokens),
            "by_segment": [self.perplexity(i + 1, i + 1) for i in range(len(self.nll))],  # every index, 1-based
            "tokens_per_segment": {str(i + 1): n for i, n in enumerate(self.tokens)},
        }


def state_floats(state, batch_size: int) -> float:
    """Floats one row of a mechanism's state holds (its memory, cache, stores or bank; weights a state refers to,
    such as RMT's learned initial memory, not counted): the state size a mechanism pays for, read off the state."""
    seen: set[int] = set()

    def walk(value, name: str = "") -> float:
        if id(value) in seen or isinstance(value, nn.Parameter):  # a weight shared by every row, not state
            return 0.0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() / batch_size if value.is_floating_point() else 0.0
        if isinstance(value, list | tuple):
            return sum(walk(item) for item in value)
        if dataclasses.is_dataclass(value):
            return sum(walk(getattr(value, f.name), f.name) for f in dataclasses.fields(value))
        if hasattr(value, "__dict__"):
            return sum(walk(item, key) for key, item in vars(value).items())
        return 0.0

    return walk(state)


ProgressCallback = Callable[[int, int | None, int], None]


@torch.no_grad()
def score_documents(
    model,
    input_ids: torch.Tensor,  # [batch, length] one document per row
    attention_mask: torch.Tensor | None = None,  # [batch, length], right padding
    scores: SegmentScores | None = None,
    callback: ProgressCallback | None = None,
) -> tuple[SegmentScores, float]:
    """Add each segment's next-token NLL to `scores` by segment index; returns them and the state's floats per row.

    Segments are cut from the left (a document is read from its beginning), each row starting from a fresh state.
    """
    if not getattr(model, "token_level", False) or not getattr(model, "causal", False):
        raise ValueError("model: perplexity needs a decoder with a causal-LM head (token logits, next-token targets)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    scores = scores if scores is not None else SegmentScores()
    targets = shift_labels(input_ids, attention_mask)
    segments = split_into_segments(input_ids, model.content_size, attention_mask, targets, "left")
    state = model.init_state(input_ids.shape[0])
    for segment, output, after in iterate(model, segments, state, None, None, False, callback):
        state = after
        labels = segment.labels.masked_fill(segment.attention_mask == 0, IGNORE_INDEX)  # [batch, n]
        logits = output.logits.float()  # [batch, n, vocab]
        nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        scored = labels != IGNORE_INDEX
        correct = (logits.argmax(-1) == labels) & scored
        scores.add(segment.index, float(nll), int(scored.sum()), int(correct.sum()))
    return scores, state_floats(state, input_ids.shape[0])


def evaluate_perplexity(
    model,
    documents: Sequence[torch.Tensor],  # each [tokens] of one document
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Perplexity per segment index over `documents` (read `batch_size` side by side), with the state's size."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
    was_training = model.training
    model.eval()
    scores, floats, done = SegmentScores(), 0.0, 0
    segments_per_doc = [count_segments(len(d), model.content_size) for d in documents]
    total = sum(segments_per_doc)
    start = time.perf_counter()
    for first in range(0, len(documents), batch_size):
        rows = list(documents[first : first + batch_size])
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row)
            mask[i, : len(row)] = 1
        base = done

        def on_segment(index: int, _total, _tokens, base=base, count=len(rows)) -> None:
            if progress is not None:
                progress(base + index * count, total)

        _, floats = score_documents(model, ids.to(device), mask.to(device), scores, on_segment)
        done += sum(segments_per_doc[first : first + batch_size])
    model.train(was_training)
    seconds = time.perf_counter() - start
    return scores.summary() | {
        "state_floats_per_row": floats,
        "documents": len(documents),
        "tokens_per_document": max(len(d) for d in documents),
        "segment_tokens": model.content_size,
        "seconds": seconds,
        "tokens_per_s": sum(scores.tokens) / seconds if seconds else float("nan"),
    }


# --------------------------------------------------------------------------------------------------------------
# Reports

TABLE_SEGMENTS = ("1", "2", "4", "8", "16+")


def markdown_table(rows: dict[str, dict], columns: Sequence[str] = TABLE_SEGMENTS) -> str:
    """One row per model: perplexity at the chosen segment indices, overall, and the state's floats per row."""
    head = ["model", *(f"seg {c}" for c in columns), "overall", "state (floats/row)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, result in rows.items():
        cells = [_number(result["perplexity"].get(c)) for c in columns]
        cells += [_number(result["overall"]), f"{result['state_floats_per_row']:,.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    """Two decimals, or "–" for a cell with nothing in it (no tokens scored: NaN)."""
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def load_for_perplexity(checkpoint: str | Path, segment_size: int | None = None, device: str = "cpu"):
    """(model, tokenizer name): a saved memformers model, or a bare causal LM (name or folder) as the backbone alone
    (an RMT without memory tokens, i.e. the same segments and no state) with `segment_size` tokens per segment."""
    from .rmt import RecurrentMemoryTransformer
    from .saving import CONFIG_NAME, load, read_config

    if (Path(checkpoint) / CONFIG_NAME).exists():
        config = read_config(checkpoint)
        model = load(checkpoint, device=device)
        return model, config.get("extra", {}).get("tokenizer") or str(Path(checkpoint) / "backbone")
    if segment_size is None:
        raise ValueError(f"segment_size: {str(checkpoint)!r} is a bare backbone; give the tokens per segment")
    from . import backbones

    backbone, _ = backbones.load(str(checkpoint), head="causal-lm")
    model = RecurrentMemoryTransformer(backbone, num_memory_tokens=0, segment_size=segment_size)
    return model.to(device).eval(), str(checkpoint)


def run(
    checkpoint: str | Path,
    tokens: int | None = None,
    documents: int = 8,
    split: str = "test",
    noise_dir: Path | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    memory_size: int | None = None,
    segment_size: int | None = None,
    json_out: Path | None = None,
    command: str = "",
    console=None,
) -> dict:
    """`memformers eval CHECKPOINT --perplexity`: held-out documents, per-segment perplexity, JSON and markdown."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .tasks import get_tokenizer, lm_documents

    model, tokenizer_name = load_for_perplexity(checkpoint, segment_size, device)
    if memory_size is not None:
        if "memory_size" not in model.config.resizable:
            raise ValueError(f"memory_size: {type(model).__name__} has no memory store to resize")
        model.memory_size = memory_size  # only the store's capacity (checked by the config): no weight depends on it
    tokens = tokens or 20 * model.content_size
    docs = [
        torch.from_numpy(d) for d in lm_documents(get_tokenizer(tokenizer_name), tokens, documents, split, noise_dir)
    ]
    with Progress(TextColumn("[bold]perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        job = bar.add_task("", total=None)
        result = evaluate_perplexity(
            model, docs, batch_size, device, lambda done, total: bar.update(job, completed=done, total=total)
        )
    result = {
        "checkpoint": str(checkpoint),
        "command": command,
        "mechanism": type(model).__name__,
        "config": model.config_dict(),
        "split": split,
        "noise_dir": str(noise_dir) if noise_dir else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    } | result
    table = markdown_table({Path(checkpoint).name: result})
    if console is not None:
        console.print(table)
    if json_out is not None:
        for path, text in ((json_out, json.dumps(result, indent=2)), (json_out.with_suffix(".md"), table)):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text + "\n")
            tmp.replace(path)  # atomic: a reader never sees half a file
    return result
