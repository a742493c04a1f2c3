"""The segment-recurrence driver (the one loop every memory mechanism runs through) and the mechanism contract.

The driver owns cutting into segments, the loop, truncated back-propagation, gradient checkpointing, gathering
logits, the loss, streaming and progress callbacks. A mechanism provides, and nothing more:
- a config: a `MechanismConfig` subclass whose fields are its knobs, checked when it is made; `fixed` and
  `resizable` say which knobs a saved model keeps and which only size a state;
- a state: a dataclass with `detach()`, `reset(rows)` and `select(rows, other)` (see `State`);
- a model: a `MemoryModel` subclass with `config_class`, an `__init__(backbone, config=None, **knobs)` that calls
  `super().__init__(backbone, config)` and sets `content_size`, `token_level` and `causal`, and
  `init_state(batch_size)` and `step(segment, state, logit_positions=None)`; with `generates = True`, also
  `generate_from(state, prompts, max_new_tokens)`; `decoder_only = False` if it also reads encoders; its own
  parameters exempt from weight decay in `no_weight_decay()`;
- one entry in `registry.py`.

States are values: a step returns a new state and never changes the one it was given. Then recomputing a step
during backward (gradient checkpointing) reads exactly what it read the first time, and gives the same loss,
gradients and state, with no special case in the driver. (The alternative, a declared "mutates in place" contract,
would need the driver to snapshot states around recomputation: the same copy, made far from the state it copies.)

Logits nobody reads are not computed. A small decoder spends most of its time in the LM head (16 × 128 × 30,522
logits per segment for a 3-layer Llama on MiniLM's vocabulary), yet reading a context for generation needs none,
and a question-answering loss needs the few answer positions of the last segment. So the driver tells a step
which content positions of a segment need logits (`logit_positions`, an empty tensor: none), and the mechanism
hands it to the backbone's head (`backbones.run_backbone`), saying in `StepOutput.logit_positions` which positions
it computed (None: all). Losses and returned logits are unchanged.

A frozen backbone (`freeze_backbone`) runs with its weights detached: gradients pass through it to the mechanism's
own weights, never into the backbone's, and its `requires_grad` flags stay the user's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .segments import IGNORE_INDEX, Alignment, Segment, check_input_ids, shift_labels, split_into_segments

LogitsMode = Literal["all", "last", "labelled", "none"]
LOGITS_MODES = ("all", "last", "labelled", "none")
S = TypeVar("S", bound="State")


class State(Protocol):
    """What flows from segment to segment. Every mechanism's state is a dataclass with these three methods."""

    def detach(self: S) -> S:
        """The same state cut from the graph (truncated back-propagation)."""

    def reset(self: S, rows: torch.Tensor) -> S:
        """Rows where `rows` [batch] is True start afresh (a new document); the others are kept."""

    def select(self: S, rows: torch.Tensor, other: S) -> S:
        """This state where `rows` [batch] is True, `other` elsewhere (rows with nothing in a segment)."""


@dataclass
class StepOutput:
    """What a mechanism returns for one segment, aligned with `segment.input_ids`."""

    logits: torch.Tensor | None = None  # [batch, length, vocab] per token, or [batch, classes] per sequence
    hidden: torch.Tensor | None = None  # [batch, length, hidden] last-layer states of the content tokens
    # The content positions [kept] that token `logits` cover when the driver asked for only some (`logits` is then
    # [batch, kept, vocab]); None: every position.
    logit_positions: torch.Tensor | None = None


@dataclass
class RecurrentOutput:
    """The result of reading a whole long input."""

    loss: torch.Tensor | None
    logits: torch.Tensor | None  # "all": [batch, length, vocab] at input positions; "last": last segment's;
    # "labelled": last segment's, zeros where no row of it has a label
    state: object
    num_segments: int


class SegmentModel(Protocol):
    """A memory mechanism: a state and a step. `content_size` tokens of input per segment.

    `logit_positions` ([kept] content positions, empty for none; None: all) says where token logits are needed: a
    step returns token logits [batch, kept, vocab] with `StepOutput.logit_positions` set to them, or all of them
    with it None (a step that cannot skip); its hidden states and new state are the same either way.
    """

    content_size: int
    token_level: bool  # logits per token (LM heads) rather than one per sequence (classification)
    causal: bool  # token targets are the next token (decoders)

    def init_state(self, batch_size: int) -> State: ...

    def step(
        self, segment: Segment, state: State, logit_positions: torch.Tensor | None = None
    ) -> tuple[StepOutput, State]: ...


ProgressCallback = Callable[[int, int | None, int], None]  # (segments done, total or None, tokens done)


def detach_before(index: int, num_segments: int | None, bptt_depth: int | None) -> bool:
    """Whether the state entering segment `index` (0-based) is cut from the graph.

    `bptt_depth=k` lets gradients cross at most k memory transitions: segments run in windows of k+1 whose
    first state is detached. Windows are counted back from the last segment when the count is known, so the last
    segment (where a classification loss sits) always gets the full depth; from the first when streaming.
    `None` back-propagates through every segment; `0` through none.
    """
    if bptt_depth is None or index == 0:
        return False
    if num_segments is None:
        return index % (bptt_depth + 1) == 0
    return (num_segments - 1 - index) % (bptt_depth + 1) == bptt_depth


LogitPositions = Callable[[Segment], "torch.Tensor | None"]  # a segment → its content positions needing logits


def no_logits(segment: Segment) -> torch.Tensor:  # [0]
    """No position needs logits (reading context, throughput runs)."""
    return torch.zeros(0, dtype=torch.long, device=segment.input_ids.device)


def run_step(
    model: SegmentModel,
    segment: Segment,
    state: State,
    gradient_checkpointing: bool,
    logit_positions: torch.Tensor | None = None,  # [kept] content positions; None: all
):
    """One step, recomputed during backward when checkpointing (only one segment's activations kept); with a
    frozen backbone (`freeze_backbone`), gradients pass through the backbone but never reach its weights."""
    kwargs = {} if logit_positions is None else {"logit_positions": logit_positions}
    step = model.step
    if getattr(model, "freeze_backbone", False) and torch.is_grad_enabled():
        step = _FrozenBackboneStep(model)
    if gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(step, segment, state, use_reentrant=False, **kwargs)
    return step(segment, state, **kwargs)


class _FrozenBackboneStep:
    """`model.step` with the backbone's weights cut from the graph for the duration of the call (its flags, hooks and
    methods untouched)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, segment: Segment, state: State, **kwargs):
        weights = {f"model.backbone.{name}": p.detach() for name, p in self.model.backbone.named_parameters()}
        return torch.func.functional_call(_StepAsForward(self.model), weights, (segment, state), kwargs)


class _StepAsForward(nn.Module):
    """A view of a mechanism whose `forward` is its `step` (what `functional_call` calls)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, segment: Segment, state: State, **kwargs):
        return self.model.step(segment, state, **kwargs)


def iterate(
    model: SegmentModel,
    segments: Iterable[Segment],
    state: State,
    num_segments: int | None = None,
    bptt_depth: int | None = None,
    gradient_checkpointing: bool = False,
    callback: ProgressCallback | None = None,
    logit_positions: LogitPositions | None = None,
) -> Iterator[tuple[Segment, StepOutput, State]]:
    """The loop. Yields each segment with its output and the state after it; holds nothing else.

    `logit_positions(segment)` says which content positions need logits (None: all); every position gets them when
    it is not given or the model's `skip_unused_logits` switch is off.
    """
    if bptt_depth is not None and bptt_depth < 0:
        raise ValueError(f"bptt_depth must be None or ≥ 0, got {bptt_depth}")
    if not getattr(model, "skip_unused_logits", True):
        logit_positions = None
    tokens = 0
    for segment in segments:
        if detach_before(segment.index, num_segments, bptt_depth):
            state = state.detach()
        positions = None if logit_positions is None else logit_positions(segment)
        output, new_state = run_step(model, segment, state, gradient_checkpointing, positions)
        active = segment.active
        state = new_state if bool(active.all()) else new_state.select(active, state)
        tokens += int(segment.attention_mask.sum())
        if callback is not None:
            callback(segment.index + 1, num_segments, tokens)
        yield segment, output, state


def run(
    model: SegmentModel,
    input_ids: torch.Tensor,  # [batch, length]
    attention_mask: torch.Tensor | None = None,  # [batch, length]
    labels: torch.Tensor | None = None,  # [batch, length] token targets or [batch] class ids
    state: State | None = None,
    alignment: Alignment = "left",
    bptt_depth: int | None = None,
    gradient_checkpointing: bool = False,
    logits: LogitsMode = "all",
    callback: ProgressCallback | None = None,
) -> RecurrentOutput:
    """Read a whole batch of long inputs segment by segment; the loss and logits the user asked for.

    Token labels (same shape as `input_ids`, `-100` = ignored) give a cross-entropy over all segments, shifted
    across segment boundaries for decoders; class labels ([batch]) a cross-entropy on each row's last segment.
    `logits`: "all" (token heads: every input position), "last" (each row's last segment), "labelled" (the last
    segment's logits where some row of it has a label, zeros elsewhere: enough to score answers, and the LM head
    runs on labelled positions only) or "none". Token logits are computed only where the loss or the returned
    logits read them; the loss is the same either way.
    """
    attention_mask = check_input_ids(input_ids, attention_mask)
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
    token_labels = class_labels = None
    if labels is not None:
        if labels.dtype.is_floating_point:
            raise ValueError(f"labels must hold integer ids, got dtype {labels.dtype}")
        if labels.dim() == 1:
            if model.token_level:
                raise ValueError(
                    "labels: class labels [batch] need a sequence-classification backbone; this model predicts "
                    "tokens, so give token labels [batch, length]"
                )
            if labels.shape[0] != input_ids.shape[0]:
                raise ValueError(f"labels must have {input_ids.shape[0]} rows, got {labels.shape[0]}")
            class_labels = labels
        else:
            if not model.token_level:
                raise ValueError(
                    "labels: token labels [batch, length] need a token-level head (masked or causal LM); this "
                    "model classifies sequences, so give class labels [batch]"
                )
            token_labels = shift_labels(labels, attention_mask) if model.causal else labels
    if logits == "labelled" and model.token_level and token_labels is None:
        raise ValueError("logits='labelled' returns the logits at labelled positions, so it needs token labels")
    if logits == "labelled" and not model.token_level:
        logits = "last"  # a sequence head has one logit vector per row
    segments = split_into_segments(input_ids, model.content_size, attention_mask, token_labels, alignment)
    if state is None:
        state = model.init_state(input_ids.shape[0])

    loss_sum = torch.zeros((), device=input_ids.device)
    loss_count = 0
    kept: list[tuple[Segment, torch.Tensor]] = []
    final_logits: torch.Tensor | None = None  # per row, the logits of its last segment
    final_state = state
    needed = None
    if model.token_level and logits != "all":

        def needed(segment: Segment) -> torch.Tensor | None:  # [kept] content positions, None: all
            if logits == "last" and segment.is_last is not None and bool(segment.is_last.any()):
                return None
            if token_labels is None:
                return no_logits(segment)
            labelled = (segment.labels != IGNORE_INDEX) & (segment.attention_mask != 0)  # [batch, n]
            columns = labelled.any(dim=0)  # [n]
            return None if bool(columns.all()) else columns.nonzero().flatten()

    for segment, output, final_state in iterate(
        model, segments, state, len(segments), bptt_depth, gradient_checkpointing, callback, needed
    ):
        out = output.logits
        if out is None:
            continue
        positions = output.logit_positions  # [kept] or None (all)
        if token_labels is not None:
            targets = segment.labels.masked_fill(segment.attention_mask == 0, IGNORE_INDEX)
            if positions is not None:
                targets = targets[:, positions]  # [batch, kept]
            loss_sum = loss_sum + F.cross_entropy(
                out.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            loss_count += int((targets != IGNORE_INDEX).sum())
        if logits == "all" and model.token_level:
            kept.append((segment, out))
        last = segment.is_last
        if last is not None and bool(last.any()) and (logits != "none" or class_labels is not None):
            if positions is not None:  # "labelled": zeros where no logits were computed
                out = out.new_zeros(*segment.input_ids.shape, out.shape[-1]).index_copy(1, positions, out)
            final_logits = _take_rows(final_logits, out, last)

    loss = None
    if token_labels is not None:
        loss = loss_sum / max(loss_count, 1)
    if class_labels is not None:
        loss = F.cross_entropy(final_logits.float(), class_labels)
    if logits == "all" and model.token_level:
        gathered = _reassemble(kept, attention_mask)
    elif logits == "none":
        gathered = None
    else:
        gathered = final_logits
    return RecurrentOutput(loss=loss, logits=gathered, state=final_state, num_segments=len(segments))


def _take_rows(current: torch.Tensor | None, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`new` in the rows marked, `current` elsewhere; token logits are padded to a common length."""
    if current is None:
        current = torch.zeros_like(new)
    if new.dim() == 3 and new.shape[1] != current.shape[1]:
        width = max(new.shape[1], current.shape[1])
        new, current = (F.pad(t, (0, 0, 0, width - t.shape[1])) for t in (new, current))
    mask = rows.view(-1, *([1] * (new.dim() - 1)))
    return torch.where(mask, new, current)


def _reassemble(
    kept: list[tuple[Segment, torch.Tensor]], attention_mask: torch.Tensor
) -> torch.Tensor:  # [batch, length, vocab]
    """Put per-segment token logits back at their rows' input positions (zeros at padding)."""
    batch, length = attention_mask.shape
    vocab = kept[0][1].shape[-1]
    out = kept[0][1].new_zeros(batch, length, vocab)
    for row in range(batch):
        pieces = [logits[row][segment.attention_mask[row].bool()] for segment, logits in kept]
        out[row, attention_mask[row].bool()] = torch.cat(pieces)
    return out


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


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(kw_only=True)
class MechanismConfig:
    """The knobs every mechanism has, the driver's; a mechanism's config adds its own. Each config checks itself
    when made (a `ValueError` naming the knob), so a model, a saved JSON and the trainer's TOML check them alike."""

    # Knobs a saved model keeps when training continues under a new config (they shape weights or segments), and
    # knobs that follow the new config (only a state's capacity); the others stay as saved.
    fixed: ClassVar[tuple[str, ...]] = ("segment_size", "alignment")
    resizable: ClassVar[tuple[str, ...]] = ()

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

    def _place_memory_tokens(self, decoder_overhead: int, encoder_overhead: int) -> None:
        """For mechanisms that put `num_memory_tokens` learned embeddings into every segment (RMT, ARMT): fix the
        layout's kind and [CLS]/[SEP] ids in the config, the content each segment leaves, and the embeddings
        (`self.memory`, drawn at the scale of the backbone's own). Overheads: positions a segment spends on
        anything but content."""
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
        embeddings = self.backbone.get_input_embeddings().weight
        self.memory = nn.Parameter(torch.randn(m, self.info.hidden_size) * embeddings.detach().float().std())

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
