"""The algorithmic-task benchmark's scoring: hand counts, chance for a constant guesser, an oracle that can fail."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from memformers.segments import IGNORE_INDEX
from memformers.tasks import get_tokenizer
from memformers.tasks.algorithmic import FIRST_SYMBOL_ID
from memformers.training import TaskBatches, answer_correct, build_model, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import algorithmic as bench  # noqa: E402


def config(task: str, mechanism: str = "rmt", vocab_size: int = 4):
    """A tiny scratch-Llama config for an algorithmic task (4 content symbols per segment)."""
    model = {"model.mechanism": mechanism, "model.head": "causal-lm", "model.scratch.family": "llama"}
    model |= {"model.segment_size": 8 if mechanism == "rmt" else 4, "model.num_memory_tokens": 2}
    model |= {"model.scratch.layers": 1, "model.scratch.hidden": 16, "model.scratch.heads": 2}
    model |= {"model.scratch.intermediate": 32, "model.scratch.dropout": 0.0}
    return load_config(None, model | {"task.name": task, "task.vocab_size": vocab_size})


class Fixed(torch.nn.Module):
    """Logits from a rule over the input: a constant guess, or the next label (an oracle) with a planted error."""

    def __init__(self, vocab: int, symbol: int | None = None, wrong_at: int | None = None) -> None:
        super().__init__()
        self.vocab, self.symbol, self.wrong_at = vocab, symbol, wrong_at

    def forward(self, input_ids, attention_mask, labels, logits="all"):
        scores = torch.zeros(*input_ids.shape, self.vocab)  # [batch, length, vocab]
        if self.symbol is not None:
            scores[..., self.symbol] = 1.0
            return SimpleNamespace(logits=scores)
        following = torch.roll(input_ids, -1, dims=1)  # teacher forcing: position t is asked for token t + 1
        scores.scatter_(2, following.unsqueeze(-1), 1.0)
        if self.wrong_at is not None:  # the target's `wrong_at`-th symbol (from its start) is predicted wrong
            first = (labels != IGNORE_INDEX).float().argmax(1) - 1  # the position predicting the target's first symbol
            rows = torch.arange(input_ids.shape[0])
            position = first + self.wrong_at
            right = following[rows, position]
            scores[rows, position] = 0.0
            scores[rows, position, (right - FIRST_SYMBOL_ID + 1) % (self.vocab - FIRST_SYMBOL_ID) + FIRST_SYMBOL_ID] = 1
        return SimpleNamespace(logits=scores)


def test_target_scores_match_a_hand_count():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 5)  # [batch, length, vocab]
    labels = torch.full((3, 7), IGNORE_INDEX)
    labels[:, 3:] = torch.randint(0, 5, (3, 4))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0  # a right-padded row: its target stops at position 4
    labels[2, 5:] = IGNORE_INDEX
    logits[0, 2:6] = torch.nn.functional.one_hot(labels[0, 3:7], 5).float() * 10  # row 0: all right
    hits, counts = bench.target_scores(logits, labels, mask)
    for row in range(3):
        n = int(mask[row].sum())
        scored = [t for t in range(n - 1) if labels[row, t + 1] != IGNORE_INDEX]
        right = sum(int(logits[row, t].argmax()) == int(labels[row, t + 1]) for t in scored)
        assert (int(hits[row]), int(counts[row])) == (right, len(scored))
    assert counts.tolist() == [4, 4, 2]
    assert int(hits[0]) == 4


@pytest.mark.parametrize("task", ["copy", "reverse", "associative"])
def test_a_constant_guess_scores_chance_and_an_oracle_scores_everything(task):
    c = config(task)
    batches = TaskBatches(c, get_tokenizer(c.tokenizer_name), content_size=4)
    vocab = FIRST_SYMBOL_ID + 4
    samples, segments = 300, 2
    exact, right, total = bench.measure(Fixed(vocab, symbol=FIRST_SYMBOL_ID + 1), batches, segments, samples, 64, 5)
    symbols = {"copy": 16, "reverse": 8, "associative": 1}[task]
    assert total == samples * symbols
    low, high = bench.wilson_interval(right, total)
    assert low < 0.25 < high  # each target symbol is uniform over the 4 data symbols
    if task == "associative":
        low, high = bench.wilson_interval(exact, samples)
        assert low < 0.25 < high
    else:
        assert exact == 0  # 8 or 16 symbols all one value: chance 4^-7 at best
    assert bench.measure(Fixed(vocab), batches, segments, 40, 16, 5) == (40, 40 * symbols, 40 * symbols)
    exact, right, total = bench.measure(Fixed(vocab, wrong_at=symbols - 1), batches, segments, 40, 16, 5)
    assert (exact, right, total) == (0, 40 * (symbols - 1), 40 * symbols)  # one wrong symbol fails the whole target


def test_scores_agree_with_the_trainers_last_segment_check_and_state_sizes_are_the_carried_ones():
    for mechanism in ("rmt", "cache"):
        c = config("associative", mechanism)
        model, tokenizer = build_model(c)
        model.eval()
        batches = TaskBatches(c, tokenizer, model.content_size)
        batch = batches.batch(list(range(12)), 3, seed=9, vary=False)
        with torch.no_grad():
            every = model(**batch, logits="all")
            last = model(**batch, logits="last")
        hits, counts = bench.target_scores(every.logits, batch["labels"], batch["attention_mask"])
        assert counts.eq(1).all()  # the value: one symbol, in the last segment
        trainer = answer_correct(
            last.logits, batch["labels"], batch["attention_mask"], True, model.content_size, model.alignment
        )
        assert (hits == counts).tolist() == trainer.tolist()
        state = every.state
        carried = (
            state.memory[0].numel() if mechanism == "rmt" else sum(t[0].numel() for t in state.keys + state.values)
        )
        assert bench.state_floats(model) == carried
