"""Checkpoints of a training run and the RNG state they carry.

`checkpoint-<step>/` in the run's output folder: model/ (loadable with `memformers.load`), trainer.pt (optimizer,
scheduler, stage, step, data position), rng-<rank>.pt (python/numpy/torch RNG states). `best/` and `final/` hold
the model alone. Checkpoints are written to a hidden temporary folder and renamed into place, so a crash never
leaves half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputWarning
from .files import fresh_folder, replace_folder, staging
from .recurrence import restore_state, state_tensors
from .training_config import CHECKPOINT_PREFIX


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first (temporary folders are never listed)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    found = [p for p in found if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


@contextlib.contextmanager
def _quiet_saving():
    """No per-shard progress bar from transformers in the middle of the training bar."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    stage: int = 0  # index into the curriculum's segment counts
    stage_start: int = 0  # step at which the current stage began
    position: int = 0  # training samples consumed (the next sample's index)
    best: tuple[int, float] = (-1, -1.0)  # (stage, accuracy) of the best validation so far
    done: bool = False


class CheckpointMixin:
    """The `Trainer`'s checkpoints: the model alone, a whole checkpoint, and loading one back to resume. Mixed into
    `Trainer`, whose accelerator, config, state, model, optimizer and scheduler it saves and restores."""

    def extra(self) -> dict:
        """What `memformers.load` users need to rebuild the task's samples, saved in the model's config."""
        return {
            "task": self.config.task.name,
            "tokenizer": self.config.tokenizer_name,
            "head": self.config.model.head,
            "segments": self.stages[: self.state.stage + 1],
            "step": self.state.step,
            "mixed_precision": self.mixed_precision,
            "train_config": self.config.to_dict(),
        }

    def save_model(self, path: Path) -> Path:
        """The model alone (with its tokenizer), loadable with `memformers.load`; written atomically."""
        from .saving import save_pretrained

        if self.accelerator.is_main_process:
            with _quiet_saving():
                save_pretrained(self.unwrapped, path, self.tokenizer, self.extra())
        self.accelerator.wait_for_everyone()
        return path

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, RNG states, stage, step and data position, atomically."""
        from .saving import save_pretrained

        target = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        tmp = staging(target)
        if self.accelerator.is_main_process:
            fresh_folder(target)
        self.accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{self.accelerator.process_index}.pt")
        carried = {chunk: (state_tensors(state), rows) for chunk, (state, rows) in self._carried.items()}
        if carried and all(tensors is not None for tensors, _ in carried.values()):  # curriculum.carry_memory
            torch.save(carried, tmp / f"carried-{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            with _quiet_saving():
                save_pretrained(self.unwrapped, tmp / "model", self.tokenizer, self.extra())
            trainer = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": asdict(self.state),
                "num_processes": self.accelerator.num_processes,
            }
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "trainer.json").write_text(json.dumps({"state": asdict(self.state)} | self.extra(), indent=2))
            replace_folder(tmp, target)
            for old in checkpoints(self.output_dir)[: -self.config.output.keep_checkpoints]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return target

    def _load_weights(self, model, path: Path) -> None:
        from .saving import load

        model.load_state_dict(load(path / "model").state_dict())

    def _warn_changed_config(self, path: Path) -> None:
        """Say which settings differ from those the checkpoint was trained with: a resumed run goes on with
        today's config, which is how a setting is changed mid-run, and easy to do unawares."""
        from .training_config_parsing import _flatten

        saved = json.loads((path / "trainer.json").read_text()).get("train_config")
        if saved is None:
            return
        defaults = _flatten(type(self.config)().to_dict())  # a key newer than the checkpoint: it trained as default
        before, now = defaults | _flatten(saved), _flatten(self.config.to_dict())
        changed = [f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
                   if k != "output.dir" and before.get(k) != now.get(k)]  # fmt: skip
        if changed:
            message = f"resuming {path.name} with settings it was not trained with: " + "; ".join(changed)
            warnings.warn(message, InputWarning, stacklevel=2)

    def _reopen_if_budget_left(self, path: Path) -> None:
        """A finished run goes on when today's config gives it steps it did not have (a larger
        curriculum.max_steps_per_stage or optim.total_steps), and says either way what it does: raising the budget
        is how a user extends a run whose curve was still moving."""
        c, s = self.config.curriculum, self.state
        in_stage = s.step - s.stage_start
        reached = c.stop_at_threshold and s.best[0] == s.stage and s.best[1] >= c.threshold
        if in_stage < c.max_steps_per_stage and s.step < self.config.total_steps and not reached:
            s.done = False
            message = (
                f"{path.name} is the end of a finished run; today's settings give it more steps: continuing from step "
                f"{s.step} to at most {min(self.config.total_steps, s.stage_start + c.max_steps_per_stage)}"
            )
        else:
            message = (
                f"{path.name} is the end of a finished run (step {s.step}): nothing to train; raise "
                "curriculum.max_steps_per_stage or optim.total_steps to go on"
            )
        if self.accelerator.is_main_process:
            warnings.warn(message, InputWarning, stacklevel=2)

    def _load_trainer_state(self, path: Path) -> None:
        if self.accelerator.is_main_process:
            self._warn_changed_config(path)
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        state = trainer["state"]
        self.state = TrainState(**(state | {"best": tuple(state["best"])}))
        if self.state.done:
            self._reopen_if_budget_left(path)
        rng = path / f"rng-{self.accelerator.process_index}.pt"
        if trainer["num_processes"] == self.accelerator.num_processes and rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
        else:  # a different number of processes: dropout streams cannot be continued exactly
            _seed_everything(self.config.optim.seed + self.state.step + self.accelerator.process_index)
        carried = path / f"carried-{self.accelerator.process_index}.pt"
        if trainer["num_processes"] == self.accelerator.num_processes and carried.exists():  # the rows' memories
            saved = torch.load(carried, map_location="cpu", weights_only=True)
            for chunk, (tensors, rows) in saved.items():
                self._carried[chunk] = (restore_state(self.unwrapped.init_state(rows), tensors), rows)
        if self.accelerator.is_main_process:  # drop what a killed run logged after this checkpoint
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.exists():
                lines = [line for line in metrics.read_text().splitlines() if line.strip()]
                kept = [line for line in lines if json.loads(line).get("step", 0) <= self.state.step]
                metrics.write_text("".join(line + "\n" for line in kept))
