"""Curriculum training of a memory model on the long-context tasks, on one CPU, one GPU or several processes.

Why a curriculum: a recurrent memory learns to write and read on one segment first; each added segment only asks
it to keep what it already knows for longer (RMT papers: 1 → 2 → 3 → 5 → 7 segments). The trainer moves to the
next segment count when validation accuracy passes a threshold or the stage's step budget runs out.

Built on Accelerate: `memformers train CONFIG.toml` runs as is on a CPU or a GPU, and under `accelerate launch`
(or any torchrun-style RANK/WORLD_SIZE environment) on several processes. `optim.batch_size` is the *global* batch
per optimizer step; sample `i` of the run is the same sample whatever the number of processes, so a run on k
processes follows the single-process run up to float rounding. The config's keys are documented in
`memformers.training_config`.

Output folder: `metrics.jsonl` (one JSON object per logging step, validation and stage change), `curves.png` (its
loss and accuracy, redrawn at every validation), `checkpoint-<step>/` (see `memformers.training_checkpoints`),
`best/` (highest stage, then accuracy) and `final/`.

Beside the `Trainer` and `train`, one module a concept: `training_config`, `training_config_parsing` (a file and
overrides into a checked config), `training_model` (the model a config describes), `training_data` (the samples;
which answers are right), `training_checkpoints`, `training_validation`. What callers use of them is re-exported
here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .precision import resolve_precision
from .segments import IGNORE_INDEX, count_segments, shift_labels
from .training_checkpoints import (  # noqa: F401 (re-exported here)
    CheckpointMixin,
    TrainState,
    _seed_everything,
    checkpoints,
    latest_checkpoint,
    rng_state,
    set_rng_state,
)
from .training_config import (  # noqa: F401 (the config API is re-exported here)
    CHECKPOINT_PREFIX,
    EVAL_SEED_OFFSET,
    ModelConfig,
    TrainConfig,
    parse_segments,
)
from .training_config_parsing import (  # noqa: F401 (re-exported here)
    _fail,
    _flatten,
    _items,
    config_from_dict,
    load_config,
    parse_override,
    validate,
)
from .training_data import TaskBatches, answer_correct
from .training_model import build_model, class_vocabulary  # noqa: F401 (class_vocabulary: re-exported here)
from .training_validation import ValidationMixin

Callback = Callable[["Trainer", dict], None]


def _usable_precision(requested: str, on_cpu: bool) -> str:
    """The precision to train in: bf16 on a CPU without bf16 instructions would only be slower, so fp32 instead
    (`memformers.precision` decides, and says so in one warning)."""
    if requested == "bf16" and on_cpu:
        return "bf16" if resolve_precision("bf16", "cpu", "optim.mixed_precision") == "bf16" else "no"
    return requested


def _fusable(groups: list[dict]) -> bool:
    """Whether torch's fused AdamW takes these weights: floating point, on the CPU or a GPU."""
    weights = [w for group in groups for w in group["params"]]
    return all(w.is_floating_point() and w.device.type in ("cpu", "cuda") for w in weights)


NO_LOSS = (torch.zeros(()), 0)  # an auxiliary loss not computed: its value and how many terms it counted


class Trainer(CheckpointMixin, ValidationMixin):
    """Runs the curriculum of a `TrainConfig`. `callbacks` are called as `fn(trainer, record)` after every step."""

    def __init__(
        self,
        config: TrainConfig,
        callbacks: list[Callback] | None = None,
        progress: bool = True,
        resume: bool | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.callbacks = list(callbacks or [])
        c, o = config.curriculum, config.optim
        self.mixed_precision = _usable_precision(o.mixed_precision, on_cpu=o.cpu or not torch.cuda.is_available())
        self.accelerator = Accelerator(cpu=o.cpu, mixed_precision=self.mixed_precision)
        world = self.accelerator.num_processes
        if o.batch_size % (o.grad_accum * world):
            _fail("optim.batch_size", o.batch_size, f"a multiple of grad_accum × processes = {o.grad_accum * world}")
        self.micro_batch = o.batch_size // (o.grad_accum * world)
        self.eval_batch = c.eval_batch_size or self.micro_batch
        self.stages = config.stages
        self.output_dir = config.output_dir
        self.progress = progress and self.accelerator.is_main_process
        self.state = TrainState()
        self._carried: dict[int, tuple] = {}  # curriculum.carry_memory: per micro-batch, (state its rows left, rows)
        self._pool: ThreadPoolExecutor | None = None  # builds the next training batch while a step runs
        self._bar = None  # the progress bar while `train` runs (when `progress`)
        self._pending: dict[tuple[int, int, int], Future] = {}

        model, self.tokenizer = build_model(config)
        self.batches = TaskBatches(config, self.tokenizer, model.content_size)
        found = latest_checkpoint(self.output_dir)
        if resume and found is None:
            raise ValueError(f"resume: no checkpoint in {self.output_dir} to resume from")
        self.resumed_from = found if resume is not False else None
        if self.resumed_from is not None:
            self._load_weights(model, self.resumed_from)
        elif self.accelerator.is_main_process:
            self._clear_output()
        if self.accelerator.is_main_process and self.output_dir.is_dir():  # leftovers of a crash mid-save
            for leftover in self.output_dir.glob(f".{CHECKPOINT_PREFIX}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.model = self.accelerator.prepare(model)
        groups = self._param_groups(model)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, fused=o.fused_adamw and _fusable(groups))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.resumed_from is not None:
            self._load_trainer_state(self.resumed_from)
        else:
            _seed_everything(o.seed + self.accelerator.process_index)

    # --- set-up -----------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _param_groups(self, model) -> list[dict]:
        """No weight decay on biases, norms and what the mechanism exempts (`no_weight_decay`); `memory_lr` for its own
        weights (everything outside the backbone), when set."""
        o = self.config.optim
        split_lr = o.memory_lr is not None
        groups = {(own, decays): [] for own in ((False, True) if split_lr else (False,)) for decays in (True, False)}
        no_decay = model.no_weight_decay()
        for name, parameter in model.trainable_parameters():
            own = split_lr and not name.startswith("backbone.")
            decays = parameter.dim() >= 2 and name not in no_decay
            groups[own, decays].append(parameter)
        if not any(groups.values()):
            raise ValueError("model.freeze_backbone: nothing left to train (the mechanism has no weights of its own)")
        return [
            {"params": params, "weight_decay": o.weight_decay if decays else 0.0, "lr": o.memory_lr if own else o.lr}
            for (own, decays), params in groups.items()
        ]

    def _lr_factor(self, step: int) -> float:
        o = self.config.optim
        if o.schedule == "per-stage":
            step, total = step - self.state.stage_start, self.config.curriculum.max_steps_per_stage
        else:
            total = self.config.total_steps
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - o.warmup_steps))

    def _apply_lr(self) -> None:
        factor = self._lr_factor(self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor

    def _clear_output(self) -> None:
        """A fresh run: old checkpoints and metrics of this folder would mix with the new ones."""
        for path in checkpoints(self.output_dir):
            shutil.rmtree(path)
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.exists():
            metrics.unlink()

    # --- logging ----------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self._bar is not None and record["type"] != "train":  # the bar shows training; milestones get a line
            self._bar.console.print(_describe_milestone(record))

    def draw_curves(self) -> Path | None:
        """`curves.png` beside `metrics.jsonl`: loss and accuracy against the step, redrawn at every validation."""
        from .plots import read_metrics, training_curves

        if not self.accelerator.is_main_process:
            return None
        title = f"{self.config.model.mechanism} on {self.config.task.name}"
        return training_curves(read_metrics(self.output_dir), self.output_dir / "curves.png", title=title)

    # --- the loop ---------------------------------------------------------------------------------------------

    def _shard(self, start: int, count: int, chunk: int) -> list[int]:
        """This process's `chunk`-th micro-batch of the samples [start, start + count)."""
        size = count // (self.config.optim.grad_accum * self.accelerator.num_processes)
        first = start + (chunk * self.accelerator.num_processes + self.accelerator.process_index) * size
        return list(range(first, first + size))

    def train_step(self) -> dict:
        """One optimizer step on the global batch at the data position; returns the step's metrics."""
        o, acc = self.config.optim, self.accelerator
        current = self.stages[self.state.stage]
        start = time.perf_counter()
        self.model.train()
        totals = torch.zeros(8, device=acc.device)  # loss, correct, samples, tokens; read, noise-write loss and count
        longest = 0  # segments of this step's longest row: below the stage's count when lengths vary
        for chunk in range(o.grad_accum):
            batch = self._training_batch(self.state.position, current, chunk)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            codes = batch.pop("read_codes", None)
            rows = batch["input_ids"].shape[0]
            longest = max(longest, count_segments(batch["input_ids"].shape[1], self.unwrapped.content_size))
            sync = chunk == o.grad_accum - 1
            recording = contextlib.nullcontext() if codes is None else self.unwrapped.recording_reads()
            with contextlib.nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                with recording as record:
                    out = self.model(**batch, state=self._starting_memory(chunk, rows), logits=self._logits_mode)
                if self.config.curriculum.carry_memory:
                    self._carried[chunk] = (out.state.detach(), rows)
                loss, (read_loss, counted), (noise_loss, noise_counted) = out.loss, NO_LOSS, NO_LOSS
                if codes is not None:
                    (read_loss, counted), (noise_loss, noise_counted) = self._read_losses(record, codes, batch)
                    loss = loss + o.read_loss_weight * read_loss + o.noise_write_weight * noise_loss
                acc.backward(loss / o.grad_accum)
            with torch.no_grad():
                correct = self._correct(out.logits, batch)
            step_totals = [
                float(out.loss.detach()) * rows,
                float(correct.sum()),
                rows,
                float(batch["attention_mask"].sum()),
            ]
            step_totals += [float(read_loss.detach()) * counted, counted]
            step_totals += [float(noise_loss.detach()) * noise_counted, noise_counted]
            totals += torch.tensor(step_totals, device=acc.device)
        if o.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.max_grad_norm))
        else:
            norm = float("nan")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals = acc.reduce(totals, reduction="sum")
        self.state.step += 1
        self.state.position += o.batch_size
        seconds = time.perf_counter() - start
        loss, correct, samples, tokens, read_loss, counted, noise_loss, noise_counted = totals.tolist()
        read = {"read_loss": read_loss / counted} if counted else {}
        if noise_counted:
            read["noise_write_loss"] = noise_loss / noise_counted
        return {
            "type": "train",
            "step": self.state.step,
            "stage": self.state.stage,
            "segments": current,
            "batch_segments": longest,
            "loss": loss / samples,
            "accuracy": correct / samples,
            "lr": self.scheduler.get_last_lr()[0],
            **({"memory_lr": self.scheduler.get_last_lr()[-1]} if self.config.optim.memory_lr is not None else {}),
            **read,
            "grad_norm": norm,
            "tokens_per_s": tokens / seconds,
            "steps_per_s": 1 / seconds,
        }

    def _starting_memory(self, chunk: int, rows: int):
        """The state micro-batch `chunk` starts from: None (empty) unless `curriculum.carry_memory`, else the state
        the previous step's micro-batch in its place left, each row emptied with chance 1 − carry_memory (drawn
        from the seed and the step, so a run draws the same ones again)."""
        carried, carried_rows = self._carried.get(chunk, (None, 0))
        if carried is None or carried_rows != rows:
            return None
        draw = torch.Generator().manual_seed((self.seed * 1_000_003 + self.state.step) * 64 + chunk)
        empty = torch.rand(rows, generator=draw) >= self.config.curriculum.carry_memory  # [rows]
        return carried.reset(empty.to(self.accelerator.device))

    def _read_losses(self, record: list, codes: torch.Tensor, batch: dict) -> tuple[tuple, tuple]:
        """The read-share and noise-write losses of the pass just recorded (`memformers.read_supervision`; each 0
        where its weight is), each with how many terms it counted."""
        from .read_supervision import noise_write_loss, read_share_loss

        m, o = self.unwrapped, self.config.optim
        layout = (batch["input_ids"], batch["attention_mask"], m.content_size, m.alignment, m.prefix)
        read = read_share_loss(record, codes, *layout) if o.read_loss_weight else NO_LOSS
        threshold = m.config.write_threshold
        noise = (
            noise_write_loss(record, codes, *layout, threshold, o.noise_write_mean) if o.noise_write_weight else NO_LOSS
        )
        return read, noise

    def _make_batch(self, position: int, current: int, chunk: int) -> dict[str, torch.Tensor]:
        return self.batches.batch(self._shard(position, self.config.optim.batch_size, chunk), current, self.seed)

    def _training_batch(self, position: int, current: int, chunk: int) -> dict[str, torch.Tensor]:
        """The micro-batch `chunk` at `position`; with `optim.prefetch` the next one is built meanwhile, in a
        thread (samples depend only on their index, so a batch built ahead is the same batch)."""
        o = self.config.optim
        future = self._pending.pop((position, current, chunk), None)
        batch = future.result() if future is not None else self._make_batch(position, current, chunk)
        if o.prefetch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="memformers-batches")
            following = (position, current, chunk + 1)
            if chunk + 1 == o.grad_accum:
                following = (position + o.batch_size, current, 0)
            self._pending = {following: self._pool.submit(self._make_batch, *following)}  # a stage change drops it
        return batch

    @property
    def seed(self) -> int:
        return self.config.task.seed

    def _correct(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        m = self.unwrapped
        if self.batches.lm:  # per row, the fraction of its last segment's next tokens predicted by argmax
            targets = shift_labels(batch["labels"], batch["attention_mask"])[:, -logits.shape[1] :]
            scored = targets != IGNORE_INDEX
            hits = (logits.argmax(-1) == targets) & scored
            return hits.sum(1) / scored.sum(1).clamp(min=1)
        whole = self.config.algorithmic
        labels, mask = batch["labels"], batch["attention_mask"]
        return answer_correct(logits, labels, mask, m.causal, m.content_size, m.alignment, whole_input=whole)

    @property
    def _logits_mode(self) -> str:
        """Algorithmic targets span many segments: score them on every position; language modelling on the last
        segment; answers where labelled only (the LM head then skips every other position, most of the work)."""
        if self.config.algorithmic:
            return "all"
        return "last" if self.batches.lm else "labelled"

    def _after_step(self) -> None:
        """Validation, stage changes and the end of the run, decided at a step's end."""
        c, s = self.config.curriculum, self.state
        in_stage = s.step - s.stage_start
        budget_spent = in_stage >= c.max_steps_per_stage
        long_every = c.eval_long_every or c.eval_every
        if c.eval_long_segments and s.step % long_every == 0:  # watched, not acted on: logged apart
            task_placement = c.eval_long_placement == "task"
            record = self.evaluate(c.eval_long_segments, c.eval_long_samples, "" if task_placement else None)
            self.log(record | {"type": "eval_long", "placement": c.eval_long_placement})
        if not (budget_spent or (c.eval_every and in_stage % c.eval_every == 0)):
            if s.step >= self.config.total_steps:
                s.done = True
            return
        record = self._validate_and_keep_best()
        passed = record["accuracy"] >= c.threshold
        last = s.stage == len(self.stages) - 1
        if passed or budget_spent:
            reason = "threshold" if passed else "budget"
            if last and (budget_spent or c.stop_at_threshold):
                s.done = True
            elif not last:
                s.stage, s.stage_start = s.stage + 1, s.step
                self._apply_lr()  # a per-stage schedule restarts now, not one step late
            if s.done or not last:  # the last stage going on past its threshold changes nothing
                self.log(
                    {
                        "type": "stage",
                        "step": s.step,
                        "reason": reason,
                        "accuracy": record["accuracy"],
                        "segments": self.stages[s.stage],
                        "done": s.done,
                    }
                )
        if s.step >= self.config.total_steps:
            s.done = True

    def _validate_and_keep_best(self) -> dict:
        """Validate at the stage's length, log and draw it, and keep the model as `best/` where it beats the best
        so far (a later stage beats any earlier one)."""
        s = self.state
        record = self.evaluate()
        self.log(record)
        self.draw_curves()
        if (s.stage, record["accuracy"]) > tuple(s.best):
            s.best = (s.stage, record["accuracy"])
            self.save_model(self.output_dir / "best")
        return record

    def train(self, stop_after_steps: int | None = None) -> Path:
        """Run (or continue) the curriculum; returns the `final` model folder (or the checkpoint when stopped)."""
        out, s = self.config.output, self.state
        bar, task = self._progress_bar()
        self._bar = bar
        try:
            # the model a fresh run starts from (a resumed run has its record); it moves no stage
            if s.step == 0 and self.config.curriculum.eval_at_start:
                self._validate_and_keep_best()
            while not s.done:
                if stop_after_steps is not None and s.step >= stop_after_steps:
                    return self.save_checkpoint()
                record = self.train_step()
                if s.step % out.log_every == 0 or s.step >= self.config.total_steps:
                    self.log(record)
                self._after_step()
                if bar is not None:
                    bar.update(task, completed=s.step, description=_describe(record, self.stages[s.stage]))
                for callback in self.callbacks:
                    callback(self, record)
                if out.checkpoint_every and s.step % out.checkpoint_every == 0 and not s.done:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.stop()
                self._bar = None
            self.close()
        self.save_checkpoint()
        return self.save_model(self.output_dir / "final")

    def close(self) -> None:
        """Stop the thread that builds batches ahead (`train` does it; callers of `train_step` do it themselves)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool, self._pending = None, {}

    def _progress_bar(self):
        if not self.progress:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        from .progress import LoggedProgress

        bar = LoggedProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        task = bar.add_task("", total=self.config.total_steps, completed=self.state.step)
        bar.start()
        return bar, task


def _describe_milestone(record: dict) -> str:
    """One line for a validation, a long validation or a stage's end, as metrics.jsonl records it."""
    step, accuracy = record["step"], f"{100 * record['accuracy']:.1f}%"
    if record["type"] == "stage":
        then = "done" if record["done"] else f"next stage: {record['segments']} segments"
        return f"step {step}: stage ends ({record['reason']}) at {accuracy}; {then}"
    by_task = record.get("accuracy_by_task") or {}
    tasks = f" ({' · '.join(f'{task} {100 * value:.0f}%' for task, value in by_task.items())})" if by_task else ""
    what = "long validation" if record["type"] == "eval_long" else "validation"
    perplexity = f", perplexity {record['perplexity']:.2f}" if "perplexity" in record else ""  # task lm
    return (
        f"step {step}: {what} at {record['segments']} segments {accuracy}{tasks}, loss {record['loss']:.3f}{perplexity}"
    )


def _describe(record: dict, segments: int) -> str:
    return (
        f"loss {record['loss']:.3f} · acc {record['accuracy']:.2f} · {segments} seg · "
        f"{record['tokens_per_s']:,.0f} tok/s"
    )


def train(
    config: TrainConfig | str | os.PathLike,
    overrides: list[str] | dict | None = None,
    callbacks: list[Callback] | None = None,
    progress: bool = True,
    resume: bool | None = None,
    stop_after_steps: int | None = None,
) -> Path:
    """Train from a config (object or TOML path). `resume=None` continues from the output folder's latest
    checkpoint when there is one; True requires one; False starts afresh (clearing old checkpoints)."""
    if not isinstance(config, TrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = load_config(None, _flatten(config.to_dict()) | dict(_items(overrides)))
    trainer = Trainer(config, callbacks=callbacks, progress=progress, resume=resume)
    return trainer.train(stop_after_steps=stop_after_steps)
