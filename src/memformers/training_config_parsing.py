"""Reading a training config: a TOML file and `section.key=value` overrides into a checked `TrainConfig`.

Why apart from `training_config`: that module is the record (the dataclasses, their defaults, the keys'
documentation) that the rest of training reads; this one is the way in, run once before anything is built.
Unknown keys and wrong types fail with the key's full name (`_section`), then every value the trainer cannot use
does (`validate`). It imports the record; the record never imports it.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .read_supervision import NOISE_WRITE_MEANS, READ_TARGETS
from .training_config import (
    CurriculumConfig,
    ModelConfig,
    OptimConfig,
    OutputConfig,
    ScratchConfig,
    TaskConfig,
    TrainConfig,
    parse_segments,
)

HEADS = ("classification", "causal-lm", "masked-lm")
FAMILIES = ("bert", "llama")
SCHEDULES = ("global", "per-stage", "constant")
PRECISIONS = ("no", "bf16")
ALIGNMENTS = ("left", "right")
EVAL_LONG_PLACEMENTS = ("training", "task")


def _fail(key: str, value, allowed: str) -> None:
    raise ValueError(f"{key} must be {allowed}, got {value!r}")


def _check_type(key: str, value, kind: type) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        _fail(key, value, f"a {kind.__name__}")


_TYPES = {
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "str | None": str,
    "int | None": int,
    "float | None": float,
    "list[int] | str": (list, str),
    "list[int]": (list,),
    "int | list[int] | None": object,  # checked by its own validator
}
_SUBSECTIONS = {"ScratchConfig": ScratchConfig}


def _is_mechanism(name: str) -> bool:
    from .registry import MECHANISMS

    return name in MECHANISMS


def _section(cls, data: dict, prefix: str):
    """A config section from a dict: unknown keys and wrong types fail with the key's full name."""
    if not isinstance(data, dict):
        _fail(prefix, data, "a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if cls is ModelConfig and _is_mechanism(key):  # [model.<mechanism>]: checked by its config class
            if not isinstance(value, dict):
                _fail(name, value, "a table")
            values.setdefault("knobs", {})[key] = dict(value)
            continue
        if key not in known or key == "knobs":
            raise ValueError(f"{name}: unknown key; allowed keys of [{prefix}]: {sorted(known)}")
        kind = known[key].type
        if kind in _SUBSECTIONS:
            values[key] = _section(_SUBSECTIONS[kind], value, name)
            continue
        expected = _TYPES[kind]
        if isinstance(expected, tuple):
            ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not isinstance(value, expected) or (kind == "list[int]" and not ints):
                _fail(name, value, "a list of ints" if kind == "list[int]" else "a list of ints or a rule string")
        else:
            _check_type(name, value, expected)
        values[key] = float(value) if expected is float else value
    return cls(**values)


def config_from_dict(data: dict) -> TrainConfig:
    """A validated `TrainConfig` from nested dicts (a parsed TOML file)."""
    sections = {"model": ModelConfig, "task": TaskConfig, "curriculum": CurriculumConfig}
    sections |= {"optim": OptimConfig, "output": OutputConfig}
    for key in data:
        if key not in sections:
            raise ValueError(f"{key}: unknown config section; allowed: {sorted(sections)}")
    config = TrainConfig(**{key: _section(cls, data.get(key, {}), key) for key, cls in sections.items()})
    validate(config)
    return config


def _check_num_facts(value, names: list[str]) -> None:
    """task.num_facts: what the story generator draws for every task named (`babi.fact_range`, one rule)."""
    from .tasks.babi import fact_range

    for name in names:
        try:
            fact_range(name, value)
        except ValueError as error:  # "num_facts must be …" / "num_facts is for tasks …", named as the config does
            raise ValueError(f"task.{error}") from None


def _check_distinct_actors(num_facts, names: list[str]) -> None:
    """task.distinct_actors: qa1 alone, and no story longer than its cast (each sentence moves another actor)."""
    from .tasks.babi import ACTORS, fact_range

    if names != ["qa1"] * len(names):
        raise ValueError(f"task.distinct_actors is for qa1 alone, got task {','.join(names)!r}")
    most = fact_range("qa1", num_facts)[1]
    if most > len(ACTORS):
        raise ValueError(
            f"task.distinct_actors: stories of up to {most} facts need as many actors; set task.num_facts to at most "
            f"{len(ACTORS)} (qa1's actors), e.g. [2, 3]"
        )


def validate(config: TrainConfig) -> None:
    """Fail early, naming the key, on values the trainer cannot use."""
    from .tasks import TASKS

    m, s, t, c, o, out = config.model, config.model.scratch, config.task, config.curriculum, config.optim, config.output
    if m.head not in HEADS:
        _fail("model.head", m.head, f"one of {HEADS}")
    _validate_mechanism(m)
    if m.segment_size < 2:
        _fail("model.segment_size", m.segment_size, "an int ≥ 2")
    if m.bptt_depth is not None and m.bptt_depth < 0:
        _fail("model.bptt_depth", m.bptt_depth, "an int ≥ 0 (leave it out for full back-propagation)")
    if m.alignment not in ALIGNMENTS:
        _fail("model.alignment", m.alignment, f"one of {ALIGNMENTS}")
    if s.family not in FAMILIES:
        _fail("model.scratch.family", s.family, f"one of {FAMILIES}")
    for key in ("layers", "hidden", "heads", "intermediate"):
        if getattr(s, key) < 1:
            _fail(f"model.scratch.{key}", getattr(s, key), "an int ≥ 1")
    if s.hidden % s.heads:
        _fail("model.scratch.hidden", s.hidden, f"a multiple of model.scratch.heads={s.heads}")
    if not 0 <= s.dropout < 1:
        _fail("model.scratch.dropout", s.dropout, "in [0, 1)")
    if m.backbone == "scratch" and (m.head == "causal-lm") != (s.family == "llama"):
        _fail("model.scratch.family", s.family, "'llama' for head 'causal-lm' and 'bert' for the other heads")
    names = config.task_names
    if not names or any(name not in TASKS for name in names):
        _fail("task.name", t.name, f"one or more (comma-separated) of {list(TASKS)}")
    if len({TASKS[name].kind for name in names}) != 1:  # bAbI tasks share one class vocabulary: their union
        _fail("task.name", t.name, "tasks of one kind (qa1,qa2,qa3,qa4,qa5; memorize,detect,reason; copy,reverse)")
    if "lm" in names and (names != ["lm"] or m.head != "causal-lm"):
        _fail(
            "task.name" if names != ["lm"] else "model.head",
            t.name if names != ["lm"] else m.head,
            "task 'lm' alone, with head 'causal-lm'",
        )
    if config.algorithmic:
        if m.head != "causal-lm":
            _fail("model.head", m.head, f"'causal-lm' for the algorithmic task {t.name!r} (its target is a sequence)")
        from .tasks.algorithmic import SYMBOLS

        if not 2 <= t.vocab_size <= len(SYMBOLS):
            _fail("task.vocab_size", t.vocab_size, f"an int in [2, {len(SYMBOLS)}]")
        for key in ("key_size", "value_size"):
            if getattr(t, key) < 1:
                _fail(f"task.{key}", getattr(t, key), "an int ≥ 1")
    for key in ("facts_first", "facts_apart"):
        if not 0 <= getattr(t, key) <= 1:
            _fail(f"task.{key}", getattr(t, key), "a number in [0, 1]")
    if t.facts_first + t.facts_apart > 1:
        _fail("task.facts_apart", t.facts_apart, f"at most 1 - task.facts_first = {1 - t.facts_first:g}")
    if t.num_facts is not None:
        _check_num_facts(t.num_facts, names)
    if not 0 <= t.distinct_actors <= 1:
        _fail("task.distinct_actors", t.distinct_actors, "a number in [0, 1]")
    if t.distinct_actors:
        _check_distinct_actors(t.num_facts, names)
    if t.split not in ("train", "test", "all"):
        _fail("task.split", t.split, "one of ('train', 'test', 'all')")
    parse_segments(c.segments)
    if not 0 <= c.threshold <= 1:
        _fail("curriculum.threshold", c.threshold, "in [0, 1]")
    for key, value, low in (
        ("curriculum.max_steps_per_stage", c.max_steps_per_stage, 1),
        ("curriculum.min_segments", c.min_segments, 1),
        ("curriculum.eval_every", c.eval_every, 0),
        ("curriculum.eval_samples", c.eval_samples, 1),
        ("curriculum.eval_long_segments", c.eval_long_segments, 0),
        ("curriculum.eval_long_every", c.eval_long_every, 0),
        ("curriculum.eval_long_samples", c.eval_long_samples, 1),
        ("optim.warmup_steps", o.warmup_steps, 0),
        ("optim.total_steps", o.total_steps, 0),
        ("optim.batch_size", o.batch_size, 1),
        ("optim.grad_accum", o.grad_accum, 1),
        ("output.checkpoint_every", out.checkpoint_every, 0),
        ("output.keep_checkpoints", out.keep_checkpoints, 1),
        ("output.log_every", out.log_every, 1),
    ):
        if value < low:
            _fail(key, value, f"an int ≥ {low}")
    if c.vary_per not in ("sample", "batch"):
        _fail("curriculum.vary_per", c.vary_per, "one of ('sample', 'batch')")
    if c.vary_fill and (config.algorithmic or config.task_names == ["lm"]):
        _fail("curriculum.vary_fill", c.vary_fill, "false for algorithmic tasks and lm (their lengths are fixed)")
    if not 0 <= c.no_noise_fraction <= 1:
        _fail("curriculum.no_noise_fraction", c.no_noise_fraction, "a number in [0, 1]")
    if not (isinstance(c.carry_memory, int | float) and 0 <= c.carry_memory < 1):
        _fail("curriculum.carry_memory", c.carry_memory, "a number in [0, 1) (the chance a row keeps its memory)")
    if c.eval_long_segments and not (c.eval_long_every or c.eval_every):
        _fail("curriculum.eval_long_every", c.eval_long_every, "an int ≥ 1 where curriculum.eval_every is 0")
    if c.eval_long_placement not in EVAL_LONG_PLACEMENTS:
        _fail("curriculum.eval_long_placement", c.eval_long_placement, f"one of {EVAL_LONG_PLACEMENTS}")
    if c.eval_batch_size is not None and c.eval_batch_size < 1:
        _fail("curriculum.eval_batch_size", c.eval_batch_size, "an int ≥ 1")
    if not (o.lr > 0 and math.isfinite(o.lr)):
        _fail("optim.lr", o.lr, "a positive number")
    if o.memory_lr is not None and not (o.memory_lr > 0 and math.isfinite(o.memory_lr)):
        _fail("optim.memory_lr", o.memory_lr, "a positive number (leave it out to use optim.lr)")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        _fail("model.dropout", m.dropout, "a number in [0, 1) (leave it out to keep the backbone's)")
    if m.dropout is not None and m.backbone == "scratch":
        _fail("model.dropout", m.dropout, "left out for a scratch backbone: set [model.scratch] dropout")
    if m.attention is not None and m.attention not in ("eager", "sdpa"):
        _fail("model.attention", m.attention, "'eager' or 'sdpa' (leave it out to keep the backbone's)")
    depth = m.keep_layers
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        _fail("model.keep_layers", depth, "an int ≥ 1 (leave it out to keep every block)")
    if depth is not None and (m.backbone == "scratch" or (Path(m.backbone) / "memformers.json").exists()):
        _fail("model.keep_layers", depth, "left out for a scratch backbone or a saved memformers model")
    if m.freeze_backbone and m.mechanism == "rmt" and m.num_memory_tokens == 0:
        _fail("model.freeze_backbone", True, "false when there is no memory to train (model.num_memory_tokens = 0)")
    if o.weight_decay < 0:
        _fail("optim.weight_decay", o.weight_decay, "≥ 0")
    if o.max_grad_norm < 0:
        _fail("optim.max_grad_norm", o.max_grad_norm, "≥ 0 (0 = no clipping)")
    for key in ("read_loss_weight", "noise_write_weight"):
        weight = getattr(o, key)
        if not (isinstance(weight, int | float) and weight >= 0 and math.isfinite(weight)):
            _fail(f"optim.{key}", weight, "a number ≥ 0")
        if weight:
            _check_read_loss(config, key)
    if o.read_target not in READ_TARGETS:
        _fail("optim.read_target", o.read_target, f"one of {READ_TARGETS}")
    if o.noise_write_mean not in NOISE_WRITE_MEANS:
        _fail("optim.noise_write_mean", o.noise_write_mean, f"one of {NOISE_WRITE_MEANS}")
    if o.noise_write_weight and not m.mechanism_config().write_threshold:
        _fail("optim.noise_write_weight", o.noise_write_weight, "0 unless [model.armt] write_threshold > 0")
    if o.schedule not in SCHEDULES:
        _fail("optim.schedule", o.schedule, f"one of {SCHEDULES}")
    if o.mixed_precision not in PRECISIONS:
        _fail("optim.mixed_precision", o.mixed_precision, f"one of {PRECISIONS}")
    if o.batch_size % o.grad_accum:
        _fail("optim.batch_size", o.batch_size, f"a multiple of optim.grad_accum={o.grad_accum}")


def _check_read_loss(config: TrainConfig, key: str) -> None:
    """optim.read_loss_weight and noise_write_weight name writes by the story's tokens: an ARMT whose every
    position writes, bAbI stories, and one forward pass a segment (gradient checkpointing would record each
    segment twice)."""
    m, weight = config.model, getattr(config.optim, key)
    allowed = (
        "0 here: it needs mechanism 'armt' with [model.armt] writers = 'all', bAbI tasks, no gradient_checkpointing"
    )
    every_position_writes = m.mechanism == "armt" and m.mechanism_config().writers == "all"
    stories = not (config.algorithmic or config.task_names == ["lm"])
    if not every_position_writes or not stories or m.gradient_checkpointing:
        _fail(f"optim.{key}", weight, allowed)


def _validate_mechanism(m: ModelConfig) -> None:
    """The mechanism's name and its knobs (every [model.<mechanism>] table given), each error naming its key."""
    from . import registry

    if not _is_mechanism(m.mechanism):
        _fail("model.mechanism", m.mechanism, f"one of {tuple(registry.MECHANISMS)}")
    if registry.get(m.mechanism).model.decoder_only and m.head != "causal-lm":
        _fail("model.head", m.head, f"'causal-lm' for mechanism {m.mechanism!r} (it needs a decoder)")
    for name in {m.mechanism, *m.knobs}:
        m.mechanism_config(name)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'curriculum.max_steps_per_stage=20' → (['curriculum', 'max_steps_per_stage'], 20); values are TOML."""
    if "=" not in text:
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: a string
    return key.split("."), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a TOML config (or start from the defaults) and apply `section.key=value` overrides."""
    from .errors import InputError

    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            what = "a folder" if Path(path).is_dir() else "not found"
            raise InputError(f"config: {str(path)!r} is {what}; give a training config file (TOML)")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"config: {path} is not valid TOML ({error})") from None
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        keys = key.split(".") if isinstance(key, str) else key
        node = data
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = value
    return config_from_dict(data)


def _items(overrides: list[str] | dict):
    if isinstance(overrides, dict):
        return overrides.items()
    return [(".".join(keys), value) for keys, value in map(parse_override, overrides)]


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, name + ".")
        else:
            flat[name] = value
    return flat
