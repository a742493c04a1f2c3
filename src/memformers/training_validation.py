"""Validation during a training run: accuracy and loss on fresh samples (the task's evaluation seed), and for
task lm perplexity per token."""

from __future__ import annotations

import time

import numpy as np
import torch

from .training_config import EVAL_SEED_OFFSET


class ValidationMixin:
    """The `Trainer`'s validation, run at every `curriculum.eval_every` steps and at a stage's end. Mixed into
    `Trainer`: it scores batches as a training step does (`_correct`, `_logits_mode`)."""

    def evaluate(self, segments: int | None = None, samples: int | None = None, placement: str | None = None) -> dict:
        """Accuracy and loss on `samples` (default `curriculum.eval_samples`) fresh validation samples (own seed) of
        `segments` (default: the current stage), and the seconds they took (a long validation costs steps).
        `placement` (see `Batches.item`) puts every sample's facts alike instead of the training mix."""
        start = time.perf_counter()
        record = self._validate(segments, samples, placement)
        return record | {"seconds": round(time.perf_counter() - start, 2)}

    @torch.no_grad()
    def _validate(self, segments: int | None, samples: int | None, placement: str | None) -> dict:
        acc, c = self.accelerator, self.config.curriculum
        segments = segments or self.stages[self.state.stage]
        seed = self.config.task.eval_seed
        seed = self.config.task.seed + EVAL_SEED_OFFSET if seed is None else seed
        model = self.unwrapped
        was_training = model.training
        model.eval()
        mine = list(range(acc.process_index, samples or c.eval_samples, acc.num_processes))
        if self.batches.lm:
            return self._evaluate_lm(mine, segments, seed, was_training)
        names = self.config.task_names  # a task listed twice is drawn twice as often: one entry for it
        slots = {name: slot for slot, name in enumerate(dict.fromkeys(names))}
        totals = torch.zeros(3, device=acc.device)  # loss sum, correct, samples
        by_task = torch.zeros(2, len(slots), device=acc.device)  # correct, samples of each task
        for i in range(0, len(mine), self.eval_batch):
            indices = mine[i : i + self.eval_batch]
            batch = self.batches.batch(indices, segments, seed, vary=False, placement=placement)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                out = model(**batch, logits=self._logits_mode)
            rows = batch["input_ids"].shape[0]
            correct = self._correct(out.logits, batch)
            totals += torch.tensor([float(out.loss) * rows, float(correct.sum()), rows], device=acc.device)
            tasks = torch.tensor([slots[names[index % len(names)]] for index in indices], device=acc.device)
            by_task[0].index_add_(0, tasks, correct.float())
            by_task[1].index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float))
        model.train(was_training)
        loss, correct, samples = acc.reduce(totals, reduction="sum").tolist()
        record = {
            "type": "eval",
            "step": self.state.step,
            "stage": self.state.stage,
            "segments": segments,
            "loss": loss / samples,
            "accuracy": correct / samples,
            "samples": int(samples),
        }
        if len(slots) > 1:  # which task lags, where several are learned together
            right, count = acc.reduce(by_task, reduction="sum").tolist()
            record["accuracy_by_task"] = {name: r / n for name, r, n in zip(slots, right, count, strict=True) if n}
        return record

    def _evaluate_lm(self, mine: list[int], segments: int, seed: int, was_training: bool) -> dict:
        """Task lm: loss and perplexity per token over all segments, and token accuracy as "accuracy" (so the
        curriculum's threshold still applies); also the perplexity of the first and the last segment."""
        from .perplexity import SegmentScores, score_documents

        acc, model = self.accelerator, self.unwrapped
        scores = SegmentScores()
        for i in range(0, len(mine), self.eval_batch):
            batch = self.batches.batch(mine[i : i + self.eval_batch], segments, seed, vary=False)
            with acc.autocast():
                score_documents(
                    model, batch["input_ids"].to(acc.device), batch["attention_mask"].to(acc.device), scores
                )
        model.train(was_training)
        first, last = (torch.tensor(scores.pooled(k, k), device=acc.device, dtype=torch.float64) for k in (1, segments))
        every = torch.tensor(scores.pooled(), device=acc.device, dtype=torch.float64)  # nll, tokens, correct
        first, last, every = (acc.reduce(t, reduction="sum").tolist() for t in (first, last, every))
        return {
            "type": "eval",
            "step": self.state.step,
            "stage": self.state.stage,
            "segments": segments,
            "loss": every[0] / every[1],
            "perplexity": float(np.exp(every[0] / every[1])),
            "perplexity_first_segment": float(np.exp(first[0] / first[1])),
            "perplexity_last_segment": float(np.exp(last[0] / last[1])),
            "accuracy": every[2] / every[1],
            "samples": len(mine) * acc.num_processes,
        }
