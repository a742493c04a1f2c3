"""The samples a training run reads (`TaskBatches`), and whether a model's answers to them are right
(`answer_correct`)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch

from .segments import IGNORE_INDEX, count_segments, shift_labels
from .training_config import TrainConfig
from .training_model import class_vocabulary


class TaskBatches:
    """Deterministic samples: sample `index` of the run and its length depend only on the config and `index`.

    So a batch can be rebuilt after a restart from the data position alone, and split over processes in any way.
    Classification samples are exactly n × content_size tokens; LM samples leave room for the answer tokens
    appended to them (n × content_size at most), so they too fill exactly n segments. Algorithmic samples are
    the other way round: their source fills n segments and the target (as long as the source, twice for copy)
    is written in the segments after it, as in the RMT paper's copy and reverse.
    """

    def __init__(self, config: TrainConfig, tokenizer, content_size: int) -> None:
        from .tasks import encode_sentence

        self.config, self.tokenizer, self.content_size = config, tokenizer, content_size
        self.head = config.model.head
        self.eos_id = None
        self.reserve = 0
        self.lm = config.task_names == ["lm"]  # language modelling: every token is a target, no answer
        self.answers = class_vocabulary(config)  # one class vocabulary over all the tasks
        if self.head != "classification" and not config.algorithmic and not self.lm:  # algorithmic: fixed length
            self.eos_id = tokenizer.eos_token_id if self.head == "causal-lm" else None
            if self.head == "causal-lm" and self.eos_id is None:
                self.eos_id = tokenizer.sep_token_id
            self.reserve = max(len(encode_sentence(tokenizer, a)) for a in self.answers) + (self.eos_id is not None)

    def segments_of(self, index: int, current: int) -> int:
        """Segments of training sample `index` at a stage of `current` segments."""
        c = self.config.curriculum
        if not c.vary_segments:
            return current
        low = min(c.min_segments, current)
        if c.vary_per == "batch":  # sample `index` belongs to global batch index // batch_size, whatever the processes
            return self._draw("batch-segments", index // self.config.optim.batch_size).randint(low, current)
        return self._draw("segments", index).randint(low, current)

    def _draw(self, what: str, key: int) -> random.Random:
        """The generator of one per-sample (or per-batch) choice: fixed by the task seed, the choice and `key`."""
        return random.Random(f"{self.config.task.seed}:{what}:{key}")

    def item(
        self,
        index: int,
        segments: int,
        seed: int,
        no_noise: bool = False,
        training: bool = False,
        placement: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sample `index` at `segments` segments; `placement` ("start", "apart" or "": the task's own) overrides
        the one `task.facts_first` / `task.facts_apart` draw for it."""
        from .tasks import make_sample, sample_item

        t = self.config.task
        if self.lm:  # a window of exactly `segments` segments of one book; labels = the input (shifted by the driver)
            from .tasks import lm_window

            ids = torch.from_numpy(
                lm_window(self.tokenizer, segments * self.content_size, seed, index, t.split, t.noise_dir)
            )
            return {"input_ids": ids, "labels": ids.clone()}
        if self.config.algorithmic:  # the source fills `segments` segments; the target follows
            from .tasks import make_algorithmic_sample

            name = self.config.task_names[index % len(self.config.task_names)]
            options = {"vocab_size": t.vocab_size}
            if name == "associative":
                options |= {"key_size": t.key_size, "value_size": t.value_size}
            problem = make_algorithmic_sample(
                name, segments * self.content_size, seed, index, segment_size=self.content_size, **options
            )
            return {"input_ids": torch.from_numpy(problem.ids), "labels": torch.from_numpy(problem.labels)}
        full = 0 if no_noise else segments * self.content_size - self.reserve
        name = self.config.task_names[index % len(self.config.task_names)]
        placement = self.placement(index) if placement is None else placement
        options = {"training": training, "facts_first": placement == "start", "facts_apart": placement == "apart"}
        options["num_facts"] = t.num_facts
        if t.distinct_actors:
            options["distinct_actors"] = self._draw("distinct-actors", index).random() < t.distinct_actors
        for length in self.lengths(index, segments, seed, full):
            try:
                sample = make_sample(name, length, self.tokenizer, seed, index, t.split, t.noise_dir, **options)
            except ValueError as error:
                failure = error
                continue
            if length == full or placement != "start" or self.facts_in_first_segment(sample, segments):
                break
        else:
            raise ValueError(f"model.segment_size: {segments} segment(s) too short for task {t.name}: {failure}")
        if self.head == "classification":
            item = sample_item(sample, "class", answers=self.answers)
        else:
            item = sample_item(sample, "text", self.eos_id)
        if self.head == "masked-lm":  # the answer's positions are masked out of the input
            answer = item["labels"] != IGNORE_INDEX
            item["input_ids"] = item["input_ids"].masked_fill(answer, self.tokenizer.mask_token_id)
        if training and (o := self.config.optim).read_loss_weight + o.noise_write_weight:  # (read_supervision)
            from .read_supervision import read_codes

            codes = torch.zeros_like(item["input_ids"])  # [tokens]; a text target's answer is OTHER
            codes[: sample.num_tokens] = torch.from_numpy(read_codes(sample, self.config.optim.read_target))
            item["read_codes"] = codes
        return item

    def placement(self, index: int) -> str:
        """Where sample `index` puts its facts: "start" (`task.facts_first`), "apart" (`task.facts_apart`) or ""
        (the task's own). One draw decides both, so a fraction of one leaves the other's samples as they were."""
        first, apart = self.config.task.facts_first, self.config.task.facts_apart
        if not (first or apart):
            return ""
        draw = self._draw("facts-first", index).random()
        return "start" if draw < first else "apart" if draw < first + apart else ""

    def lengths(self, index: int, segments: int, seed: int, full: int) -> Iterator[int]:
        """The lengths to try for sample `index`, the first whose story fits taken, `full` last: with
        `curriculum.vary_fill` first `full` less a cut of 0 .. one segment less one, drawn per sample and seed (so
        validation draws its own), then halves of the cut (a long story may not fit the first). One segment and a
        story alone keep their length."""
        cut = 0
        if self.config.curriculum.vary_fill and segments >= 2 and full:
            cut = self._draw(f"fill:{seed}", index).randrange(self.content_size)
        while cut:
            yield full - cut
            cut //= 2
        yield full

    def facts_in_first_segment(self, sample, segments: int) -> bool:
        """Whether facts placed first all lie in the first of `segments` (a shorter sample may not leave room)."""
        facts = sample.story_tokens - (sample.num_tokens - sample.question_position)
        return facts <= sample.num_tokens - (segments - 1) * self.content_size

    def without_noise(self, index: int) -> bool:
        """Whether training sample `index` is its story alone (`curriculum.no_noise_fraction`)."""
        fraction = self.config.curriculum.no_noise_fraction
        if not fraction or self.lm or self.config.algorithmic:
            return False
        return self._draw("no-noise", index).random() < fraction

    def batch(
        self, indices: list[int], current: int, seed: int, vary: bool = True, placement: str | None = None
    ) -> dict[str, torch.Tensor]:
        from .tasks import collate

        if not vary:  # validation: every sample at `current` segments, in noise
            items = [self.item(i, current, seed, placement=placement) for i in indices]
        else:
            draw = self.segments_of  # training: lengths and noise drawn per sample, from the trainer's own stream
            items = [self.item(i, draw(i, current), seed, self.without_noise(i), training=True) for i in indices]
        batch = collate(items, pad_id=self.tokenizer.pad_token_id or 0)
        if "read_codes" in items[0]:
            batch["read_codes"] = torch.zeros_like(batch["input_ids"])  # [batch, max_len]
            for row, item in enumerate(items):
                batch["read_codes"][row, : len(item["read_codes"])] = item["read_codes"]
        return batch


def answer_correct(
    logits: torch.Tensor,  # [batch, classes] or [batch, width, vocab]: each row's last segment
    labels: torch.Tensor,  # [batch] class ids or [batch, length] token labels
    attention_mask: torch.Tensor,  # [batch, length]
    causal: bool,
    content_size: int,
    alignment: str,
    whole_input: bool = False,
) -> torch.Tensor:  # [batch] bool
    """Whether each row's answer is right: the class, or every answer token (teacher-forced argmax).

    `whole_input`: the logits cover every input position ([batch, length, vocab]), for answers that span several
    segments (the algorithmic tasks' targets); otherwise they are each row's last segment.
    """
    if labels.dim() == 1:
        return logits.argmax(-1) == labels
    if causal:
        labels = shift_labels(labels, attention_mask)
    if whole_input:
        scored = labels != IGNORE_INDEX
        return ((logits.argmax(-1) == labels) | ~scored).all(1)
    lengths = attention_mask.sum(1)
    correct = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    for row in range(labels.shape[0]):
        n = int(lengths[row])
        count = count_segments(n, content_size)
        kept = min(n, content_size) if alignment == "right" else n - (count - 1) * content_size
        target = labels[row, attention_mask[row].bool()][n - kept :]  # the row's last segment
        predicted = logits[row, :kept].argmax(-1)
        scored = target != IGNORE_INDEX
        correct[row] = bool((predicted[scored] == target[scored]).all())
    return correct
