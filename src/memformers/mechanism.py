"""The mechanism contract: what a memory mechanism provides, and the model API every mechanism shares.

A mechanism provides, and nothing more:
- a config: a `MechanismConfig` subclass whose fields are its knobs, checked when it is made (`check_int`,
  `check_choice`); `fixed` says which knobs a saved model keeps, `resizable` which only size a state, `tunable`
  which change what a step computes but no weight (both follow a training config that continues the model);
- a state: a dataclass with `detach()`, `reset(rows)` and `select(rows, other)` (see `recurrence.State`), a value
  that a step never changes (why: `recurrence.py`);
- a model: a `MemoryModel` subclass with `config_class`, an `__init__(backbone, config=None, **knobs)` that calls
  `super().__init__(backbone, config)` and sets `content_size`, `token_level` and `causal`, and
  `init_state(batch_size)` and `step(segment, state, logit_positions=None)` returning a `recurrence.StepOutput`;
  with `generates = True`, also `generate_from(state, prompts, max_new_tokens)`; `decoder_only = False` if it also
  reads encoders; its own parameters exempt from weight decay in `no_weight_decay()`;
- one entry in `registry.py`.

`MemoryModel` turns that step into the public `forward`, `stream`, `read_context` and `generate` through the driver
(`recurrence.py`), which holds the loop and knows a model only by its `SegmentModel` shape. The contract (knobs,
loading the backbone, saving) and the loop change for different reasons, so they live apart; this module imports
the driver, never the other way round.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .recurrence import LogitsMode, ProgressCallback, RecurrentOutput, State, StepOutput, iterate, no_logits, run
from .segments import Alignment, Segment, check_input_ids, split_into_segments


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    """`value` must be an int (not a bool) in [minimum, maximum]; else a ValueError naming `name`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        allowed = f"an int ≥ {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_number(name: str, value: Any, positive: bool = False) -> None:
    """`value` must be a finite int or float (not a bool), above 0 if `positive`; else a ValueError naming `name`."""
    number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not number or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_layers(name: str, value: Any) -> tuple[int, ...]:
    """`value` (a list or tuple of ints; negative counts from the top) as a tuple; else a ValueError naming `name`."""
    layers = tuple(value) if isinstance(value, list) else value
    if not isinstance(layers, tuple) or not layers:
        raise ValueError(f"{name} must name at least one layer, got {value!r}")
    if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers):
        raise ValueError(f"{name} must hold ints, got {value!r}")
    return layers


def resolve_layers(name: str, layers: tuple[int, ...], num_layers: int) -> list[int]:
    """`layers` as distinct indices in [0, num_layers), negative ones counted from the top; else a ValueError."""
    resolved = [layer % num_layers if -num_layers <= layer < num_layers else None for layer in layers]
    if None in resolved or len(set(resolved)) != len(resolved):
        raise ValueError(f"{name} must be distinct layers in [{-num_layers}, {num_layers - 1}], got {layers}")
    return resolved


@dataclass(kw_only=True)
class MechanismConfig:
    """The knobs every mechanism has, the driver's; a mechanism's config adds its own. Each config checks itself
    when made (a `ValueError` naming the knob), so a model, a saved JSON and the trainer's TOML check them alike."""

    # Knobs a saved model keeps when training continues under a new config (they shape weights or layouts), and
    # knobs that follow the new config (only a state's capacity); the others stay as saved. `segment_size` shapes
    # no weight: it always follows the config, the model rebuilt around the same weights.
    fixed: ClassVar[tuple[str, ...]] = ("alignment",)
    resizable: ClassVar[tuple[str, ...]] = ()
    tunable: ClassVar[tuple[str, ...]] = ()
    # What a model saved before a knob existed had instead (its JSON lacks the key): it loads and computes as saved.
    saved_before: ClassVar[dict[str, Any]] = {}

    segment_size: int = 512  # the backbone's input length per segment, memory and special tokens included
    alignment: Alignment = "left"  # "right": every row ends on a full last segment
    bptt_depth: int | None = None  # memory transitions gradients cross; None: all
    gradient_checkpointing: bool = False  # keep only one segment's activations during backward

    def __post_init__(self) -> None:
        check_int("segment_size", self.segment_size, 1)
        check_choice("alignment", self.alignment, ("left", "right"))
        if self.bptt_depth is not None:
            check_int("bptt_depth", self.bptt_depth, 0)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True or False, got {self.gradient_checkpointing!r}")

    def to_dict(self) -> dict:
        """Plain JSON data (tuples as lists): what `save_pretrained` records."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def knobs(cls) -> tuple[str, ...]:
        """The names of this mechanism's own knobs (not the driver's)."""
        common = {f.name for f in dataclasses.fields(MechanismConfig)}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in common)

    @classmethod
    def from_dict(cls, data: dict) -> MechanismConfig:
        """A config from plain data; an unknown key fails naming the allowed ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: not a knob of {cls.__name__}; allowed: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_saved(cls, data: dict) -> MechanismConfig:
        """The config of a saved model: knobs newer than the model take the values it was computed with."""
        return cls.from_dict(cls.saved_before | data)


@functools.cache
def _field_names(config_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(config_class))


class MemoryModel(nn.Module):
    """Base of every mechanism: the public `forward`/`stream`/`generate` API on top of the driver.

    A subclass calls `super().__init__(backbone, config)`, sets `content_size`, `token_level` and `causal`, and
    implements `init_state` and `step` (and `generate_from` when it sets `generates`). Its knobs live in
    `self.config` (a `MechanismConfig`); `model.knob` reads one and `model.knob = value` replaces the config by a
    checked copy.
    """

    config_class: ClassVar[type[MechanismConfig]] = MechanismConfig
    generates: ClassVar[bool] = False  # implements `generate_from` (decoders with a causal-LM head)
    decoder_only: ClassVar[bool] = True  # needs a decoder backbone (RMT also reads encoders)
    content_size: int
    token_level: bool
    causal: bool
    skip_unused_logits: bool = True  # False: the LM head runs on every position (for timing and debugging)
    freeze_backbone: bool = False  # True: only the mechanism's own weights train; the backbone's get no gradient

    def __init__(
        self, backbone=None, config: MechanismConfig | None = None, kind: str | None = None, span: int = 1
    ) -> None:
        """Load `backbone` when it is a name, describe it, and check that `span` segments fit its window (without
        a backbone: a model that computes its steps itself). `config`: the config class's defaults when None."""
        super().__init__()
        from . import backbones

        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ValueError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        if backbone is not None:
            self.backbone, self.info = backbones.take(backbone, config.segment_size, kind, span)

    def _place_memory_tokens(self, decoder_overhead: int, encoder_overhead: int, init_std: float | None = None) -> None:
        """For mechanisms that put `num_memory_tokens` learned embeddings into every segment (RMT, ARMT): fix the
        layout's kind and [CLS]/[SEP] ids in the config, the content each segment leaves, and the embeddings
        (`self.memory`, drawn at `init_std`, or at the scale of the backbone's own when None). Overheads: positions
        a segment spends on anything but content."""
        from . import backbones

        config, name, m = self.config, type(self).__name__, self.config.num_memory_tokens
        if self.info.is_decoder:
            if self.info.head == "classification":
                raise ValueError(
                    f"backbone: a decoder {name} needs a causal-LM or base model, got {self.info.class_name}; its "
                    "sequence-classification head reads the last position, which the memory tokens take"
                )
            overhead = decoder_overhead
            self.config = dataclasses.replace(config, kind="decoder", cls_token_id=None, sep_token_id=None)
        else:
            overhead = encoder_overhead
            cls_id, sep_id = backbones.encoder_special_ids(self.backbone, config.cls_token_id, config.sep_token_id)
            self.config = dataclasses.replace(config, kind="encoder", cls_token_id=cls_id, sep_token_id=sep_id)
        self.content_size = config.segment_size - overhead
        if self.content_size < 1:
            raise ValueError(
                f"segment_size={config.segment_size} leaves no room for content: {self.info.kind} {name} with "
                f"num_memory_tokens={m} uses {overhead} positions per segment; use segment_size ≥ {overhead + 1}"
            )
        if init_std is None:
            init_std = self.backbone.get_input_embeddings().weight.detach().float().std().item()
        self.memory = nn.Parameter(torch.randn(m, self.info.hidden_size) * init_std)

    @classmethod
    def make_config(cls, config: MechanismConfig | None, knobs: dict) -> MechanismConfig:
        """The config a constructor was given: `config`, or one made from keyword knobs (not both)."""
        if config is not None:
            if knobs:
                raise ValueError(f"give either config or keyword knobs, got both (knobs {sorted(knobs)})")
            return config
        return cls.config_class.from_dict(knobs)

    @classmethod
    def from_config(cls, backbone, config: MechanismConfig) -> MemoryModel:
        return cls(backbone, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("config")
            if config is not None and name in _field_names(type(config)):
                return getattr(config, name)
            raise

    def __setattr__(self, name: str, value) -> None:
        config = self.__dict__.get("config")
        if config is not None and name in _field_names(type(config)):
            self.__dict__["config"] = dataclasses.replace(config, **{name: value})  # checked again
        else:
            super().__setattr__(name, value)

    def config_dict(self) -> dict:
        """The knobs, as `save_pretrained` records them."""
        return self.config.to_dict()

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.config_dict().items())

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of what an optimizer should train: parameters that take gradients, without the
        backbone's when it is frozen."""
        for name, parameter in self.named_parameters():
            if parameter.requires_grad and not (self.freeze_backbone and name.startswith("backbone.")):
                yield name, parameter

    def no_weight_decay(self) -> set[str]:
        """Names of parameters an optimizer should not decay besides biases and norms (a mechanism's own say)."""
        return set()

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, length]
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        state: State | None = None,
        logits: LogitsMode | None = None,
        callback: ProgressCallback | None = None,
    ) -> RecurrentOutput:
        """Read the whole input; `out.loss`, `out.logits`, `out.state`. Default logits: all tokens for LM heads."""
        return run(
            self,
            input_ids,
            attention_mask,
            labels,
            state,
            alignment=self.alignment,
            bptt_depth=self.bptt_depth,
            gradient_checkpointing=self.gradient_checkpointing,
            logits=logits or ("all" if self.token_level else "last"),
            callback=callback,
        )

    def stream(
        self,
        segments: Iterable[Segment],
        state: State | None = None,
        batch_size: int = 1,
        callback: ProgressCallback | None = None,
        logits: Literal["all", "none"] = "all",
    ) -> Iterator[tuple[Segment, StepOutput, State]]:
        """Step over segments as they come (e.g. from `stream_segments`): memory does not grow with length.

        `logits="none"` skips the LM head where the mechanism can (token logits are then [batch, 0, vocab]).
        """
        if logits not in ("all", "none"):
            raise ValueError(f"logits must be 'all' or 'none', got {logits!r}")
        if state is None:
            state = self.init_state(batch_size)
        positions = no_logits if logits == "none" and self.token_level else None
        yield from iterate(
            self, segments, state, None, self.bptt_depth, self.gradient_checkpointing, callback, positions
        )

    def read_context(
        self,
        input_ids: torch.Tensor,  # [batch, length] a long context
        attention_mask: torch.Tensor | None = None,
        state: State | None = None,
        callback: ProgressCallback | None = None,
    ) -> tuple[State, list[torch.Tensor]]:
        """Read every segment but each row's last into the state; return it with those last segments (the prompts).

        What generation starts from, for every mechanism: the prompt is the row's last segment as the driver cuts
        it, so a model generates from the same kind of segment it was trained to answer in.
        """
        attention_mask = check_input_ids(input_ids, attention_mask)
        segments = split_into_segments(input_ids, self.content_size, attention_mask, None, self.alignment)
        return self.read_segments(segments, state, input_ids.shape[0], callback)

    def read_segments(
        self,
        segments: Iterable[Segment],
        state: State | None = None,
        batch_size: int = 1,
        callback: ProgressCallback | None = None,
    ) -> tuple[State, list[torch.Tensor]]:
        """`read_context` for segments as they come (e.g. from `stream_segments`), in memory O(one segment).

        Each segment must say which rows end in it (`is_last`); those rows' segments are held back as prompts.
        """
        prompts: list[torch.Tensor | None] = [None] * batch_size
        if state is None:
            state = self.init_state(batch_size)

        def reading():  # rows on their prompt segment are inactive: the driver keeps their state
            for segment in segments:
                if segment.is_last is None or segment.batch_size != batch_size:
                    raise ValueError(
                        f"segments must carry is_last and {batch_size} rows (batch_size), got is_last="
                        f"{segment.is_last} and {segment.batch_size} rows"
                    )
                for row in segment.is_last.nonzero().flatten().tolist():
                    prompts[row] = segment.input_ids[row][segment.attention_mask[row].bool()]
                rows = segment.active & ~segment.is_last
                if bool(rows.any()):
                    yield Segment(segment.input_ids, segment.attention_mask * rows[:, None], None, segment.index)

        read = state
        positions = no_logits if self.token_level else None  # reading needs the state, not the logits
        for _, _, read in iterate(self, reading(), state, None, None, False, callback, positions):
            pass
        missing = [row for row, prompt in enumerate(prompts) if prompt is None]
        if missing:
            raise ValueError(f"segments: rows {missing} never reached their last segment (is_last)")
        return read, prompts

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # [batch, length] the long context
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        state: State | None = None,
        callback: ProgressCallback | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:  # [batch, new tokens]
        """Read a long context (every segment but each row's last, continuing `state`), then generate from each
        row's last segment with what was read. Keyword arguments go to the mechanism's `generate_from`; returns
        only the new tokens."""
        self._check_generation(max_new_tokens)
        state, prompts = self.read_context(input_ids, attention_mask, state, callback)
        return self.generate_from(state, prompts, max_new_tokens, **generate_kwargs)

    @torch.no_grad()
    def generate_streamed(
        self,
        segments: Iterable[Segment],
        batch_size: int = 1,
        callback: ProgressCallback | None = None,
        max_new_tokens: int = 32,
        **generate_kwargs,
    ) -> torch.Tensor:  # [batch, new tokens]
        """`generate` on a context that arrives as segments (`read_segments`) and is never held whole."""
        self._check_generation(max_new_tokens)
        state, prompts = self.read_segments(segments, None, batch_size, callback)
        return self.generate_from(state, prompts, max_new_tokens, **generate_kwargs)

    def generate_from(
        self, state: State, prompts: list[torch.Tensor], max_new_tokens: int = 32, **generate_kwargs
    ) -> torch.Tensor:  # [batch, new tokens]
        """Generate from each row's prompt (its last segment) behind the state read before it: per mechanism."""
        raise NotImplementedError(f"{type(self).__name__} does not generate")

    def _check_generation(self, max_new_tokens: int) -> None:
        if not (self.generates and self.causal and self.token_level):
            raise ValueError(f"generate needs a decoder with a causal-LM head, got {self.info.class_name}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}")

    def save_pretrained(self, path, tokenizer=None, dtype: str | None = None) -> None:
        """Save mechanism, backbone and weights to a folder (safetensors + JSON), atomically; `dtype="float16"`
        stores them at half the size."""
        from .saving import save_pretrained

        save_pretrained(self, path, tokenizer, dtype=dtype)
