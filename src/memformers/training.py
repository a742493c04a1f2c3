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
loss and accuracy, redrawn at every validation), `checkpoint-<step>/` (model/ loadable with `memformers.load`,
trainer.pt: optimizer, scheduler, stage, step, data position; rng-<rank>.pt: python/numpy/torch RNG states),
`best/` (highest stage, then accuracy) and `final/`.
Checkpoints are written to a hidden temporary folder and renamed into place, so a crash never leaves half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .files import fresh_folder, replace_folder, staging
from .precision import resolve_precision
from .segments import IGNORE_INDEX, shift_labels
from .training_config import (  # noqa: F401 (the config API is re-exported here)
    CHECKPOINT_PREFIX,
    EVAL_SEED_OFFSET,
    ModelConfig,
    TrainConfig,
    _fail,
    _flatten,
    _items,
    config_from_dict,
    load_config,
    parse_override,
    parse_segments,
    validate,
)

# --------------------------------------------------------------------------------------------------------------
# Model and data


def class_vocabulary(config: TrainConfig) -> tuple[str, ...]:
    """The classes a classifier answers with: the tasks' answers, or a saved classifier's own classes (in its order)
    where they cover them, so that a model trained on qa1-qa5 can go on with qa1 alone without a new head."""
    from .tasks import answer_vocabulary

    answers = answer_vocabulary(config.task_names)
    m = config.model
    if m.head != "classification" or m.backbone == "scratch":
        return answers
    folder = Path(m.backbone)
    saved = folder / "backbone" / "config.json" if (folder / "memformers.json").exists() else folder / "config.json"
    if not saved.is_file():
        return answers
    id2label = json.loads(saved.read_text()).get("id2label") or {}
    classes = tuple(id2label[key] for key in sorted(id2label, key=int))
    return classes if set(answers) <= set(classes) else answers


def build_model(config: TrainConfig):
    """The mechanism and tokenizer a config describes (weights drawn from `optim.seed` where they are new)."""
    from . import backbones
    from .tasks import get_tokenizer

    m = config.model
    tokenizer = get_tokenizer(config.tokenizer_name)
    answers = class_vocabulary(config)  # class i = answers[i], kept in the backbone's id2label
    labels = {"id2label": dict(enumerate(answers)), "label2id": {a: i for i, a in enumerate(answers)}}
    _seed_everything(config.optim.seed)
    if (Path(m.backbone) / "memformers.json").exists():  # a saved memformers model: train it further
        model = _continue_from(m, Path(m.backbone))
        _set_kernels(model.backbone, m)
        return _frozen_as_asked(model, m), tokenizer
    if m.backbone == "scratch":
        backbone = _scratch_backbone(m, tokenizer, labels)
    else:
        kwargs = {"num_labels": len(answers)} | labels if m.head == "classification" else {}
        backbone, _ = backbones.load(m.backbone, head=m.head, **kwargs)
    _set_kernels(backbone, m)
    from . import registry

    mechanism = registry.get(m.mechanism)
    config = m.mechanism_config()
    if m.head != "causal-lm":  # the task tokenizer's [CLS] and [SEP], for mechanisms whose layout has them
        special = {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
        config = dataclasses.replace(config, **{k: v for k, v in special.items() if k in config.knobs()})
    try:
        model = mechanism.model(backbone, config)
    except ValueError as error:
        raise ValueError(f"[model.{m.mechanism}] {error}") from None
    return _frozen_as_asked(model, m), tokenizer


def _set_kernels(backbone, m: ModelConfig) -> None:
    """`model.dropout` (pretrained or saved backbones: a scratch one is built with its own) and `model.attention`."""
    from . import backbones

    if m.dropout is not None:
        backbones.set_dropout(backbone, m.dropout)
    if m.attention is not None:
        backbones.set_attention(backbone, m.attention)


def _frozen_as_asked(model, m: ModelConfig):
    """`model.freeze_backbone`: only the mechanism's own weights train (the backbone is left as loaded)."""
    model.freeze_backbone = model.freeze_backbone or m.freeze_backbone
    return model


def _continue_from(m: ModelConfig, path: Path):
    """A model saved by `save_pretrained`, with the config's training knobs; its shape must match the config.

    The knobs that shape weights or segments (the config class's `fixed`) must equal the saved ones; those that
    only size a state (`resizable`: kNN/LongMem `memory_size`) and the driver's follow the config; the others stay
    as saved. To put a saved backbone into another mechanism, give its `backbone/` folder instead.
    """
    from . import registry
    from .saving import load

    model = load(path)
    mechanism = registry.get(m.mechanism)
    if not isinstance(model, mechanism.model):
        raise ValueError(
            f"model.mechanism = {m.mechanism!r}, but {path} holds a {type(model).__name__}; to wrap its backbone in "
            f"another mechanism set model.backbone = {str(path / 'backbone')!r}"
        )
    wanted, saved = m.mechanism_config().to_dict(), model.config_dict()
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in model.config.fixed:
        if wanted[key] is not None and wanted[key] != saved[key]:  # None: the backbone's default, as saved
            name = f"model.{key}" if key in top else f"model.{m.mechanism}.{key}"
            raise ValueError(f"{name} = {wanted[key]!r}, but the model saved in {path} has {saved[key]!r}")
    follow = (*model.config.resizable, "bptt_depth", "gradient_checkpointing")
    model.config = dataclasses.replace(model.config, **{key: getattr(m.mechanism_config(), key) for key in follow})
    return model


def _scratch_backbone(m: ModelConfig, tokenizer, labels: dict):
    import transformers

    s = m.scratch
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        intermediate_size=s.intermediate,
        max_position_embeddings=m.segment_size * (1 if s.family == "bert" else 2),  # a decoder's cache: 2 segments
        pad_token_id=tokenizer.pad_token_id,
    )
    if s.family == "bert":
        config = transformers.BertConfig(
            **common, hidden_dropout_prob=s.dropout, attention_probs_dropout_prob=s.dropout, **labels
        )
        cls = transformers.BertForSequenceClassification if m.head == "classification" else transformers.BertForMaskedLM
        return cls(config)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    config = transformers.LlamaConfig(
        **common, num_key_value_heads=s.heads, attention_dropout=s.dropout, bos_token_id=bos, eos_token_id=eos
    )
    return transformers.LlamaForCausalLM(config)


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
        if not self.config.curriculum.vary_segments:
            return current
        low = min(self.config.curriculum.min_segments, current)
        return random.Random(f"{self.config.task.seed}:segments:{index}").randint(low, current)

    def item(self, index: int, segments: int, seed: int, no_noise: bool = False) -> dict[str, torch.Tensor]:
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
        length = segments * self.content_size - self.reserve
        if no_noise:
            length = 0
        try:
            names = self.config.task_names
            sample = make_sample(names[index % len(names)], length, self.tokenizer, seed, index, t.split, t.noise_dir)
        except ValueError as error:
            raise ValueError(
                f"model.segment_size: {segments} segment(s) too short for task {t.name}: {error}"
            ) from None
        if self.head == "classification":
            return sample_item(sample, "class", answers=self.answers)
        item = sample_item(sample, "text", self.eos_id)
        if self.head == "masked-lm":  # the answer's positions are masked out of the input
            answer = item["labels"] != IGNORE_INDEX
            item["input_ids"] = item["input_ids"].masked_fill(answer, self.tokenizer.mask_token_id)
        return item

    def without_noise(self, index: int) -> bool:
        """Whether training sample `index` is its story alone (`curriculum.no_noise_fraction`)."""
        fraction = self.config.curriculum.no_noise_fraction
        if not fraction or self.lm or self.config.algorithmic:
            return False
        return random.Random(f"{self.config.task.seed}:no-noise:{index}").random() < fraction

    def batch(self, indices: list[int], current: int, seed: int, vary: bool = True) -> dict[str, torch.Tensor]:
        from .tasks import collate

        if not vary:  # validation: every sample at `current` segments, in noise
            items = [self.item(i, current, seed) for i in indices]
        else:
            items = [self.item(i, self.segments_of(i, current), seed, self.without_noise(i)) for i in indices]
        return collate(items, pad_id=self.tokenizer.pad_token_id or 0)


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
        count = -(-n // content_size)
        kept = min(n, content_size) if alignment == "right" else n - (count - 1) * content_size
        target = labels[row, attention_mask[row].bool()][n - kept :]  # the row's last segment
        predicted = logits[row, :kept].argmax(-1)
        scored = target != IGNORE_INDEX
        correct[row] = bool((predicted[scored] == target[scored]).all())
    return correct


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


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


# --------------------------------------------------------------------------------------------------------------
# Trainer

Callback = Callable[["Trainer", dict], None]


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    stage: int = 0  # index into the curriculum's segment counts
    stage_start: int = 0  # step at which the current stage began
    position: int = 0  # training samples consumed (the next sample's index)
    best: tuple[int, float] = (-1, -1.0)  # (stage, accuracy) of the best validation so far
    done: bool = False


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


class Trainer:
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
        self._pool: ThreadPoolExecutor | None = None  # builds the next training batch while a step runs
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

    # --- checkpoints ------------------------------------------------------------------------------------------

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

    def _load_trainer_state(self, path: Path) -> None:
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        state = trainer["state"]
        self.state = TrainState(**(state | {"best": tuple(state["best"])}))
        rng = path / f"rng-{self.accelerator.process_index}.pt"
        if trainer["num_processes"] == self.accelerator.num_processes and rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
        else:  # a different number of processes: dropout streams cannot be continued exactly
            _seed_everything(self.config.optim.seed + self.state.step + self.accelerator.process_index)
        if self.accelerator.is_main_process:  # drop what a killed run logged after this checkpoint
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.exists():
                lines = [line for line in metrics.read_text().splitlines() if line.strip()]
                kept = [line for line in lines if json.loads(line).get("step", 0) <= self.state.step]
                metrics.write_text("".join(line + "\n" for line in kept))

    # --- logging ----------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

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
        totals = torch.zeros(4, device=acc.device)  # loss sum, correct, samples, tokens
        for chunk in range(o.grad_accum):
            batch = self._training_batch(self.state.position, current, chunk)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            sync = chunk == o.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model), acc.autocast():
                out = self.model(**batch, logits=self._logits_mode)
                acc.backward(out.loss / o.grad_accum)
            rows = batch["input_ids"].shape[0]
            with torch.no_grad():
                correct = self._correct(out.logits, batch)
            totals += torch.tensor(
                [float(out.loss.detach()) * rows, float(correct.sum()), rows, float(batch["attention_mask"].sum())],
                device=acc.device,
            )
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
        loss, correct, samples, tokens = totals.tolist()
        return {
            "type": "train",
            "step": self.state.step,
            "stage": self.state.stage,
            "segments": current,
            "loss": loss / samples,
            "accuracy": correct / samples,
            "lr": self.scheduler.get_last_lr()[0],
            **({"memory_lr": self.scheduler.get_last_lr()[-1]} if self.config.optim.memory_lr is not None else {}),
            "grad_norm": norm,
            "tokens_per_s": tokens / seconds,
            "steps_per_s": 1 / seconds,
        }

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

    @torch.no_grad()
    def evaluate(self, segments: int | None = None) -> dict:
        """Accuracy and loss on fresh validation samples (own seed) of `segments` (default: the current stage)."""
        acc, c = self.accelerator, self.config.curriculum
        segments = segments or self.stages[self.state.stage]
        seed = self.config.task.eval_seed
        seed = self.config.task.seed + EVAL_SEED_OFFSET if seed is None else seed
        model = self.unwrapped
        was_training = model.training
        model.eval()
        mine = list(range(acc.process_index, c.eval_samples, acc.num_processes))
        if self.batches.lm:
            return self._evaluate_lm(mine, segments, seed, was_training)
        names = self.config.task_names
        totals = torch.zeros(3, device=acc.device)  # loss sum, correct, samples
        by_task = torch.zeros(2, len(names), device=acc.device)  # correct, samples of each task
        for i in range(0, len(mine), self.eval_batch):
            indices = mine[i : i + self.eval_batch]
            batch = self.batches.batch(indices, segments, seed, vary=False)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.autocast():
                out = model(**batch, logits=self._logits_mode)
            rows = batch["input_ids"].shape[0]
            correct = self._correct(out.logits, batch)
            totals += torch.tensor([float(out.loss) * rows, float(correct.sum()), rows], device=acc.device)
            tasks = torch.tensor([index % len(names) for index in indices], device=acc.device)  # as items cycle
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
        if len(names) > 1:  # which task lags, where several are learned together
            right, count = acc.reduce(by_task, reduction="sum").tolist()
            record["accuracy_by_task"] = {name: r / n for name, r, n in zip(names, right, count, strict=True) if n}
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

    def _after_step(self) -> None:
        """Validation, stage changes and the end of the run, decided at a step's end."""
        c, s = self.config.curriculum, self.state
        in_stage = s.step - s.stage_start
        budget_spent = in_stage >= c.max_steps_per_stage
        if not (budget_spent or (c.eval_every and in_stage % c.eval_every == 0)):
            if s.step >= self.config.total_steps:
                s.done = True
            return
        record = self.evaluate()
        self.log(record)
        self.draw_curves()
        if (s.stage, record["accuracy"]) > tuple(s.best):
            s.best = (s.stage, record["accuracy"])
            self.save_model(self.output_dir / "best")
        passed = record["accuracy"] >= c.threshold
        last = s.stage == len(self.stages) - 1
        if passed or budget_spent:
            reason = "threshold" if passed else "budget"
            if last and (budget_spent or c.stop_at_threshold):
                s.done = True
            elif not last:
                s.stage, s.stage_start = s.stage + 1, s.step
                self._apply_lr()  # a per-stage schedule restarts now, not one step late
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

    def train(self, stop_after_steps: int | None = None) -> Path:
        """Run (or continue) the curriculum; returns the `final` model folder (or the checkpoint when stopped)."""
        out, s = self.config.output, self.state
        bar, task = self._progress_bar()
        try:
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
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        task = bar.add_task("", total=self.config.total_steps, completed=self.state.step)
        bar.start()
        return bar, task


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
