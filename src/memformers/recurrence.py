"""The segment-recurrence driver: the one loop every memory mechanism runs through.

The driver owns cutting into segments, the loop, truncated back-propagation, gradient checkpointing, gathering
logits, the loss, streaming and progress callbacks. It asks of a model only the shape `SegmentModel` describes
(`content_size`, `token_level`, `causal`, `init_state` and `step`, returning a `StepOutput` and a `State`), so it
knows no mechanism and no config: what a mechanism provides to be one (`MechanismConfig`, `MemoryModel`) is the
mechanism contract in `mechanism.py`, which builds the public API on this loop. This module never imports it.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

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


def state_tensors(state: State) -> dict[str, torch.Tensor] | None:
    """A state's fields by name, to save it (`torch.save`, weights only), where every field is a tensor (ARMT, RMT,
    a segment cache); None where one is not (a kNN store, a memory bank): such a state is not saved. A field that
    is one of the model's parameters (RMT's initial memory) is left out: it is the model's, not the reading's."""
    tensors = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        return None
    return {name: value for name, value in tensors.items() if not isinstance(value, nn.Parameter)}


def restore_state(fresh: S, tensors: dict[str, torch.Tensor]) -> S:
    """`state_tensors` back into a state of `fresh`'s type (a model's `init_state`, which gives the fields left
    out), on its device."""
    moved = {name: value.to(getattr(fresh, name).device) for name, value in tensors.items()}
    return dataclasses.replace(fresh, **moved)


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
