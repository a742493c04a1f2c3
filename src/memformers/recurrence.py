"""The segment-recurrence driver: the one loop every memory mechanism runs through.

A mechanism supplies `init_state` and `step`; the driver owns cutting into segments, the loop, truncated
back-propagation, gradient checkpointing, gathering logits, the loss, streaming and progress callbacks.

Logits nobody reads are not computed. A small decoder spends most of its time in the LM head (16 × 128 × 30,522
logits per segment for a 3-layer Llama on MiniLM's vocabulary), yet reading a context for generation needs none,
and a question-answering loss needs the few answer positions of the last segment. So the driver tells a mechanism
whose `step` takes `logit_positions` which content positions of a segment need logits (an empty tensor: none), and
the mechanism hands it to the backbone's head (`backbones.run_backbone`). Losses and returned logits are unchanged.
"""

from __future__ import annotations

import inspect
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

    A `step` may also take `logit_positions` ([kept] content positions, empty for none; None: all): the driver then
    passes it where logits are not needed everywhere, and the step returns token logits [batch, kept, vocab] with
    `StepOutput.logit_positions` set, leaving its hidden states and new state as they would be without it.
    """

    content_size: int
    token_level: bool  # logits per token (LM heads) rather than one per sequence (classification)
    causal: bool  # token targets are the next token (decoders)

    def init_state(self, batch_size: int) -> State: ...

    def step(self, segment: Segment, state: State) -> tuple[StepOutput, State]: ...


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


def skips_logits(model: SegmentModel) -> bool:
    """Whether `model.step` takes `logit_positions` (and its `skip_unused_logits` switch, default on, is on)."""
    if not getattr(model, "skip_unused_logits", True):
        return False
    return "logit_positions" in inspect.signature(model.step).parameters


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

    `logit_positions(segment)` says which content positions need logits (None: all); a model whose step cannot
    skip logits (`skips_logits`) computes them all, as does every model when it is not given.
    """
    if bptt_depth is not None and bptt_depth < 0:
        raise ValueError(f"bptt_depth must be None or ≥ 0, got {bptt_depth}")
    if logit_positions is not None and not skips_logits(model):
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


class MemoryModel(nn.Module):
    """Base of every mechanism: the public `forward`/`stream` API on top of the driver.

    Subclasses set `content_size`, `token_level`, `causal` and implement `init_state` and `step`.
    """

    content_size: int
    token_level: bool
    causal: bool
    alignment: Alignment = "left"
    bptt_depth: int | None = None
    gradient_checkpointing: bool = False
    skip_unused_logits: bool = True  # False: the LM head runs on every position (for timing and debugging)
    freeze_backbone: bool = False  # True: only the mechanism's own weights train; the backbone's get no gradient

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of what an optimizer should train: parameters that take gradients, without the
        backbone's when it is frozen."""
        for name, parameter in self.named_parameters():
            if parameter.requires_grad and not (self.freeze_backbone and name.startswith("backbone.")):
                yield name, parameter

    def _take_backbone(self, backbone, segment_size: int, alignment: str, kind: str | None = None, span: int = 1):
        """What every mechanism checks first: a name is loaded, the backbone described, `span` segments of
        `segment_size` positions must fit its window, and the alignment must be known. Returns the backbone."""
        from . import backbones

        if isinstance(backbone, str):
            backbone, _ = backbones.load(backbone)
        self.info = backbones.describe(backbone, kind)
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be an int ≥ 1, got {segment_size!r}")
        limit = self.info.max_positions
        if limit is not None and span * segment_size > limit:
            held = "a segment" if span == 1 else f"{span} segments"
            raise ValueError(
                f"segment_size={segment_size}: {held} span {span * segment_size} positions, more than the backbone's "
                f"{limit}; use segment_size ≤ {limit // span}"
            )
        if alignment not in ("left", "right"):
            raise ValueError(f"alignment must be 'left' or 'right', got {alignment!r}")
        self.segment_size = segment_size
        self.alignment = alignment
        return backbone

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
        if not (self.causal and self.token_level) or type(self).generate_from is MemoryModel.generate_from:
            raise ValueError(f"generate needs a decoder with a causal-LM head, got {self.info.class_name}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int ≥ 1, got {max_new_tokens!r}")

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Save mechanism, backbone and weights to a folder (safetensors + JSON), atomically."""
        from .saving import save_pretrained

        save_pretrained(self, path, tokenizer)
